"""LoRA-GA (low-rank adaptation with gradient approximation, Wang et al. 2024):
adapters started along the singular directions of the full fine-tuning
gradient, as PEFT's ``init_lora_weights="lora_ga"``::

    config = lorac.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                              lora_ga_config=lorac.LoraGAConfig())
    def train_step():
        for x, y in batches:
            loss_fn(model(x), y)
            model.backward(loss_fn.backward())
    lorac.preprocess_loraga(model, config, train_step)
    lorac.get_peft_model(model, config)

What it computes (PEFT 0.21's ``peft.tuners.lora.loraga`` and
``lora_ga_init``):

- ``preprocess_loraga`` makes only the target layers' weights trainable,
  runs ``train_step`` in training mode, and keeps each weight's gradient
  summed over the calls divided by the number of backward passes through
  the layer: G (out, in).
- The SVD ``G = U S V^T`` (its 2r leading directions) gives the factors;
  ``direction`` picks which go to A and which to B: "ArB2r" (default) A =
  V[:, :r]^T, B = U[:, r:2r] S[r:2r]; "A2rBr" A = V[:, r:2r]^T, B = U[:, :r]
  S[:r]; "ArBr" A the odd, B the even of the 2r; "random" the same r
  random ones for both.
- ``scale``: "stable" multiplies B by out^(1/4) / sqrt(stable_gamma);
  "weight_svd" by the top singular value of W over B's first S;
  "gd_scale" divides both by the scaling; "unit" leaves them.
- ``get_peft_model`` starts each adapter at those factors and replaces the
  base weight by the residual ``W - s B A`` (the model computes what it
  did; its saved base weight is the residual -- see PiSSA).

Unlike PEFT, the SVD is exact (PEFT's is the randomized svd_lowrank) and
each direction's sign is fixed (the largest entry of each column of U
positive), the run's gradients of the target weights start from zero
(PEFT adds to any gradient already there), 2r > min(in, out) is refused
up front, and a layer without prepared gradients is an error in
get_peft_model (PEFT falls back to the default init, a path it needs for
loading).  ``cache_file`` stores the gradients as safetensors; lorac reads
its own and PEFT's (``torch.save``) files.
"""

import numbers
import os
from dataclasses import dataclass

import numpy as np

from ..checkpoint import load, save
from ..module import Module
from ._prepared import attach, config_ranks, plain_linear_targets, prepared_data, stored_entry
from .subconfig import sub_config

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGAConfig:
    """PEFT's LoraGAConfig: direction (which singular directions of the gradient go to A and
    to B), scale (how B, A are scaled), stable_gamma (for scale="stable")."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"LoraGAConfig: direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale not in SCALES:
            raise ValueError(f"LoraGAConfig: scale must be one of {SCALES}, got {self.scale!r}")
        gamma = self.stable_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not np.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"LoraGAConfig: stable_gamma must be a number > 0, got {gamma!r}")


def preprocess_loraga(model, lora_config, train_step, cache_file=None):
    """Estimate each target layer's weight gradient (module docstring) and leave it on the
    layer for ``get_peft_model(model, lora_config)``.

    lora_config: the lorac.LoraConfig get_peft_model will take (its target
    fields, r, rank_pattern and lora_ga_config, which must be set).
    train_step(): runs forward and backward passes (the loss is the
    caller's); not needed when ``cache_file`` exists.  Every parameter's
    requires_grad, the target weights' gradients and the model's mode come
    back afterwards, also when train_step raises."""
    from .peft_model import LoraConfig

    func = "preprocess_loraga"
    if not isinstance(model, Module):
        raise TypeError(f"{func}: model must be a lorac.Module, got {type(model).__name__}")
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"{func}: lora_config must be a lorac.LoraConfig, got {type(lora_config).__name__}")
    if sub_config(lora_config.lora_ga_config, LoraGAConfig, "lora_ga_config", func) is None:
        raise ValueError(f"{func}: LoRA-GA needs LoraConfig(init_lora_weights='lora_ga', "
                         "lora_ga_config=lorac.LoraGAConfig(...))")
    targets = plain_linear_targets(model, lora_config, func, "LoRA-GA")
    check_ranks(targets, config_ranks(targets, lora_config), func)
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        grads = _read_cache(cache_file, targets, func)
    else:
        if train_step is None or not callable(train_step):
            raise ValueError(f"{func}: train_step (a function running forward and backward passes) is required "
                             "when cache_file does not exist yet")
        grads = _estimate(model, targets, train_step, func)
        if cache_file is not None:
            save({f"{path}._peft_loraga_grad": grad for path, grad in grads.items()}, cache_file)
    for path, layer in targets:
        attach(layer, "lora_ga", grads[path])


def check_ranks(targets, ranks, func):
    for path, layer in targets:
        if 2 * ranks[path] > min(layer.in_features, layer.out_features):
            raise ValueError(f"{func}: layer {path!r} ({layer.in_features} -> {layer.out_features}): LoRA-GA's rank "
                             f"{ranks[path]} takes 2r = {2 * ranks[path]} singular directions of its gradient, more "
                             "than min(in, out)")


def _estimate(model, targets, train_step, func):
    """{path: mean weight gradient (stored layout), float64} from running train_step."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    weights = [layer.weight for _, layer in targets]
    saved_grads = [w.grad for w in weights]
    counts = {path: 0 for path, _ in targets}
    training = model.training
    try:
        for p in params:
            p.requires_grad = False
        for w in weights:
            w.requires_grad = True
            w.grad = None
        for path, layer in targets:
            layer.__dict__["backward"] = _counting(layer, path, counts)
        model.train()
        train_step()
        grads = {path: layer.weight.grad for path, layer in targets}
    finally:
        for _, layer in targets:
            layer.__dict__.pop("backward", None)
        for w, grad in zip(weights, saved_grads):
            w.grad = grad
        for p, flag in zip(params, flags):
            p.requires_grad = flag
        model.train(training)
    silent = [path for path, count in counts.items() if count == 0 or grads[path] is None]
    if silent:
        raise ValueError(f"{func}: layers {silent} had no backward pass while train_step ran; LoRA-GA needs a "
                         "gradient for every target layer")
    out = {}
    for path, grad in grads.items():
        grad = grad.astype(np.float64) / counts[path]
        if not np.isfinite(grad).all():
            raise ValueError(f"{func}: the gradient of layer {path!r} holds NaN or infinite values")
        out[path] = grad
    return out


def _counting(layer, path, counts):
    """layer's own backward, counting its calls (an instance attribute shadowing the method)."""
    backward = type(layer).backward.__get__(layer)

    def counted(grad_output):
        counts[path] += 1
        return backward(grad_output)
    return counted


def _read_cache(cache, targets, func):
    stored = load(cache)
    where = f"cache_file {os.fspath(cache)!r}"
    return {path: stored_entry(stored, f"{path}._peft_loraga_grad", layer.weight.data.shape, where, func,
                               hint="; build it with the same model")
            for path, layer in targets}


def loraga_grads(model, config, func):
    """{path: gradient} of the layers get_peft_model's LoRA-GA init adapts, checked (before anything changes)."""
    grads = prepared_data(model, config, func, "lora_ga", "LoRA-GA", "gradients",
                          "preprocess_loraga(model, config, train_step)")
    targets = [(path, model.get_submodule(path)) for path in grads]
    check_ranks(targets, config_ranks(targets, config), func)
    return grads


def loraga_factors(layer, grad, ga_config, rng):
    """(lora_A (r, in), lora_B (out, r)) of an injected rank-r layer from its gradient (module docstring)."""
    g = grad.T if layer.fan_in_fan_out else grad                      # (out, in)
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    r = layer.r
    u, s, vt = u[:, :2 * r], s[:2 * r], vt[:2 * r]
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    u, vt = u * signs, vt * signs[:, None]
    if ga_config.direction == "ArBr":
        a_rows, b_cols = np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2)
    elif ga_config.direction == "A2rBr":
        a_rows, b_cols = np.arange(r, 2 * r), np.arange(r)
    elif ga_config.direction == "ArB2r":
        a_rows, b_cols = np.arange(r), np.arange(r, 2 * r)
    else:   # "random"
        a_rows = b_cols = rng.permutation(2 * r)[:r]
    lora_a = vt[a_rows]
    lora_b = u[:, b_cols] * s[b_cols]
    s_b = s[b_cols]
    if ga_config.scale == "stable":
        lora_b = lora_b * (g.shape[0] ** 0.25 / ga_config.stable_gamma ** 0.5)
    elif ga_config.scale == "weight_svd":
        w = layer.weight.data.astype(np.float64)
        if s_b[0] > 0:
            lora_b = lora_b * (np.linalg.norm(w, 2) / s_b[0])
    elif ga_config.scale == "gd_scale":
        lora_a, lora_b = lora_a / layer.scaling, lora_b / layer.scaling
    return lora_a, lora_b

"""CorDA (context-oriented decomposition adaptation, Yang et al. 2024): LoRA
factors from the SVD of each weight times the covariance of its inputs, as
PEFT's ``init_lora_weights="corda"``::

    config = lorac.LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights="corda",
                              corda_config=lorac.CordaConfig(corda_method="kpm"))
    lorac.preprocess_corda(model, config, run_model=lambda: [model(x) for x in batches])
    lorac.get_peft_model(model, config)

What it computes (PEFT 0.21's ``peft.tuners.lora.corda``, step for step):

- ``preprocess_corda`` runs ``run_model`` with a forward hook on each target
  Linear layer.  Each call adds ``X^T X`` of the layer's input rows X
  (flattened over the leading dimensions), X first divided by
  ``|max(X)|``; the covariance C is that sum over the number of calls.
- C is damped, ``C + d * mean(diag(C)) * I`` with d = 0.01 doubled until
  the inverse checks to within 0.05 (Frobenius norm of ``C C^-1 - I``).
- The SVD ``W C = U S V'^T`` gives ``V = C^-1 V'``; mode "ipm"
  (instruction-previewed) keeps the r largest directions, "kpm"
  (knowledge-preserved) the r smallest, r the layer's rank (rank_pattern).
- ``get_peft_model`` then starts each adapter at ``lora_A = sqrt(S / s) V^T``
  and ``lora_B = U sqrt(S / s)`` (s the scaling) and replaces the base
  weight by the residual ``W - s B A``: the model computes what it did
  (up to rounding), but its saved base weight is the residual, as with
  PiSSA -- keep the pretrained weights if you need them.

``corda_config.cache_file`` stores the cropped factors and
``covariance_file`` the covariances, to be reused; lorac writes them as
safetensors and reads its own or PEFT's (``torch.save``) files.  Unlike
PEFT, lorac works in float64 (``use_float16_for_covariance`` keeps the sums
in float32, half the memory), puts back the hooked model's train/eval mode,
and refuses a rank above min(in, out) with a clear error.
``prune_temporary_fields`` is accepted: lorac keeps nothing temporary on
the layers.
"""

import os
from collections import namedtuple
from dataclasses import dataclass

import numpy as np

from ..checkpoint import load, save
from ..module import Module
from ._prepared import attach, config_ranks, plain_linear_targets, prepared_data, stored_entry
from .subconfig import sub_config
from .targets import layer_kind

# The cropped factors of one layer: S (r,), U (out, r), V (in, r), float64.
CordaEigens = namedtuple("CordaEigens", ["S_WC", "U_WC", "V_WC"])
METHODS = ("ipm", "kpm")


@dataclass
class CordaConfig:
    """PEFT's CordaConfig: cache_file / covariance_file (paths or None) to store and
    reuse the factors / the covariances; corda_method "ipm" or "kpm";
    verbose: a progress bar; use_float16_for_covariance: lower-precision
    sums (float32 in lorac); prune_temporary_fields (nothing to prune in lorac)."""

    cache_file: str = None
    covariance_file: str = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self):
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"CordaConfig: {name} must be a path or None, got {type(value).__name__}")
        if self.corda_method not in METHODS:
            raise ValueError(f"CordaConfig: corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"CordaConfig: {name} must be True or False, got {getattr(self, name)!r}")


def preprocess_corda(model, lora_config, run_model=None, hooked_model=None):
    """Compute each target layer's CorDA factors (module docstring) and leave them on
    the layer for ``get_peft_model(model, lora_config)``.

    lora_config: the lorac.LoraConfig get_peft_model will take (its
    target_modules, exclude_modules, layers_to_transform, r, rank_pattern
    and corda_config).  run_model(): runs the calibration data through the
    model (not needed when the cache or covariance file exists).
    hooked_model: the model to hook instead (same layer paths), e.g. a copy.
    Everything is checked, and the data run, before any layer takes its factors."""
    from .peft_model import LoraConfig

    func = "preprocess_corda"
    for what, value in (("model", model), ("hooked_model", hooked_model)):
        if (value is not None or what == "model") and not isinstance(value, Module):
            raise TypeError(f"{func}: {what} must be a lorac.Module, got {type(value).__name__}")
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"{func}: lora_config must be a lorac.LoraConfig, got {type(lora_config).__name__}")
    corda = sub_config(lora_config.corda_config, CordaConfig, "corda_config", func) or CordaConfig()
    targets = plain_linear_targets(model, lora_config, func, "CorDA")
    ranks = _ranks(targets, lora_config, func)
    cache = corda.cache_file
    if cache is not None and os.path.exists(cache) and os.path.getsize(cache) > 0:
        eigens = _read_cache(cache, targets, ranks, func)
    else:
        covariances = _covariances(model, targets, lora_config, corda, run_model, hooked_model, func)
        eigens = {path: _crop(_layer_eigens(path, layer, covariances[path]), ranks[path], corda.corda_method)
                  for path, layer in _progress(targets, corda.verbose)}
        if cache is not None:
            save({f"{path}.eigens.{field}": value for path, e in eigens.items()
                  for field, value in e._asdict().items()}, cache)
    for path, layer in targets:
        attach(layer, "corda", eigens[path])


def _ranks(targets, config, func):
    ranks = config_ranks(targets, config)
    for path, layer in targets:
        if ranks[path] > min(layer.in_features, layer.out_features):
            raise ValueError(f"{func}: layer {path!r} ({layer.in_features} -> {layer.out_features}) cannot take "
                             f"CorDA's rank {ranks[path]} > min(in, out)")
    return ranks


def _covariances(model, targets, config, corda, run_model, hooked_model, func):
    """{path: float64 (in, in) covariance}: from covariance_file if it exists, else by running the data."""
    path_file = corda.covariance_file
    if path_file is not None and os.path.exists(path_file) and os.path.getsize(path_file) > 0:
        stored = load(path_file)
        where = f"covariance_file {os.fspath(path_file)!r}"
        return {path: stored_entry(stored, path, (layer.in_features, layer.in_features), where, func,
                                   entry=f"for layer {path!r}")
                for path, layer in targets}
    if run_model is None or not callable(run_model):
        raise ValueError(f"{func}: run_model (a function running the calibration data) is required when "
                         "corda_config's cache_file and covariance_file do not exist yet")
    hooked = model if hooked_model is None else hooked_model
    dtype = np.float32 if corda.use_float16_for_covariance else np.float64
    sums = {path: _CovarianceSum(path, layer.in_features, dtype) for path, layer in targets}
    hooked_modules = dict(hooked.named_modules())
    missing = [p for p in sums if layer_kind(hooked_modules.get(p)) != "linear"]
    if missing:
        raise ValueError(f"{func}: hooked_model has no Linear layers at {missing}")
    handles = []
    training = hooked.training
    hooked.eval()
    try:
        for path, summed in sums.items():
            handles.append(hooked_modules[path].register_forward_hook(summed))
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(training)
    silent = [path for path, summed in sums.items() if summed.count == 0]
    if silent:
        raise ValueError(f"{func}: layers {silent} received no input while run_model ran; CorDA needs every "
                         "target layer on the forward path")
    covariances = {path: summed.total.astype(np.float64) / summed.count for path, summed in sums.items()}
    if path_file is not None:
        save(covariances, path_file)
    return covariances


class _CovarianceSum:
    """A forward hook: the sum over calls of X^T X, X the input rows scaled by 1 / |max(X)| (PEFT's)."""

    def __init__(self, path, in_features, dtype):
        self.path = path
        self.total = np.zeros((in_features, in_features), dtype)
        self.count = 0

    def __call__(self, module, args, output):
        x = np.asarray(args[0])
        x = x.reshape(-1, x.shape[-1]).astype(self.total.dtype)
        top = np.abs(x.max()) if x.size else 0.0
        if x.size == 0 or top == 0 or not np.isfinite(x).all():
            raise ValueError(f"preprocess_corda: layer {self.path!r}: its input is empty, has maximum 0 (CorDA "
                             "divides it by |max|) or is not finite")
        x = x / top
        self.total += x.T @ x
        self.count += 1


def _layer_eigens(path, layer, covariance):
    """The full CordaEigens of a layer: S (m,), U (out, m), V (in, m), m = min(in, out), float64."""
    w = layer.weight.data.astype(np.float64)
    w = w.T if layer.fan_in_fan_out else w            # (out, in)
    size = covariance.shape[0]
    damp = 0.01
    while True:
        fixed = covariance + np.eye(size) * np.mean(np.diag(covariance)) * damp
        try:
            inverse = np.linalg.inv(fixed)
        except np.linalg.LinAlgError:
            inverse = None
        if inverse is not None and np.linalg.norm(fixed @ inverse - np.eye(size)) < 0.05:
            break
        if damp > 1e6:
            raise ValueError(f"preprocess_corda: the covariance of layer {path!r}'s inputs cannot be inverted "
                             "even damped; give more (varied) calibration data")
        damp *= 2
    u, s, vt = np.linalg.svd(w @ fixed, full_matrices=False)
    return CordaEigens(s, u, (vt @ inverse).T)


def _crop(eigens, rank, method):
    keep = slice(None, rank) if method == "ipm" else slice(len(eigens.S_WC) - rank, None)
    return CordaEigens(eigens.S_WC[keep].copy(), eigens.U_WC[:, keep].copy(), eigens.V_WC[:, keep].copy())


def _read_cache(cache, targets, ranks, func):
    stored = load(cache)
    where = f"cache_file {os.fspath(cache)!r}"
    out = {}
    for path, layer in targets:
        shapes = {"S_WC": (ranks[path],), "U_WC": (layer.out_features, ranks[path]),
                  "V_WC": (layer.in_features, ranks[path])}
        out[path] = CordaEigens(**{field: stored_entry(stored, f"{path}.eigens.{field}", shape, where, func,
                                                       hint="; build it with the same model and rank")
                                   for field, shape in shapes.items()})
    return out


def _progress(targets, verbose):
    if not verbose:
        return targets
    from tqdm.auto import tqdm

    return tqdm(targets, desc="Collecting eigens")


def corda_eigens(model, config, func):
    """{path: CordaEigens} of the layers get_peft_model's CorDA init adapts, checked to be there and of
    the rank the config gives each layer (before anything changes)."""
    eigens = prepared_data(model, config, func, "corda", "CorDA", "factors",
                           "preprocess_corda(model, config, run_model)")
    ranks = config_ranks([(path, None) for path in eigens], config)
    for path, e in eigens.items():
        if len(e.S_WC) != ranks[path]:
            raise ValueError(f"{func}: layer {path!r} has CorDA factors of rank {len(e.S_WC)}, the config "
                             f"gives it rank {ranks[path]}; run preprocess_corda with this config")
    return eigens


def corda_factors(layer, eigens):
    """(lora_A (r, in), lora_B (out, r)) = (sqrt(S / s) V^T, U sqrt(S / s)), s the injected layer's scaling."""
    s = eigens.S_WC / layer.scaling
    return eigens.V_WC.T * np.sqrt(s)[:, None], eigens.U_WC * np.sqrt(s)

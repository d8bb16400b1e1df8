"""lorac.MergedLinear: loralib's fused-projection LoRA layer on the C kernels
(csrc/lora_merged_linear*)."""

from collections import namedtuple

import numpy as np

from .. import _C
from .. import init
from .._arrays import (as_float_array, as_generator, check_last_dim, float_dtype,
                       non_negative_int)
from ..module import Module, Parameter
from ._grads import GradBuffers
from .base import LoRALayer

# What backward needs from a forward: the 2-D input, u = drop(x) A^T, the
# dropout mask and its 1 / (1 - p), whether the adapter branch ran, and the
# input's leading shape.
_ForwardCache = namedtuple("_ForwardCache", ["x", "u", "mask", "keep_scale", "lora_on", "lead_shape"])


class MergedLinear(LoRALayer, Module):
    """One linear layer over several stacked projections (e.g. q, k, v), with a
    LoRA adapter on the enabled ones only — loralib's ``MergedLinear``.

    The output's ``out_features`` split into ``len(enable_lora)`` equal
    blocks; block g gets an adapter when ``enable_lora[g]`` (e.g.
    ``[True, False, True]`` adapts q and v).  Parameters (loralib's names and
    shapes, so state dicts interchange): ``weight`` (out, in) — (in, out)
    when ``fan_in_fan_out`` —, ``bias`` (out,), ``lora_A``
    (r * n_enabled, in) kaiming-uniform and ``lora_B``
    (out / len(enable_lora) * n_enabled, r) zeros, the rows of enabled group e
    (counting enabled groups only) being ``lora_A[e*r:(e+1)*r]`` and
    ``lora_B[e*og:(e+1)*og]``.

    Forward adds ``scaling * (drop(x) A_e^T) B_e^T`` into each enabled block
    of the output, never building the dense block-diagonal delta that
    loralib forms on every call.  Merging adds ``scaling * B_e A_e`` into the
    weight's rows of each enabled block.  With no enabled group (or r = 0)
    there is no adapter: the layer is a plain, trainable linear layer (where
    loralib raises AttributeError in forward when r > 0).

    ``lora_ind`` (bool, (out,)) marks the output features that have an
    adapter, as in loralib.
    """

    def __init__(self, in_features, out_features, r=0, lora_alpha=1, lora_dropout=0.0,
                 enable_lora=(False,), fan_in_fan_out=False, merge_weights=True, bias=True,
                 dtype=np.float32, rng=None, use_rslora=False):
        Module.__init__(self)
        self.in_features = non_negative_int(in_features, "in_features")
        self.out_features = non_negative_int(out_features, "out_features")
        self.enable_lora = _checked_enable_lora(enable_lora, self.out_features)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.dtype = float_dtype(dtype)
        self.rng = as_generator(rng)
        self._cache = None
        n_enabled = sum(self.enable_lora)
        self._adapter = self.r > 0 and n_enabled > 0

        weight = init.kaiming_uniform((self.out_features, self.in_features), self.in_features,
                                      self.rng, self.dtype)
        if self.fan_in_fan_out:
            weight = np.ascontiguousarray(weight.T)
        self.weight = Parameter(weight, requires_grad=not self._adapter)
        if bias:
            bound = 1.0 / np.sqrt(self.in_features) if self.in_features > 0 else 0.0
            self.bias = Parameter(init.uniform((self.out_features,), bound, self.rng, self.dtype))
        else:
            self.register_parameter("bias", None)
        if self._adapter:
            group_out = self.out_features // len(self.enable_lora)
            self.lora_A = Parameter(init.kaiming_uniform((self.r * n_enabled, self.in_features),
                                                         self.in_features, self.rng, self.dtype))
            self.lora_B = Parameter(init.zeros((group_out * n_enabled, self.r), self.dtype))

    @property
    def lora_ind(self):
        """bool (out_features,): True for the output features of enabled groups."""
        return np.repeat(np.array(self.enable_lora, dtype=bool), self.out_features // len(self.enable_lora))

    # -- forward / backward ---------------------------------------------
    def forward(self, x):
        # Hot path for small batches: a 2-D input of the right dtype goes
        # straight to the kernel, without reshapes or attribute hooks.
        if type(x) is not np.ndarray or x.dtype != self.dtype or x.ndim == 0 \
                or x.shape[-1] != self.in_features:
            x = self._checked_input(x)
        params = self._parameters
        x2 = x if x.ndim == 2 else x.reshape(-1, self.in_features)
        bias = params["bias"]
        bias = None if bias is None else bias.data
        lora_on = self._adapter and not self.merged
        mask, keep_scale = None, 1.0 / (1.0 - self.lora_dropout)
        if lora_on:
            if self.training and self.lora_dropout:
                mask = self._dropout_mask(x2.shape)
            y, u = _C.merged_linear_forward(x2, params["weight"].data, bias, params["lora_A"].data,
                                            params["lora_B"].data, self.enable_lora, self.scaling,
                                            self.fan_in_fan_out, mask, keep_scale)
        else:  # merged or no adapter: the base layer only
            y, u = _C.linear_forward(x2, params["weight"].data, bias, None, None, 0.0, self.fan_in_fan_out)
        lead_shape = x.shape[:-1]
        self.__dict__["_cache"] = _ForwardCache(x2, u, mask, keep_scale, lora_on, lead_shape)
        return y if x.ndim == 2 else y.reshape(lead_shape + (self.out_features,))

    def backward(self, grad_output):
        """Gradient w.r.t. the input; accumulates .grad of trainable parameters."""
        cache = self._require_cache()
        g = grad_output
        expected = cache.lead_shape + (self.out_features,)
        if type(g) is not np.ndarray or g.dtype != self.dtype or g.shape != expected:
            g = self._checked_grad_output(g, expected)
        g2 = g if g.ndim == 2 else g.reshape(-1, self.out_features)
        params = self._parameters
        weight = params["weight"]
        if cache.lora_on:
            lora_a, lora_b = params["lora_A"], params["lora_B"]
            grads = {"grad_weight": weight, "grad_bias": params["bias"],
                     "grad_lora_A": lora_a, "grad_lora_B": lora_b}
            with GradBuffers(grads) as buffers:
                dx = _C.merged_linear_backward(
                    g2, cache.x, weight.data, lora_a.data, lora_b.data, cache.u, self.enable_lora,
                    self.scaling, self.fan_in_fan_out, cache.mask, cache.keep_scale, True, **buffers)
        else:
            with GradBuffers({"grad_weight": weight, "grad_bias": params["bias"]}) as buffers:
                dx = _C.linear_backward(g2, cache.x, weight.data, None, None, None, 0.0,
                                        self.fan_in_fan_out, None, 1.0, True, **buffers)
        self.__dict__["_cache"] = None
        return dx if len(cache.lead_shape) == 1 else dx.reshape(cache.lead_shape + (self.in_features,))

    def _checked_input(self, x):
        name = f"{type(self).__name__}.forward: input"
        x = as_float_array(x, self.dtype, name)
        check_last_dim(x, self.in_features, name)
        return x

    def _checked_grad_output(self, g, expected):
        name = f"{type(self).__name__}.backward: grad_output"
        g = as_float_array(g, self.dtype, name)
        if g.shape != expected:
            raise ValueError(f"{name} must have shape {expected} (the output's), got {g.shape}")
        return g

    def _require_cache(self):
        cache = self._cache
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called without a preceding forward() "
                               "(or twice for one forward)")
        if cache.lora_on != (self._adapter and not self.merged):
            raise RuntimeError(f"{type(self).__name__}.backward(): the adapter was merged or unmerged "
                               "(train()/eval()) between forward() and backward(); run forward() again")
        return cache

    def _dropout_mask(self, shape):
        """uint8 keep-mask (1 = keep) of the LoRA branch input, shared by all
        groups as in loralib, drawn from self.rng."""
        keep = self.rng.random(shape, dtype=np.float32) >= self.lora_dropout
        return keep.view(np.uint8)

    # -- merging and state ------------------------------------------------
    def _apply_delta(self, alpha):
        if self._adapter:
            self._merge_into(self.weight.data, alpha)
        self._cache = None

    def _merge_into(self, weight, alpha):
        _C.merged_linear_merge(weight, self.lora_A.data, self.lora_B.data, self.enable_lora, alpha,
                               self.fan_in_fan_out)

    def _load_state_items(self, values):
        """Loading into a merged layer equals loading unmerged, then merging."""
        remerge = self.merged
        self.unmerge()
        Module._load_state_items(self, values)
        if remerge:
            self.merge()

    def _state_items(self):
        for name, value in Module._state_items(self):
            if name == "weight" and self.merged and self._adapter:
                value = value.copy()
                self._merge_into(value, -self.scaling)
            yield name, value

    def extra_repr(self):
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, enable_lora={list(self.enable_lora)}")
        if self.r > 0:
            text += f", r={self.r}, lora_alpha={self.lora_alpha:g}"
            if self.lora_dropout:
                text += f", lora_dropout={self.lora_dropout:g}"
        if self.fan_in_fan_out:
            text += ", fan_in_fan_out=True"
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        return text


def _checked_enable_lora(enable_lora, out_features):
    """A non-empty sequence of bools whose length divides out_features -> tuple of bools."""
    if isinstance(enable_lora, (str, bytes)) or not hasattr(enable_lora, "__len__"):
        raise TypeError(f"enable_lora must be a sequence of bools, got {type(enable_lora).__name__}")
    flags = tuple(enable_lora)
    for position, flag in enumerate(flags):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"enable_lora must be a sequence of bools, got {type(flag).__name__} "
                            f"at position {position}")
    if not flags:
        raise ValueError("enable_lora must be a non-empty sequence of bools, got an empty one")
    if out_features % len(flags) != 0:
        raise ValueError(f"len(enable_lora) = {len(flags)} must divide out_features = {out_features}")
    return tuple(bool(flag) for flag in flags)

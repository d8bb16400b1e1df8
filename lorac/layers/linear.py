"""lorac.Linear: loralib's LoRA Linear on the fused C kernels (csrc/lora_linear*)."""

from collections import namedtuple

import numpy as np

from .. import _C
from .. import init
from .._arrays import (as_float_array, as_generator, check_last_dim, float_dtype,
                       non_negative_int)
from ..module import Module, Parameter
from ._grads import GradBuffers as _GradBuffers
from .base import LoRALayer

# What backward needs from a forward: the 2-D input, u = drop(x) A^T, the
# dropout mask and its 1 / (1 - p), whether the adapter branch ran, and the
# input's leading shape.
_ForwardCache = namedtuple("_ForwardCache", ["x", "u", "mask", "keep_scale", "lora_on", "lead_shape"])


class Linear(LoRALayer, Module):
    """y = x W0^T + b + scaling * (dropout(x) A^T) B^T, with loralib's API.

    Parameters (loralib's names and shapes): ``weight`` (out, in) — (in, out)
    when ``fan_in_fan_out`` —, ``bias`` (out,), ``lora_A`` (r, in) kaiming-
    uniform, ``lora_B`` (out, r) zeros, ``scaling = lora_alpha / r``.  With
    r > 0 the base weight is frozen; r = 0 is a plain trainable linear layer.
    ``eval()`` merges the adapter into the weight and ``train()`` unmerges it
    when ``merge_weights``.  Dropout applies to the LoRA branch input only,
    in training, drawn from ``rng`` (a seed or numpy Generator).

    ``state_dict()`` always holds the unmerged base weight, so a checkpoint
    means the same whether it was taken in train() or eval() mode.
    """

    def __init__(self, in_features, out_features, r=0, lora_alpha=1, lora_dropout=0.0,
                 fan_in_fan_out=False, merge_weights=True, bias=True, dtype=np.float32, rng=None,
                 use_rslora=False):
        Module.__init__(self)
        self.in_features = non_negative_int(in_features, "in_features")
        self.out_features = non_negative_int(out_features, "out_features")
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.dtype = float_dtype(dtype)
        self.rng = as_generator(rng)
        self._cache = None

        weight = init.kaiming_uniform((self.out_features, self.in_features), self.in_features,
                                      self.rng, self.dtype)
        if self.fan_in_fan_out:
            weight = np.ascontiguousarray(weight.T)
        self.weight = Parameter(weight, requires_grad=self.r == 0)
        if bias:
            bound = 1.0 / np.sqrt(self.in_features) if self.in_features > 0 else 0.0
            self.bias = Parameter(init.uniform((self.out_features,), bound, self.rng, self.dtype))
        else:
            self.register_parameter("bias", None)
        if self.r > 0:
            self.lora_A = Parameter(init.kaiming_uniform((self.r, self.in_features), self.in_features,
                                                         self.rng, self.dtype))
            self.lora_B = Parameter(init.zeros((self.out_features, self.r), self.dtype))

    # -- forward / backward ---------------------------------------------
    def forward(self, x):
        # This is the hot path for small batches: plain dict lookups, no
        # reshapes or attribute hooks that a 2-D, right-dtype input does not need.
        if type(x) is not np.ndarray or x.dtype != self.dtype or x.ndim == 0 \
                or x.shape[-1] != self.in_features:
            x = self._checked_input(x)
        params = self._parameters
        x2 = x if x.ndim == 2 else x.reshape(-1, self.in_features)
        lora_on = self.r > 0 and not self.merged
        mask = self._dropout_mask(x2.shape) if lora_on and self.training and self.lora_dropout else None
        keep_scale = 1.0 / (1.0 - self.lora_dropout)
        bias = params["bias"]
        y, u = _C.linear_forward(
            x2, params["weight"].data, None if bias is None else bias.data,
            params["lora_A"].data if lora_on else None, params["lora_B"].data if lora_on else None,
            self.scaling, self.fan_in_fan_out, mask, keep_scale)
        lead_shape = x.shape[:-1]
        self.__dict__["_cache"] = _ForwardCache(x2, u, mask, keep_scale, lora_on, lead_shape)
        return y if x.ndim == 2 else y.reshape(lead_shape + (self.out_features,))

    def _checked_input(self, x):
        name = f"{type(self).__name__}.forward: input"
        x = as_float_array(x, self.dtype, name)
        check_last_dim(x, self.in_features, name)
        return x

    def backward(self, grad_output):
        """Gradient w.r.t. the input; accumulates .grad of trainable parameters."""
        cache = self._require_cache()
        g = grad_output
        expected = cache.lead_shape + (self.out_features,)
        if type(g) is not np.ndarray or g.dtype != self.dtype or g.shape != expected:
            g = self._checked_grad_output(g, expected)
        params = self._parameters
        lora_on = cache.lora_on
        weight = params["weight"]
        lora_a, lora_b = (params["lora_A"], params["lora_B"]) if lora_on else (None, None)
        grads = {"grad_weight": weight, "grad_bias": params["bias"],
                 "grad_lora_A": lora_a, "grad_lora_B": lora_b}
        with _GradBuffers(grads) as buffers:
            dx = _C.linear_backward(
                g if g.ndim == 2 else g.reshape(-1, self.out_features), cache.x, weight.data,
                None if lora_a is None else lora_a.data, None if lora_b is None else lora_b.data,
                cache.u, self.scaling, self.fan_in_fan_out, cache.mask, cache.keep_scale,
                True, **buffers)
        self.__dict__["_cache"] = None
        return dx if len(cache.lead_shape) == 1 else dx.reshape(cache.lead_shape + (self.in_features,))

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
        if cache.lora_on != (self.r > 0 and not self.merged):
            raise RuntimeError(f"{type(self).__name__}.backward(): the adapter was merged or unmerged "
                               "(train()/eval()) between forward() and backward(); run forward() again")
        return cache

    def _dropout_mask(self, shape):
        """uint8 keep-mask (1 = keep) for the LoRA branch input, drawn from self.rng."""
        keep = self.rng.random(shape, dtype=np.float32) >= self.lora_dropout
        return keep.view(np.uint8)

    # -- merging and state ------------------------------------------------
    def _apply_delta(self, alpha):
        _C.linear_merge(self.weight.data, self.lora_A.data, self.lora_B.data, alpha, self.fan_in_fan_out)
        self._cache = None

    def _state_items(self):
        for name, value in Module._state_items(self):
            if name == "weight" and self.merged and self.r > 0:
                value = value.copy()
                _C.linear_merge(value, self.lora_A.data, self.lora_B.data, -self.scaling,
                                self.fan_in_fan_out)
            yield name, value

    def _load_state_items(self, values):
        """Loading into a merged layer equals loading unmerged, then merging."""
        remerge = self.merged
        self.unmerge()
        Module._load_state_items(self, values)
        if remerge:
            self.merge()

    def extra_repr(self):
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
        if self.r > 0:
            text += f", r={self.r}, lora_alpha={self.lora_alpha:g}"
            if self.lora_dropout:
                text += f", lora_dropout={self.lora_dropout:g}"
        if self.fan_in_fan_out:
            text += ", fan_in_fan_out=True"
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        return text


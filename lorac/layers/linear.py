"""lorac.Linear: loralib's LoRA Linear on the fused C kernels (csrc/lora_linear*)."""

from collections import namedtuple

import numpy as np

from .. import _C
from .. import init
from .._arrays import (as_float_array, as_generator, check_last_dim, float_dtype,
                       non_negative_int)
from ..module import Module, Parameter
from .base import LoRALayer

# What backward needs from a forward: the 2-D input, u = drop(x) A^T, the
# dropout mask, whether the adapter branch ran, and the input's leading shape.
_ForwardCache = namedtuple("_ForwardCache", ["x", "u", "mask", "lora_on", "lead_shape"])


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
        x = as_float_array(x, self.dtype, f"{type(self).__name__}.forward: input")
        check_last_dim(x, self.in_features, f"{type(self).__name__}.forward: input")
        lead_shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        lora_on = self.r > 0 and not self.merged
        mask = self._dropout_mask(x2.shape) if lora_on else None
        y, u = _C.linear_forward(
            x2, self.weight.data, None if self.bias is None else self.bias.data,
            self.lora_A.data if lora_on else None, self.lora_B.data if lora_on else None,
            self.scaling, self.fan_in_fan_out, mask, self._keep_scale())
        self._cache = _ForwardCache(x2, u, mask, lora_on, lead_shape)
        return y.reshape(lead_shape + (self.out_features,))

    def backward(self, grad_output):
        """Gradient w.r.t. the input; accumulates .grad of trainable parameters."""
        cache = self._require_cache()
        g = as_float_array(grad_output, self.dtype, f"{type(self).__name__}.backward: grad_output")
        expected = cache.lead_shape + (self.out_features,)
        if g.shape != expected:
            raise ValueError(f"{type(self).__name__}.backward: grad_output must have shape {expected} "
                             f"(the output's), got {g.shape}")
        lora_on = cache.lora_on
        grads = {"grad_weight": self.weight, "grad_bias": self.bias,
                 "grad_lora_A": self.lora_A if lora_on else None,
                 "grad_lora_B": self.lora_B if lora_on else None}
        with _GradBuffers(grads) as buffers:
            dx = _C.linear_backward(
                g.reshape(-1, self.out_features), cache.x, self.weight.data,
                self.lora_A.data if lora_on else None, self.lora_B.data if lora_on else None,
                cache.u, self.scaling, self.fan_in_fan_out, cache.mask, self._keep_scale(),
                True, **buffers)
        self._cache = None
        return dx.reshape(cache.lead_shape + (self.in_features,))

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
        if not (self.training and self.lora_dropout > 0.0):
            return None
        keep = self.rng.random(shape, dtype=np.float32) >= self.lora_dropout
        return keep.view(np.uint8)

    def _keep_scale(self):
        return 1.0 / (1.0 - self.lora_dropout)

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


class _GradBuffers:
    """Context manager: gradient accumulators for the trainable parameters among
    `params` ({kernel argument: Parameter or None}); frozen ones get None and no
    allocation.  If the call inside fails, buffers it allocated are dropped so
    the parameters are left as they were."""

    def __init__(self, params):
        self.params = params
        self.created = []

    def __enter__(self):
        buffers = {}
        for arg, param in self.params.items():
            if param is None or not param.requires_grad:
                buffers[arg] = None
                continue
            if param.grad is None:
                self.created.append(param)
            buffers[arg] = param.grad_buffer()
        return buffers

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for param in self.created:
                param.grad = None
        return False

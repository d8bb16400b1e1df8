"""lorac.LayerNorm: torch.nn.LayerNorm on the C kernels of csrc/layernorm*."""

import numbers

import numpy as np

from .. import _C
from .. import functional as F
from .._arrays import as_float_array, float_dtype, real_number
from ..module import Module, Parameter
from ._grads import GradBuffers


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing
    ``normalized_shape`` of x (biased variance), like torch.nn.LayerNorm.

    Parameters (torch's names): ``weight`` (ones) and ``bias`` (zeros) of
    shape normalized_shape when ``elementwise_affine`` (``bias=False`` drops
    the bias).  ``dtype`` (float32 or float64) is the parameters' and the inputs'.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, dtype=np.float32):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else normalized_shape
        try:
            shape = tuple(shape)
        except TypeError:
            raise TypeError("LayerNorm: normalized_shape must be an int or a tuple of ints, got "
                            f"{type(normalized_shape).__name__}") from None
        if not shape or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape):
            raise ValueError(f"LayerNorm: normalized_shape must be positive ints, got {normalized_shape!r}")
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps = real_number(eps, "LayerNorm: eps")
        if self.eps < 0:
            raise ValueError(f"LayerNorm: eps must be >= 0, got {self.eps}")
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = float_dtype(dtype)
        self._cache = None
        if self.elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dtype=self.dtype))
            if bias:
                self.bias = Parameter(np.zeros(self.normalized_shape, dtype=self.dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        self._cache = None
        name = "LayerNorm.forward: input"
        x = as_float_array(x, self.dtype, name)
        d = F.normalized_size(x, self.normalized_shape, "LayerNorm.forward")
        x2 = x.reshape(-1, d)
        y, mean, rstd = _C.layernorm_forward(x2, self._flat("weight"), self._flat("bias"), self.eps)
        self._cache = (x2, mean, rstd, x.shape)
        return y.reshape(x.shape)

    def backward(self, grad_output):
        """Gradient w.r.t. the input; accumulates weight.grad / bias.grad when they train."""
        if self._cache is None:
            raise RuntimeError("LayerNorm.backward() called without a preceding forward() (or twice for one forward)")
        x2, mean, rstd, shape = self._cache
        g = as_float_array(grad_output, self.dtype, "LayerNorm.backward: grad_output")
        if g.shape != shape:
            raise ValueError(f"LayerNorm.backward: grad_output must have shape {shape} (the output's), "
                             f"got {g.shape}")
        with GradBuffers({"grad_weight": self.weight, "grad_bias": self.bias}) as buffers:
            buffers = {k: None if v is None else _flat_inplace(v, k) for k, v in buffers.items()}
            dx = _C.layernorm_backward(g.reshape(x2.shape), x2, self._flat("weight"), mean, rstd, True,
                                       **buffers)
        self._cache = None
        return dx.reshape(shape)

    def _flat(self, name):
        param = self._parameters[name]
        return None if param is None else param.data.reshape(-1)

    def _forget_forward(self):
        self._cache = None

    def extra_repr(self):
        text = f"{self.normalized_shape}, eps={self.eps:g}, elementwise_affine={self.elementwise_affine}"
        if self.elementwise_affine and self.bias is None:
            text += ", bias=False"
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        return text


def _flat_inplace(buffer, name):
    """A 1-D view of a gradient accumulator the kernel adds into."""
    if not buffer.flags.c_contiguous:
        raise ValueError(f"LayerNorm.backward: {name} must be C-contiguous (it is accumulated in place)")
    return buffer.reshape(-1)

"""Activation and dropout modules with backward: ReLU, GELU, Tanh, Dropout.

Each keeps, in forward, the one array its backward needs (the output for
ReLU and Tanh, the input for GELU, the keep-mask for Dropout) and composes in
lorac.Sequential.  They follow the input's dtype (float32 or float64).
"""

import numpy as np

from .. import _C
from .. import functional as F
from .._arrays import as_generator
from ..module import Module


class _Activation(Module):
    """Elementwise C kernel `_kind` (csrc/activation*) with its backward."""

    _kind = None
    _backward_uses_output = False

    def __init__(self):
        super().__init__()
        self._saved = None

    def forward(self, x):
        self._saved = None
        name = type(self).__name__
        x = F.float_input(x, f"{name}.forward: input")
        y = _C.activation_forward(self._kind, x.reshape(-1)).reshape(x.shape)
        self._saved = y if self._backward_uses_output else x
        return y

    def backward(self, grad_output):
        name = type(self).__name__
        if self._saved is None:
            raise RuntimeError(f"{name}.backward() called without a preceding forward() (or twice for one forward)")
        dx = F.activation_backward(self._kind, grad_output, self._saved, f"{name}.backward")
        self._saved = None
        return dx


class ReLU(_Activation):
    """max(x, 0); backward passes the gradient where the output is > 0."""

    _kind = "relu"
    _backward_uses_output = True


class Tanh(_Activation):
    """tanh(x); backward: grad * (1 - y^2)."""

    _kind = "tanh"
    _backward_uses_output = True


class GELU(_Activation):
    """x * Phi(x) (approximate='none', erf) or torch's tanh approximation ('tanh')."""

    def __init__(self, approximate="none"):
        super().__init__()
        self._kind = F.gelu_kind(approximate)
        self.approximate = approximate

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class Dropout(Module):
    """Zero each element with probability p in training and scale the rest by
    1 / (1 - p) (p = 1: all zeros); identity in eval().  rng: None, an int
    seed or a numpy Generator (the mask is drawn from it)."""

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        self.p = F.check_dropout_p(p, "Dropout")
        self.rng = as_generator(rng)
        self._cache = None

    def forward(self, x):
        self._cache = None
        x = F.float_input(x, "Dropout.forward: input")
        if not self.training or self.p == 0.0:
            self._cache = (None, x.shape, x.dtype)
            return x
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
        self._cache = (keep, x.shape, x.dtype)
        return F.dropout_apply(x, keep, self.p)

    def backward(self, grad_output):
        if self._cache is None:
            raise RuntimeError("Dropout.backward() called without a preceding forward() (or twice for one forward)")
        keep, shape, dtype = self._cache
        g = F.as_dtype(grad_output, dtype, "Dropout.backward: grad_output")
        if g.shape != shape:
            raise ValueError(f"Dropout.backward: grad_output must have shape {shape} (the output's), got {g.shape}")
        self._cache = None
        return g if keep is None else F.dropout_apply(g, keep, self.p)

    def extra_repr(self):
        return f"p={self.p:g}"

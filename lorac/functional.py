"""lorac.functional: losses and activations as functions (torch.nn.functional's names).

Forward functions take array-likes: an ndarray must be float32 or float64
(its dtype is kept: lorac never silently changes an array's precision);
lists and scalars become float64.  Each op has a ``*_backward`` function
giving the gradient w.r.t. its input; the modules in lorac.nn
(CrossEntropyLoss, ReLU, ...) call these and keep what backward needs.

Shapes follow lorac's last-dimension convention: logits are (..., C) with
integer targets (...) -- torch's (N, C) and (C,) layouts are the same thing;
its (N, C, d1, ...) layout would be moved to (N, d1, ..., C) here.
"""

from collections import namedtuple

import numpy as np

from . import _C
from ._arrays import FLOAT_DTYPES

REDUCTIONS = ("mean", "sum", "none")
GELU_APPROXIMATIONS = ("none", "tanh")


# -- argument checks ------------------------------------------------------------

def float_input(x, name):
    """x as a float32/float64 ndarray (TypeError for other dtypes of ndarrays)."""
    if isinstance(x, np.generic):  # a NumPy scalar keeps its dtype, like an ndarray
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
        return x
    data = getattr(x, "data", None)
    if isinstance(data, np.ndarray) and not isinstance(x, (list, tuple)):  # a lorac.Parameter
        return float_input(data, name)
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of floats, got {type(x).__name__}: {exc}") from None


def as_dtype(x, dtype, name):
    """x as an ndarray of `dtype` (an ndarray of another dtype: TypeError)."""
    if isinstance(x, np.ndarray):
        if x.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype} (the input's), got {x.dtype}")
        return x
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of {dtype}, got {type(x).__name__}: {exc}") from None


def check_reduction(reduction, owner):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{owner}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _grad_for(grad_output, shape, dtype, reduction, owner):
    """(scalar scale, per-element array or None) for a loss's upstream gradient."""
    if reduction != "none":
        if np.ndim(grad_output) != 0:
            raise ValueError(f"{owner}: grad_output must be a scalar for reduction={reduction!r}, got "
                             f"shape {np.shape(grad_output)}")
        return float(np.asarray(grad_output)), None
    g = as_dtype(grad_output, dtype, f"{owner}: grad_output")
    try:
        g = np.broadcast_to(g, shape)
    except ValueError:
        raise ValueError(f"{owner}: grad_output must have shape {shape} (the loss's, reduction='none'), "
                         f"got {g.shape}") from None
    return 1.0, np.ascontiguousarray(g).reshape(-1)


# -- cross-entropy ----------------------------------------------------------------

# What cross-entropy's backward needs: 2-D logits, 1-D targets, the row
# log-sum-exps, how many rows count, and the input and loss shapes.
CrossEntropyContext = namedtuple("CrossEntropyContext",
                                 ["logits", "target", "lse", "count", "input_shape", "loss_shape",
                                  "ignore_index", "reduction"])


def cross_entropy_with_context(input, target, ignore_index=-100, reduction="mean"):
    """(loss, context for cross_entropy_backward_from_context)."""
    owner = "cross_entropy"
    check_reduction(reduction, owner)
    ignore_index = check_int(ignore_index, "cross_entropy: ignore_index")
    x = float_input(input, "cross_entropy: input")
    if x.ndim == 0:
        raise ValueError("cross_entropy: input must have shape (..., C) (class scores last), got a scalar")
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class indices, got dtype {t.dtype} "
                        "(class probabilities are not supported)")
    if t.shape != x.shape[:-1]:
        raise ValueError(f"cross_entropy: target must have shape {x.shape[:-1]} (input's shape without its "
                         f"last, class dimension {x.shape[-1]}), got {t.shape}")
    classes = x.shape[-1]
    logits = x.reshape(-1, classes)
    t1 = np.ascontiguousarray(t, dtype=np.int64).reshape(-1)
    loss, lse, total, count = _C.cross_entropy_forward(logits, t1, ignore_index)
    ctx = CrossEntropyContext(logits, t1, lse, count, x.shape, t.shape, ignore_index, reduction)
    if reduction == "none":
        return loss.reshape(t.shape), ctx
    if reduction == "sum":
        return float(total), ctx
    return (float(total) / count if count else float("nan")), ctx


def cross_entropy_backward_from_context(ctx, grad_output=1.0):
    """dL/dinput (the input's shape) for the loss cross_entropy_with_context returned."""
    owner = "cross_entropy_backward"
    scale, g = _grad_for(grad_output, ctx.loss_shape, ctx.logits.dtype, ctx.reduction, owner)
    if ctx.reduction == "mean":
        scale = scale / ctx.count if ctx.count else 0.0  # no counted rows: torch's zero gradient
    d = _C.cross_entropy_backward(ctx.logits, ctx.target, ctx.lse, ctx.ignore_index, scale, g)
    return d.reshape(ctx.input_shape)


def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    """-log softmax(input)[target] over the last axis of input (..., C), targets (...) of int.

    reduction 'mean' (over targets != ignore_index; NaN if none) or 'sum'
    gives a Python float, 'none' an array of the targets' shape (0 where
    ignored).  log-softmax is computed stably (max-shifted) in C."""
    return cross_entropy_with_context(input, target, ignore_index, reduction)[0]


def cross_entropy_backward(input, target, grad_output=1.0, ignore_index=-100, reduction="mean"):
    """d cross_entropy / d input, times grad_output (a scalar, or the loss's shape for 'none')."""
    _, ctx = cross_entropy_with_context(input, target, ignore_index, reduction)
    return cross_entropy_backward_from_context(ctx, grad_output)


# -- mean squared error -------------------------------------------------------------

MSEContext = namedtuple("MSEContext", ["pred", "target", "shape", "reduction"])


def mse_loss_with_context(input, target, reduction="mean"):
    """(loss, context for mse_loss_backward_from_context)."""
    owner = "mse_loss"
    check_reduction(reduction, owner)
    x = float_input(input, "mse_loss: input")
    t = as_dtype(target, x.dtype, "mse_loss: target")
    if t.shape != x.shape:
        raise ValueError(f"mse_loss: target must have the input's shape {x.shape}, got {t.shape}")
    p1, t1 = x.reshape(-1), t.reshape(-1)
    total, squares = _C.mse_forward(p1, t1, reduction == "none")
    ctx = MSEContext(p1, t1, x.shape, reduction)
    if reduction == "none":
        return squares.reshape(x.shape), ctx
    if reduction == "sum":
        return float(total), ctx
    return (float(total) / p1.size if p1.size else float("nan")), ctx


def mse_loss_backward_from_context(ctx, grad_output=1.0):
    scale, g = _grad_for(grad_output, ctx.shape, ctx.pred.dtype, ctx.reduction, "mse_loss_backward")
    if ctx.reduction == "mean":
        scale = scale / ctx.pred.size if ctx.pred.size else 0.0
    return _C.mse_backward(ctx.pred, ctx.target, scale, g).reshape(ctx.shape)


def mse_loss(input, target, reduction="mean"):
    """(input - target)^2, averaged ('mean', a float), summed ('sum') or elementwise ('none')."""
    return mse_loss_with_context(input, target, reduction)[0]


def mse_loss_backward(input, target, grad_output=1.0, reduction="mean"):
    """d mse_loss / d input, times grad_output (a scalar, or the input's shape for 'none')."""
    _, ctx = mse_loss_with_context(input, target, reduction)
    return mse_loss_backward_from_context(ctx, grad_output)


# -- activations ------------------------------------------------------------------------

def gelu_kind(approximate):
    """'none' -> 'gelu' (exact, erf), 'tanh' -> 'gelu_tanh' (torch's approximate=)."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return "gelu" if approximate == "none" else "gelu_tanh"


def activation(kind, x, name):
    """The C kernel `kind` ('relu', 'gelu', 'gelu_tanh', 'tanh') applied elementwise."""
    x = float_input(x, f"{name}: input")
    return _C.activation_forward(kind, x.reshape(-1)).reshape(x.shape)


def activation_backward(kind, grad_output, saved, name):
    """grad_output * f'(.) given `saved` (the output for relu/tanh, the input for gelu)."""
    saved = float_input(saved, f"{name}: saved tensor")
    g = as_dtype(grad_output, saved.dtype, f"{name}: grad_output")
    if g.shape != saved.shape:
        raise ValueError(f"{name}: grad_output must have shape {saved.shape} (the output's), got {g.shape}")
    return _C.activation_backward(kind, saved.reshape(-1), g.reshape(-1)).reshape(saved.shape)


def relu(x):
    """max(x, 0) elementwise (NaN stays NaN)."""
    return activation("relu", x, "relu")


def relu_backward(grad_output, output):
    """grad_output where relu's output > 0, else 0."""
    return activation_backward("relu", grad_output, output, "relu_backward")


def gelu(x, approximate="none"):
    """x * Phi(x) (approximate='none') or torch's tanh approximation ('tanh')."""
    return activation(gelu_kind(approximate), x, "gelu")


def gelu_backward(grad_output, input, approximate="none"):
    """grad_output * gelu'(input)."""
    return activation_backward(gelu_kind(approximate), grad_output, input, "gelu_backward")


def tanh(x):
    return activation("tanh", x, "tanh")


def tanh_backward(grad_output, output):
    """grad_output * (1 - output^2)."""
    return activation_backward("tanh", grad_output, output, "tanh_backward")


def softmax(x, axis=-1):
    """exp(x - logsumexp(x)) along `axis` (NumPy, max-shifted)."""
    x = float_input(x, "softmax: input")
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    """x - logsumexp(x) along `axis` (NumPy, max-shifted)."""
    x = float_input(x, "log_softmax: input")
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def dropout(x, p=0.5, training=True, rng=None):
    """x * mask / (1 - p) with mask ~ Bernoulli(1 - p) when training, else x.

    rng: None, an int seed or a numpy Generator.  (The module lorac.nn.Dropout
    keeps the mask for backward.)"""
    from ._arrays import as_generator

    x = float_input(x, "dropout: input")
    p = check_dropout_p(p, "dropout")
    if not training or p == 0.0:
        return x
    keep = as_generator(rng).random(x.shape) >= p
    return dropout_apply(x, keep, p)


def check_dropout_p(p, owner):
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{owner}: dropout probability p must be in [0, 1], got {p}")
    return p


def dropout_apply(x, keep, p):
    """x * keep / (1 - p); p = 1 drops everything (zeros, as torch)."""
    scale = x.dtype.type(0.0 if p >= 1.0 else 1.0 / (1.0 - p))
    return x * keep * scale


# -- layer norm -----------------------------------------------------------------------------

def normalized_size(x, normalized_shape, owner):
    """Number of elements normalised together: the product of x's trailing normalized_shape."""
    k = len(normalized_shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != tuple(normalized_shape):
        raise ValueError(f"{owner}: input must have shape (..., {', '.join(map(str, normalized_shape))}) "
                         f"(normalized_shape last), got {x.shape}")
    return int(np.prod(normalized_shape, dtype=np.int64))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing normalized_shape
    (biased variance, as torch)."""
    x = float_input(x, "layer_norm: input")
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    d = normalized_size(x, shape, "layer_norm")
    w = None if weight is None else _affine(weight, shape, x.dtype, "layer_norm: weight")
    b = None if bias is None else _affine(bias, shape, x.dtype, "layer_norm: bias")
    y, _, _ = _C.layernorm_forward(x.reshape(-1, d), w, b, float(eps))
    return y.reshape(x.shape)


def _affine(value, shape, dtype, name):
    value = as_dtype(value, dtype, name)
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (normalized_shape), got {value.shape}")
    return value.reshape(-1)

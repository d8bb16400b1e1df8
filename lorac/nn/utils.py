"""torch.nn.utils' gradient clipping, on the .grad arrays in place.

    model.backward(criterion.backward())
    lorac.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()

As torch's: parameters without a gradient (frozen ones) are skipped, the
norm is over all gradients as one vector, and the gradients are scaled by
max_norm / (norm + 1e-6) when that is below 1.  Differences, on purpose:
the norm comes back as a float (torch: a 0-d tensor) and is summed in
float64 whatever the gradients' dtype; a negative or non-finite max_norm or
clip_value, and a norm order other than a positive number or inf, raise
instead of flipping or zeroing the gradients.
"""

import math

import numpy as np

from .._arrays import real_number
from ..module import Parameter

_CHUNK = 1 << 16  # elements widened to float64 at a time: no float64 copy of a whole gradient


def _gradients(parameters, caller):
    """The .grad arrays of `parameters` (one Parameter or an iterable of them) that have one."""
    params = [parameters] if isinstance(parameters, Parameter) else list(parameters)
    for index, param in enumerate(params):
        if not isinstance(param, Parameter):
            raise TypeError(f"{caller}: parameters must be lorac Parameters (model.parameters()), "
                            f"got {type(param).__name__} at position {index}")
    return [p.grad for p in params if p.grad is not None]


def _norm_order(norm_type):
    if isinstance(norm_type, str) and norm_type == "inf":
        return math.inf
    order = real_number(norm_type, "clip_grad_norm_: norm_type", finite=False)
    if not order > 0:
        raise ValueError(f"clip_grad_norm_: norm_type must be a positive number or inf, got {norm_type!r}")
    return order


def _sum_of_powers(grad, order):
    """sum |grad|^order, accumulated in float64."""
    flat = grad.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        part = np.abs(flat[start:start + _CHUNK].astype(np.float64))
        total += float(np.dot(part, part)) if order == 2 else float(np.sum(part ** order))
    return total


def total_grad_norm(grads, order):
    """The order-norm of all `grads` as one vector (0.0 for none); NaN if any holds NaN."""
    if not grads:
        return 0.0
    if order == math.inf:
        return float(np.max([np.max(np.abs(g)) if g.size else 0.0 for g in grads]))  # NaN propagates
    return sum(_sum_of_powers(g, order) for g in grads) ** (1.0 / order)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Scale the gradients in place so that their joint norm is at most
    max_norm; return the norm they had (a float).

    parameters: one Parameter or an iterable of them (a generator such as
    model.parameters() is fine).  norm_type: a positive number or inf
    (2.0: the Euclidean norm).  A non-finite norm raises RuntimeError if
    error_if_nonfinite, and otherwise scales the gradients as torch does (a
    NaN norm makes them NaN).  foreach is accepted for torch's signature and
    has no effect."""
    grads = _gradients(parameters, "clip_grad_norm_")
    max_norm = real_number(max_norm, "clip_grad_norm_: max_norm")
    if max_norm < 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be >= 0, got {max_norm:g}")
    order = _norm_order(norm_type)
    norm = total_grad_norm(grads, order)
    if not math.isfinite(norm) and error_if_nonfinite:
        raise RuntimeError(f"clip_grad_norm_: the gradients' norm of order {order:g} is {norm}, so they cannot "
                           "be clipped; pass error_if_nonfinite=False to scale them anyway, as torch does")
    scale = max_norm / (norm + 1e-6)
    if not scale >= 1.0:  # also a NaN scale, as torch's clamp(max=1) keeps it
        with np.errstate(invalid="ignore"):  # an inf norm: inf * 0 is NaN, as in torch
            for grad in grads:
                grad *= grad.dtype.type(scale)
    return norm


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp every gradient element to [-clip_value, clip_value] in place
    (NaN stays NaN).  foreach is accepted for torch's signature."""
    grads = _gradients(parameters, "clip_grad_value_")
    clip_value = real_number(clip_value, "clip_grad_value_: clip_value")
    if clip_value < 0:
        raise ValueError(f"clip_grad_value_: clip_value must be >= 0, got {clip_value:g}")
    for grad in grads:
        np.clip(grad, -clip_value, clip_value, out=grad)

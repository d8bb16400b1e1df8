"""Argument checks shared by the Python layers (the C binding re-checks arrays).

Every helper raises TypeError for a wrong type or dtype and ValueError for a
wrong shape or value, with a message naming the argument, what was expected
and what came.
"""

import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_dtype(dtype, name="dtype"):
    """np.float32 / np.float64 (or their names) -> np.dtype; None -> float32, the
    default (as torch's dtype=None); anything else: TypeError.  (np.dtype(None)
    would be float64, and a dtype compares equal to None.)"""
    if dtype is None:
        return FLOAT_DTYPES[0]
    try:
        resolved = np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or resolved not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}")
    return resolved


def as_generator(rng, name="rng"):
    """None (fresh entropy), an int seed or a numpy Generator -> numpy Generator."""
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, (numbers.Integral, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"{name} must be a seed >= 0 (or a numpy.random.Generator), got {rng}")
        return np.random.default_rng(int(rng))
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"{name} must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")


def non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def real_number(value, name, finite=True):
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if finite and not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def probability(value, name):
    value = real_number(value, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def as_float_array(x, dtype, name):
    """x as an ndarray of `dtype`.

    An ndarray must already have that dtype (TypeError otherwise: lorac never
    silently changes the precision of an array); other array-likes (lists,
    scalars) are converted.
    """
    if isinstance(x, np.ndarray):
        if x.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
        return x
    if hasattr(x, "data") and isinstance(getattr(x, "data"), np.ndarray):  # a Parameter
        return as_float_array(x.data, dtype, name)
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of {dtype}, got {type(x).__name__}: {exc}") from None
    return arr


def check_last_dim(x, features, name):
    """x must have shape (..., features)."""
    if x.ndim == 0 or x.shape[-1] != features:
        raise ValueError(f"{name} must have shape (..., {features}), got shape {tuple(x.shape)}")


def as_rows(a):
    """``a`` (..., k) as a 2-D (rows, k) view: reshape(-1, k) fails when k = 0."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])

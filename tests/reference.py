"""NumPy float64 references of the LoRA math in DESIGN.md (test helper)."""

import numpy as np


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def linear_forward(x, w, bias, a, b, scaling, fan_in_fan_out=False, mask=None, keep_scale=1.0):
    """y = x W0^T + bias + scaling * (drop(x) A^T) B^T, all in float64."""
    x, w, bias, a, b = map(f64, (x, w, bias, a, b))
    w_out_in = w.T if fan_in_fan_out else w
    y = x @ w_out_in.T
    if bias is not None:
        y = y + bias
    if a is not None:
        xd = x if mask is None else x * mask * keep_scale
        y = y + scaling * (xd @ a.T) @ b.T
    return y


def linear_backward(g, x, w, a, b, scaling, fan_in_fan_out=False, mask=None, keep_scale=1.0):
    """dict of dx, dw (stored layout), dbias, da, db in float64."""
    g, x, w, a, b = map(f64, (g, x, w, a, b))
    w_out_in = w.T if fan_in_fan_out else w
    dx = g @ w_out_in
    dw = g.T @ x
    out = {"dx": dx, "dw": dw.T if fan_in_fan_out else dw, "dbias": g.sum(axis=0)}
    if a is not None:
        m = 1.0 if mask is None else mask * keep_scale
        xd = x * m
        gb = g @ b
        out["dx"] = dx + scaling * (gb @ a) * m
        out["da"] = scaling * gb.T @ xd
        out["db"] = scaling * g.T @ (xd @ a.T)
    return out


def tolerance(dtype):
    """(rtol, atol) for comparing a float32/float64 result with the float64 reference."""
    return (2e-5, 2e-5) if np.dtype(dtype) == np.float32 else (1e-12, 1e-12)


def assert_close(actual, expected, dtype, scale=None):
    """|actual - expected| <= atol * scale + rtol * |expected|, scale = max |expected| (>= 1)."""
    rtol, atol = tolerance(dtype)
    expected = np.asarray(expected, dtype=np.float64)
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol * scale)


def central_difference(f, p, eps=1e-6):
    """d f / d p for a scalar function f() of the float64 array p (modified in place and restored)."""
    grad = np.zeros_like(p)
    flat, gflat = p.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return grad

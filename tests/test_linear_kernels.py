"""lorac._C linear kernels vs the NumPy float64 reference (tests/reference.py)."""

import itertools

import numpy as np
import pytest

from lorac import _C
from reference import assert_close, central_difference, linear_backward, linear_forward

DTYPES = [np.float32, np.float64]
# (n, in, out, r): empty batch, single row, odd sizes, r = 1, r > in, wide/tall;
# n and r of 2 and 3 take gemm_rm's row-by-row GEMV path, n of 5 and 32 with a
# depth >= 128 its panel path (two panels of C^T, the second partial; csrc/gemm_impl.h);
# one row with out > 32 makes dB a k = 1 product that is neither GER nor GEMV:
# r = 5 takes its transposed-row route, r = 16 the plain one; n of 65 and 130 span
# the backward's blocks of 64 rows (lora_linear_impl.h), their last block 1 and 2 rows
SHAPES = [(0, 5, 3, 2), (1, 1, 1, 1), (1, 7, 5, 3), (2, 6, 5, 2), (3, 8, 4, 3), (3, 17, 9, 1), (13, 31, 23, 4),
          (65, 20, 70, 8), (5, 130, 300, 4), (32, 128, 260, 2), (1, 40, 70, 5), (1, 40, 70, 16),
          (130, 9, 11, 16), (4, 0, 6, 2), (4, 6, 0, 2)]


def make_operands(rng, n, fin, fout, r, dtype, fan_in_fan_out, bias, dropout):
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fin, fout) if fan_in_fan_out else (fout, fin)).astype(dtype)
    b = rng.standard_normal(fout).astype(dtype) if bias else None
    a = rng.standard_normal((r, fin)).astype(dtype)
    bb = rng.standard_normal((fout, r)).astype(dtype)
    mask = (rng.random((n, fin)) >= 0.3).astype(np.uint8) if dropout else None
    return x, w, b, a, bb, mask


CASES = list(itertools.product(SHAPES, DTYPES, [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("shape,dtype,fan_in_fan_out,bias,dropout", CASES)
def test_forward_matches_reference(rng, shape, dtype, fan_in_fan_out, bias, dropout):
    n, fin, fout, r = shape
    x, w, b, a, bb, mask = make_operands(rng, n, fin, fout, r, dtype, fan_in_fan_out, bias, dropout)
    keep = 1 / 0.7
    y, u = _C.linear_forward(x, w, b, a, bb, 0.75, fan_in_fan_out, mask, keep)
    assert y.dtype == dtype and y.shape == (n, fout) and u.shape == (n, r)
    assert_close(y, linear_forward(x, w, b, a, bb, 0.75, fan_in_fan_out, mask, keep), dtype)
    xd = x.astype(np.float64) * (1 if mask is None else mask * keep)
    assert_close(u, xd @ a.astype(np.float64).T, dtype)


@pytest.mark.parametrize("shape,dtype,fan_in_fan_out,bias,dropout", CASES)
def test_backward_matches_reference(rng, shape, dtype, fan_in_fan_out, bias, dropout):
    n, fin, fout, r = shape
    x, w, b, a, bb, mask = make_operands(rng, n, fin, fout, r, dtype, fan_in_fan_out, bias, dropout)
    keep = 1 / 0.7
    _, u = _C.linear_forward(x, w, b, a, bb, 0.75, fan_in_fan_out, mask, keep)
    g = rng.standard_normal((n, fout)).astype(dtype)
    # accumulators start non-zero: kernels must add, not overwrite
    start = {k: rng.standard_normal(s).astype(dtype)
             for k, s in {"dw": w.shape, "dbias": (fout,), "da": a.shape, "db": bb.shape}.items()}
    acc = {k: v.copy() for k, v in start.items()}
    dx = _C.linear_backward(g, x, w, a, bb, u, 0.75, fan_in_fan_out, mask, keep, True,
                            acc["dw"], acc["dbias"] if bias else None, acc["da"], acc["db"])
    ref = linear_backward(g, x, w, a, bb, 0.75, fan_in_fan_out, mask, keep)
    assert dx.shape == (n, fin) and dx.dtype == dtype
    assert_close(dx, ref["dx"], dtype)
    for k in ("dw", "da", "db") + (("dbias",) if bias else ()):
        assert_close(acc[k], start[k] + ref[k], dtype)
    if not bias:
        np.testing.assert_array_equal(acc["dbias"], start["dbias"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_frozen_gradients_are_not_touched(rng, dtype, fan_in_fan_out):
    x, w, b, a, bb, _ = make_operands(rng, 5, 6, 4, 2, dtype, fan_in_fan_out, True, False)
    _, u = _C.linear_forward(x, w, b, a, bb, 2.0, fan_in_fan_out)
    g = rng.standard_normal((5, 4)).astype(dtype)
    da = np.zeros_like(a)
    out = _C.linear_backward(g, x, w, a, bb, u, 2.0, fan_in_fan_out, None, 1.0, False, None, None, da, None)
    assert out is None  # need_input_grad=False: no dx computed
    assert_close(da, linear_backward(g, x, w, a, bb, 2.0, fan_in_fan_out)["da"], dtype)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_gradients_match_finite_differences(rng, fan_in_fan_out, dropout):
    n, fin, fout, r = 3, 5, 4, 2
    x, w, b, a, bb, mask = make_operands(rng, n, fin, fout, r, np.float64, fan_in_fan_out, True, dropout)
    keep, s = 1 / 0.7, 1.5
    g = rng.standard_normal((n, fout))

    def loss():
        y, _ = _C.linear_forward(x, w, b, a, bb, s, fan_in_fan_out, mask, keep)
        return float(np.sum(y * g))

    _, u = _C.linear_forward(x, w, b, a, bb, s, fan_in_fan_out, mask, keep)
    grads = {"w": np.zeros_like(w), "b": np.zeros_like(b), "a": np.zeros_like(a), "bb": np.zeros_like(bb)}
    dx = _C.linear_backward(g, x, w, a, bb, u, s, fan_in_fan_out, mask, keep, True,
                            grads["w"], grads["b"], grads["a"], grads["bb"])
    for name, param in [("x", x), ("w", w), ("b", b), ("a", a), ("bb", bb)]:
        numeric = central_difference(loss, param)
        analytic = dx if name == "x" else grads[name]
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_and_unmerge(rng, dtype, fan_in_fan_out):
    fout, fin, r = 33, 21, 5
    w = rng.standard_normal((fin, fout) if fan_in_fan_out else (fout, fin)).astype(dtype)
    a = rng.standard_normal((r, fin)).astype(dtype)
    bb = rng.standard_normal((fout, r)).astype(dtype)
    merged = w.copy()
    _C.linear_merge(merged, a, bb, 0.5, fan_in_fan_out)
    delta = 0.5 * bb.astype(np.float64) @ a.astype(np.float64)
    assert_close(merged, w.astype(np.float64) + (delta.T if fan_in_fan_out else delta), dtype)
    _C.linear_merge(merged, a, bb, -0.5, fan_in_fan_out)
    # round trip: within a few ulp of |W0| (plus the delta's own rounding)
    eps = np.finfo(dtype).eps
    bound = 4 * eps * (np.abs(w) + np.abs(delta.T if fan_in_fan_out else delta))
    assert np.all(np.abs(merged.astype(np.float64) - w) <= bound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_fortran_inputs_are_read_correctly(rng, dtype):
    big = rng.standard_normal((20, 30)).astype(dtype)
    x = big[::2, 3:13]  # row stride 60 elements, offset start
    xf = np.asfortranarray(rng.standard_normal((10, 10)).astype(dtype))
    xneg = big[::-2, 5:15]  # negative row stride: copied
    xcol = big[:10, ::3]  # non-unit inner stride: copied
    w = rng.standard_normal((8, 10)).astype(dtype)
    a = rng.standard_normal((3, 10)).astype(dtype)
    bb = rng.standard_normal((8, 3)).astype(dtype)
    for xin in (x, xf, xneg, xcol):
        y, _ = _C.linear_forward(xin, w, None, a, bb, 1.0, False)
        assert_close(y, linear_forward(xin, w, None, a, bb, 1.0), dtype)
    wslice = np.ascontiguousarray(rng.standard_normal((8, 14)).astype(dtype))[:, 2:12]
    y, _ = _C.linear_forward(x, wslice, None, a, bb, 1.0, False)
    assert_close(y, linear_forward(x, wslice, None, a, bb, 1.0), dtype)


def test_nan_propagates(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    x[1, 2] = np.nan
    w = rng.standard_normal((5, 6)).astype(np.float32)
    a = rng.standard_normal((2, 6)).astype(np.float32)
    bb = rng.standard_normal((5, 2)).astype(np.float32)
    y, _ = _C.linear_forward(x, w, None, a, bb, 1.0, False)
    assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, axis=0)).all()


def test_big_endian_input_is_converted(rng):
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((2, 4))
    y, u = _C.linear_forward(x.astype(">f8"), w, None, None, None, 1.0, False)
    assert u is None
    assert_close(y, x @ w.T, np.float64)


def placed(rng, shape, dtype, after, offset):
    """A C-contiguous standard-normal array of `shape` whose data starts
    `offset` bytes after `after`'s data modulo 4 KiB (a view into a larger
    buffer)."""
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape))
    buffer = np.empty(count + 8192 // itemsize, dtype)
    start = (after.ctypes.data + offset - buffer.ctypes.data) % 4096 // itemsize
    view = buffer[start:start + count].reshape(shape)
    view[...] = rng.standard_normal(shape)
    assert (view.ctypes.data - after.ctypes.data) % 4096 == offset
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_bytes", [4096, 1024, 2048 + 1024, 400])
@pytest.mark.parametrize("offset", [0, 64, 448, 2048, 4032])
def test_gemv_output_in_the_4k_aliasing_window(rng, dtype, row_bytes, offset):
    # A weight of two rows merges row by row through the axpy form of GEMV
    # over A's rows (csrc/gemm_impl.h, gemv_rm).  A weight row in the 4K-
    # aliasing window around A's row starts is updated through a copy placed
    # elsewhere: offsets 0, 64, 448 and 4032 at every stride that is a
    # multiple of 1 KiB, and 2048 too at strides of 1 and 3 KiB (rows then
    # start every 1 KiB modulo 4 KiB); 2048 at 4 KiB and any offset at a
    # 400-byte stride are updated in place.  Either way: the reference's
    # result (a copy back that dropped an element fails 28 of these cases).
    fin = row_bytes // np.dtype(dtype).itemsize
    a = rng.standard_normal((16, fin)).astype(dtype)  # r = 16: LORAC_ALIAS_MIN_ROWS
    bb = rng.standard_normal((2, 16)).astype(dtype)
    w = placed(rng, (2, fin), dtype, a, offset)
    w0 = w.astype(np.float64)
    _C.linear_merge(w, a, bb, 0.5, False)
    assert_close(w, w0 + 0.5 * bb.astype(np.float64) @ a.astype(np.float64), dtype)
    _C.linear_merge(w, a, bb, -0.5, False)
    assert_close(w, w0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 448, 640])
def test_gemv_column_output_in_the_4k_aliasing_window(rng, dtype, offset):
    # With r = 1, dB (out, 1) += scaling g^T u is gemm_rm's one-column route:
    # the axpy form of GEMV over g's 16 rows of 1 KiB, writing dB's column.
    # dB placed in the window (0, 448) is accumulated through a copy, at 640
    # in place; both match the reference.
    n, fin, fout = 16, 8, 1024 // np.dtype(dtype).itemsize
    x, w, b, a, bb, _ = make_operands(rng, n, fin, fout, 1, dtype, False, True, False)
    _, u = _C.linear_forward(x, w, b, a, bb, 0.75, False)
    g = rng.standard_normal((n, fout)).astype(dtype)
    db = placed(rng, (fout, 1), dtype, g, offset)
    start = db.copy()
    _C.linear_backward(g, x, w, a, bb, u, 0.75, False, None, 1.0, False, None, None, None, db)
    assert_close(db, start + linear_backward(g, x, w, a, bb, 0.75)["db"], dtype)

"""Cross-entropy and MSE (lorac.functional, lorac.CrossEntropyLoss/MSELoss) vs NumPy float64."""

import numpy as np
import pytest

import lorac
from lorac import _C
from lorac import functional as F
from reference import assert_close, central_difference

DTYPES = [np.float32, np.float64]
# logits shapes (..., C): empty batch, one row, one class, odd sizes, 3-D, a single (C,) vector
CE_SHAPES = [(0, 4), (1, 1), (1, 5), (7, 3), (33, 10), (2, 3, 5), (6,)]


def ce_reference(x, t, ignore_index=-100, reduction="mean"):
    """float64 -log softmax(x)[t] over the last axis, stable (max-shifted)."""
    x = np.asarray(x, np.float64)
    x2, t1 = x.reshape(-1, x.shape[-1]), np.asarray(t).reshape(-1)
    m = x2.max(axis=1, keepdims=True) if x2.size else np.zeros((x2.shape[0], 1))
    lse = (m + np.log(np.exp(x2 - m).sum(axis=1, keepdims=True)))[:, 0]
    keep = t1 != ignore_index
    loss = np.where(keep, lse - x2[np.arange(len(t1)), np.where(keep, t1, 0)], 0.0)
    if reduction == "none":
        return loss.reshape(np.shape(t))
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum() if keep.sum() else np.nan


def ce_grad_reference(x, t, ignore_index=-100, reduction="mean", grad_output=1.0):
    x = np.asarray(x, np.float64)
    x2, t1 = x.reshape(-1, x.shape[-1]), np.asarray(t).reshape(-1)
    p = np.exp(x2 - x2.max(axis=1, keepdims=True)) if x2.size else x2.copy()
    p = p / p.sum(axis=1, keepdims=True) if x2.size else p
    keep = t1 != ignore_index
    p[np.arange(len(t1))[keep], t1[keep]] -= 1
    p[~keep] = 0
    if reduction == "none":
        p *= np.broadcast_to(np.asarray(grad_output, np.float64), np.shape(t)).reshape(-1, 1)
    else:
        p *= grad_output / (keep.sum() if reduction == "mean" and keep.sum() else 1)
    return p.reshape(x.shape)


def make_targets(rng, shape, classes, ignore=True):
    t = rng.integers(0, classes, size=shape[:-1])
    if ignore and t.size > 1:
        t.reshape(-1)[::3] = -100
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_reference(rng, dtype, shape, reduction):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = make_targets(rng, shape, shape[-1])
    loss = F.cross_entropy(x, t, reduction=reduction)
    ref = ce_reference(x, t, reduction=reduction)
    if reduction == "none":
        assert isinstance(loss, np.ndarray) and loss.shape == t.shape and loss.dtype == dtype
        assert_close(loss, ref, dtype)
    else:
        assert isinstance(loss, float)
        if np.isnan(ref):
            assert np.isnan(loss)
        else:
            assert_close(loss, ref, dtype)
    g = rng.standard_normal(t.shape).astype(dtype) if reduction == "none" else 0.7
    grad = F.cross_entropy_backward(x, t, g, reduction=reduction)
    assert grad.shape == x.shape and grad.dtype == dtype
    assert_close(grad, ce_grad_reference(x, t, reduction=reduction, grad_output=g), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_is_numerically_stable(dtype):
    x = np.array([[1e4, 0.0, -1e4], [-3e4, -3e4 + 2.0, -3e4 + 1.0], [88.0, 89.0, 90.0]], dtype)
    t = np.array([0, 1, 2])
    loss = F.cross_entropy(x, t, reduction="none")
    assert np.all(np.isfinite(loss))
    assert_close(loss, ce_reference(x, t, reduction="none"), dtype)
    grad = F.cross_entropy_backward(x, t)
    assert np.all(np.isfinite(grad))
    assert_close(grad, ce_grad_reference(x, t), dtype)


def test_cross_entropy_nan_and_all_ignored():
    x = np.array([[np.nan, 1.0], [0.0, 1.0]])
    loss = F.cross_entropy(x, np.array([1, 0]), reduction="none")
    assert np.isnan(loss[0]) and np.isfinite(loss[1])
    x = np.ones((3, 4))
    t = np.full(3, -100)
    assert np.isnan(F.cross_entropy(x, t))  # torch: mean over no targets is NaN ...
    np.testing.assert_array_equal(F.cross_entropy_backward(x, t), 0.0)  # ... with a zero gradient
    assert F.cross_entropy(x, t, reduction="sum") == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_gradient_matches_finite_differences(rng, reduction, ignore_index):
    x = rng.standard_normal((4, 3, 5))
    t = rng.integers(0, 5, size=(4, 3))
    w = rng.standard_normal(t.shape)  # weights the 'none' losses into a scalar

    def scalar():
        loss = F.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
        return float(np.sum(loss * w)) if reduction == "none" else loss

    expected = central_difference(scalar, x)
    grad = F.cross_entropy_backward(x, t, w if reduction == "none" else 1.0, ignore_index, reduction)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.torch
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_cross_entropy_matches_torch(rng, reduction, ignore_index):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((16, 7)).astype(np.float32)
    t = rng.integers(0, 7, size=16)
    t[::4] = ignore_index
    tx = torch.tensor(x, requires_grad=True)
    tloss = torch.nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore_index)(tx, torch.tensor(t))
    g = rng.standard_normal(16).astype(np.float32)
    tloss.backward(torch.tensor(g) if reduction == "none" else None)
    crit = lorac.CrossEntropyLoss(reduction=reduction, ignore_index=ignore_index)
    loss = crit(x, t)
    np.testing.assert_allclose(loss, tloss.detach().numpy(), rtol=1e-5, atol=1e-6)
    grad = crit.backward(g if reduction == "none" else 1.0)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-5, atol=1e-7)


# -- MSE ---------------------------------------------------------------------------------------

MSE_SHAPES = [(0,), (1,), (7,), (5, 3), (2, 3, 4), ()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MSE_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_matches_reference(rng, dtype, shape, reduction):
    x = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    d = x.astype(np.float64) - t
    loss = F.mse_loss(x, t, reduction)
    if reduction == "none":
        assert loss.shape == shape and loss.dtype == dtype
        assert_close(loss, d * d, dtype)
    elif reduction == "sum":
        assert_close(loss, np.sum(d * d), dtype)
    elif d.size:
        assert_close(loss, np.mean(d * d), dtype)
    else:
        assert np.isnan(loss)
    g = rng.standard_normal(shape).astype(dtype) if reduction == "none" else 1.5
    scale = 1.0 / d.size if reduction == "mean" and d.size else 1.0
    grad = F.mse_loss_backward(x, t, g, reduction)
    assert grad.shape == shape and grad.dtype == dtype
    assert_close(grad, 2 * d * np.asarray(g, np.float64) * scale, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_gradient_matches_finite_differences(rng, reduction):
    x, t, w = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))

    def scalar():
        loss = F.mse_loss(x, t, reduction)
        return float(np.sum(loss * w)) if reduction == "none" else loss

    grad = F.mse_loss_backward(x, t, w if reduction == "none" else 1.0, reduction)
    np.testing.assert_allclose(grad, central_difference(scalar, x), rtol=1e-6, atol=1e-8)


@pytest.mark.torch
def test_mse_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x, t = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((6, 5)).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    tloss = torch.nn.MSELoss()(tx, torch.tensor(t))
    tloss.backward()
    crit = lorac.MSELoss()
    np.testing.assert_allclose(crit(x, t), tloss.item(), rtol=1e-6)
    np.testing.assert_allclose(crit.backward(), tx.grad.numpy(), rtol=1e-6, atol=1e-8)


# -- modules and bad input ---------------------------------------------------------------------

def test_loss_modules_return_floats_and_need_a_forward(rng):
    crit = lorac.CrossEntropyLoss()
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        crit.backward()
    loss = crit(rng.standard_normal((3, 4)).astype(np.float32), [0, 1, 3])
    assert type(loss) is float
    assert crit.backward().dtype == np.float32
    with pytest.raises(RuntimeError, match="twice for one forward"):
        crit.backward()
    assert repr(lorac.CrossEntropyLoss(reduction="sum", ignore_index=3)) == \
        "CrossEntropyLoss(reduction='sum', ignore_index=3)"
    assert isinstance(lorac.nn.MSELoss()(np.zeros(3), np.ones(3)), float)


def test_failed_forward_clears_the_previous_context(rng):
    crit = lorac.CrossEntropyLoss()
    crit(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError):
        crit(np.zeros((2, 3)), [0, 7])
    with pytest.raises(RuntimeError):
        crit.backward()


@pytest.mark.parametrize("call,error,match", [
    (lambda: F.cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0])), TypeError,
     r"target must hold integer class indices, got dtype float64"),
    (lambda: F.cross_entropy(np.zeros((2, 3)), [0, 3]), ValueError,
     r"'target' must hold class indices in \[0, 3\) or ignore_index=-100, got 3 at position 1"),
    (lambda: F.cross_entropy(np.zeros((2, 3)), [-1, 0]), ValueError, r"got -1 at position 0"),
    (lambda: F.cross_entropy(np.zeros((2, 3)), [0, 1, 2]), ValueError,
     r"target must have shape \(2,\) \(input's shape without its last, class dimension 3\), got \(3,\)"),
    (lambda: F.cross_entropy(np.zeros((2, 3), np.int32), [0, 1]), TypeError,
     r"input must have dtype float32 or float64, got int32"),
    (lambda: F.cross_entropy(np.float64(1.0), 0), ValueError, r"input must have shape \(..., C\)"),
    (lambda: F.cross_entropy(np.zeros((2, 3)), [0, 1], reduction="avg"), ValueError,
     r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (lambda: lorac.CrossEntropyLoss(ignore_index=1.5), TypeError, r"ignore_index must be an int, got float"),
    (lambda: F.cross_entropy_backward(np.zeros((2, 3)), [0, 1], np.ones(2)), ValueError,
     r"grad_output must be a scalar for reduction='mean', got shape \(2,\)"),
    (lambda: F.cross_entropy_backward(np.zeros((2, 3)), [0, 1], np.ones(3), reduction="none"), ValueError,
     r"grad_output must have shape \(2,\) \(the loss's, reduction='none'\), got \(3,\)"),
    (lambda: F.mse_loss(np.zeros(3, np.float32), np.zeros(3)), TypeError,
     r"mse_loss: target must have dtype float32 \(the input's\), got float64"),
    (lambda: F.mse_loss(np.zeros(3), np.zeros((3, 1))), ValueError,
     r"target must have the input's shape \(3,\), got \(3, 1\)"),
    (lambda: _C.cross_entropy_forward(np.zeros((2, 3)), np.zeros(2, np.int32), -100), TypeError,
     r"cross_entropy_forward\(\): 'target' must have dtype int64, got int32"),
    (lambda: _C.cross_entropy_backward(np.zeros((2, 3)), np.zeros(2, np.int64), np.zeros(3), -100, 1.0),
     ValueError, r"cross_entropy_backward\(\): 'lse' must have shape \(N,\) = \(2,\), got shape \(3,\)"),
    (lambda: _C.cross_entropy_backward(np.zeros((2, 3)), np.array([0, 5]), np.zeros(2), -100, 1.0),
     ValueError, r"cross_entropy_backward\(\): 'target' must hold class indices in \[0, 3\)"),
    (lambda: _C.mse_backward(np.zeros(2), np.zeros(2), float("inf")), ValueError,
     r"mse_backward\(\): 'scale' must be finite, got inf"),
    (lambda: _C.mse_forward(np.zeros(2, np.float32), np.zeros(3, np.float32)), ValueError,
     r"mse_forward\(\): 'target' must have shape \(n,\) = \(2,\), got shape \(3,\)"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_kernels_read_strided_logits(rng):
    big = rng.standard_normal((5, 12))
    x = big[:, 2:9]  # rows with a stride of 12 elements
    t = rng.integers(0, 7, 5)
    loss, lse, total, count = _C.cross_entropy_forward(x, t, -100)
    np.testing.assert_allclose(loss, ce_reference(x, t, reduction="none"), rtol=1e-13)
    assert count == 5 and np.isclose(total, loss.sum())
    np.testing.assert_allclose(_C.cross_entropy_backward(x, t, lse, -100, 1.0),
                               ce_grad_reference(x, t, reduction="sum"), rtol=1e-12, atol=1e-14)

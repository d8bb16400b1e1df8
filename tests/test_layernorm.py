"""LayerNorm (lorac.LayerNorm, csrc/layernorm*) vs NumPy float64, finite differences and torch."""

import numpy as np
import pytest

import lorac
from lorac import _C
from lorac import functional as F
from reference import assert_close, central_difference

DTYPES = [np.float32, np.float64]
# (input shape, normalized_shape): empty batch, one row, D = 1, odd sizes, 3-D, 2-D normalized shape
CASES = [((0, 4), (4,)), ((1, 1), (1,)), ((1, 6), (6,)), ((7, 13), (13,)), ((3, 5, 9), (9,)),
         ((2, 3, 4), (3, 4)), ((65, 32), (32,))]


def reference(x, shape, w, b, eps, g):
    """float64 forward and gradients (dx, dw, db) of LayerNorm over the trailing `shape`."""
    d = int(np.prod(shape))
    x2 = np.asarray(x, np.float64).reshape(-1, d)
    g2 = np.asarray(g, np.float64).reshape(-1, d)
    mean = x2.mean(axis=1, keepdims=True) if d else np.zeros((len(x2), 1))
    var = ((x2 - mean) ** 2).mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    xhat = (x2 - mean) * rstd
    wf = np.ones(d) if w is None else np.asarray(w, np.float64).reshape(-1)
    bf = np.zeros(d) if b is None else np.asarray(b, np.float64).reshape(-1)
    y = xhat * wf + bf
    gw = g2 * wf
    dx = rstd * (gw - gw.mean(axis=1, keepdims=True) - xhat * (gw * xhat).mean(axis=1, keepdims=True))
    return (y.reshape(np.shape(x)), dx.reshape(np.shape(x)), (g2 * xhat).sum(axis=0).reshape(shape),
            g2.sum(axis=0).reshape(shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized", CASES)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_matches_reference(rng, dtype, shape, normalized, affine, bias):
    ln = lorac.LayerNorm(normalized, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=dtype)
    if affine:
        ln.weight.data[...] = rng.standard_normal(normalized)
        start_w = rng.standard_normal(normalized).astype(dtype)
        ln.weight.grad = start_w.copy()  # accumulators start non-zero: backward must add
    if bias:
        ln.bias.data[...] = rng.standard_normal(normalized)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    y = ln(x)
    g = rng.standard_normal(shape).astype(dtype)
    dx = ln.backward(g)
    w = ln.weight.data if affine else None
    b = ln.bias.data if bias else None
    ry, rdx, rdw, rdb = reference(x, normalized, w, b, 1e-5, g)
    assert y.shape == shape and y.dtype == dtype and dx.shape == shape and dx.dtype == dtype
    assert_close(y, ry, dtype)
    assert_close(dx, rdx, dtype)
    if affine:
        assert_close(ln.weight.grad, start_w + rdw, dtype)
    if bias:
        assert_close(ln.bias.grad, rdb, dtype)
    np.testing.assert_allclose(F.layer_norm(x, normalized, w, b), y)


def test_large_offsets_are_normalised_accurately():
    x = np.array([[1e4 + 1, 1e4 + 2, 1e4 + 3]], np.float32)
    y = lorac.LayerNorm(3)(x)
    assert_close(y, reference(x, (3,), None, None, 1e-5, x)[0], np.float32)


def test_gradients_match_finite_differences(rng):
    ln = lorac.LayerNorm((2, 3), eps=1e-3, dtype=np.float64)
    ln.weight.data[...] = rng.standard_normal((2, 3))
    ln.bias.data[...] = rng.standard_normal((2, 3))
    x = rng.standard_normal((4, 2, 3))
    wout = rng.standard_normal(x.shape)

    def loss():
        return float(np.sum(ln(x) * wout))

    ln(x)
    dx = ln.backward(wout)
    np.testing.assert_allclose(dx, central_difference(loss, x), rtol=1e-6, atol=1e-8)
    for name in ("weight", "bias"):
        p = getattr(ln, name)
        np.testing.assert_allclose(p.grad, central_difference(loss, p.data), rtol=1e-6, atol=1e-8)


def test_frozen_parameters_get_no_gradient(rng):
    ln = lorac.LayerNorm(5)
    ln.weight.requires_grad = False
    ln(rng.standard_normal((3, 5)).astype(np.float32))
    ln.backward(np.ones((3, 5), np.float32))
    assert ln.weight.grad is None and ln.bias.grad is not None


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch(rng, dtype, bias):
    torch = pytest.importorskip("torch")
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    tln = torch.nn.LayerNorm((4, 6), eps=1e-4, bias=bias, dtype=tdtype)
    with torch.no_grad():
        tln.weight.copy_(torch.tensor(rng.standard_normal((4, 6))))
        if bias:
            tln.bias.copy_(torch.tensor(rng.standard_normal((4, 6))))
    ln = lorac.nn.LayerNorm((4, 6), eps=1e-4, bias=bias, dtype=dtype)
    assert list(ln.state_dict()) == list(tln.state_dict())  # torch's keys
    ln.load_state_dict({k: v.numpy() for k, v in tln.state_dict().items()})
    x = (rng.standard_normal((3, 4, 6)) * 2).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    tln(tx).backward(torch.tensor(g))
    t = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ln(x), tln(tx).detach().numpy(), **t)
    np.testing.assert_allclose(ln.backward(g), tx.grad.numpy(), **t)
    np.testing.assert_allclose(ln.weight.grad, tln.weight.grad.numpy(), **t)
    if bias:
        np.testing.assert_allclose(ln.bias.grad, tln.bias.grad.numpy(), **t)


@pytest.mark.parametrize("call,error,match", [
    (lambda: lorac.LayerNorm(0), ValueError, r"normalized_shape must be positive ints, got 0"),
    (lambda: lorac.LayerNorm("4"), ValueError, r"normalized_shape must be positive ints"),
    (lambda: lorac.LayerNorm(4.0), TypeError, r"normalized_shape must be an int or a tuple of ints, got float"),
    (lambda: lorac.LayerNorm(4, eps=-1.0), ValueError, r"eps must be >= 0, got -1.0"),
    (lambda: lorac.LayerNorm(4, dtype=np.int32), TypeError, r"dtype must be float32 or float64"),
    (lambda: lorac.LayerNorm(4)(np.zeros((2, 5), np.float32)), ValueError,
     r"LayerNorm.forward: input must have shape \(..., 4\) \(normalized_shape last\), got \(2, 5\)"),
    (lambda: lorac.LayerNorm((2, 3))(np.zeros(6, np.float32)), ValueError, r"must have shape \(..., 2, 3\)"),
    (lambda: lorac.LayerNorm(4)(np.zeros((2, 4))), TypeError,
     r"LayerNorm.forward: input must have dtype float32, got float64"),
    (lambda: lorac.LayerNorm(4).backward(np.zeros((2, 4), np.float32)), RuntimeError, r"without a preceding forward"),
    (lambda: _run(lorac.LayerNorm(4), np.zeros((2, 4), np.float32), np.zeros((4, 2), np.float32)), ValueError,
     r"LayerNorm.backward: grad_output must have shape \(2, 4\) \(the output's\), got \(4, 2\)"),
    (lambda: F.layer_norm(np.zeros((2, 4)), 4, weight=np.ones(3)), ValueError,
     r"layer_norm: weight must have shape \(4,\) \(normalized_shape\), got \(3,\)"),
    (lambda: _C.layernorm_forward(np.zeros((2, 4)), None, None, -1.0), ValueError,
     r"layernorm_forward\(\): 'eps' must be in \[0, inf\), got -1"),
    (lambda: _C.layernorm_forward(np.zeros((2, 4)), np.ones(4, np.float32), None, 1e-5), TypeError,
     r"layernorm_forward\(\): 'weight' must have dtype float64, got float32"),
    (lambda: _C.layernorm_backward(np.zeros((2, 4)), np.zeros((2, 4)), None, np.zeros(3), np.zeros(2)),
     ValueError, r"layernorm_backward\(\): 'mean' must have shape \(N,\) = \(2,\), got shape \(3,\)"),
    (lambda: _C.layernorm_backward(np.zeros((2, 4)), np.zeros((2, 4)), None, np.zeros(2), np.zeros(2), True,
                                   np.zeros(4)[::-1]), ValueError,
     r"layernorm_backward\(\): 'grad_weight' is updated in place and must be"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _run(module, x, g):
    module(x)
    return module.backward(g)


def test_failed_backward_leaves_no_gradient_behind():
    ln = lorac.LayerNorm(4)
    ln(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError):
        ln.backward(np.zeros((2, 4)))  # wrong dtype
    assert ln.weight.grad is None and ln.bias.grad is None


def test_repr_and_state_dict_keys():
    ln = lorac.LayerNorm((2, 3), bias=False, dtype=np.float64)
    assert repr(ln) == "LayerNorm((2, 3), eps=1e-05, elementwise_affine=True, bias=False, dtype=float64)"
    assert list(ln.state_dict()) == ["weight"]
    assert list(lorac.LayerNorm(3, elementwise_affine=False).state_dict()) == []

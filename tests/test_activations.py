"""ReLU, GELU (erf and tanh forms), Tanh and Dropout vs NumPy float64 references."""

import math

import numpy as np
import pytest

import lorac
from lorac import _C
from lorac import functional as F
from reference import assert_close, central_difference

DTYPES = [np.float32, np.float64]
SHAPES = [(0,), (1,), (7,), (5, 3), (2, 3, 5), (0, 4), ()]
KINDS = ["relu", "gelu", "gelu_tanh", "tanh"]
_erf = np.vectorize(math.erf, otypes=[np.float64])
_B = math.sqrt(2 / math.pi)


def forward_reference(kind, x):
    x = np.asarray(x, np.float64)
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(_B * (x + 0.044715 * x ** 3)))
    return np.tanh(x)


def derivative_reference(kind, x):
    x = np.asarray(x, np.float64)
    if kind == "relu":
        return (x > 0).astype(np.float64)
    if kind == "gelu":
        return 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    if kind == "gelu_tanh":
        t = np.tanh(_B * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _B * (1 + 3 * 0.044715 * x * x)
    return 1 - np.tanh(x) ** 2


MODULES = {"relu": lambda: lorac.ReLU(), "gelu": lambda: lorac.GELU(), "gelu_tanh": lambda: lorac.GELU("tanh"),
           "tanh": lambda: lorac.Tanh()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_module_matches_reference(rng, dtype, shape, kind):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    module = MODULES[kind]()
    y = module(x)
    assert y.shape == shape and y.dtype == dtype
    assert_close(y, forward_reference(kind, x), dtype)
    g = rng.standard_normal(shape).astype(dtype)
    dx = module.backward(g)
    assert dx.shape == shape and dx.dtype == dtype
    assert_close(dx, g * derivative_reference(kind, x), dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_read_strided_input(rng, kind):
    x = rng.standard_normal(20)[::2]  # stride of two elements: the binding copies it
    assert_close(_C.activation_forward(kind, x), forward_reference(kind, x), np.float64)


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "tanh"])
def test_gradient_matches_finite_differences(rng, kind):
    x = rng.standard_normal((3, 4)) * 2
    w = rng.standard_normal((3, 4))
    module = MODULES[kind]()
    module(x)
    dx = module.backward(w)
    expected = central_difference(lambda: float(np.sum(F.activation(kind, x, "test") * w)), x)
    np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-8)


def test_relu_gradient_matches_finite_differences_away_from_zero(rng):
    x = rng.standard_normal((4, 5))
    x[np.abs(x) < 0.1] = 0.5  # the kink at 0 has no derivative
    w = rng.standard_normal((4, 5))
    relu = lorac.ReLU()
    relu(x)
    np.testing.assert_allclose(relu.backward(w), central_difference(lambda: float(np.sum(F.relu(x) * w)), x),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 40.0, -40.0], dtype)
    np.testing.assert_array_equal(F.relu(x)[:4], np.array([np.nan, np.inf, 0.0, 0.0], dtype))
    np.testing.assert_array_equal(F.tanh(x)[1:3], [1.0, -1.0])
    for approximate in ("none", "tanh"):  # torch's values, -inf -> NaN included
        y = F.gelu(x, approximate)
        assert np.isnan(y[0]) and y[1] == np.inf and np.isnan(y[2]) and y[5] == 40.0 and y[6] == 0.0
        d = F.gelu_backward(np.ones_like(x), x, approximate)
        assert np.all(np.isnan(d[:3])) and d[5] == 1.0 and d[6] == 0.0
    # ReLU's backward, like torch's threshold_backward, blocks the gradient where the output <= 0
    np.testing.assert_array_equal(F.relu_backward(np.ones(3, dtype), np.array([0.0, -0.0, 2.0], dtype)), [0, 0, 1])


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(rng, dtype, approximate):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal((64, 33)) * 4).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.GELU(approximate=approximate)(tx)
    ty.backward(torch.tensor(g))
    gelu = lorac.nn.GELU(approximate=approximate)
    # float32: absolute error ~1e-6 where the tanh form saturates (1 + tanh -> 0); torch and
    # glibc's tanhf round differently there, and neither is closer to the float64 value
    t = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(gelu(x), ty.detach().numpy(), **t)
    np.testing.assert_allclose(gelu.backward(g), tx.grad.numpy(), **t)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["ReLU", "Tanh"])
def test_relu_tanh_match_torch(rng, name):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((10, 7)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    getattr(torch.nn, name)()(tx).backward(torch.tensor(g))
    module = getattr(lorac.nn, name)()
    module(x)
    np.testing.assert_allclose(module.backward(g), tx.grad.numpy(), rtol=1e-6, atol=1e-7)


# -- Dropout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_training_and_eval(dtype):
    x = np.ones((200, 50), dtype)
    drop = lorac.Dropout(0.3, rng=0)
    y = drop(x)
    assert y.dtype == dtype
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    g = np.arange(x.size, dtype=dtype).reshape(x.shape)
    np.testing.assert_allclose(drop.backward(g), g * kept / 0.7, rtol=1e-6)  # the same mask
    np.testing.assert_array_equal(lorac.Dropout(0.3, rng=0)(x), y)  # seeded: reproducible
    drop.eval()
    assert drop(x) is x and drop.backward(g) is g
    np.testing.assert_array_equal(lorac.Dropout(1.0)(x), 0.0)  # p = 1 drops everything, as torch
    assert lorac.Dropout(0.0)(x) is x


def test_dropout_functional_and_bad_input():
    x = np.ones((4, 4))
    assert F.dropout(x, 0.5, training=False) is x
    assert set(np.unique(F.dropout(x, 0.5, rng=1))) <= {0.0, 2.0}
    with pytest.raises(ValueError, match=r"Dropout: dropout probability p must be in \[0, 1\], got 1.5"):
        lorac.Dropout(1.5)
    with pytest.raises(TypeError, match=r"Dropout: p must be a real number, got str"):
        lorac.Dropout("0.1")
    drop = lorac.Dropout(0.5)
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        drop.backward(x)
    drop(x)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(4, 4\) \(the output's\), got \(4,\)"):
        drop.backward(np.ones(4))


# -- composition and bad input -----------------------------------------------------------------

def test_sequential_gradients_match_finite_differences(rng):
    model = lorac.nn.Sequential(lorac.nn.Linear(5, 6, rng=1, dtype=np.float64), lorac.nn.GELU(),
                                lorac.nn.Linear(6, 4, r=2, lora_alpha=2, rng=2, dtype=np.float64),
                                lorac.nn.Tanh(), lorac.nn.LayerNorm(4, dtype=np.float64), lorac.nn.ReLU(),
                                lorac.nn.Linear(4, 3, rng=3, dtype=np.float64))
    model[2].lora_B.data[...] = rng.standard_normal(model[2].lora_B.shape)
    model[4].weight.data[...] = rng.standard_normal(4)
    model[4].bias.data[...] = rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 5))
    t = rng.integers(0, 3, (2, 3))
    crit = lorac.nn.CrossEntropyLoss()
    crit(model(x), t)
    dx = model.backward(crit.backward())

    def loss():
        return F.cross_entropy(model(x), t)

    np.testing.assert_allclose(dx, central_difference(loss, x), rtol=1e-5, atol=1e-8)
    for name, p in model.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(p.grad, central_difference(loss, p.data), rtol=1e-5, atol=1e-8,
                                       err_msg=name)
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("call,error,match", [
    (lambda: lorac.ReLU()(np.zeros(3, np.int64)), TypeError,
     r"ReLU.forward: input must have dtype float32 or float64, got int64"),
    (lambda: lorac.GELU("exact"), ValueError, r"approximate must be 'none' or 'tanh', got 'exact'"),
    (lambda: lorac.Tanh().backward(np.zeros(3)), RuntimeError, r"Tanh.backward\(\) called without"),
    (lambda: _run(lorac.GELU(), np.zeros(3, np.float32), np.zeros(3)), TypeError,
     r"GELU.backward: grad_output must have dtype float32 \(the input's\), got float64"),
    (lambda: _run(lorac.ReLU(), np.zeros((2, 3)), np.zeros((3, 2))), ValueError,
     r"ReLU.backward: grad_output must have shape \(2, 3\) \(the output's\), got \(3, 2\)"),
    (lambda: _C.activation_forward("swish", np.zeros(3)), ValueError,
     r"activation_forward\(\): 'kind' must be one of 'relu', 'gelu', 'gelu_tanh', 'tanh', got 'swish'"),
    (lambda: _C.activation_forward("relu", np.zeros((3, 1))), ValueError,
     r"activation_forward\(\): 'x' must be 1-D, got 2-D"),
    (lambda: _C.activation_backward("tanh", np.zeros(3), np.zeros(2)), ValueError,
     r"activation_backward\(\): 'grad_output' must have shape \(n,\) = \(3,\), got shape \(2,\)"),
    (lambda: _C.activation_backward("tanh", np.zeros(3), [0.0, 0.0, 0.0]), TypeError,
     r"activation_backward\(\): 'grad_output' must be a numpy.ndarray of dtype float64, got list"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _run(module, x, g):
    module(x)
    return module.backward(g)


def test_lists_are_accepted_as_float64():
    y = lorac.ReLU()([[-1.0, 2.0]])
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, [[0.0, 2.0]])

"""Bad input to lorac.Linear and its kernels: a clear exception or a correct result,
and the layer unchanged after a failed call."""

import numpy as np
import pytest

import lorac
from lorac import _C
from reference import assert_close, linear_forward


def make_layer(rng, dtype=np.float32, **kwargs):
    layer = lorac.Linear(6, 4, r=2, dtype=dtype, rng=0, **kwargs)
    for p in layer.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    return layer


def snapshot(layer):
    return ({k: v.copy() for k, v in layer.state_dict().items()},
            {n: None if p.grad is None else p.grad.copy() for n, p in layer.named_parameters()},
            layer.merged)


def assert_unchanged(layer, snap):
    state, grads, merged = snap
    assert layer.merged == merged
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    for n, p in layer.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            np.testing.assert_array_equal(p.grad, grads[n])


def expected(layer, x):
    return linear_forward(x.reshape(-1, 6), layer.weight.data, layer.bias.data, layer.lora_A.data,
                          layer.lora_B.data, layer.scaling).reshape(x.shape[:-1] + (4,))


def test_wrong_last_dimension(rng):
    layer = make_layer(rng)
    snap = snapshot(layer)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 6\), got shape \(3, 5\)"):
        layer(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        layer(np.float32(1.0))
    assert_unchanged(layer, snap)


def test_wrong_dtype(rng):
    layer = make_layer(rng)
    with pytest.raises(TypeError, match="dtype float32, got float64"):
        layer(np.zeros((3, 6)))
    with pytest.raises(TypeError, match="got int64"):
        layer(np.zeros((3, 6), np.int64))
    with pytest.raises(TypeError):
        layer("not an array")
    y = layer([[0.5] * 6])  # a list is converted to the layer's dtype
    assert y.dtype == np.float32 and y.shape == (1, 4)


@pytest.mark.parametrize("kind", ["fortran", "strided", "negative", "transposed_view", "readonly"])
def test_unusual_layouts_work(rng, kind):
    layer = make_layer(rng, dtype=np.float64)
    base = rng.standard_normal((12, 14))
    x = {"fortran": np.asfortranarray(base[:5, :6]),
         "strided": base[::2, 1:7],
         "negative": base[::-3, ::-2][:, :6],
         "transposed_view": base[:6, :5].T,
         "readonly": base[:4, :6].copy()}[kind]
    if kind == "readonly":
        x.flags.writeable = False
    y = layer(x)
    assert_close(y, expected(layer, x), np.float64)
    g = np.asfortranarray(rng.standard_normal(y.shape))
    g.flags.writeable = False
    dx = layer.backward(g)
    assert dx.shape == x.shape


def test_empty_batch(rng):
    layer = make_layer(rng)
    y = layer(np.zeros((0, 6), np.float32))
    assert y.shape == (0, 4)
    assert layer.backward(np.zeros((0, 4), np.float32)).shape == (0, 6)
    assert np.all(layer.lora_A.grad == 0)
    y3 = layer(np.zeros((2, 0, 6), np.float32))
    assert y3.shape == (2, 0, 4)


def test_nan_propagates_without_crash(rng):
    layer = make_layer(rng)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    x[0, 0] = np.nan
    y = layer(x)
    assert np.isnan(y[0]).all() and np.isfinite(y[1:]).all()
    dx = layer.backward(np.ones_like(y))
    assert np.isfinite(dx).all()  # dx = g W0 + ... does not involve x
    assert np.isnan(layer.lora_A.grad).any()


def test_backward_errors_leave_layer_unchanged(rng):
    layer = make_layer(rng)
    snap = snapshot(layer)
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        layer.backward(np.zeros((3, 4), np.float32))
    x = rng.standard_normal((3, 6)).astype(np.float32)
    layer(x)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(3, 4\).*got \(3, 5\)"):
        layer.backward(np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match="grad_output must have dtype float32"):
        layer.backward(np.zeros((3, 4)))
    assert_unchanged(layer, snap)
    layer.backward(np.ones((3, 4), np.float32))  # the forward's cache survived the failures
    with pytest.raises(RuntimeError, match="twice"):
        layer.backward(np.ones((3, 4), np.float32))


def test_backward_after_merging_is_refused(rng):
    layer = make_layer(rng)
    layer(rng.standard_normal((3, 6)).astype(np.float32))
    layer.eval()
    with pytest.raises(RuntimeError):
        layer.backward(np.ones((3, 4), np.float32))


def test_corrupted_grad_buffer_is_reported_and_nothing_written(rng):
    layer = make_layer(rng)
    layer(rng.standard_normal((3, 6)).astype(np.float32))
    layer.lora_B.grad = np.zeros((5, 5), np.float32)  # wrong shape set by user code
    snap = snapshot(layer)
    with pytest.raises(ValueError, match=r"grad_lora_B.*\(4, 2\).*got shape \(5, 5\)"):
        layer.backward(np.ones((3, 4), np.float32))
    assert_unchanged(layer, snap)  # lora_A.grad and bias.grad were not allocated either


@pytest.mark.parametrize("kwargs,error", [
    (dict(r=-1), ValueError), (dict(r=1.5), TypeError), (dict(lora_dropout=1.0), ValueError),
    (dict(lora_dropout=-0.1), ValueError), (dict(dtype=np.int32), TypeError), (dict(rng="seed"), TypeError),
    (dict(lora_alpha=float("nan")), ValueError), (dict(lora_alpha="8"), TypeError),
    (dict(rng=-1), ValueError), (dict(rng=True), TypeError), (dict(dtype="bogus"), TypeError),
])
def test_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        lorac.Linear(4, 3, **{"r": 2, **kwargs})
    with pytest.raises(ValueError):
        lorac.Linear(-4, 3)


def test_binding_validates_before_writing(rng):
    w = rng.standard_normal((4, 6)).astype(np.float32)
    a = rng.standard_normal((2, 6)).astype(np.float32)
    b = rng.standard_normal((4, 2)).astype(np.float32)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    g = rng.standard_normal((3, 4)).astype(np.float32)
    _, u = _C.linear_forward(x, w, None, a, b, 1.0, False)
    da = np.zeros_like(a)
    with pytest.raises(ValueError, match="grad_lora_B"):
        _C.linear_backward(g, x, w, a, b, u, 1.0, False, None, 1.0, True, None, None, da, np.zeros((4, 3), np.float32))
    assert np.all(da == 0)
    with pytest.raises(TypeError, match="'x' must be a numpy.ndarray"):
        _C.linear_forward([[1.0] * 6], w, None, a, b, 1.0, False)
    with pytest.raises(TypeError, match="'weight' must have dtype float32 or float64, got int64"):
        _C.linear_forward(x, np.zeros((4, 6), np.int64), None, None, None, 1.0, False)
    with pytest.raises(ValueError, match="'scaling' must be finite"):
        _C.linear_forward(x, w, None, a, b, float("nan"), False)
    with pytest.raises(ValueError, match="both be arrays or both be None"):
        _C.linear_forward(x, w, None, a, None, 1.0, False)
    with pytest.raises(ValueError, match="'mask' must have shape"):
        _C.linear_forward(x, w, None, a, b, 1.0, False, np.ones((3, 5), np.uint8), 1.0)
    with pytest.raises(TypeError, match="'mask' must have dtype uint8"):
        _C.linear_forward(x, w, None, a, b, 1.0, False, np.ones((3, 6), bool), 1.0)
    readonly = w.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _C.linear_merge(readonly, a, b, 1.0, False)
    with pytest.raises(ValueError, match="in place"):
        _C.linear_merge(np.asfortranarray(w), a, b, 1.0, False)
    with pytest.raises(TypeError):
        _C.linear_forward(x, w, None, a, b, "1.0", False)


def test_a_negative_seed_is_named():
    with pytest.raises(ValueError, match="rng must be a seed >= 0"):
        lorac.Linear(4, 3, r=2, rng=-1)


def test_an_equal_dtype_object_is_accepted(rng):
    # float32 with metadata: equal to the layer's dtype, not the same object
    layer = make_layer(rng)
    same = np.dtype(np.float32, metadata={"source": "test"})
    assert same == np.float32 and same is not np.dtype(np.float32)
    x = rng.standard_normal((3, 6)).astype(same)
    y = layer(x)
    np.testing.assert_allclose(y, expected(layer, x.astype(np.float32)), rtol=1e-5, atol=1e-6)
    dx = layer.backward(np.ones((3, 4), same))
    assert dx.shape == (3, 6) and dx.dtype == np.float32

"""lorac.nn.utils.clip_grad_norm_ / clip_grad_value_ vs a NumPy float64
reference and torch.nn.utils, on the .grad arrays in place."""

import math

import numpy as np
import pytest

import lorac
from lorac.nn.utils import clip_grad_norm_, clip_grad_value_

DTYPES = [np.float32, np.float64]


def params_with_grads(rng, dtype, shapes=((4, 3), (5,), (2, 3, 2), (0, 4)), scale=1.0):
    params = []
    for shape in shapes:
        p = lorac.Parameter(rng.standard_normal(shape).astype(dtype))
        p.grad = (rng.standard_normal(shape) * scale).astype(dtype)
        params.append(p)
    return params


def reference_norm(grads, order):
    flat = np.concatenate([g.astype(np.float64).ravel() for g in grads])
    return np.max(np.abs(flat)) if order == math.inf else np.sum(np.abs(flat) ** order) ** (1 / order)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [2.0, 1, 3.5, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_the_float64_reference(rng, dtype, order, max_norm):
    params = params_with_grads(rng, dtype)
    before = [p.grad.astype(np.float64) for p in params]
    arrays = [p.grad for p in params]
    norm_order = math.inf if order == "inf" else order
    expected_norm = reference_norm(before, norm_order)
    norm = clip_grad_norm_(params, max_norm, norm_type=order)
    assert isinstance(norm, float)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(norm, expected_norm, rtol=rtol)
    scale = min(1.0, max_norm / (expected_norm + 1e-6))
    for p, grad, array in zip(params, before, arrays):
        assert p.grad is array and p.grad.dtype == dtype  # in place
        np.testing.assert_allclose(p.grad, grad * scale, rtol=rtol * 10, atol=0)
    if max_norm < expected_norm:
        assert reference_norm([p.grad for p in params], norm_order) == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [2.0, 1.0, math.inf])
def test_clip_grad_norm_matches_torch(rng, dtype, order):
    torch = pytest.importorskip("torch")
    params = params_with_grads(rng, dtype, shapes=((4, 3), (5,), (2, 3, 2)), scale=3.0)  # torch's inf
    tensors = []  # norm refuses an empty gradient; lorac's counts it as 0 (test above)
    for p in params:
        t = torch.tensor(p.data, requires_grad=True)
        t.grad = torch.tensor(p.grad)
        tensors.append(t)
    frozen = lorac.Parameter(np.ones(3, dtype), requires_grad=False)  # no grad: skipped by both
    norm = clip_grad_norm_(params + [frozen], 2.0, norm_type=order)
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors + [torch.ones(3)], 2.0, norm_type=order)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert norm == pytest.approx(float(torch_norm), rel=rtol)
    for p, t in zip(params, tensors):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=rtol, atol=1e-7)


@pytest.mark.torch
def test_clip_grad_value_matches_torch(rng):
    torch = pytest.importorskip("torch")
    params = params_with_grads(rng, np.float32, scale=2.0)
    params[0].grad[0, 0] = np.nan
    tensors = [torch.tensor(p.data) for p in params]
    for t, p in zip(tensors, params):
        t.grad = torch.tensor(p.grad)
    arrays = [p.grad for p in params]
    clip_grad_value_(params, 0.75)
    torch.nn.utils.clip_grad_value_(tensors, 0.75)
    for p, t, array in zip(params, tensors, arrays):
        assert p.grad is array
        np.testing.assert_array_equal(p.grad, t.grad.numpy())  # NaN stays NaN in both
    assert np.nanmax(np.abs(params[1].grad)) <= 0.75 and np.isnan(params[0].grad[0, 0])


def test_a_training_step_of_a_lora_model_clips_only_the_trainable_gradients(rng):
    model = lorac.Sequential(lorac.Linear(6, 5, r=2, rng=0), lorac.ReLU(), lorac.Linear(5, 3, r=2, rng=1))
    lorac.mark_only_lora_as_trainable(model)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * (1.0 if p.requires_grad else 0.3)
    y = model(rng.standard_normal((4, 6)).astype(np.float32))
    model.backward(np.full_like(y, 10.0))
    grads = {k: p.grad.copy() for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    norm = clip_grad_norm_(model.parameters(), max_norm=1.0)  # a generator, as torch users pass it
    assert norm == pytest.approx(reference_norm(list(grads.values()), 2), rel=1e-6) and norm > 1.0
    assert reference_norm([p.grad for p in model.parameters() if p.grad is not None], 2) == pytest.approx(
        1.0, rel=1e-5)
    assert all(p.grad is None for k, p in model.named_parameters() if k not in grads)


def test_one_parameter_and_no_gradients(rng):
    (p,) = params_with_grads(rng, np.float64, shapes=((3,),))
    expected = np.linalg.norm(p.grad)
    assert clip_grad_norm_(p, 10.0) == pytest.approx(expected, rel=1e-12)
    q = lorac.Parameter(np.ones(3))
    assert clip_grad_norm_([q], 1.0) == 0.0 and q.grad is None
    assert clip_grad_norm_([], 1.0) == 0.0
    clip_grad_value_([q], 1.0)
    assert q.grad is None


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_norm_raises_when_asked_and_changes_nothing(rng, bad):
    params = params_with_grads(rng, np.float32)
    params[1].grad[2] = bad
    before = [p.grad.copy() for p in params]
    with pytest.raises(RuntimeError, match="norm of order 2 is (nan|inf), so they cannot be clipped"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, grad in zip(params, before):
        np.testing.assert_array_equal(p.grad, grad)
    norm = clip_grad_norm_(params, 1.0)  # as torch: scaled by max_norm / (norm + 1e-6), NaN or 0
    assert not math.isfinite(norm)
    assert np.isnan(params[1].grad[2])
    if bad == np.inf:
        assert np.all(params[0].grad == 0)
    else:
        assert np.all(np.isnan(params[0].grad))


@pytest.mark.parametrize("call, error, message", [
    (lambda ps: clip_grad_norm_(ps, -1.0), ValueError, "max_norm must be >= 0, got -1"),
    (lambda ps: clip_grad_norm_(ps, np.nan), ValueError, "max_norm must be finite"),
    (lambda ps: clip_grad_norm_(ps, "1"), TypeError, "max_norm must be a real number, got str"),
    (lambda ps: clip_grad_norm_(ps, 1.0, norm_type=0), ValueError, "positive number or inf, got 0"),
    (lambda ps: clip_grad_norm_(ps, 1.0, norm_type=-math.inf), ValueError, "positive number or inf"),
    (lambda ps: clip_grad_norm_(ps, 1.0, norm_type="fro"), TypeError, "norm_type must be a real number"),
    (lambda ps: clip_grad_norm_(ps + [np.ones(3)], 1.0), TypeError, "got ndarray at position 4"),
    (lambda ps: clip_grad_value_(ps, -0.5), ValueError, "clip_value must be >= 0, got -0.5"),
    (lambda ps: clip_grad_value_(ps, None), TypeError, "clip_value must be a real number, got NoneType"),
])
def test_bad_arguments_raise_and_change_nothing(rng, call, error, message):
    params = params_with_grads(rng, np.float32, scale=5.0)
    before = [p.grad.copy() for p in params]
    with pytest.raises(error, match=message):
        call(params)
    for p, grad in zip(params, before):
        np.testing.assert_array_equal(p.grad, grad)


def test_reachable_as_torch_spells_it():
    from lorac import nn

    assert nn.utils.clip_grad_norm_ is clip_grad_norm_ and lorac.nn.utils.clip_grad_value_ is clip_grad_value_

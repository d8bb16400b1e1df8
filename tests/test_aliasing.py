"""Aliasing between the arguments of lorac._C (issue 7).

The rule (csrc/binding.c, resolve_aliasing): an input that shares memory with
an array the call updates in place is read as it was when the call began
(the binding copies it first); two arrays updated in place that share memory
are refused with a ValueError naming both, before anything is written.
Overlap is decided exactly (numpy.shares_memory), so disjoint views
interleaved in one buffer are accepted.  The property tests
(tests/property) draw aliasing at random for every entry point; these are
the named cases.
"""

import numpy as np
import pytest

import lorac._C as C

import entry_points as E


def _expect(name, kwargs):
    """The reference result from the arguments' values at call time."""
    return E.BY_NAME[name].reference(E.snapshot(kwargs))


def _assert_result(name, kwargs, result, expected):
    ep = E.BY_NAME[name]
    dtype = next(v.dtype for _, v in E.arrays_in(kwargs) if v.dtype.kind == "f")
    rtol = E.tolerance(ep, dtype)
    E.assert_matches(result, expected.returns, rtol)
    for n, value in expected.inplace.items():
        E.assert_matches(kwargs[n], value, rtol, n)


def _case(name, seed=0, **overrides):
    """A valid case of entry point `name` whose arrays are all non-empty."""
    for s in range(seed, seed + 500):
        case = E.build(name, s)
        kw = case.kwargs
        if all(v.size for _, v in E.arrays_in(kw)) and all(kw.get(k) is not None for k in overrides.get("need", ())):
            return case
    raise AssertionError(f"no non-empty case for {name}")


@pytest.mark.parametrize("dtype", E.FLOATS)
def test_sgd_grad_is_param(dtype):
    p = np.linspace(-1, 1, 7).astype(dtype)
    kw = dict(param=p, grad=p, momentum_buffer=None, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.01,
              nesterov=False, maximize=False, init_buffer=False)
    expected = _expect("sgd_step", kw)
    C.sgd_step(**kw)
    _assert_result("sgd_step", kw, None, expected)


@pytest.mark.parametrize("dtype", E.FLOATS)
def test_adam_grad_overlaps_param(dtype):
    buf = np.linspace(-1, 1, 12).astype(dtype)
    param, grad = buf[:8], buf[4:]  # grad's first half is param's second half
    kw = dict(param=param, grad=grad, exp_avg=np.zeros(8, dtype), exp_avg_sq=np.zeros(8, dtype),
              max_exp_avg_sq=None, step=1, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled=False, amsgrad=False, maximize=False)
    expected = _expect("adam_step", kw)
    C.adam_step(**kw)
    _assert_result("adam_step", kw, None, expected)


def test_adam_state_arrays_must_not_share_memory():
    p, state = np.ones(5), np.zeros(5)
    before = (p.copy(), state.copy())
    with pytest.raises(ValueError, match=r"adam_step\(\): 'exp_avg' and 'exp_avg_sq' .*share memory"):
        C.adam_step(p, np.ones(5), state, state, None, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, False)
    np.testing.assert_array_equal(p, before[0])
    np.testing.assert_array_equal(state, before[1])


@pytest.mark.parametrize("dtype", E.FLOATS)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_adapter_is_a_view_of_the_weight(dtype, fan_in_fan_out):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 6)).astype(dtype)
    kw = dict(weight=w, lora_A=w[:2], lora_B=w[:, 4:], alpha=0.5, fan_in_fan_out=fan_in_fan_out)
    expected = _expect("linear_merge", kw)
    C.linear_merge(**kw)
    _assert_result("linear_merge", kw, None, expected)


@pytest.mark.parametrize("grad_name", ["grad_weight", "grad_lora_A", "grad_lora_B", "grad_bias"])
@pytest.mark.parametrize("input_name", ["grad_output", "x", "weight", "lora_A", "lora_B", "u"])
def test_linear_backward_input_overlaps_gradient(grad_name, input_name):
    """Each input placed inside the memory of each gradient accumulator."""
    case = _case("linear_backward", need=("lora_A", "grad_weight", "grad_bias", "grad_lora_A", "grad_lora_B"))
    kw = dict(case.kwargs)
    out, inp = kw[grad_name], kw[input_name]
    buf = np.concatenate([out.ravel(), inp.ravel()]).astype(out.dtype)
    start = out.size // 2  # the input begins in the middle of the gradient
    buf = np.concatenate([buf, np.zeros(inp.size, out.dtype)])
    kw[grad_name] = buf[:out.size].reshape(out.shape)
    kw[input_name] = buf[start:start + inp.size].reshape(inp.shape)
    assert np.shares_memory(kw[grad_name], kw[input_name])
    expected = _expect("linear_backward", kw)
    result = C.linear_backward(**kw)
    _assert_result("linear_backward", kw, result, expected)


def test_two_gradients_sharing_memory_are_refused():
    case = _case("linear_backward", need=("lora_A", "grad_lora_A"))
    kw = dict(case.kwargs)
    kw["grad_weight"] = None
    kw["grad_bias"] = None
    ga = kw["grad_lora_A"]
    kw["grad_lora_B"] = np.zeros(kw["lora_B"].shape, ga.dtype)
    buf = np.zeros(max(ga.size, kw["grad_lora_B"].size) + 1, ga.dtype)
    kw["grad_lora_A"] = buf[:ga.size].reshape(ga.shape)
    kw["grad_lora_B"] = buf[1:1 + kw["grad_lora_B"].size].reshape(kw["grad_lora_B"].shape)
    before = buf.copy()
    with pytest.raises(ValueError, match="'grad_lora_A' and 'grad_lora_B' are both updated in place"):
        C.linear_backward(**kw)
    np.testing.assert_array_equal(buf, before)


def test_disjoint_views_of_one_buffer_are_accepted():
    """A flat gradient buffer split into column blocks: extents interleave,
    memory does not; the exact test lets it through and the result is right."""
    case = _case("linear_backward", need=("lora_A", "grad_lora_A", "grad_lora_B"))
    kw = dict(case.kwargs)
    ga, gb = kw["grad_lora_A"], kw["grad_lora_B"]
    rows = max(ga.shape[0], gb.shape[0])
    flat = np.zeros((rows, ga.shape[1] + gb.shape[1]), ga.dtype)
    kw["grad_lora_A"] = flat[:ga.shape[0], :ga.shape[1]]
    kw["grad_lora_B"] = flat[:gb.shape[0], ga.shape[1]:]
    kw["grad_lora_A"][...] = ga
    kw["grad_lora_B"][...] = gb
    if ga.shape[0] > 1 and gb.shape[0] > 1:
        assert not np.shares_memory(kw["grad_lora_A"], kw["grad_lora_B"])
    expected = _expect("linear_backward", kw)
    result = C.linear_backward(**kw)
    _assert_result("linear_backward", kw, result, expected)


def test_layernorm_grad_weight_is_grad_bias():
    g = np.ones((3, 4))
    acc = np.zeros(4)
    with pytest.raises(ValueError, match="'grad_weight' and 'grad_bias'"):
        C.layernorm_backward(g, g, None, np.zeros(3), np.ones(3), True, acc, acc)
    np.testing.assert_array_equal(acc, 0)


def test_embedding_indices_stored_inside_grad_weight():
    """The index array is an int64 view of grad_weight's float64 bytes (small
    ints are denormal floats).  Without the copy the kernel would rewrite the
    indices while scattering into grad_weight and write out of bounds."""
    num, dim = 6, 2
    gw = np.zeros((num, dim))
    idx_view = gw.reshape(-1).view(np.int64)[:4]   # the first 4 entries of grad_weight's memory
    idx_view[:] = [5, 1, 5, 0]
    w = np.random.default_rng(0).standard_normal((num, dim))
    g = np.full((4, dim), 1e300)  # huge: one addition turns an index's bits into garbage
    kw = dict(grad_output=g, indices=idx_view, weight=w, lora_A=None, lora_B=None, u=None, scaling=1.0,
              padding_idx=None, grad_weight=gw, grad_lora_A=None, grad_lora_B=None)
    expected = _expect("embedding_backward", kw)
    C.embedding_backward(**kw)
    np.testing.assert_array_equal(gw, expected.inplace["grad_weight"])


def test_molora_router_gradient_overlapping_lora_a_gradient_is_refused():
    case = _case("molora_backward", need=("grad_lora_A", "grad_lora_router"))
    kw = dict(case.kwargs)
    kw["grad_lora_router"] = kw["grad_lora_A"][: kw["lora_router"].shape[0]] if \
        kw["grad_lora_A"].shape[0] >= kw["lora_router"].shape[0] else kw["grad_lora_router"]
    if not np.shares_memory(kw["grad_lora_router"], kw["grad_lora_A"]):
        pytest.skip("no case with r >= num_experts")
    with pytest.raises(ValueError, match="'grad_lora_A' and 'grad_lora_router'"):
        C.molora_backward(**kw)


@pytest.mark.parametrize("name", [ep.name for ep in E.ENTRY_POINTS if ep.inplace])
def test_every_in_place_entry_point_copies_an_aliased_input(name):
    """For each entry point that writes in place: an input that IS one of its
    in-place arrays (same memory, same shape) gives the reference result."""
    ep = E.BY_NAME[name]
    for seed in range(400):
        kw = dict(E.build(name, seed).kwargs)
        outs = [n for n in ep.inplace if kw.get(n) is not None and kw[n].size]
        pairs = [(i, o) for o in outs for i, v in kw.items()
                 if i not in ep.inplace and isinstance(v, np.ndarray) and v.dtype == kw[o].dtype
                 and v.shape == kw[o].shape]
        if pairs:
            break
    else:
        pytest.skip(f"{name}: no input with the shape of an in-place array")
    i, o = pairs[0]
    kw[i] = kw[o] = np.ascontiguousarray(kw[o])
    with np.errstate(all="ignore"):
        expected = _expect(name, kw)
    result = getattr(C, name)(**kw)
    _assert_result(name, kw, result, expected)

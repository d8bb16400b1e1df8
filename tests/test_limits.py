"""Numerical limits (issue 7).

* Sizes beyond BLAS's 32-bit integers are refused with a ValueError before
  any allocation.  Arrays claiming 2**31 or more rows, columns or entries are
  faked with zero-stride views (np.lib.stride_tricks.as_strided: no memory
  behind them); tracemalloc, which sees NumPy's data allocations, proves that
  nothing was allocated for them.
* 1,000 merge/unmerge cycles (eval()/train() with merge_weights) drift the
  base weight by far less than 1e-5 relative in float32 (measured: ~2e-7
  with an adapter 8x the weight's norm; docs/HARDENING.md lists the figures).
* merge_and_unload(safe_merge=True) refuses a non-finite adapter and leaves
  every base weight as it was.
"""

import tracemalloc

import numpy as np
import pytest

import lorac
import lorac._C as C

import entry_points as E

HUGE = 2**31  # one past LORAC_BLAS_INT_MAX
MIB = 2**20


def fake(shape, dtype):
    """A zero-stride array of `shape` backed by one element."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=shape, strides=(0,) * len(shape))


def base_case(name):
    """A valid case whose arrays all have at least one element on every axis."""
    for seed in range(2000):
        kw = E.build(name, seed).kwargs
        if all(v.ndim >= 1 and min(v.shape) > 0 for _, v in E.arrays_in(kw)):
            return kw
    raise AssertionError(f"no case without empty axes for {name}")


def huge_variants(name):
    """(label, kwargs): one array argument with one axis faked to 2**31."""
    kw = base_case(name)
    for arg, value in kw.items():
        arrays = [(f"{arg}", value, None)] if isinstance(value, np.ndarray) else \
            [(f"{arg}[{i}]", v, i) for i, v in enumerate(value)] if isinstance(value, list) else []
        for label, arr, index in arrays:
            if not isinstance(arr, np.ndarray):
                continue
            for axis in range(arr.ndim):
                shape = list(arr.shape)
                shape[axis] = HUGE
                big = fake(tuple(shape), arr.dtype)
                new = dict(kw)
                if index is None:
                    new[arg] = big
                else:
                    new[arg] = list(value)
                    new[arg][index] = big
                yield f"{label} axis {axis}", new


def _call_allocating_nothing(fn, kwargs):
    """fn(**kwargs) must raise ValueError; returns (message, peak bytes traced during the call)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        with pytest.raises(ValueError) as info:
            fn(**kwargs)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    return str(info.value), peak


@pytest.mark.parametrize("name", [ep.name for ep in E.ENTRY_POINTS])
def test_sizes_beyond_blas_ints_are_refused_before_allocating(name):
    fn = getattr(C, name)
    blas_refusals = 0
    variants = list(huge_variants(name))
    assert variants
    for label, kwargs in variants:
        message, peak = _call_allocating_nothing(fn, kwargs)
        assert peak < MIB, f"{name} ({label}): {peak} bytes allocated before the refusal: {message}"
        assert message.startswith(f"{name}()"), message
        blas_refusals += "32-bit" in message
    # a free dimension (rows of x, r, number of indices...) is refused for its size, not its shape
    assert blas_refusals > 0, f"{name}: no variant reached the BLAS size check"


@pytest.mark.parametrize("name", ["embedding_forward", "embedding_backward", "multi_embedding_forward"])
def test_indices_with_too_many_entries_are_refused_before_conversion(name):
    """(2**16, 2**16) uint8 indices: each axis fits an int, their 2**32 entries do not.
    Converting them to intp would allocate 32 GiB; the size check comes first."""
    kw = base_case(name)
    kw["indices"] = fake((2**16, 2**16), np.uint8)
    message, peak = _call_allocating_nothing(getattr(C, name), kw)
    assert "32-bit" in message and "'indices'" in message
    assert peak < MIB


@pytest.fixture
def one_blas_thread():
    """Tiny GEMMs in a loop: OpenBLAS's threads only add contention on a busy machine."""
    before = lorac.get_num_threads()
    lorac.set_num_threads(1)
    yield
    lorac.set_num_threads(before)


@pytest.mark.parametrize("dtype, bound", [(np.float32, 1e-5), (np.float64, 1e-13)])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_thousand_merge_unmerge_cycles_barely_drift(dtype, bound, fan_in_fan_out, one_blas_thread):
    layer = lorac.Linear(256, 128, r=16, lora_alpha=32, dtype=dtype, rng=0, fan_in_fan_out=fan_in_fan_out)
    rng = np.random.default_rng(1)
    layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)  # a trained adapter: |s B A| ~ 8 |W0|
    w0 = layer.weight.data.astype(np.float64)
    for _ in range(1000):
        layer.eval()   # merge
        layer.train()  # unmerge
    assert not layer.merged
    drift = np.linalg.norm(layer.weight.data - w0) / np.linalg.norm(w0)
    assert drift <= bound, f"{np.dtype(dtype).name}: relative drift {drift:.2e} after 1000 cycles"
    assert drift > 0 or dtype == np.float64  # the cycles did touch the weight (float32 rounding shows)


def test_safe_merge_refuses_a_non_finite_adapter():
    model = lorac.Sequential(lorac.Linear(4, 3, r=2), lorac.Linear(3, 2, r=2))
    model[0].lora_B.data[...] = 1.0
    model[1].lora_B.data[0, 0] = np.inf
    before = [layer.weight.data.copy() for layer in model]
    with pytest.raises(ValueError, match="non-finite"):
        lorac.merge_and_unload(model, safe_merge=True)
    for layer, w in zip(model, before):
        np.testing.assert_array_equal(layer.weight.data, w)
        assert not layer.merged

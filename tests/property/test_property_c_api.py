"""Property-based tests of every public C entry point of lorac._C (issue 7).

For each function of the catalogue (tests/entry_points.py), hypothesis draws a
valid call -- random sizes including 0 and 1, random rank, scaling, dropout
masks, both float dtypes, optional arguments -- then rearranges its arrays in
memory (C or Fortran order, negative or non-unit strides, windows into larger
arrays) and may make buffers alias:

* ``in_out``: an input shares memory with an array updated in place; the
  result must be the one computed from the values the input had when the
  call began (the binding copies such inputs);
* ``out_out``: two in-place arrays share memory: ValueError, nothing written;
* ``in_in``: two inputs share memory: no effect on the result.

The call must then equal the NumPy float64 reference within the entry
point's tolerance, or raise the documented exception: ValueError when an
array updated in place has a layout the kernel cannot write (Fortran order,
negative or non-unit strides) or shares memory with another -- leaving every
in-place array untouched.  Inputs are never modified.

Examples per entry point: the hypothesis profile's max_examples (tests/conftest.py:
"ci" 300, ``pytest --hypothesis-profile=long`` 5000).
"""

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import lorac._C as C

import entry_points as E

ALIAS_MODES = ("none", "none", "in_out", "out_out", "in_in")


def _float_inputs(ep, kwargs, dtype):
    """Names of top-level float array inputs of `dtype` (not updated in place)."""
    return [n for n, v in kwargs.items()
            if isinstance(v, np.ndarray) and v.dtype == dtype and n not in ep.inplace]


def _present_outputs(ep, kwargs):
    return [n for n in ep.inplace if kwargs.get(n) is not None]


def _overlapping_views(draw, shapes, dtype, values):
    """Views of one random buffer, one per shape (C order), placed at random
    offsets so that they overlap when both are non-empty."""
    sizes = [int(np.prod(s)) for s in shapes]
    total = sum(sizes) + 2
    buf = values.array((total,), dtype)
    views = []
    for shape, size in zip(shapes, sizes):
        start = draw.int(0, max(0, min(total - size, max(sizes) - 1)))
        views.append(buf[start:start + size].reshape(shape))
    return views


def _apply_alias(draw, ep, kwargs, dtype, mode, values):
    """Rewire some arrays of kwargs to share memory; returns the mode applied."""
    if mode == "in_out":
        ins, outs = _float_inputs(ep, kwargs, dtype), _present_outputs(ep, kwargs)
        if not ins or not outs:
            return "none"
        i, o = draw.choice(ins), draw.choice(outs)
        if kwargs[i].shape == kwargs[o].shape and draw.bool():  # the very same array
            kwargs[i] = kwargs[o] = np.ascontiguousarray(kwargs[o])
        else:
            kwargs[i], kwargs[o] = _overlapping_views(draw, [kwargs[i].shape, kwargs[o].shape], dtype, values)
        return mode
    if mode == "out_out":
        outs = _present_outputs(ep, kwargs)
        if len(outs) < 2:
            return "none"
        a = draw.choice(outs)
        b = draw.choice([n for n in outs if n != a])
        kwargs[a], kwargs[b] = _overlapping_views(draw, [kwargs[a].shape, kwargs[b].shape], dtype, values)
        return mode
    if mode == "in_in":
        ins = _float_inputs(ep, kwargs, dtype)
        if len(ins) < 2:
            return "none"
        a = draw.choice(ins)
        b = draw.choice([n for n in ins if n != a])
        kwargs[a], kwargs[b] = _overlapping_views(draw, [kwargs[a].shape, kwargs[b].shape], dtype, values)
        return mode
    return "none"


def _relayout_all(draw, kwargs):
    for name, value in list(kwargs.items()):
        if isinstance(value, np.ndarray):
            kwargs[name] = E.relayout(value, draw.choice(E.LAYOUTS), draw)
        elif isinstance(value, list):
            kwargs[name] = [E.relayout(v, draw.choice(E.LAYOUTS), draw) for v in value]


def _must_refuse(ep, kwargs):
    """The documented ValueError cases: an in-place array the kernel cannot
    write in place, or two in-place arrays sharing memory."""
    outs = [kwargs[n] for n in _present_outputs(ep, kwargs)]
    if any(not E.kernel_accepts_in_place(o) for o in outs):
        return True
    return any(np.shares_memory(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])


def _check(ep, dtype, kwargs, result, expected):
    """The return value and every in-place argument equal the reference's."""
    rtol = E.tolerance(ep, dtype)
    E.assert_matches(result, expected.returns, rtol)
    for n in _present_outputs(ep, kwargs):
        E.assert_matches(kwargs[n], expected.inplace[n], rtol, n)


@pytest.mark.parametrize("name", [ep.name for ep in E.ENTRY_POINTS])
@given(data=st.data())
def test_matches_reference(name, data):
    ep = E.BY_NAME[name]
    draw = E.HypothesisDraw(data)
    case = ep.build(draw)
    kwargs = dict(case.kwargs)
    _relayout_all(draw, kwargs)
    _apply_alias(draw, ep, kwargs, case.dtype, draw.choice(ALIAS_MODES), E.Values(draw))

    before = E.snapshot(kwargs)
    try:
        with np.errstate(all="ignore"):  # aliased buffers may hold e.g. a negative exp_avg_sq: NaN on both sides
            expected = ep.reference(E.snapshot(kwargs))
    except E.Ambiguous:
        assume(False)
    fn = getattr(C, name)
    outputs = _present_outputs(ep, kwargs)

    if _must_refuse(ep, kwargs):
        with pytest.raises(ValueError, match=name):
            fn(**kwargs)
        for n in outputs:
            np.testing.assert_array_equal(kwargs[n], before[n], err_msg=f"{n} changed by a refused call")
        return

    result = fn(**kwargs)
    _check(ep, case.dtype, kwargs, result, expected)
    # inputs are read only (unless they share memory with an output, which the call updates)
    out_arrays = [kwargs[n] for n in outputs]
    for n, value in E.arrays_in(kwargs):
        if n in ep.inplace or any(np.shares_memory(value, o) for o in out_arrays):
            continue
        orig = before[n] if "[" not in n else before[n.split("[")[0]][int(n.split("[")[1][:-1])]
        np.testing.assert_array_equal(value, orig, err_msg=f"input {n} was modified")


def test_catalogue_is_complete():
    """Every public function of lorac._C has an entry (or is a utility)."""
    missing = set(E.public_functions(C)) - set(E.BY_NAME) - set(E.UTILITIES)
    assert not missing, f"add these lorac._C functions to tests/entry_points.py: {sorted(missing)}"
    gone = set(E.BY_NAME) - set(E.public_functions(C))
    assert not gone, f"tests/entry_points.py lists functions lorac._C lacks: {sorted(gone)}"


@pytest.mark.parametrize("name", [ep.name for ep in E.ENTRY_POINTS])
def test_comparison_can_fail(name):
    """The reference check is not vacuous: a result off by 1e-3 of its scale is caught."""
    ep = E.BY_NAME[name]
    for seed in range(50):
        case = ep.build(E.RandomDraw(seed))
        try:
            expected = ep.reference(E.snapshot(case.kwargs))
        except E.Ambiguous:
            continue
        target = _first_nonempty(expected)
        if target is None:
            continue
        target.flat[0] += 1e-3 * max(1.0, float(np.max(np.abs(target))))
        result = getattr(C, name)(**case.kwargs)
        with pytest.raises(AssertionError):
            _check(ep, case.dtype, case.kwargs, result, expected)
        return
    pytest.fail(f"{name}: no case with a non-empty result in 50 seeds")


def _first_nonempty(expected):
    """The first non-empty float array of an Expected (returns, then in-place), or None."""
    stack = [expected.returns] + list(expected.inplace.values())
    while stack:
        item = stack.pop(0)
        if isinstance(item, tuple):
            stack = list(item) + stack
        elif isinstance(item, np.ndarray) and item.size and item.dtype.kind == "f":
            return item
    return None

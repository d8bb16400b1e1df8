"""Leaks and reference counts of every lorac._C function (issue 7).

For every entry point of the catalogue (tests/entry_points.py) and every
utility: 100,000 successful calls and 100,000 failing ones (cycling through a
wrong dtype for each array argument, a wrong shape, and, for functions that
write in place, two in-place arrays sharing memory) must grow the resident
set by less than 1 MiB after a warm-up, and leave ``sys.getrefcount`` of every
argument unchanged.  Arrays are tiny so the whole file takes ~30 s.

Skipped under the sanitizers (LORAC_UNDER_SANITIZER: ASan's allocator makes
RSS meaningless there; LeakSanitizer does this job instead).
LORAC_LEAK_CALLS overrides the number of calls (default 100000).
"""

import os
import sys

import numpy as np
import pytest

import lorac._C as C

import entry_points as E

pytestmark = pytest.mark.skipif(bool(os.environ.get("LORAC_UNDER_SANITIZER")),
                                reason="RSS is meaningless under AddressSanitizer")

CALLS = int(os.environ.get("LORAC_LEAK_CALLS", "100000"))
WARMUP = 3000
MIB = 2**20
DOCUMENTED = (TypeError, ValueError, IndexError, OverflowError)


def rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tiny_case(name):
    """A valid case with as many array arguments as possible (optional ones
    given: their release paths run too), all non-empty and at most 64 elements."""
    best, best_count = None, -1
    for seed in range(600):
        kw = E.build(name, seed).kwargs
        arrays = [v for _, v in E.arrays_in(kw)]
        if all(0 < v.size <= 64 for v in arrays) and len(arrays) > best_count:
            best, best_count = kw, len(arrays)
    assert best is not None, f"no tiny case for {name}"
    return best


def _wrong_dtype(a):
    return a.astype(np.int8) if a.dtype.kind == "f" else a.astype(np.float64)


def failing_variants(name, kw):
    """Argument sets that each make `name` raise a documented exception."""
    variants = []
    for arg, value in kw.items():
        if isinstance(value, np.ndarray):
            variants.append(dict(kw, **{arg: _wrong_dtype(value)}))
            if value.ndim >= 1 and value.shape[0] > 1 and arg not in ("indices",):
                variants.append(dict(kw, **{arg: value[:-1]}))  # one row short
        elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            variants.append(dict(kw, **{arg: [_wrong_dtype(value[0])] + value[1:]}))
    outs = [n for n in E.BY_NAME[name].inplace if kw.get(n) is not None] if name in E.BY_NAME else []
    if len(outs) >= 2 and kw[outs[0]].shape == kw[outs[1]].shape:
        variants.append(dict(kw, **{outs[1]: kw[outs[0]]}))  # two in-place arrays sharing memory
    fn = getattr(C, name)
    kept = []
    for v in variants:
        try:
            fn(**v)
        except DOCUMENTED:
            kept.append(v)
    assert kept, f"{name}: no failing variant"
    return kept


def objects_of(*kwargs_list):
    """Every array and list passed, with its current reference count."""
    objs = {}
    for kw in kwargs_list:
        for value in kw.values():
            if isinstance(value, (np.ndarray, list)):
                objs[id(value)] = value
                if isinstance(value, list):
                    for item in value:
                        objs[id(item)] = item
    return list(objs.values())


def _loop_ok(fn, kw, n):
    for _ in range(n):
        fn(**kw)


def _loop_fail(fn, variants, n):
    k = len(variants)
    for i in range(n):
        try:
            fn(**variants[i % k])
        except DOCUMENTED:
            pass


def _measure(loop, *args):
    loop(*args[:-1], WARMUP)
    before = rss_bytes()
    loop(*args)
    return rss_bytes() - before


@pytest.mark.parametrize("name", [ep.name for ep in E.ENTRY_POINTS])
def test_no_leak_no_refcount_change(name):
    fn = getattr(C, name)
    kw = tiny_case(name)
    variants = failing_variants(name, kw)
    objs = objects_of(kw, *variants)
    counts = [sys.getrefcount(o) for o in objs]
    with np.errstate(all="ignore"):
        grown_ok = _measure(_loop_ok, fn, kw, CALLS)
        grown_fail = _measure(_loop_fail, fn, variants, CALLS)
    after = [sys.getrefcount(o) for o in objs]
    changed = [(type(o).__name__, b, a) for o, b, a in zip(objs, counts, after) if a != b]
    assert not changed, f"{name}: reference counts changed (type, before, after): {changed}"
    assert grown_ok < MIB, f"{name}: {CALLS} successful calls grew RSS by {grown_ok / MIB:.2f} MiB"
    assert grown_fail < MIB, f"{name}: {CALLS} failing calls grew RSS by {grown_fail / MIB:.2f} MiB"


@pytest.mark.parametrize("name", sorted(E.UTILITIES))
def test_utilities_no_leak(name):
    fn = getattr(C, name)
    args = E.UTILITIES[name](C)
    bad = (object(),) if args else (1,)  # wrong type / wrong arity

    def ok(n):
        for _ in range(n):
            fn(*args)

    def fail(n):
        for _ in range(n):
            try:
                fn(*bad)
            except DOCUMENTED:
                pass

    ok(WARMUP), fail(WARMUP)
    before = rss_bytes()
    ok(CALLS)
    fail(CALLS)
    assert rss_bytes() - before < MIB


def test_rss_measure_can_fail():
    """The RSS probe sees a real leak: 100,000 kept 64-byte arrays are well over 1 MiB."""
    before = rss_bytes()
    kept = [np.empty(8) for _ in range(100000)]
    assert rss_bytes() - before > MIB
    del kept

"""Mixed-batch kernels (csrc/lora_multi*) vs a NumPy float64 reference: every
row gets its own adapter, per-adapter ranks and scalings, Linear, MergedLinear
and Embedding, both dtypes, odd and empty sizes; and the binding's checks."""

import numpy as np
import pytest

from reference import assert_close

from lorac import _C

DTYPES = [np.float32, np.float64]


def ref_multi_linear(x, w, bias, As, Bs, scalings, ids, fan_in_fan_out=False, enable_lora=None):
    """y[i] = x[i] W0^T + bias + s_k sum_e (x[i] A_ke^T) B_ke^T into block e, in float64."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    w_oi = w.T if fan_in_fan_out else w
    y = x @ w_oi.T
    if bias is not None:
        y += bias
    out = w_oi.shape[0]
    flags = [True] if enable_lora is None else list(enable_lora)
    og = out // len(flags)
    blocks = [g for g, on in enumerate(flags) if on]
    for k, (a, b, s) in enumerate(zip(As, Bs, scalings)):
        rows = np.nonzero(ids == k)[0]
        if rows.size == 0:
            continue
        r = a.shape[0] // max(len(blocks), 1)
        for e, g in enumerate(blocks):
            ae = a[e * r:(e + 1) * r].astype(np.float64)
            be = b[e * og:(e + 1) * og].astype(np.float64)
            y[rows, g * og:(g + 1) * og] += s * (x[rows] @ ae.T) @ be.T
    return y


def make_adapters(rng, ranks, fan_in, b_rows, groups, dtype):
    As = [rng.standard_normal((groups * r, fan_in)).astype(dtype) for r in ranks]
    Bs = [rng.standard_normal((b_rows, r)).astype(dtype) for r in ranks]
    scalings = [float(s) for s in rng.uniform(-2, 2, len(ranks))]
    return As, Bs, scalings


SHAPES = [  # (n, in, out, ranks)
    (0, 5, 4, [2, 3]), (1, 5, 4, [2]), (7, 1, 1, [1, 1]), (9, 13, 11, [3, 0, 5, 2]), (37, 16, 24, [4, 8, 1]),
    (300, 9, 7, [2, 3, 4]), (5, 0, 6, [2]), (5, 6, 0, [2]), (6, 4, 3, []),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ["random", "sorted", "one"])
@pytest.mark.parametrize("contiguous_runs", [True, False])
def test_multi_linear_matches_reference(dtype, shape, order, contiguous_runs):
    n, fin, fout, ranks = shape
    rng = np.random.default_rng([n, fin, fout, len(ranks), len(order)])
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fout, fin)).astype(dtype)
    bias = rng.standard_normal(fout).astype(dtype)
    As, Bs, scalings = make_adapters(rng, ranks, fin, fout, 1, dtype)
    ids = rng.integers(-1, len(ranks), n) if ranks else np.full(n, -1)
    if order == "sorted":
        ids = np.sort(ids)
    elif order == "one" and ranks:
        ids = np.full(n, len(ranks) - 1)
    y = _C.multi_linear_forward(x, w, bias, As, Bs, scalings, ids, False, contiguous_runs=contiguous_runs)
    assert y.dtype == dtype and y.shape == (n, fout)
    assert_close(y, ref_multi_linear(x, w, bias, As, Bs, scalings, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("enable_lora", [None, (True, False, True)])
def test_multi_linear_without_base_is_the_adapters_part(dtype, enable_lora):
    rng = np.random.default_rng(5)
    n, fin, fout = 70, 8, 9
    n_enabled = 1 if enable_lora is None else sum(enable_lora)
    og = fout if enable_lora is None else fout // len(enable_lora)
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fout, fin)).astype(dtype)
    bias = rng.standard_normal(fout).astype(dtype)
    As, Bs, scalings = make_adapters(rng, [3, 1], fin, n_enabled * og, n_enabled, dtype)
    ids = rng.integers(-1, 2, n)
    y = _C.multi_linear_forward(x, w, bias, As, Bs, scalings, ids, False, enable_lora, with_base=False)
    full = ref_multi_linear(x, w, bias, As, Bs, scalings, ids, enable_lora=enable_lora)
    assert_close(y, full - (x.astype(np.float64) @ w.T.astype(np.float64) + bias), dtype, scale=10)
    assert np.all(y[ids == -1] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_multi_linear_layouts_and_strides(dtype, fan_in_fan_out):
    """Strided x, transposed (fan_in_fan_out) weight, no bias, int32 ids, an
    adapter given twice: the binding lays out what the kernel cannot take."""
    rng = np.random.default_rng(1)
    n, fin, fout = 20, 7, 9
    big = rng.standard_normal((n, 2 * fin)).astype(dtype)
    x = big[:, ::2]
    w = rng.standard_normal((fin, fout) if fan_in_fan_out else (fout, fin)).astype(dtype)
    As, Bs, scalings = make_adapters(rng, [3, 2], fin, fout, 1, dtype)
    As.append(As[0])
    Bs.append(Bs[0][::1])
    scalings.append(-scalings[0])
    ids = rng.integers(-1, 3, n).astype(np.int32)
    y = _C.multi_linear_forward(x, w, None, As, Bs, scalings, ids, fan_in_fan_out)
    assert_close(y, ref_multi_linear(x, w, None, As, Bs, scalings, ids, fan_in_fan_out), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("enable_lora", [(True, False, True), (False, True), (True,), (True, True, True, True)])
@pytest.mark.parametrize("n", [0, 1, 6, 150])
def test_multi_merged_linear_matches_reference(dtype, enable_lora, n):
    rng = np.random.default_rng(n + len(enable_lora))
    fin, groups = 10, len(enable_lora)
    fout = 3 * groups
    n_enabled = sum(enable_lora)
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fout, fin)).astype(dtype)
    bias = rng.standard_normal(fout).astype(dtype)
    As, Bs, scalings = make_adapters(rng, [2, 1, 4], fin, n_enabled * (fout // groups), n_enabled, dtype)
    ids = rng.integers(-1, 3, n)
    y = _C.multi_linear_forward(x, w, bias, As, Bs, scalings, ids, False, enable_lora)
    expected = ref_multi_linear(x, w, bias, As, Bs, scalings, ids, enable_lora=enable_lora)
    assert_close(y, expected, dtype)


def ref_multi_embedding(idx, w, As, Bs, scalings, ids):
    y = w[idx].astype(np.float64)
    for k, (a, b, s) in enumerate(zip(As, Bs, scalings)):
        rows = np.nonzero(ids == k)[0]
        y[rows] += s * a[:, idx[rows]].T.astype(np.float64) @ b.T.astype(np.float64)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,num,dim,ranks", [(0, 4, 3, [2]), (1, 4, 3, [2]), (17, 9, 5, [1, 3, 0, 2]),
                                              (260, 30, 8, [4, 2]), (5, 3, 0, [2])])
@pytest.mark.parametrize("sort", [False, True])
def test_multi_embedding_matches_reference(dtype, n, num, dim, ranks, sort):
    rng = np.random.default_rng(n + num)
    idx = rng.integers(0, num, n)
    w = rng.standard_normal((num, dim)).astype(dtype)
    As, Bs, scalings = make_adapters(rng, ranks, num, dim, 1, dtype)
    ids = rng.integers(-1, len(ranks), n)
    if sort:
        ids = np.sort(ids)
    y = _C.multi_embedding_forward(idx, w, As, Bs, scalings, ids)
    assert y.shape == (n, dim) and y.dtype == dtype
    assert_close(y, ref_multi_embedding(idx, w, As, Bs, scalings, ids), dtype)


def test_multi_embedding_reads_indices_of_any_shape():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3))
    As, Bs, scalings = make_adapters(rng, [2], 6, 3, 1, np.float64)
    idx = rng.integers(0, 6, (2, 3)).astype(np.uint8)
    ids = np.array([0, -1, 0, 0, -1, 0])
    y = _C.multi_embedding_forward(idx, w, As, Bs, scalings, ids)
    assert_close(y, ref_multi_embedding(idx.reshape(-1), w, As, Bs, scalings, ids), np.float64)


# -- bad input: every check happens before anything runs -------------------------
def _linear_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5)).astype(dtype)
    w = rng.standard_normal((3, 5)).astype(dtype)
    As, Bs, scalings = make_adapters(rng, [2, 1], 5, 3, 1, dtype)
    return x, w, None, As, Bs, scalings, np.array([0, 1, -1, 0]), False


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.__setitem__(6, np.array([0, 2, 0, 0])), ValueError, r"'ids' must lie in \[-1, 2\).*got 2 at row 1"),
    (lambda a: a.__setitem__(6, np.array([0, -2, 0, 0])), ValueError, r"got -2 at row 1"),
    (lambda a: a.__setitem__(6, np.array([0, 1, 0])), ValueError, r"'ids' must have shape \(N,\) = \(4,\)"),
    (lambda a: a.__setitem__(6, np.array([0.0, 1, 0, 0])), TypeError, r"'ids' must be a numpy.ndarray of an integer"),
    (lambda a: a.__setitem__(6, [0, 1, 0, 0]), TypeError, r"'ids' must be a numpy.ndarray"),
    (lambda a: a[3].__setitem__(1, a[3][1].astype(np.float64)), TypeError, r"'lora_As\[1\]' must have dtype float32"),
    (lambda a: a[3].__setitem__(0, a[3][0][:, :4]), ValueError, r"'lora_As\[0\]' must have shape \(r, in\)"),
    (lambda a: a[4].__setitem__(1, a[4][1][:2]), ValueError, r"'lora_Bs\[1\]' must have shape \(out, r\) = \(3, 1\)"),
    (lambda a: a[4].pop(), ValueError, r"same length .* got 2, 1 and 2"),
    (lambda a: a[5].__setitem__(0, float("nan")), ValueError, r"'scalings\[0\]' must be finite"),
    (lambda a: a[5].__setitem__(0, "2"), TypeError, r"'scalings\[0\]' must be a real number"),
    (lambda a: a.__setitem__(3, a[3][0]), TypeError, r"'lora_As' must be a list of numpy arrays"),
    (lambda a: a.__setitem__(5, 3.0), TypeError, r"'scalings' must be a sequence"),
    (lambda a: a.__setitem__(0, a[0][:, :4]), ValueError, r"'x' must have shape \(N, in\)"),
])
def test_multi_linear_bad_input(change, error, match):
    args = list(_linear_args())
    args[3], args[4], args[5] = list(args[3]), list(args[4]), list(args[5])
    change(args)
    with pytest.raises(error, match="multi_linear_forward"):
        _C.multi_linear_forward(*args)
    with pytest.raises(error, match=match):
        _C.multi_linear_forward(*args)


def test_multi_merged_linear_bad_groups():
    x, w, _, As, Bs, scalings, ids, _ = _linear_args()
    w6 = np.zeros((6, 5), np.float32)
    with pytest.raises(ValueError, match=r"'lora_As\[0\]' must have shape \(r \* n_enabled, in\).*not a multiple"):
        _C.multi_linear_forward(x, w6, None, [np.zeros((3, 5), np.float32)], [np.zeros((6, 1), np.float32)], [1.0],
                                np.zeros(4, np.int64), False, (True, True, False))
    with pytest.raises(ValueError, match="no True entry"):
        _C.multi_linear_forward(x, w6, None, As, Bs, scalings, ids, False, (False, False))
    with pytest.raises(ValueError, match=r"len\(enable_lora\) = 4 must divide"):
        _C.multi_linear_forward(x, w6, None, As, Bs, scalings, ids, False, (True,) * 4)


def test_multi_embedding_bad_input():
    w = np.zeros((5, 3))
    As, Bs = [np.zeros((2, 5))], [np.zeros((3, 2))]
    with pytest.raises(IndexError, match=r"multi_embedding_forward\(\): 'indices' must lie in \[0, 5\)"):
        _C.multi_embedding_forward(np.array([0, 5]), w, As, Bs, [1.0], np.array([0, 0]))
    with pytest.raises(ValueError, match=r"'ids' must have shape \(N,\) = \(2,\)"):
        _C.multi_embedding_forward(np.array([0, 4]), w, As, Bs, [1.0], np.array([0]))
    with pytest.raises(ValueError, match=r"'lora_Bs\[0\]' must have shape \(embedding_dim, r\)"):
        _C.multi_embedding_forward(np.array([0, 4]), w, As, [np.zeros((2, 2))], [1.0], np.array([0, 0]))


def test_multi_linear_releases_the_gil_and_is_thread_safe():
    """Two threads on the same operands with different ids get their own results."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 32))
    w = rng.standard_normal((24, 32))
    As, Bs, scalings = make_adapters(rng, [4, 2, 8], 32, 24, 1, np.float64)
    id_sets = [rng.integers(-1, 3, 64) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda ids: _C.multi_linear_forward(x, w, None, As, Bs, scalings, ids, False),
                                id_sets))
    for ids, y in zip(id_sets, results):
        assert_close(y, ref_multi_linear(x, w, None, As, Bs, scalings, ids), np.float64)

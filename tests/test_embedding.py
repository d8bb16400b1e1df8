"""lorac.Embedding and its C kernels vs a NumPy float64 reference (gather + scatter-add)."""

import itertools

import numpy as np
import pytest

import lorac
from lorac import _C
from reference import assert_close, central_difference

DTYPES = [np.float32, np.float64]
# (n, num_embeddings, embedding_dim, r): empty batch, single index, odd sizes,
# more indices than rows (repeats guaranteed), r > num, empty dims
SHAPES = [(0, 5, 3, 2), (1, 1, 1, 1), (7, 13, 5, 3), (50, 9, 17, 4), (130, 40, 33, 16),
          (6, 3, 4, 8), (4, 6, 0, 2), (5, 6, 3, 0)]
INDEX_DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64, np.intp]


# -- float64 references --------------------------------------------------------
def ref_forward(idx, w, a, b, scaling):
    """y[i] = W0[idx[i]] + scaling * A[:, idx[i]] B^T via a dense one-hot (independent of the kernel)."""
    w, idx = np.asarray(w, np.float64), np.asarray(idx).reshape(-1).astype(np.int64)
    onehot = np.zeros((idx.size, w.shape[0]))
    onehot[np.arange(idx.size), idx] = 1.0
    y = onehot @ w
    if a is not None:
        y = y + scaling * (onehot @ np.asarray(a, np.float64).T) @ np.asarray(b, np.float64).T
    return y


def ref_backward(g, idx, w, a, b, scaling, padding_idx=None):
    """dict of dw, da, db (float64): the one-hot reference's gradients, padding rows zeroed."""
    g, idx = np.asarray(g, np.float64), np.asarray(idx).reshape(-1).astype(np.int64)
    onehot = np.zeros((idx.size, w.shape[0]))
    onehot[np.arange(idx.size), idx] = 1.0
    keep = onehot.copy()
    if padding_idx is not None:
        keep[:, padding_idx] = 0
    out = {"dw": keep.T @ g}
    if a is not None:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        out["da"] = scaling * ((g @ b).T @ keep)
        out["db"] = scaling * g.T @ (onehot @ a.T)
    return out


def make_operands(rng, n, num, dim, r, dtype, index_dtype=np.int64):
    idx = rng.integers(0, num, size=n).astype(index_dtype) if num else np.zeros(0, index_dtype)
    w = rng.standard_normal((num, dim)).astype(dtype)
    a = rng.standard_normal((r, num)).astype(dtype)
    b = rng.standard_normal((dim, r)).astype(dtype)
    return idx, w, a, b


def randomize(layer, rng):
    for p in layer.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    return layer


# -- kernels ---------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", list(itertools.product(SHAPES, DTYPES)))
def test_forward_matches_reference(rng, shape, dtype):
    n, num, dim, r = shape
    idx, w, a, b = make_operands(rng, n, num, dim, r, dtype)
    y, u = _C.embedding_forward(idx, w, a, b, 0.75)
    assert y.dtype == dtype and y.shape == (n, dim) and u.shape == (n, r)
    assert_close(y, ref_forward(idx, w, a, b, 0.75), dtype)
    assert_close(u, a.T.astype(np.float64)[idx], dtype)
    y0, u0 = _C.embedding_forward(idx, w, None, None, 0.75)  # no adapter: a pure gather
    assert u0 is None
    np.testing.assert_array_equal(y0, w[idx])


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_every_integer_index_dtype_and_shape(rng, index_dtype):
    idx, w, a, b = make_operands(rng, 12, 7, 5, 3, np.float64, index_dtype)
    ref = ref_forward(idx, w, a, b, 2.0)
    for shaped in (idx, idx.reshape(3, 4), idx.reshape(2, 3, 2), idx[::2], np.asfortranarray(idx.reshape(3, 4))):
        y, _ = _C.embedding_forward(shaped, w, a, b, 2.0)
        assert_close(y, ref_forward(shaped, w, a, b, 2.0), np.float64)
    y, _ = _C.embedding_forward(idx.astype(idx.dtype.newbyteorder()), w, a, b, 2.0)  # byte-swapped
    assert_close(y, ref, np.float64)


@pytest.mark.parametrize("shape,dtype,padding", list(itertools.product(SHAPES, DTYPES, [False, True])))
def test_backward_matches_reference(rng, shape, dtype, padding):
    n, num, dim, r = shape
    idx, w, a, b = make_operands(rng, n, num, dim, r, dtype)
    padding_idx = int(idx[0]) if padding and n else None
    _, u = _C.embedding_forward(idx, w, a, b, 0.75)
    g = rng.standard_normal((n, dim)).astype(dtype)
    # accumulators start non-zero: kernels must add, not overwrite
    start = {k: rng.standard_normal(s).astype(dtype) for k, s in
             {"dw": w.shape, "da": a.shape, "db": b.shape}.items()}
    acc = {k: v.copy() for k, v in start.items()}
    assert _C.embedding_backward(g, idx, w, a, b, u, 0.75, padding_idx, acc["dw"], acc["da"], acc["db"]) is None
    ref = ref_backward(g, idx, w, a, b, 0.75, padding_idx)
    for k in ("dw", "da", "db"):
        assert_close(acc[k], start[k] + ref[k], dtype)
    if padding_idx is not None:  # the padding row/column is exactly untouched
        np.testing.assert_array_equal(acc["dw"][padding_idx], start["dw"][padding_idx])
        np.testing.assert_array_equal(acc["da"][:, padding_idx], start["da"][:, padding_idx])


def test_repeated_indices_accumulate(rng):
    w = rng.standard_normal((4, 3))
    a, b = rng.standard_normal((2, 4)), rng.standard_normal((3, 2))
    idx = np.array([2, 2, 2, 0])
    g = rng.standard_normal((4, 3))
    _, u = _C.embedding_forward(idx, w, a, b, 1.0)
    dw, da, db = np.zeros_like(w), np.zeros_like(a), np.zeros_like(b)
    _C.embedding_backward(g, idx, w, a, b, u, 1.0, None, dw, da, db)
    np.testing.assert_allclose(dw[2], g[:3].sum(axis=0), rtol=1e-14)
    np.testing.assert_allclose(da[:, 2], (g[:3] @ b).sum(axis=0), rtol=1e-14)
    assert np.all(dw[[1, 3]] == 0) and np.all(da[:, [1, 3]] == 0)


def test_frozen_gradients_are_not_touched(rng):
    idx, w, a, b = make_operands(rng, 9, 6, 5, 2, np.float32)
    _, u = _C.embedding_forward(idx, w, a, b, 1.0)
    g = rng.standard_normal((9, 5)).astype(np.float32)
    db = np.zeros_like(b)
    _C.embedding_backward(g, idx, w, a, b, u, 1.0, None, None, None, db)
    assert_close(db, ref_backward(g, idx, w, a, b, 1.0)["db"], np.float32)


@pytest.mark.parametrize("r", [0, 3])
def test_gradients_match_finite_differences(rng, r):
    idx, w, a, b = make_operands(rng, 8, 5, 4, r, np.float64)
    idx[:3] = 1  # repeats
    s = 1.5
    g = rng.standard_normal((8, 4))

    def loss():
        y, _ = _C.embedding_forward(idx, w, a if r else None, b if r else None, s)
        return float(np.sum(y * g))

    _, u = _C.embedding_forward(idx, w, a if r else None, b if r else None, s)
    grads = {"w": np.zeros_like(w), "a": np.zeros_like(a), "b": np.zeros_like(b)}
    _C.embedding_backward(g, idx, w, a if r else None, b if r else None, u, s, None, grads["w"],
                          grads["a"] if r else None, grads["b"] if r else None)
    for name, param in [("w", w), ("a", a), ("b", b)][: 3 if r else 1]:
        np.testing.assert_allclose(grads[name], central_difference(loss, param), rtol=1e-6, atol=1e-7,
                                   err_msg=name)


# -- bad input: errors before anything is written -------------------------------------
@pytest.mark.parametrize("bad,error", [
    (np.array([0, 6]), IndexError), (np.array([-1, 0]), IndexError),
    (np.array([2 ** 64 - 1], dtype=np.uint64), IndexError), (np.array([0.0, 1.0]), TypeError),
    (np.array([True, False]), TypeError), ([0, 1], TypeError), (np.array(["a"]), TypeError)])
def test_bad_indices_are_refused_before_writing(rng, bad, error):
    idx, w, a, b = make_operands(rng, 2, 6, 3, 2, np.float64)
    _, u = _C.embedding_forward(idx, w, a, b, 1.0)
    g = rng.standard_normal((2, 3))
    with pytest.raises(error, match="indices"):
        _C.embedding_forward(bad, w, a, b, 1.0)
    dw, da, db = np.ones_like(w), np.ones_like(a), np.ones_like(b)
    with pytest.raises(error, match="indices"):
        _C.embedding_backward(g, bad, w, a, b, u, 1.0, None, dw, da, db)
    assert np.all(dw == 1) and np.all(da == 1) and np.all(db == 1)


def test_index_error_message_names_value_and_range(rng):
    _, w, a, b = make_operands(rng, 1, 6, 3, 2, np.float32)
    with pytest.raises(IndexError, match=r"embedding_forward\(\): 'indices' must lie in \[0, 6\).*got 9"):
        _C.embedding_forward(np.array([[1, 2], [9, 0]]), w, a, b, 1.0)
    with pytest.raises(IndexError, match="18446744073709551615"):
        _C.embedding_forward(np.array([2 ** 64 - 1], dtype=np.uint64), w, a, b, 1.0)


@pytest.mark.parametrize("case", ["a_shape", "b_shape", "a_dtype", "only_a", "w_1d", "w_int", "scaling_nan",
                                  "g_shape", "u_shape", "da_shape", "dw_readonly", "pad_range", "pad_type"])
def test_bad_operands_raise_and_write_nothing(rng, case):
    idx, w, a, b = make_operands(rng, 4, 6, 3, 2, np.float32)
    _, u = _C.embedding_forward(idx, w, a, b, 1.0)
    g = rng.standard_normal((4, 3)).astype(np.float32)
    dw, da, db = np.ones_like(w), np.ones_like(a), np.ones_like(b)
    fwd = dict(indices=idx, weight=w, lora_A=a, lora_B=b, scaling=1.0)
    bwd = dict(grad_output=g, indices=idx, weight=w, lora_A=a, lora_B=b, u=u, scaling=1.0, padding_idx=None,
               grad_weight=dw, grad_lora_A=da, grad_lora_B=db)
    error = ValueError
    if case == "a_shape":
        fwd["lora_A"] = bwd["lora_A"] = a[:, :5]
    elif case == "b_shape":
        fwd["lora_B"] = bwd["lora_B"] = b[:2]
    elif case == "a_dtype":
        fwd["lora_A"] = bwd["lora_A"] = a.astype(np.float64)
        error = TypeError
    elif case == "only_a":
        fwd["lora_B"] = bwd["lora_B"] = None
    elif case == "w_1d":
        fwd["weight"] = bwd["weight"] = w[0]
    elif case == "w_int":
        fwd["weight"] = bwd["weight"] = w.astype(np.int32)
        error = TypeError
    elif case == "scaling_nan":
        fwd["scaling"] = bwd["scaling"] = float("nan")
    elif case == "g_shape":
        bwd["grad_output"] = g[:3]
    elif case == "u_shape":
        bwd["u"] = u[:, :1]
    elif case == "da_shape":
        bwd["grad_lora_A"] = np.ones((2, 5), np.float32)
    elif case == "dw_readonly":
        dw.flags.writeable = False
    elif case == "pad_range":
        bwd["padding_idx"] = 6
    elif case == "pad_type":
        bwd["padding_idx"] = 1.0
        error = TypeError
    with pytest.raises(error, match="embedding_backward"):
        _C.embedding_backward(**bwd)
    if case in ("a_shape", "b_shape", "a_dtype", "only_a", "w_1d", "w_int", "scaling_nan"):
        with pytest.raises(error, match="embedding_forward"):
            _C.embedding_forward(**fwd)
    assert np.all(dw == 1) and np.all(da == 1) and np.all(db == 1)


# -- the layer -------------------------------------------------------------------
def test_loralib_parameters_and_init():
    layer = lorac.Embedding(1000, 64, r=8, lora_alpha=16, padding_idx=3, rng=0)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "lora_A", "lora_B"]
    assert layer.weight.shape == (1000, 64) and layer.lora_A.shape == (8, 1000) and layer.lora_B.shape == (64, 8)
    assert layer.scaling == 2.0 and not layer.weight.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert np.all(layer.lora_A.data == 0) and np.all(layer.weight.data[3] == 0)
    for p in (layer.weight.data[np.arange(1000) != 3], layer.lora_B.data):  # N(0, 1) like torch
        assert abs(p.mean()) < 0.1 and abs(p.std() - 1) < 0.1
    assert layer.weight.dtype == np.float32 and not layer.merged
    plain = lorac.Embedding(5, 3)
    assert [n for n, _ in plain.named_parameters()] == ["weight"] and plain.weight.requires_grad
    assert lorac.Embedding(5, 3, padding_idx=-1).padding_idx == 4
    assert lorac.Embedding(5, 3, r=4, lora_alpha=8, use_rslora=True).scaling == pytest.approx(4.0)
    assert isinstance(layer, lorac.LoRALayer) and "padding_idx=3" in repr(layer)


@pytest.mark.parametrize("kwargs,error", [
    (dict(padding_idx=5), ValueError), (dict(padding_idx=-6), ValueError), (dict(padding_idx=1.0), TypeError),
    (dict(r=-1), ValueError), (dict(dtype=np.int32), TypeError), (dict(lora_alpha="1"), TypeError)])
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        lorac.Embedding(5, 3, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3), (0,), (2, 0, 3)])
def test_layer_forward_backward_match_reference(rng, dtype, lead):
    layer = randomize(lorac.Embedding(10, 6, r=3, lora_alpha=6, padding_idx=2, dtype=dtype, rng=1), rng)
    idx = rng.integers(0, 10, size=lead)
    y = layer(idx)
    assert y.shape == lead + (6,) and y.dtype == dtype
    args = (layer.weight.data, layer.lora_A.data, layer.lora_B.data, layer.scaling)
    assert_close(y.reshape(-1, 6), ref_forward(idx, *args), dtype)
    g = rng.standard_normal(lead + (6,)).astype(dtype)
    assert layer.backward(g) is None
    ref = ref_backward(g.reshape(-1, 6), idx, *args, padding_idx=2)
    assert layer.weight.grad is None  # frozen: never allocated
    assert_close(layer.lora_A.grad, ref["da"], dtype)
    assert_close(layer.lora_B.grad, ref["db"], dtype)


def test_list_and_scalar_indices(rng):
    layer = randomize(lorac.Embedding(4, 3, r=2, dtype=np.float64, rng=0), rng)
    np.testing.assert_array_equal(layer([1, 3]), layer(np.array([1, 3])))
    assert layer(2).shape == (3,) and layer([]).shape == (0, 3)
    with pytest.raises(TypeError, match="Embedding.forward: indices"):
        layer([0.5])


def test_plain_embedding_trains_its_weight(rng):
    layer = lorac.Embedding(6, 4, padding_idx=0, dtype=np.float64, rng=0)
    idx = np.array([0, 1, 1, 5])
    layer(idx)
    g = rng.standard_normal((4, 4))
    layer.backward(g)
    ref = ref_backward(g, idx, layer.weight.data, None, None, 0.0, padding_idx=0)
    np.testing.assert_allclose(layer.weight.grad, ref["dw"], rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_merges_and_equals_train_output(rng, dtype):
    layer = randomize(lorac.Embedding(20, 8, r=4, lora_alpha=8, dtype=dtype, rng=0), rng)
    idx = rng.integers(0, 20, size=(3, 5))
    w0 = layer.weight.data.copy()
    y_train = layer(idx)
    layer.eval()
    assert layer.merged
    delta = layer.scaling * (layer.lora_B.data.astype(np.float64) @ layer.lora_A.data).T
    assert_close(layer.weight.data, w0.astype(np.float64) + delta, dtype)
    assert_close(layer(idx), y_train.astype(np.float64), dtype)
    np.testing.assert_array_equal(layer(idx), layer.weight.data[idx])  # merged: a pure gather
    layer.train()
    assert not layer.merged
    scale = np.abs(w0).max() + np.abs(delta).max()
    assert np.abs(layer.weight.data - w0).max() <= 8 * np.finfo(dtype).eps * scale
    layer.merge_weights = False
    layer.eval()
    assert not layer.merged


def test_state_dict_is_unmerged_and_loads_into_a_merged_layer(rng):
    layer = randomize(lorac.Embedding(9, 5, r=2, dtype=np.float64, rng=0), rng)
    sd_train = {k: v.copy() for k, v in layer.state_dict().items()}
    layer.eval()
    sd_eval = layer.state_dict()
    for k in sd_train:
        np.testing.assert_allclose(sd_eval[k], sd_train[k], rtol=1e-14, atol=1e-14)
    other = randomize(lorac.Embedding(9, 5, r=2, dtype=np.float64, rng=1), rng).eval()
    other.load_state_dict(sd_train)
    assert other.merged
    idx = np.arange(9)
    np.testing.assert_allclose(other(idx), layer(idx), rtol=1e-14, atol=1e-14)


def test_backward_errors_leave_the_layer_unchanged(rng):
    layer = randomize(lorac.Embedding(6, 3, r=2, dtype=np.float32, rng=0), rng)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        layer.backward(np.zeros((1, 3), np.float32))
    with pytest.raises(IndexError):
        layer(np.array([1, 6]))
    layer(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 3\)"):
        layer.backward(np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="grad_output"):
        layer.backward(np.zeros((2, 3), np.float64))
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    layer.eval()  # merging drops the cached forward: its u no longer matches the weights
    with pytest.raises(RuntimeError, match="backward"):
        layer.train().backward(np.zeros((2, 3), np.float32))
    for k, v in layer.state_dict().items():
        np.testing.assert_allclose(v, before[k], rtol=1e-6, atol=1e-6)


def test_concurrent_calls_agree(rng):
    from concurrent.futures import ThreadPoolExecutor
    idx, w, a, b = make_operands(rng, 300, 50, 24, 4, np.float64)
    expected = ref_forward(idx, w, a, b, 0.5)
    g = rng.standard_normal((300, 24))
    _, u = _C.embedding_forward(idx, w, a, b, 0.5)

    def run(_):
        y, _u = _C.embedding_forward(idx, w, a, b, 0.5)
        da = np.zeros_like(a)
        _C.embedding_backward(g, idx, w, a, b, _u, 0.5, 3, None, da, None)
        return y, da

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(16)))
    ref_da = ref_backward(g, idx, w, a, b, 0.5, padding_idx=3)["da"]
    for y, da in results:
        assert_close(y, expected, np.float64)
        assert_close(da, ref_da, np.float64)

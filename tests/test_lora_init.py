"""lorac.layers._lora_init: how an adapter starts ('kaiming', 'gaussian', 'zeros_A', 'pissa', 'olora',
'orthogonal')."""

import math

import numpy as np
import pytest

import lorac
from lorac import init as base_init
from lorac.layers._lora_init import (AdapterInit, check_init, embedding_init, init_adapter, linear_init,
                                     merged_linear_init)

DTYPES = [np.float32, np.float64]


def tol(dtype):
    return 2e-6 if dtype == np.float32 else 1e-12


def best_rank_r(M, r):
    """(U_r S_r V_r^T, singular values) of M in float64."""
    u, s, vt = np.linalg.svd(np.asarray(M, dtype=np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], s


def decaying(out, inp, rng, decay=0.7):
    """A random (out, in) matrix with singular values decay^i (distinct, well separated)."""
    k = min(out, inp)
    u = np.linalg.qr(rng.standard_normal((out, k)))[0]
    v = np.linalg.qr(rng.standard_normal((inp, k)))[0]
    return (u * decay ** np.arange(k)) @ v.T


# -- shapes and the loralib defaults ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "zeros_A", "pissa", "pissa_niter_2", "olora", "orthogonal",
                                  True, False])
def test_shapes_and_dtypes(init, dtype, rng):
    w = rng.standard_normal((5, 7))
    lin = linear_init(init, 7, 5, 4, weight=w, rng=1, dtype=dtype)
    assert lin.lora_A.shape == (4, 7) and lin.lora_B.shape == (5, 4)
    emb = embedding_init(init, 11, 4, 2, weight=rng.standard_normal((11, 4)), rng=1, dtype=dtype)
    assert emb.lora_A.shape == (2, 11) and emb.lora_B.shape == (4, 2)
    mer = merged_linear_init(init, 6, 9, 2, [True, False, True], weight=rng.standard_normal((9, 6)), rng=1,
                             dtype=dtype)
    assert mer.lora_A.shape == (4, 6) and mer.lora_B.shape == (6, 2)
    for result in (lin, emb, mer):
        assert isinstance(result, AdapterInit)
        assert result.lora_A.dtype == dtype and result.lora_B.dtype == dtype
        assert result.lora_A.flags.c_contiguous and result.lora_B.flags.c_contiguous
        changes_base = init in ("pissa", "pissa_niter_2", "olora")
        assert (result.weight is not None) == changes_base
    if init in ("pissa", "pissa_niter_2", "olora"):
        assert lin.weight.shape == (5, 7) and emb.weight.shape == (11, 4) and mer.weight.shape == (9, 6)
        assert lin.weight.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_kaiming_reproduces_the_layers_own_init(fan_in_fan_out, dtype):
    """'kaiming' (and PEFT's True) draws exactly what the layer constructors draw: seeded
    layers keep their arrays once the constructors go through init_adapter."""
    layer = lorac.Linear(13, 6, r=4, rng=7, dtype=dtype, fan_in_fan_out=fan_in_fan_out)
    for init in ("kaiming", True):
        gen = np.random.default_rng(7)
        base_init.kaiming_uniform((6, 13), 13, gen, dtype)           # weight
        base_init.uniform((6,), 1 / math.sqrt(13), gen, dtype)        # bias
        got = linear_init(init, 13, 6, 4, fan_in_fan_out=fan_in_fan_out, rng=gen, dtype=dtype)
        np.testing.assert_array_equal(got.lora_A, layer.lora_A.data)
        np.testing.assert_array_equal(got.lora_B, layer.lora_B.data)
    assert np.all(np.abs(got.lora_A) <= 1 / math.sqrt(13)) and np.any(got.lora_A != 0)

    emb = lorac.Embedding(10, 5, r=3, rng=8, dtype=dtype)
    gen = np.random.default_rng(8)
    base_init.normal((10, 5), 1.0, gen, dtype)                        # weight
    got = embedding_init("kaiming", 10, 5, 3, rng=gen, dtype=dtype)
    np.testing.assert_array_equal(got.lora_A, emb.lora_A.data)       # zeros
    np.testing.assert_array_equal(got.lora_B, emb.lora_B.data)       # N(0, 1)
    assert not got.lora_A.any() and got.lora_B.any()

    mer = lorac.MergedLinear(7, 9, r=2, enable_lora=[True, False, True], rng=9, dtype=dtype,
                             fan_in_fan_out=fan_in_fan_out)
    gen = np.random.default_rng(9)
    base_init.kaiming_uniform((9, 7), 7, gen, dtype)
    base_init.uniform((9,), 1 / math.sqrt(7), gen, dtype)
    got = merged_linear_init("kaiming", 7, 9, 2, [True, False, True], fan_in_fan_out=fan_in_fan_out, rng=gen,
                             dtype=dtype)
    np.testing.assert_array_equal(got.lora_A, mer.lora_A.data)
    np.testing.assert_array_equal(got.lora_B, mer.lora_B.data)


def test_kaiming_is_uniform_with_loralib_bound():
    a = linear_init("kaiming", 400, 3, 50, rng=0, dtype=np.float64).lora_A
    bound = 1 / math.sqrt(400)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)   # U(-b, b) has std b / sqrt(3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("std", [None, 0.5])
def test_gaussian_statistics(std, dtype):
    expected = 0.01 if std is None else std
    for result in (linear_init("gaussian", 500, 7, 40, std=std, rng=3, dtype=dtype),
                   embedding_init("gaussian", 500, 7, 40, std=std, rng=3, dtype=dtype),
                   merged_linear_init("gaussian", 500, 6, 20, [True, True], std=std, rng=3, dtype=dtype)):
        a = result.lora_A.astype(np.float64)                  # 20 000 draws: std within ~1%
        assert a.std() == pytest.approx(expected, rel=0.03)
        assert abs(a.mean()) < 4 * expected / math.sqrt(a.size)
        assert not result.lora_B.any()                        # B = 0: the adapter starts as a no-op


@pytest.mark.parametrize("std", [None, 0.2])
def test_zeros_A_statistics(std):
    expected = 1.0 if std is None else std
    for result in (linear_init("zeros_A", 9, 400, 50, std=std, rng=4),
                   embedding_init("zeros_A", 9, 400, 50, std=std, rng=4),
                   merged_linear_init("zeros_A", 9, 800, 25, [True, False, True, False], std=std, rng=4)):
        assert not result.lora_A.any()
        b = result.lora_B.astype(np.float64)
        assert b.std() == pytest.approx(expected, rel=0.03)
        assert abs(b.mean()) < 4 * expected / math.sqrt(b.size)


def test_peft_false_gives_a_nontrivial_adapter():
    lin = linear_init(False, 8, 5, 2, rng=0)
    assert np.abs(lin.lora_B @ lin.lora_A).max() > 0
    emb = embedding_init(False, 8, 5, 2, rng=0)
    assert np.abs(emb.lora_B @ emb.lora_A).max() > 0


def test_same_seed_same_arrays_and_seeds_differ():
    for init in ("kaiming", "gaussian", "zeros_A"):
        one, two = linear_init(init, 6, 4, 2, rng=5), linear_init(init, 6, 4, 2, rng=5)
        np.testing.assert_array_equal(one.lora_A, two.lora_A)
        np.testing.assert_array_equal(one.lora_B, two.lora_B)
        other = linear_init(init, 6, 4, 2, rng=6)
        assert not (np.array_equal(one.lora_A, other.lora_A) and np.array_equal(one.lora_B, other.lora_B))


# -- PiSSA ---------------------------------------------------------------------------------------
def linear_delta(result, scaling, fan_in_fan_out):
    """scaling * B A in the stored layout, float64."""
    d = scaling * (result.lora_B.astype(np.float64) @ result.lora_A.astype(np.float64))
    return d.T if fan_in_fan_out else d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("out, inp, r", [(1, 1, 1), (5, 7, 2), (7, 5, 3), (16, 16, 4), (3, 20, 3), (9, 4, 4)])
def test_pissa_linear_residual_plus_adapter_is_w0(out, inp, r, fan_in_fan_out, dtype, rng):
    w0 = rng.standard_normal((inp, out) if fan_in_fan_out else (out, inp)).astype(dtype)
    before = w0.copy()
    scaling = 2.5
    res = linear_init("pissa", inp, out, r, fan_in_fan_out=fan_in_fan_out, weight=w0, scaling=scaling,
                      dtype=dtype, rng=0)
    np.testing.assert_array_equal(w0, before)                              # the input is not modified
    assert res.weight.shape == w0.shape and res.weight.dtype == dtype
    delta = linear_delta(res, scaling, fan_in_fan_out)
    scale = float(np.abs(w0).max())
    np.testing.assert_allclose(res.weight + delta, w0, atol=tol(dtype) * scale)
    # scaling * B A is the best rank-r approximation of W0 (in the (out, in) view) ...
    w_view = w0.astype(np.float64).T if fan_in_fan_out else w0.astype(np.float64)
    best, s = best_rank_r(w_view, r)
    oriented = delta.T if fan_in_fan_out else delta
    atol = (1e-4 if dtype == np.float32 else 1e-11) * scale
    np.testing.assert_allclose(oriented, best, atol=atol)
    # ... so the residual holds exactly the discarded singular values.
    tail = s[r:]
    assert np.linalg.norm(res.weight.astype(np.float64)) == pytest.approx(np.sqrt(np.sum(tail ** 2)),
                                                                          abs=atol * 10)
    # balanced split: A A^T == B^T B == diag(S_r / scaling)
    a, b = res.lora_A.astype(np.float64), res.lora_B.astype(np.float64)
    np.testing.assert_allclose(a @ a.T, b.T @ b, atol=atol * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pissa_embedding_is_layout_aware(dtype, rng):
    num, dim, r, scaling = 12, 6, 3, 0.5
    w0 = rng.standard_normal((num, dim)).astype(dtype)                   # stored (num, dim)
    res = embedding_init("pissa", num, dim, r, weight=w0, scaling=scaling, dtype=dtype)
    assert res.lora_A.shape == (r, num) and res.lora_B.shape == (dim, r)
    delta = scaling * (res.lora_B.astype(np.float64) @ res.lora_A.astype(np.float64))   # (dim, num)
    np.testing.assert_allclose(res.weight + delta.T, w0, atol=tol(dtype) * np.abs(w0).max())
    best, _ = best_rank_r(w0.T, r)
    np.testing.assert_allclose(delta, best, atol=(1e-4 if dtype == np.float32 else 1e-11))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_pissa_merged_linear_factors_each_enabled_block(fan_in_fan_out, dtype, rng):
    inp, og, r, scaling, flags = 8, 5, 2, 3.0, [True, False, True]
    w_view = rng.standard_normal((3 * og, inp))
    w0 = (w_view.T if fan_in_fan_out else w_view).astype(dtype).copy()
    res = merged_linear_init("pissa", inp, 3 * og, r, flags, fan_in_fan_out=fan_in_fan_out, weight=w0,
                             scaling=scaling, dtype=dtype)
    new_view = res.weight.T if fan_in_fan_out else res.weight
    old_view = w0.T if fan_in_fan_out else w0
    np.testing.assert_array_equal(new_view[og:2 * og], old_view[og:2 * og])   # the disabled block: untouched
    for e, g in enumerate([0, 2]):
        a = res.lora_A[e * r:(e + 1) * r].astype(np.float64)
        b = res.lora_B[e * og:(e + 1) * og].astype(np.float64)
        block = old_view[g * og:(g + 1) * og].astype(np.float64)
        best, _ = best_rank_r(block, r)
        np.testing.assert_allclose(scaling * b @ a, best, atol=1e-4 if dtype == np.float32 else 1e-11)
        np.testing.assert_allclose(new_view[g * og:(g + 1) * og] + scaling * b @ a, block,
                                   atol=tol(dtype) * np.abs(block).max())


def test_pissa_rank_above_the_matrix_rank_keeps_trainable_directions(rng):
    """r > min(out, in): the top min(out, in) directions take all of W0 (residual ~ 0); the
    extra ones start as 'kaiming' directions (A random, B = 0), so they still train."""
    w0 = rng.standard_normal((3, 10))
    res = linear_init("pissa", 10, 3, 5, weight=w0, scaling=1.0, dtype=np.float64, rng=1)
    np.testing.assert_allclose(res.weight, 0, atol=1e-12)
    assert not res.lora_B[:, 3:].any() and np.all(np.abs(res.lora_A[3:]).max(axis=1) > 0)
    np.testing.assert_allclose(res.lora_B @ res.lora_A, w0, atol=1e-12)
    emb = embedding_init("pissa", 4, 2, 3, weight=rng.standard_normal((4, 2)), scaling=1.0, rng=1)
    assert not emb.lora_A[2:].any() and emb.lora_B[:, 2:].any()   # Embedding's own convention


def test_pissa_niter_is_close_to_the_exact_svd(rng):
    w0 = decaying(60, 40, rng) + 1e-3 * rng.standard_normal((60, 40))
    exact = linear_init("pissa", 40, 60, 6, weight=w0, dtype=np.float64)
    fast = linear_init("pissa_niter_2", 40, 60, 6, weight=w0, dtype=np.float64, rng=0)
    err_exact, err_fast = np.linalg.norm(exact.weight), np.linalg.norm(fast.weight)
    assert err_exact <= err_fast <= 1.01 * err_exact
    np.testing.assert_allclose(fast.weight + fast.lora_B @ fast.lora_A, w0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pissa_leaves_the_layers_output_unchanged(dtype, rng):
    """Assigning PiSSA's arrays to real layers (what the constructors / add_adapter will do)
    keeps forward() the same, merged or not."""
    x = rng.standard_normal((7, 10)).astype(dtype)
    atol = 1e-4 if dtype == np.float32 else 1e-11
    for fan_in_fan_out in (False, True):
        layer = lorac.Linear(10, 6, r=3, lora_alpha=6, rng=2, dtype=dtype, fan_in_fan_out=fan_in_fan_out)
        before = layer(x)
        res = linear_init("pissa", 10, 6, 3, fan_in_fan_out=fan_in_fan_out, weight=layer.weight,
                          scaling=layer.scaling, dtype=dtype)
        layer.weight.data[...] = res.weight
        layer.lora_A.data[...] = res.lora_A
        layer.lora_B.data[...] = res.lora_B
        assert np.abs(layer.lora_B.data).max() > 0.1                # the adapter is not a no-op any more ...
        np.testing.assert_allclose(layer(x), before, atol=atol)   # ... yet the output is the same
        layer.eval()                                                # merged
        np.testing.assert_allclose(layer(x), before, atol=atol)

    idx = np.array([[0, 3, 11], [5, 5, 2]])
    emb = lorac.Embedding(12, 4, r=2, lora_alpha=4, rng=3, dtype=dtype)
    before = emb(idx)
    res = embedding_init("pissa", 12, 4, 2, weight=emb.weight, scaling=emb.scaling, dtype=dtype)
    emb.weight.data[...], emb.lora_A.data[...], emb.lora_B.data[...] = res.weight, res.lora_A, res.lora_B
    assert np.abs(emb.lora_A.data).max() > 0.1
    np.testing.assert_allclose(emb(idx), before, atol=atol)

    mer = lorac.MergedLinear(10, 9, r=2, lora_alpha=3, enable_lora=[True, False, True], rng=4, dtype=dtype)
    before = mer(x)
    res = merged_linear_init("pissa", 10, 9, 2, mer.enable_lora, weight=mer.weight, scaling=mer.scaling,
                             dtype=dtype)
    mer.weight.data[...], mer.lora_A.data[...], mer.lora_B.data[...] = res.weight, res.lora_A, res.lora_B
    np.testing.assert_allclose(mer(x), before, atol=atol)


def test_pissa_of_an_empty_or_zero_weight():
    res = linear_init("pissa", 0, 4, 2, weight=np.zeros((4, 0)), dtype=np.float64)
    assert res.lora_A.shape == (2, 0) and res.weight.shape == (4, 0)
    res = linear_init("pissa", 5, 4, 2, weight=np.zeros((4, 5)), dtype=np.float64)
    assert not res.weight.any() and not (res.lora_B @ res.lora_A).any()


# -- OLoRA and PEFT's 'orthogonal' ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("out, inp, r", [(1, 1, 1), (5, 7, 2), (7, 5, 3), (3, 20, 3), (9, 4, 6)])
def test_olora_is_the_thin_qr_and_the_residual_keeps_w0(out, inp, r, fan_in_fan_out, dtype, rng):
    w0 = rng.standard_normal((inp, out) if fan_in_fan_out else (out, inp)).astype(dtype)
    before = w0.copy()
    scaling = -1.5   # any finite scaling: the residual absorbs it
    res = linear_init("olora", inp, out, r, fan_in_fan_out=fan_in_fan_out, weight=w0, scaling=scaling,
                      dtype=dtype, rng=0)
    np.testing.assert_array_equal(w0, before)
    assert res.weight.shape == w0.shape and res.weight.dtype == dtype
    np.testing.assert_allclose(res.weight + linear_delta(res, scaling, fan_in_fan_out), w0,
                               atol=tol(dtype) * float(np.abs(w0).max()))
    q, upper = np.linalg.qr((w0.T if fan_in_fan_out else w0).astype(np.float64))
    k = min(r, out, inp)
    atol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(res.lora_B[:, :k], q[:, :k], atol=atol)           # B = Q_r: orthonormal columns
    np.testing.assert_allclose(res.lora_A[:k], upper[:k], atol=atol * 10)         # A = R_r: upper triangular
    if r > k:   # the extra directions start as 'kaiming' ones: A random, B = 0
        assert not res.lora_B[:, k:].any() and np.all(np.abs(res.lora_A[k:]).max(axis=1) > 0)


def test_olora_on_merged_linear_and_embedding_blocks(rng):
    inp, og, r, scaling, flags = 8, 5, 2, 0.5, [False, True, True]
    w0 = rng.standard_normal((3 * og, inp))
    res = merged_linear_init("olora", inp, 3 * og, r, flags, weight=w0, scaling=scaling, dtype=np.float64)
    np.testing.assert_array_equal(res.weight[:og], w0[:og])                      # the disabled block: untouched
    for e, g in enumerate([1, 2]):
        block = w0[g * og:(g + 1) * og]
        b, a = res.lora_B[e * og:(e + 1) * og], res.lora_A[e * r:(e + 1) * r]
        np.testing.assert_allclose(b, np.linalg.qr(block)[0][:, :r], atol=1e-13)
        np.testing.assert_allclose(res.weight[g * og:(g + 1) * og] + scaling * b @ a, block, atol=1e-13)
    w_emb = rng.standard_normal((10, 4))                                          # (num, dim): the view is w^T
    emb = embedding_init("olora", 10, 4, 2, weight=w_emb, scaling=2.0, dtype=np.float64)
    np.testing.assert_allclose(emb.lora_B, np.linalg.qr(w_emb.T)[0][:, :2], atol=1e-13)
    np.testing.assert_allclose(emb.weight + 2.0 * (emb.lora_B @ emb.lora_A).T, w_emb, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_starts_as_a_no_op_with_both_factors_random(dtype):
    lin = linear_init("orthogonal", 30, 20, 8, rng=0, dtype=dtype)
    a, b = lin.lora_A.astype(np.float64), lin.lora_B.astype(np.float64)
    assert np.abs(b @ a).max() < (1e-7 if dtype == np.float32 else 1e-15)
    # PEFT's scale: entries of (G Q_odd)^T / 10 with orthonormal Q rows have variance 1 / 200 on average
    assert 0.04 < a.std() < 0.1 and 0.04 < b.std() < 0.1
    assert np.linalg.matrix_rank(a, tol=1e-5) == 4 == np.linalg.matrix_rank(b, tol=1e-5)   # r / 2 directions each
    mer = merged_linear_init("orthogonal", 6, 9, 2, [True, False, True], rng=1, dtype=dtype)
    for e in range(2):   # each group its own draw, each a no-op
        block = mer.lora_B[e * 3:(e + 1) * 3].astype(np.float64) @ mer.lora_A[e * 2:(e + 1) * 2].astype(np.float64)
        assert np.abs(block).max() < 1e-6
    assert not np.allclose(mer.lora_A[:2], mer.lora_A[2:])
    emb = embedding_init("orthogonal", 11, 4, 2, rng=2, dtype=dtype)
    assert emb.lora_A.shape == (2, 11) and np.abs(emb.lora_B @ emb.lora_A).max() < 1e-6
    again = linear_init("orthogonal", 30, 20, 8, rng=0, dtype=dtype)
    np.testing.assert_array_equal(again.lora_A, lin.lora_A)


def test_olora_and_orthogonal_through_the_layers(rng):
    x = rng.standard_normal((3, 10))
    layer = lorac.Linear(10, 6, r=2, lora_alpha=3, dtype=np.float64, rng=0)
    before = layer(x)
    layer.reset_adapter(init="olora")
    assert np.abs(layer.lora_B.data).max() > 0.1 and np.abs(layer.lora_A.data).max() > 0.1
    np.testing.assert_allclose(layer(x), before, atol=1e-12)
    layer.add_adapter("other", 2)
    with pytest.raises(ValueError, match="init='olora' replaces the shared base weight"):
        layer.reset_adapter(init="olora")
    fresh = lorac.Linear(10, 6, r=4, init="orthogonal", dtype=np.float64, rng=0)
    base = x @ fresh.weight.data.T + fresh.bias.data
    np.testing.assert_allclose(fresh(x), base, atol=1e-15)
    assert np.abs(fresh.lora_B.data).max() > 0
    with pytest.raises(ValueError, match="init='orthogonal' needs an even r"):
        lorac.Linear(10, 6, r=3, init="orthogonal")


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(init="xavier"), ValueError, "Linear: init must be one of 'kaiming', 'gaussian', 'zeros_A', 'pissa'"),
    (dict(init="Kaiming"), ValueError, "got 'Kaiming'"),
    (dict(init="pissa_niter_x"), ValueError, "got 'pissa_niter_x'"),
    (dict(init=3), TypeError, "Linear: init must be one of"),
    (dict(init=None), TypeError, "got NoneType None"),
    (dict(init="kaiming", std=0.1), ValueError, "std applies to init='gaussian' and init='zeros_A' only"),
    (dict(init="pissa", std=0.1), ValueError, "std applies to"),
    (dict(init="gaussian", std=0.0), ValueError, "std must be a finite number > 0, got 0.0"),
    (dict(init="gaussian", std=-1), ValueError, "std must be a finite number > 0, got -1.0"),
    (dict(init="zeros_A", std=float("nan")), ValueError, "std must be a finite number > 0, got nan"),
    (dict(init="gaussian", std="0.1"), TypeError, "std must be a real number > 0, got str"),
    (dict(init="gaussian", std=True), TypeError, "std must be a real number > 0, got bool"),
    (dict(init="pissa"), ValueError, "init='pissa' needs the base weight"),
    (dict(init="pissa", weight=np.zeros((5, 4))), ValueError, "weight must have shape (4, 5), got (5, 4)"),
    (dict(init="pissa", weight=np.full((4, 5), np.nan)), ValueError, "weight must hold finite values"),
    (dict(init="pissa", weight=np.zeros((4, 5), complex)), TypeError, "weight must be a 2-D array of real"),
    (dict(init="pissa", weight=np.zeros((4, 5)), scaling=0.0), ValueError, "needs scaling = lora_alpha / r > 0"),
    (dict(init="olora"), ValueError, "init='olora' needs the base weight"),
    (dict(init="olora", weight=np.zeros((5, 4))), ValueError, "init='olora': weight must have shape (4, 5)"),
    (dict(init="olora", weight=np.zeros((4, 5)), scaling=float("inf")), ValueError, "needs a finite scaling"),
    (dict(init="orthogonal", std=0.1), ValueError, "std applies to"),
    (dict(init="kaiming", dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (dict(init="kaiming", rng="seed"), TypeError, "rng must be None, an int seed"),
])
def test_bad_arguments_are_refused_with_clear_messages(kwargs, error, message):
    kwargs = dict(kwargs)
    init = kwargs.pop("init")
    with pytest.raises(error) as info:
        linear_init(init, 5, 4, 2, **kwargs)
    assert message in str(info.value)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="r must be >= 1 for an adapter, got 0"):
        linear_init("kaiming", 5, 4, 0)
    with pytest.raises(TypeError, match="r must be an int"):
        linear_init("kaiming", 5, 4, 2.0)
    with pytest.raises(ValueError, match="in_features|fan_in"):
        linear_init("kaiming", -1, 4, 2)
    with pytest.raises(ValueError, match="kind must be 'linear' or 'embedding'"):
        init_adapter("kaiming", 2, 5, 4, kind="conv")
    with pytest.raises(ValueError, match=r"block_starts \[0, 8\] with blocks of 4 rows do not fit"):
        init_adapter("kaiming", 2, 5, 4, block_starts=[0, 8], out_features=10)
    for flags in ([], [False, False], [True, True, True]):
        with pytest.raises(ValueError, match="MergedLinear: enable_lora must be a non-empty sequence"):
            merged_linear_init("kaiming", 5, 4, 2, flags)


def test_check_init_spec():
    assert check_init("gaussian") == ("gaussian", 0.01, None)
    assert check_init("zeros_A") == ("zeros_A", 1.0, None)
    assert check_init("gaussian", 1 / 8) == ("gaussian", 0.125, None)
    assert check_init("pissa_niter_4") == ("pissa", None, 4)
    assert check_init(True) == ("kaiming", None, None)
    assert check_init(False).name == "random"
    spec = check_init("gaussian", 0.3)
    assert check_init(spec) is spec                       # an already checked spec passes through
    with pytest.raises(TypeError, match="init must be one of"):
        check_init(spec, 0.2)

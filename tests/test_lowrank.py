"""lorac.lowrank.low_rank_approx (exact and randomized) and rank_report, against NumPy
float64 references."""

import math

import numpy as np
import pytest

import lorac
from lorac.lowrank import (effective_rank, low_rank_approx, product_singular_values, rank_report,
                           stable_rank)

DTYPES = [np.float32, np.float64]
SHAPES = [(0, 0), (0, 3), (4, 0), (1, 1), (1, 7), (7, 1), (5, 3), (3, 5), (8, 8), (17, 11), (9, 23)]


def tol(dtype):
    return 1e-4 if dtype == np.float32 else 1e-11


def reference_svd(M):
    """float64 singular values of M (descending)."""
    if min(M.shape) == 0:
        return np.zeros(0)
    return np.linalg.svd(np.asarray(M, dtype=np.float64), compute_uv=False)


def best_rank_r(M, r):
    """U_r S_r V_r^T in float64."""
    M = np.asarray(M, dtype=np.float64)
    if min(M.shape) == 0:
        return np.zeros(M.shape)
    u, s, vt = np.linalg.svd(M, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def decaying(m, n, rng, decay=0.7, dtype=np.float64):
    """A matrix with singular values decay^i and random singular vectors."""
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return ((u * decay ** np.arange(k)) @ v.T).astype(dtype)


# -- exact path ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_reproduces_the_matrix(shape, dtype, rng):
    M = rng.standard_normal(shape).astype(dtype)
    for r in (min(shape), min(shape) + 3):
        res = low_rank_approx(M, r)
        assert res.left.shape == (shape[0], r) and res.right.shape == (r, shape[1])
        assert res.left.dtype == dtype and res.right.dtype == dtype and res.rank == r and res.shape == shape
        scale = max(1.0, np.abs(M).max()) if M.size else 1.0
        np.testing.assert_allclose(res.approximation, M, atol=tol(dtype) * scale * 10)
        assert res.error <= tol(dtype) * 10 * max(res.norm, 1.0)
        assert res.energy == pytest.approx(1.0, abs=tol(dtype))
        # padding beyond min(m, n) is exactly zero
        assert not res.left[:, min(shape):].any() and not res.right[min(shape):].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 5), (8, 8), (17, 11), (9, 23)])
def test_error_is_the_discarded_energy(shape, dtype, rng):
    M = rng.standard_normal(shape).astype(dtype)
    s = reference_svd(M)
    norm = math.sqrt(np.sum(s ** 2))
    for r in range(0, min(shape) + 1):
        res = low_rank_approx(M, r)
        expected = math.sqrt(np.sum(s[r:] ** 2))
        assert res.error == pytest.approx(expected, rel=tol(dtype), abs=tol(dtype) * norm)
        actual = np.linalg.norm(M.astype(np.float64) - res.approximation.astype(np.float64))
        assert actual == pytest.approx(expected, rel=10 * tol(dtype), abs=10 * tol(dtype) * norm)
        assert res.norm == pytest.approx(norm, rel=tol(dtype))
        assert res.relative_error == pytest.approx(expected / norm, rel=tol(dtype), abs=tol(dtype))
        assert res.energy == pytest.approx(np.sum(s[:r] ** 2) / norm ** 2, rel=tol(dtype), abs=tol(dtype))
        np.testing.assert_allclose(res.singular_values, s, rtol=tol(dtype), atol=tol(dtype) * norm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_approximation_is_the_truncated_svd_and_factors_are_balanced(dtype, rng):
    M = rng.standard_normal((13, 9)).astype(dtype)
    for r in (1, 2, 5):
        res = low_rank_approx(M, r)
        np.testing.assert_allclose(res.approximation, best_rank_r(M, r), atol=20 * tol(dtype))
        s = reference_svd(M)[:r]
        # left = U sqrt(S), right = sqrt(S) V^T: both Gram matrices are diag(S)
        np.testing.assert_allclose(res.left.T.astype(np.float64) @ res.left, np.diag(s), atol=20 * tol(dtype))
        np.testing.assert_allclose(res.right.astype(np.float64) @ res.right.T, np.diag(s), atol=20 * tol(dtype))


def test_integer_input_becomes_float64_and_zero_matrix_is_exact():
    res = low_rank_approx([[1, 2], [2, 4], [3, 6]], 1)
    assert res.left.dtype == np.float64
    np.testing.assert_allclose(res.approximation, [[1, 2], [2, 4], [3, 6]], atol=1e-12)
    assert res.error < 1e-12 and res.energy == pytest.approx(1.0)
    zero = low_rank_approx(np.zeros((4, 3)), 2)
    assert zero.error == 0.0 and zero.relative_error == 0.0 and zero.energy == 1.0
    assert not zero.approximation.any()


def test_rank_zero_keeps_nothing(rng):
    M = rng.standard_normal((6, 4))
    res = low_rank_approx(M, 0)
    assert res.left.shape == (6, 0) and res.right.shape == (0, 4)
    assert res.error == pytest.approx(np.linalg.norm(M)) and res.relative_error == pytest.approx(1.0)
    assert res.energy == 0.0
    assert not res.approximation.any()


def test_parameter_input_is_accepted(rng):
    p = lorac.Parameter(rng.standard_normal((5, 4)))
    np.testing.assert_allclose(low_rank_approx(p, 4).approximation, p.data, atol=1e-12)


# -- randomized path ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 200), (120, 400)])
def test_randomized_is_near_optimal_on_a_decaying_spectrum(shape, dtype, rng):
    M = decaying(*shape, rng, decay=0.8, dtype=dtype)
    s = reference_svd(M)
    for r in (1, 5, 12):
        res = low_rank_approx(M, r, randomized=True, niter=2, rng=0)
        assert res.randomized
        optimal = math.sqrt(np.sum(s[r:] ** 2))
        assert optimal * (1 - tol(dtype)) <= res.error <= 1.01 * optimal + tol(dtype)
        # the reported error is the true error of the returned factors
        true = np.linalg.norm(M.astype(np.float64) - res.left.astype(np.float64) @ res.right.astype(np.float64))
        assert res.error == pytest.approx(true, rel=1e-5 if dtype == np.float32 else 1e-10)
        np.testing.assert_allclose(res.singular_values, s[:r], rtol=1e-3)
        assert res.energy == pytest.approx(1.0 - res.error ** 2 / res.norm ** 2, abs=1e-5)
        assert res.norm == pytest.approx(np.linalg.norm(M.astype(np.float64)), rel=1e-6)


def test_randomized_without_power_iterations_is_worse_but_still_sound(rng):
    M = rng.standard_normal((200, 150))           # flat spectrum: the hard case
    s = reference_svd(M)
    optimal = math.sqrt(np.sum(s[10:] ** 2))
    plain = low_rank_approx(M, 10, randomized=True, niter=0, oversample=5, rng=1)
    powered = low_rank_approx(M, 10, randomized=True, niter=4, oversample=5, rng=1)
    assert optimal <= powered.error <= plain.error
    assert powered.error <= 1.05 * optimal


def test_randomized_is_reproducible_and_pads_like_exact(rng):
    M = decaying(40, 30, rng)
    a = low_rank_approx(M, 4, randomized=True, rng=7)
    b = low_rank_approx(M, 4, randomized=True, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.left, b.left)
    full = low_rank_approx(M, 35, randomized=True, rng=0)      # r > min(m, n): the matrix itself
    assert full.left.shape == (40, 35)
    np.testing.assert_allclose(full.approximation, M, atol=1e-10)


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs, exc, fragment", [
    ((np.zeros((2, 3, 4)), 1), {}, ValueError, "2-D"),
    ((np.zeros(3), 1), {}, ValueError, "2-D"),
    ((np.array([[1.0, np.nan]]), 1), {}, ValueError, "finite"),
    ((np.array([["a"]]), 1), {}, TypeError, "dtype"),
    ((np.zeros((2, 2), dtype=complex), 1), {}, TypeError, "dtype"),
    ((np.zeros((2, 2)), -1), {}, ValueError, "r must be >= 0"),
    ((np.zeros((2, 2)), 1.5), {}, TypeError, "r must be an int"),
    ((np.zeros((2, 2)), True), {}, TypeError, "r must be an int"),
    ((np.zeros((2, 2)), 1), {"niter": -1}, ValueError, "niter"),
    ((np.zeros((2, 2)), 1), {"rng": "seed"}, TypeError, "rng"),
])
def test_bad_input(args, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment) as info:
        low_rank_approx(*args, **kwargs)
    assert str(info.value).startswith("low_rank_approx: ")


# -- rank_report --------------------------------------------------------------------------------------------------
def reference_ranks(delta):
    """(singular values, rank90, rank99, stable rank) of a dense delta, by brute force."""
    s = reference_svd(delta)
    total = np.sum(s ** 2)
    ranks = []
    for share in (0.9, 0.99):
        k = 0
        while total > 0 and np.sum(s[:k] ** 2) < share * total * (1 - 1e-12):
            k += 1
        ranks.append(k)
    stable = float(total / s[0] ** 2) if total > 0 else 0.0
    return s, ranks[0], ranks[1], stable


LAYERS = [("enc.q", 8, 6, 3), ("enc.v", 5, 9, 1), ("wide", 3, 4, 7), ("dec.0", 16, 12, 5)]  # path, out, in, r


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_report_matches_dense_svd_on_a_state_dict(dtype, rng):
    state, scalings = {}, {}
    for k, (path, out, inp, r) in enumerate(LAYERS):
        a = rng.standard_normal((r, inp))
        b = rng.standard_normal((out, r)) * (0.5 ** np.arange(r))       # decaying columns
        state[f"{path}.lora_A"], state[f"{path}.lora_B"] = a.astype(dtype), b.astype(dtype)
        scalings[path] = 0.5 + k
    report = rank_report(state, scalings=scalings)
    assert list(report) == [p for p, *_ in LAYERS]
    for path, out, inp, r in LAYERS:
        info = report[path]
        a = state[f"{path}.lora_A"].astype(np.float64)
        b = state[f"{path}.lora_B"].astype(np.float64)
        s, r90, r99, stable = reference_ranks(scalings[path] * b @ a)
        k = min(r, inp, out)
        np.testing.assert_allclose(info.singular_values, s[:k], rtol=1e-9, atol=1e-9 * s[0])
        assert (info.r, info.in_features, info.out_features, info.groups) == (r, inp, out, 1)
        assert info.scaling == scalings[path]
        assert (info.rank_90, info.rank_99) == (r90, r99)
        assert info.stable_rank == pytest.approx(stable, rel=1e-9)
        assert info.norm == pytest.approx(np.linalg.norm(scalings[path] * b @ a), rel=1e-9)


def test_rank_report_on_a_model_uses_each_layers_scaling(rng):
    model = lorac.Sequential(lorac.Linear(6, 10, r=4, lora_alpha=8, rng=0, dtype=np.float64), lorac.ReLU(),
                             lorac.Linear(10, 3, r=2, lora_alpha=1, use_rslora=True, rng=1, fan_in_fan_out=True),
                             lorac.Linear(3, 3, rng=2))                              # r = 0: no adapter
    for i in (0, 2):
        model[i].lora_B.data[...] = rng.standard_normal(model[i].lora_B.shape)
    report = rank_report(model)
    assert list(report) == ["0", "2"]
    for i in (0, 2):
        layer = model[i]
        delta = layer.scaling * layer.lora_B.data.astype(np.float64) @ layer.lora_A.data
        s, r90, r99, stable = reference_ranks(delta)
        np.testing.assert_allclose(report[str(i)].singular_values, s[:layer.r], rtol=1e-5)
        assert report[str(i)].scaling == layer.scaling
        assert (report[str(i)].rank_90, report[str(i)].rank_99) == (r90, r99)
    assert rank_report(model, scalings=2.0)["0"].scaling == 2.0


def test_rank_report_merged_linear_and_embedding_against_merge(rng):
    """The delta a layer really merges (W after merge - W before) is the reference."""
    merged = lorac.MergedLinear(7, 9, r=2, lora_alpha=3, enable_lora=[True, False, True], rng=0, dtype=np.float64)
    emb = lorac.Embedding(11, 5, r=3, lora_alpha=6, rng=1, dtype=np.float64)
    merged.lora_B.data[...] = rng.standard_normal(merged.lora_B.shape)
    emb.lora_A.data[...] = rng.standard_normal(emb.lora_A.shape)
    model = lorac.Sequential(emb, merged)
    report = rank_report(model)
    for name, layer in (("0", emb), ("1", merged)):
        before = layer.weight.data.copy()
        layer.merge()
        delta = layer.weight.data - before
        layer.unmerge()
        s, r90, r99, stable = reference_ranks(delta)
        k = report[name].singular_values.size
        np.testing.assert_allclose(report[name].singular_values, s[:k], rtol=1e-8, atol=1e-10)
        assert np.all(s[k:] < 1e-10 * s[0])
        assert (report[name].rank_90, report[name].rank_99) == (r90, r99)
        assert report[name].stable_rank == pytest.approx(stable, rel=1e-8)
    assert report["1"].groups == 2
    # the same from the state dict (groups found from the shapes)
    from_state = rank_report(model.state_dict(), scalings={"0": emb.scaling, "1": merged.scaling})
    np.testing.assert_allclose(from_state["1"].singular_values, report["1"].singular_values, rtol=1e-12)


def test_product_singular_values_never_needs_the_dense_product(rng):
    b = rng.standard_normal((3000, 4))
    a = rng.standard_normal((4, 2000))
    s = product_singular_values(b, a, scaling=0.5)
    # reference through the 4 x 4 Gram matrices: sigma^2 = eig((B^T B)(A A^T))
    eig = np.sort(np.linalg.eigvals((b.T @ b) @ (a @ a.T)).real)[::-1]
    np.testing.assert_allclose(s, 0.5 * np.sqrt(eig), rtol=1e-9)


def test_effective_and_stable_rank():
    assert effective_rank([3.0, 1.0], 0.9) == 1               # 9 / 10 is exactly 90%
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 0.9) == 4
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 0.75) == 3
    assert effective_rank([2.0, 1.0, 0.1], 0.99) == 2          # 5 / 5.01 = 0.998
    assert effective_rank([0.0, 0.0], 0.9) == 0 and effective_rank([], 0.9) == 0
    assert stable_rank([2.0, 2.0, 2.0]) == pytest.approx(3.0)
    assert stable_rank([4.0, 2.0]) == pytest.approx(1.25)
    assert stable_rank([0.0]) == 0.0


@pytest.mark.parametrize("state, scalings, exc, fragment", [
    ({"a.lora_A": np.ones((2, 3))}, None, ValueError, "no matching"),
    ({"a.lora_A": np.ones((2, 3)), "a.lora_B": np.ones((4, 3))}, None, ValueError, "do not fit"),
    ({"a.lora_A": np.ones((2, 3)), "a.lora_B": np.full((4, 2), np.inf)}, None, ValueError, "finite"),
    ({"a.lora_A": np.ones((2, 3)), "a.lora_B": np.ones((4, 2))}, {"b": 1.0}, ValueError, "no entry"),
    ({"a.lora_A": np.ones((2, 3)), "a.lora_B": np.ones((4, 2))}, {"a": 1.0, "b": 1.0}, ValueError, "'b'"),
    ({"a.lora_A": np.ones((2, 3)), "a.lora_B": np.ones((4, 2))}, "x", TypeError, "real number"),
    ({"a.lora_A": np.ones((2, 3)), "a.lora_B": np.ones((4, 2))}, {"a": np.nan}, ValueError, "finite"),
    ([1, 2], None, TypeError, "state dict"),
])
def test_rank_report_bad_input(state, scalings, exc, fragment):
    with pytest.raises(exc, match=fragment) as info:
        rank_report(state, scalings=scalings)
    assert str(info.value).startswith("rank_report")

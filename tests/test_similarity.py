"""lorac.subspace_similarity and lorac.projection_distance: the LoRA paper's phi(i, j)."""

import math

import numpy as np
import pytest

import lorac
from lorac import projection_distance, subspace_similarity


def seed_phi(A1, A2, kind="A"):
    """The seed's formula, entry by entry: phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j),
    U the right singular vectors of A (kind 'A') or the left ones of B (kind 'B')."""
    def basis(M):
        M = np.asarray(M, dtype=np.float64)
        if kind == "A":
            vt = np.linalg.svd(M, full_matrices=True)[2]       # (in, in): rows are right singular vectors
            return vt[:min(M.shape)].T
        u = np.linalg.svd(M, full_matrices=True)[0]            # (out, out)
        return u[:, :min(M.shape)]
    u1, u2 = basis(A1), basis(A2)
    phi = np.empty((u1.shape[1], u2.shape[1]))
    for i in range(1, u1.shape[1] + 1):
        for j in range(1, u2.shape[1] + 1):
            phi[i - 1, j - 1] = np.linalg.norm(u1[:, :i].T @ u2[:, :j], "fro") ** 2 / min(i, j)
    return phi


def random_orthogonal(n, rng):
    q, rr = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(rr))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r1, r2, dim", [(1, 1, 5), (3, 7, 20), (8, 4, 16), (8, 64, 100), (6, 6, 6), (9, 2, 5)])
def test_matches_the_seed_formula(r1, r2, dim, dtype, rng):
    A1 = rng.standard_normal((r1, dim)).astype(dtype)
    A2 = rng.standard_normal((r2, dim)).astype(dtype)
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (min(r1, dim), min(r2, dim))
    np.testing.assert_allclose(phi, seed_phi(A1, A2), atol=1e-10)
    B1, B2 = A1.T.copy(), A2.T.copy()                          # lora_B (out, r): columns
    np.testing.assert_allclose(subspace_similarity(B1, B2, kind="B"), seed_phi(B1, B2, "B"), atol=1e-10)
    np.testing.assert_allclose(subspace_similarity(B1, B2, kind="B"), phi, atol=1e-10)
    assert np.all((phi >= 0) & (phi <= 1))


@pytest.mark.parametrize("r, dim", [(1, 3), (4, 10), (8, 8), (12, 5)])
def test_identical_subspaces_give_one(r, dim, rng):
    A = rng.standard_normal((r, dim))
    np.testing.assert_allclose(subspace_similarity(A, A), 1.0, atol=1e-12)
    np.testing.assert_allclose(subspace_similarity(A.T, A.T, kind="B"), 1.0, atol=1e-12)
    assert projection_distance(A, A) == pytest.approx(0.0, abs=1e-7)


def test_orthogonal_subspaces_give_zero(rng):
    q = random_orthogonal(12, rng)
    A1 = rng.standard_normal((4, 4)) @ q[:4]           # rows span q_0..q_3
    A2 = rng.standard_normal((6, 6)) @ q[4:10]         # rows span q_4..q_9
    np.testing.assert_allclose(subspace_similarity(A1, A2), 0.0, atol=1e-12)
    np.testing.assert_allclose(subspace_similarity(A1.T, A2.T, kind="B"), 0.0, atol=1e-12)
    assert projection_distance(A1, A2) == pytest.approx(2.0)        # sqrt(min(4, 6))
    assert projection_distance(A1, A2, i=1, j=3) == pytest.approx(1.0)


def test_nested_subspace_reaches_one_at_the_full_span(rng):
    A1 = rng.standard_normal((3, 15))
    A2 = np.vstack([A1, rng.standard_normal((5, 15))])  # span(A1) inside span(A2)
    phi = subspace_similarity(A1, A2)
    assert phi[-1, -1] == pytest.approx(1.0)
    assert projection_distance(A1, A2) == pytest.approx(0.0, abs=1e-7)
    assert phi[0, 0] < 1.0


def test_symmetry(rng):
    A1, A2 = rng.standard_normal((5, 12)), rng.standard_normal((9, 12))
    np.testing.assert_allclose(subspace_similarity(A1, A2), subspace_similarity(A2, A1).T, atol=1e-13)
    assert projection_distance(A1, A2, i=2, j=7) == pytest.approx(projection_distance(A2, A1, i=7, j=2))


def test_invariance_to_mixing_within_the_span(rng):
    A1, A2 = rng.standard_normal((5, 12)), rng.standard_normal((7, 12))
    phi = subspace_similarity(A1, A2)
    # orthogonal mixing keeps every singular direction: the whole matrix is unchanged (and any scale)
    mixed = 3.0 * random_orthogonal(5, rng) @ A1
    np.testing.assert_allclose(subspace_similarity(mixed, A2), phi, atol=1e-12)
    # an invertible mixing keeps the span: phi(r1, j) (the last row) is unchanged
    G = rng.standard_normal((5, 5)) + 3 * np.eye(5)
    np.testing.assert_allclose(subspace_similarity(G @ A1, A2)[-1], phi[-1], atol=1e-12)
    assert projection_distance(G @ A1, A2) == pytest.approx(projection_distance(A1, A2), rel=1e-10)
    # kind 'B': B -> B G
    B1, B2 = A1.T, A2.T
    H = rng.standard_normal((7, 7)) + 3 * np.eye(7)
    np.testing.assert_allclose(subspace_similarity(B1, B2 @ H, kind="B")[:, -1],
                               subspace_similarity(B1, B2, kind="B")[:, -1], atol=1e-12)


def test_projection_distance_is_the_projection_metric(rng):
    A1, A2 = rng.standard_normal((4, 9)), rng.standard_normal((6, 9))
    phi = subspace_similarity(A1, A2)
    for i, j in [(1, 1), (2, 5), (4, 6), (4, 2)]:
        d = projection_distance(A1, A2, i=i, j=j)
        assert d == pytest.approx(math.sqrt(min(i, j) * (1 - phi[i - 1, j - 1])), rel=1e-9)
        # principal angles: d^2 = min(i, j) - sum cos^2
        u1 = np.linalg.svd(A1, full_matrices=False)[2][:i].T
        u2 = np.linalg.svd(A2, full_matrices=False)[2][:j].T
        cosines = np.linalg.svd(u1.T @ u2, compute_uv=False)
        assert d ** 2 == pytest.approx(min(i, j) - np.sum(cosines ** 2), rel=1e-9)


def test_random_subspaces_of_a_wide_space_barely_overlap():
    """The seed's random-Gaussian baseline: expected phi(i, j) = max(i, j) / dim."""
    rng = np.random.default_rng(3)
    A1, A2 = rng.standard_normal((8, 2000)), rng.standard_normal((64, 2000))
    phi = subspace_similarity(A1, A2)
    assert phi[0, 0] < 0.01
    assert phi[7, 63] == pytest.approx(64 / 2000, rel=0.3)


def test_accepts_parameters_and_layers_matrices(rng):
    layer = lorac.Linear(6, 4, r=3, rng=0)
    phi = subspace_similarity(layer.lora_A, layer.lora_A.data)
    np.testing.assert_allclose(phi, 1.0, atol=1e-6)


@pytest.mark.parametrize("call, exc, fragment", [
    (lambda: subspace_similarity(np.ones((2, 3)), np.ones((2, 4))), ValueError, "in_features"),
    (lambda: subspace_similarity(np.ones((3, 2)), np.ones((4, 2)), kind="B"), ValueError, "out_features"),
    (lambda: subspace_similarity(np.ones((2, 3)), np.ones((2, 3)), kind="C"), ValueError, "kind"),
    (lambda: subspace_similarity(np.ones(3), np.ones((2, 3))), ValueError, "A1 must be a 2-D"),
    (lambda: subspace_similarity(np.ones((2, 3)), np.array([[np.nan] * 3])), ValueError, "A2 must hold finite"),
    (lambda: subspace_similarity(np.ones((2, 3)), "x"), TypeError, "A2"),
    (lambda: projection_distance(np.ones((2, 3)), np.ones((2, 3)), i=3), ValueError, "at most"),
    (lambda: projection_distance(np.ones((2, 3)), np.ones((2, 3)), j=0), ValueError, "j must be >= 1"),
])
def test_bad_input(call, exc, fragment):
    with pytest.raises(exc, match=fragment) as info:
        call()
    assert str(info.value).split(":")[0] in ("subspace_similarity", "projection_distance")

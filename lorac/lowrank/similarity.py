"""How much two adapters' subspaces overlap: the LoRA paper's phi(i, j).

Each adapter matrix spans a subspace of the layer's feature space, ordered
by its singular values:

- ``kind='A'``: ``lora_A`` (r, in) acts on inputs through its rows; the
  directions are its right singular vectors (columns of V, in R^in);
- ``kind='B'``: ``lora_B`` (out, r) writes outputs through its columns;
  the directions are its left singular vectors (columns of U, in R^out).

With U1_i the top-i directions of the first matrix (k1 = min(r1, dim) of
them) and U2_j the top-j of the second,

    phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j)       1 <= i <= k1, 1 <= j <= k2

in [0, 1]: 1 when the smaller subspace lies inside the larger, 0 when they
are orthogonal.  ||U1_i^T U2_j||_F^2 is the sum of the squared cosines of
the principal angles between the two subspaces, so phi(i, j) = 1 - d^2 /
min(i, j) with the projection distance d = sqrt(min(i, j) - sum cos^2)
(``projection_distance``).

Properties: phi(A1, A2)[i, j] == phi(A2, A1)[j, i]; an orthogonal mixing
A -> Q A (B -> B Q) leaves every entry unchanged; any invertible mixing
A -> G A leaves the row span, hence phi(k1, j) (the last row), unchanged but
reorders directions inside the span (so other entries may change).
Directions belonging to zero singular values (a rank-deficient matrix, a
freshly initialised lora_B = 0) are arbitrary: phi beyond the matrix's
rank means nothing.  Computed in float64.
"""

import numpy as np

from ._checks import as_matrix, integer

KINDS = ("A", "B")


def directions(M, kind, name="M", func="directions"):
    """Orthonormal directions of an adapter matrix, best first: (dim, min(r, dim)).

    kind 'A': right singular vectors of lora_A (r, in) -> (in, k);
    kind 'B': left singular vectors of lora_B (out, r) -> (out, k)."""
    if kind not in KINDS:
        raise ValueError(f"{func}: kind must be 'A' (lora_A, rows) or 'B' (lora_B, columns), got {kind!r}")
    M = as_matrix(M, name, func).astype(np.float64, copy=False)
    if kind == "A":
        M = M.T                                   # (in, r): the rows of lora_A as columns
    dim, r = M.shape
    if min(dim, r) == 0:
        return np.zeros((dim, 0))
    u = np.linalg.svd(M, full_matrices=False)[0]  # (dim, min(dim, r))
    return u


def _pair(A1, A2, kind, func):
    u1 = directions(A1, kind, "A1", func)
    u2 = directions(A2, kind, "A2", func)
    if u1.shape[0] != u2.shape[0]:
        what = "in_features (columns of lora_A)" if kind == "A" else "out_features (rows of lora_B)"
        raise ValueError(f"{func}: A1 and A2 must share {what}, got {u1.shape[0]} and {u2.shape[0]} "
                         f"(kind={kind!r})")
    return u1, u2


def subspace_similarity(A1, A2, *, kind="A"):
    """The (k1, k2) matrix phi with phi[i - 1, j - 1] = phi(i, j) (module docstring).

    A1, A2: two lora_A matrices (r, in) with kind='A', or two lora_B
    matrices (out, r) with kind='B'; k = min(r, dim) of each.
    """
    u1, u2 = _pair(A1, A2, kind, "subspace_similarity")
    overlap = np.square(u1.T @ u2)                       # (k1, k2) squared cosines
    cumulative = overlap.cumsum(axis=0).cumsum(axis=1)   # ||U1_i^T U2_j||_F^2
    k1, k2 = overlap.shape
    smaller = np.minimum.outer(np.arange(1, k1 + 1), np.arange(1, k2 + 1))
    return np.clip(cumulative / smaller, 0.0, 1.0)


def projection_distance(A1, A2, *, kind="A", i=None, j=None):
    """sqrt(min(i, j) - ||U1_i^T U2_j||_F^2): the projection distance between the
    top-i directions of A1 and the top-j of A2 (default: all of them).

    0 for nested subspaces, sqrt(min(i, j)) for orthogonal ones;
    equals sqrt(min(i, j) * (1 - phi(i, j))).
    """
    func = "projection_distance"
    u1, u2 = _pair(A1, A2, kind, func)
    k1, k2 = u1.shape[1], u2.shape[1]
    i = k1 if i is None else integer(i, "i", func, minimum=1)
    j = k2 if j is None else integer(j, "j", func, minimum=1)
    if i > k1 or j > k2:
        raise ValueError(f"{func}: i and j must be at most the number of directions ({k1}, {k2}), "
                         f"got i={i}, j={j}")
    small, large = (u1[:, :i], u2[:, :j]) if i <= j else (u2[:, :j], u1[:, :i])
    # ||(I - P_large) U_small||_F^2 = min(i, j) - sum cos^2, without the cancellation.
    residual = small - large @ (large.T @ small)
    return float(np.sqrt(np.sum(np.square(residual))))

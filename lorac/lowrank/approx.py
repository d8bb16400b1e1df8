"""Best rank-r approximation of a matrix (Eckart--Young), exact or randomized.

For M (m, n) with singular value decomposition M = U S V^T, the best
rank-r approximation in the Frobenius and spectral norms is
U_r S_r V_r^T, and

    ||M - U_r S_r V_r^T||_F = sqrt(sum_{i > r} sigma_i^2).

``low_rank_approx`` returns it as two balanced factors

    left  = U_r sqrt(S_r)       (m, r)
    right = sqrt(S_r) V_r^T     (r, n)          left @ right = U_r S_r V_r^T

so that neither factor carries all of the scale (the split LoRA
extraction and PiSSA use).

Exact path (default): ``numpy.linalg.svd`` (LAPACK gesdd), cost
O(m n min(m, n)).

Randomized path (``randomized=True``): the range finder of Halko,
Martinsson and Tropp (2011) with ``niter`` power iterations:

    Omega (n, l) Gaussian, l = r + oversample (at most min(m, n))
    Q = orth(M Omega)                                  (m, l)
    niter times:  Q = orth(M^T Q),  Q = orth(M Q)      QR re-orthonormalises
    B = Q^T M  (l, n),  B = Ub S Vt  (a small SVD)
    U_r = Q Ub[:, :r],  S_r,  V_r^T = Vt[:r]

Cost: 2 niter + 2 GEMMs of size m n l (NumPy's BLAS-backed matmul) plus
QRs of (m, l) / (n, l) and one (l, n) SVD -- far below the exact SVD when
r << min(m, n).  Accuracy: Q Q^T M differs from M by at most about
(1 + r / (oversample - 1))^(1/2) times the optimal rank-r error in
expectation without power iterations (HMT Thm 10.5); each power iteration
replaces sigma_j by sigma_j^(2 niter + 1), so for a decaying spectrum the
rank-r result is within a fraction of a percent of the optimal error with
niter=2, oversample=10 (tests/test_lowrank.py checks 1%).  On a flat
spectrum (noise) it can be a few percent worse than optimal; the reported
``error`` is always the true error of the returned factors (computed
exactly, one more m n r GEMM in row blocks), never an estimate.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .._arrays import as_generator
from ._checks import as_matrix, frobenius, integer

# Rows per block when the randomized path measures its residual: about 4M
# values per block whatever the width.
_BLOCK_VALUES = 1 << 22


@dataclass(frozen=True, eq=False)
class LowRankApprox:
    """A rank-r approximation ``left @ right`` of an (m, n) matrix M.

    - ``left`` (m, r) = U_r sqrt(S_r) and ``right`` (r, n) = sqrt(S_r) V_r^T,
      in M's dtype (float32 stays float32; integers become float64).  When
      r exceeds min(m, n) the extra columns / rows are zero.
    - ``singular_values``: exact path, all min(m, n) singular values of M
      (descending); randomized path, the estimates of the top min(r, m, n).
    - ``error`` = ||M - left @ right||_F; ``norm`` = ||M||_F;
      ``relative_error`` = error / norm (0 when M = 0);
      ``energy`` = the captured share of ||M||_F^2, sum_{i<=r} sigma_i^2 /
      ||M||_F^2 (1 when M = 0); error^2 = (1 - energy) norm^2.
    - ``approximation``: the (m, n) product, formed on first access.
    """

    left: np.ndarray
    right: np.ndarray
    singular_values: np.ndarray
    error: float
    relative_error: float
    energy: float
    norm: float
    randomized: bool = False

    @property
    def rank(self):
        """r, the number of columns of ``left``."""
        return int(self.left.shape[1])

    @property
    def shape(self):
        """(m, n) of the approximated matrix."""
        return (int(self.left.shape[0]), int(self.right.shape[1]))

    @cached_property
    def approximation(self):
        """left @ right, (m, n)."""
        return self.left @ self.right


def low_rank_approx(M, r, randomized=False, niter=2, oversample=10, rng=None):
    """The best rank-r approximation of the 2-D matrix ``M`` (module docstring).

    r: int >= 0 (may exceed min(m, n): the approximation is then M itself and
    the factors are zero-padded to r).  randomized: use the range finder with
    ``niter`` power iterations and ``oversample`` extra columns, drawing the
    test matrix from ``rng`` (None, an int seed or a numpy Generator); the
    exact path ignores these three.  Returns a ``LowRankApprox``.
    """
    func = "low_rank_approx"
    M = as_matrix(M, "M", func)
    r = integer(r, "r", func)
    niter = integer(niter, "niter", func)
    oversample = integer(oversample, "oversample", func)
    rng = as_generator(rng, f"{func}: rng")
    m, n = M.shape
    k = min(r, m, n)
    if randomized and k > 0:
        u, s, vt = _randomized_svd(M, k, niter, oversample, rng)
        kept = s
    else:
        u, s, vt = _exact_svd(M)
        u, kept, vt = u[:, :k], s[:k], vt[:k]
    root = np.sqrt(kept)
    left = np.zeros((m, r), dtype=M.dtype)
    right = np.zeros((r, n), dtype=M.dtype)
    np.multiply(u, root, out=left[:, :k])
    np.multiply(root[:, None], vt, out=right[:k])
    s64 = s.astype(np.float64)
    if randomized and k > 0:
        norm, error = _residual(M, left[:, :k], right[:k])
        captured = float(np.dot(s64, s64))
    else:
        norm = float(np.sqrt(np.dot(s64, s64)))
        tail = s64[k:]
        error = float(np.sqrt(np.dot(tail, tail)))
        captured = float(np.dot(s64[:k], s64[:k]))
    relative = error / norm if norm > 0 else 0.0
    energy = min(captured / (norm * norm), 1.0) if norm > 0 else 1.0
    return LowRankApprox(left, right, s, error, relative, energy, norm, bool(randomized and k > 0))


def _exact_svd(M):
    """(U (m, k), S (k,), V^T (k, n)), k = min(m, n), S descending."""
    m, n = M.shape
    if min(m, n) == 0:
        k = 0
        return np.zeros((m, k), M.dtype), np.zeros(k, M.dtype), np.zeros((k, n), M.dtype)
    return np.linalg.svd(M, full_matrices=False)


def _orthonormal(Y):
    """An orthonormal basis (QR's Q) of the columns of Y (p, l), p >= l."""
    return np.linalg.qr(Y, mode="reduced")[0]


def _randomized_svd(M, k, niter, oversample, rng):
    """Top-k (U (m, k), S (k,), V^T (k, n)) of M by the range finder, 1 <= k <= min(m, n)."""
    m, n = M.shape
    width = min(k + oversample, m, n)
    omega = rng.standard_normal((n, width)).astype(M.dtype, copy=False)  # (n, l)
    q = _orthonormal(M @ omega)                                          # (m, l)
    for _ in range(niter):
        q = _orthonormal(M.T @ q)                                        # (n, l)
        q = _orthonormal(M @ q)                                          # (m, l)
    small = q.T @ M                                                      # (l, n)
    ub, s, vt = np.linalg.svd(small, full_matrices=False)                # (l, l), (l,), (l, n)
    return q @ ub[:, :k], s[:k], vt[:k]


def _residual(M, left, right):
    """(||M||_F, ||M - left @ right||_F) in one pass over row blocks of M.

    M (m, n), left (m, k), right (k, n); squares are summed in float64."""
    m, n = M.shape
    rows = max(1, _BLOCK_VALUES // max(n, 1))
    norm2 = err2 = 0.0
    for start in range(0, m, rows):
        block = M[start:start + rows]
        norm2 += frobenius(block) ** 2
        err2 += frobenius(block - left[start:start + rows] @ right) ** 2
    return float(np.sqrt(norm2)), float(np.sqrt(err2))

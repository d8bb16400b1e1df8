"""The low-rank toolkit: SVD approximation, LoRA extraction, subspace similarity, rank reports.

- ``low_rank_approx(M, r, randomized=False, niter=2, oversample=10, rng=None)``:
  the best rank-r approximation (Eckart--Young) as balanced factors
  U_r sqrt(S_r) and sqrt(S_r) V_r^T, with its error and captured energy;
  exact (LAPACK SVD) or randomized (range finder + power iterations)
  -- approx.py documents the accuracy.
- ``extract_lora(W_finetuned, W_base, r, lora_alpha=None, fan_in_fan_out=False)``:
  lora_A, lora_B and scaling whose ``scaling * B A`` is the best rank-r
  approximation of the weight difference (extract.py); ``lora_factors``
  is the same split for any weight (what PiSSA needs).
- ``extract_adapter(finetuned, base, r, lora_alpha=None, ...)``: the same for
  every changed 2-D weight of a model, as a loralib state dict plus a
  per-layer error report (adapter.py).
- ``subspace_similarity(A1, A2, kind='A')``: the LoRA paper's
  phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j); ``projection_distance``
  (similarity.py).
- ``rank_report(model_or_state_dict, scalings=None)``: per layer, the
  singular values of s B A without forming it, effective ranks at 90% /
  99% energy and the stable rank (rank.py).

Everything here is NumPy (LAPACK for SVD / QR, BLAS-backed matmul): these
are offline analyses, not the training hot path.
"""

from .adapter import ExtractedAdapter, extract_adapter
from .approx import LowRankApprox, low_rank_approx
from .extract import ExtractedLoRA, extract_lora, lora_factors
from .rank import LayerRank, effective_rank, product_singular_values, rank_report, stable_rank
from .similarity import directions, projection_distance, subspace_similarity

__all__ = [
    "low_rank_approx", "LowRankApprox",
    "extract_lora", "ExtractedLoRA", "lora_factors",
    "extract_adapter", "ExtractedAdapter",
    "subspace_similarity", "projection_distance", "directions",
    "rank_report", "LayerRank", "product_singular_values", "effective_rank", "stable_rank",
]

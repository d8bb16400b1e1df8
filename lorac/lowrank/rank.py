"""How many directions an adapter really uses: singular values of s B A per layer.

The adapter's delta is ``s B A`` with B (out, r), A (r, in).  Its singular
values come without forming the (out, in) product:

    B = Qb Rb (QR, Rb (p, r)),  A^T = Qa Ra (QR, Ra (q, r))
    B A = Qb (Rb Ra^T) Qa^T  ->  sigma(s B A) = |s| sigma(Rb Ra^T)

an SVD of a matrix at most r x r, cost O(r^2 (in + out)).  A loralib
``MergedLinear`` adapter (lora_A (r g, in), lora_B (out_e, r) over g
enabled groups) has delta rows ``B_e A_e`` per group: B is then taken
block-diagonal (out_e, r g) and the same formula applies.

Per layer the report gives the singular values (descending), the
effective rank at 90% and 99% energy (the fewest leading singular values
whose squares hold that share of ||s B A||_F^2) and the stable rank
||s B A||_F^2 / ||s B A||_2^2 (a continuous rank, between 1 and r).
"""

from dataclasses import dataclass

import numpy as np

from ..layers.base import LoRALayer
from ..layers.merged_linear import MergedLinear
from ._checks import as_matrix
from ._sources import lora_pairs, state_of


def product_singular_values(lora_B, lora_A, scaling=1.0, groups=1):
    """Singular values (descending, float64) of ``scaling * blockdiag(B_1..B_g) @ A``.

    lora_B (out, r) -- with groups g, (g * og, r) holding B_e in rows
    [e og, (e + 1) og) --, lora_A (r g, in).  Never forms the (out, in) product."""
    b = np.asarray(lora_B, dtype=np.float64)
    a = np.asarray(lora_A, dtype=np.float64)
    if groups > 1:
        og, r = b.shape[0] // groups, b.shape[1]
        block = np.zeros((b.shape[0], r * groups))
        for e in range(groups):
            block[e * og:(e + 1) * og, e * r:(e + 1) * r] = b[e * og:(e + 1) * og]
        b = block
    if min(b.shape + a.shape) == 0:
        return np.zeros(0)
    rb = np.linalg.qr(b, mode="r")         # (min(out, rank), rank)
    ra = np.linalg.qr(a.T, mode="r")       # (min(in, rank), rank)
    return abs(float(scaling)) * np.linalg.svd(rb @ ra.T, compute_uv=False)


def effective_rank(singular_values, energy=0.9):
    """The fewest leading singular values whose squares hold ``energy`` of the total (0 for zeros)."""
    s2 = np.square(np.asarray(singular_values, dtype=np.float64))
    total = float(s2.sum())
    if total == 0.0:
        return 0
    cumulative = np.cumsum(s2)
    # A relative slack of a few ulps so that an exact 90% split counts as reached.
    return int(np.searchsorted(cumulative, energy * total * (1.0 - 1e-12), side="left") + 1)


def stable_rank(singular_values):
    """sum sigma^2 / sigma_max^2 (0 for a zero matrix)."""
    s = np.asarray(singular_values, dtype=np.float64)
    if s.size == 0 or s.max() == 0.0:
        return 0.0
    return float(np.sum(np.square(s)) / s.max() ** 2)


@dataclass(frozen=True, eq=False)
class LayerRank:
    """One layer's rank report: ``r`` (rows of lora_A per group), ``in_features``,
    ``out_features`` (rows of lora_B), ``groups`` (MergedLinear's enabled groups,
    else 1), ``scaling``, ``singular_values`` of s B A (descending),
    ``norm`` = ||s B A||_F, ``rank_90`` / ``rank_99`` and ``stable_rank``."""

    r: int
    in_features: int
    out_features: int
    groups: int
    scaling: float
    singular_values: np.ndarray
    norm: float
    rank_90: int
    rank_99: int
    stable_rank: float


def _layer_rank(lora_A, lora_B, scaling, groups):
    s = product_singular_values(lora_B, lora_A, scaling, groups)
    return LayerRank(int(lora_B.shape[1]), int(lora_A.shape[1]), int(lora_B.shape[0]), groups, float(scaling),
                     s, float(np.sqrt(np.sum(np.square(s)))), effective_rank(s, 0.9), effective_rank(s, 0.99),
                     stable_rank(s))


def _groups_of(path, a, b, func):
    """Enabled groups g from the shapes: lora_A (r g, in), lora_B (og g, r)."""
    r = b.shape[1]
    if a.shape[0] == r:
        return 1
    if r and a.shape[0] % r == 0 and b.shape[0] % (a.shape[0] // r) == 0:
        return a.shape[0] // r
    raise ValueError(f"{func}: {path!r}: lora_A {a.shape} (r, in) and lora_B {b.shape} (out, r) do not fit "
                     "together")


def _scaling_for(path, scalings, func):
    if scalings is None:
        return 1.0
    if isinstance(scalings, dict):
        if path not in scalings:
            raise ValueError(f"{func}: scalings has no entry for layer {path!r}")
        value = scalings[path]
    else:
        value = scalings
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{func}: the scaling of layer {path!r} must be a real number, got "
                        f"{type(value).__name__} {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{func}: the scaling of layer {path!r} must be finite, got {value!r}")
    return float(value)


def rank_report(model_or_state_dict, scalings=None):
    """{module path: LayerRank} for every LoRA layer (module docstring).

    A lorac model: every LoRA layer with r > 0 and its own ``scaling``
    (``scalings``, a number or a {path: number} dict, overrides it).  A state
    dict: every ``<path>.lora_A`` / ``<path>.lora_B`` pair (a MergedLinear
    pair is recognised from its shapes) with scaling from ``scalings`` --
    None means 1 (the report is then that of B A), a number applies to all,
    a dict must name every layer.
    """
    func = "rank_report"
    state, model = state_of(model_or_state_dict, "model_or_state_dict", func)
    if scalings is not None and not isinstance(scalings, dict):
        _scaling_for("*", scalings, func)
    pairs = {}
    if model is not None:
        for path, module in model.named_modules():
            if isinstance(module, LoRALayer) and "lora_A" in module._parameters:
                groups = sum(module.enable_lora) if isinstance(module, MergedLinear) else 1
                scale = module.scaling if scalings is None else _scaling_for(path, scalings, func)
                pairs[path] = (module.lora_A.data, module.lora_B.data, scale, groups)
    else:
        for path, (a, b) in lora_pairs(state, func).items():
            a = as_matrix(a, f"{path + '.' if path else ''}lora_A", func)
            b = as_matrix(b, f"{path + '.' if path else ''}lora_B", func)
            pairs[path] = (a, b, _scaling_for(path, scalings, func), _groups_of(path, a, b, func))
    if isinstance(scalings, dict):
        unknown = sorted(set(scalings) - set(pairs))
        if unknown:
            raise ValueError(f"{func}: scalings names {unknown[0]!r}, which is not a LoRA layer here")
    return {path: _layer_rank(a, b, scale, groups) for path, (a, b, scale, groups) in pairs.items()}

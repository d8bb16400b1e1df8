"""One layer's LoRA adapter from a weight difference (or from a weight itself).

With delta = W_finetuned - W_base in torch's (out, in) layout (transposed
first when ``fan_in_fan_out``: the weights are then stored (in, out)) and
its best rank-r approximation U_r S_r V_r^T, the adapter is

    lora_B = U_r sqrt(S_r / scaling)        (out, r)
    lora_A = sqrt(S_r / scaling) V_r^T      (r, in)

so that ``scaling * lora_B @ lora_A = U_r S_r V_r^T`` exactly: the singular
values are split evenly between the two factors after dividing out the
layer's ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``).  ``lora_alpha`` defaults to the value giving scaling 1
(r, or sqrt(r) with rsLoRA), so B A itself is the approximation; any other
alpha only rescales both factors by 1 / sqrt(scaling) -- the merged weight
is the same.

The difference is formed and decomposed in float64 whatever the weights'
dtype (an offline, one-off computation where the accuracy of the error
report matters); the factors come back in the weights' dtype (float32 when
both weights are float32).  The reported errors are those of the float64
factors, before any rounding to float32.
"""

import math
from dataclasses import dataclass

import numpy as np

from ._checks import as_matrix, integer, positive_number
from .approx import low_rank_approx


@dataclass(frozen=True, eq=False)
class ExtractedLoRA:
    """An adapter ``scaling * lora_B @ lora_A`` approximating a weight difference.

    - ``lora_A`` (r, in), ``lora_B`` (out, r): loralib's shapes and names.
    - ``r``, ``lora_alpha``, ``scaling``, ``use_rslora``, ``fan_in_fan_out``:
      what a ``lorac.Linear`` needs to use it.
    - ``singular_values``: of the difference (out, in), descending (exact
      path: all of them; randomized: the top r).
    - ``error`` = ||delta - scaling B A||_F, ``delta_norm`` = ||delta||_F,
      ``relative_error`` = error / delta_norm (0 when delta = 0),
      ``energy``: the share of ||delta||_F^2 the adapter captures.
    """

    lora_A: np.ndarray
    lora_B: np.ndarray
    lora_alpha: float
    scaling: float
    use_rslora: bool
    fan_in_fan_out: bool
    singular_values: np.ndarray
    error: float
    relative_error: float
    energy: float
    delta_norm: float

    @property
    def r(self):
        return int(self.lora_A.shape[0])

    def delta(self):
        """scaling * B A in the weights' layout: (out, in), or (in, out) when fan_in_fan_out."""
        product = self.scaling * (self.lora_B @ self.lora_A)
        return np.ascontiguousarray(product.T) if self.fan_in_fan_out else product

    def state_dict(self, prefix=""):
        """{"<prefix>.lora_A": A, "<prefix>.lora_B": B} (no dot when prefix is empty)."""
        dot = "." if prefix else ""
        return {f"{prefix}{dot}lora_A": self.lora_A, f"{prefix}{dot}lora_B": self.lora_B}


def default_alpha(r, use_rslora=False):
    """The lora_alpha giving scaling 1: r, or sqrt(r) with rsLoRA."""
    return math.sqrt(r) if use_rslora else float(r)


def lora_factors(W, r, scaling=1.0, fan_in_fan_out=False, randomized=False, niter=2, oversample=10,
                 rng=None, func="lora_factors"):
    """(lora_A (r, in), lora_B (out, r), LowRankApprox) with ``scaling * B A`` the
    best rank-r approximation of the weight-shaped matrix ``W``.

    W is (out, in), or (in, out) when ``fan_in_fan_out``; it is decomposed in
    its own dtype.  The approximation's report (errors, singular values) is
    that of W itself.  This is the step both LoRA extraction (W = delta) and
    PiSSA initialisation (W = W0) need.
    """
    W = as_matrix(W, "W", func)
    r = integer(r, "r", func)
    scaling = positive_number(scaling, "scaling", func)
    approx = low_rank_approx(W.T if fan_in_fan_out else W, r, randomized=randomized, niter=niter,
                             oversample=oversample, rng=rng)
    shrink = 1.0 / math.sqrt(scaling)
    lora_b = np.ascontiguousarray(approx.left * shrink)     # (out, r)
    lora_a = np.ascontiguousarray(approx.right * shrink)    # (r, in)
    return lora_a, lora_b, approx


def extract_lora(W_finetuned, W_base, r, lora_alpha=None, fan_in_fan_out=False, use_rslora=False,
                 randomized=False, niter=2, oversample=10, rng=None):
    """The rank-r LoRA adapter that best reproduces ``W_finetuned - W_base``.

    W_finetuned, W_base: 2-D arrays of one shape, (out, in) -- (in, out) when
    ``fan_in_fan_out``.  r >= 1.  lora_alpha: > 0, default r (scaling 1).
    randomized / niter / oversample / rng: as in ``low_rank_approx``.
    Returns an ``ExtractedLoRA`` (module docstring for the split).
    """
    func = "extract_lora"
    finetuned = as_matrix(W_finetuned, "W_finetuned", func)
    base = as_matrix(W_base, "W_base", func)
    if finetuned.shape != base.shape:
        raise ValueError(f"{func}: W_finetuned and W_base must have the same shape, got "
                         f"{tuple(finetuned.shape)} and {tuple(base.shape)}")
    r = integer(r, "r", func, minimum=1)
    use_rslora = bool(use_rslora)
    alpha = default_alpha(r, use_rslora) if lora_alpha is None else positive_number(lora_alpha, "lora_alpha", func)
    scaling = alpha / (math.sqrt(r) if use_rslora else r)
    dtype = np.result_type(finetuned.dtype, base.dtype)
    delta = finetuned.astype(np.float64) - base.astype(np.float64)
    lora_a, lora_b, approx = lora_factors(delta, r, scaling, fan_in_fan_out=bool(fan_in_fan_out),
                                          randomized=randomized, niter=niter, oversample=oversample,
                                          rng=rng, func=func)
    return ExtractedLoRA(lora_a.astype(dtype, copy=False), lora_b.astype(dtype, copy=False), alpha, scaling,
                         use_rslora, bool(fan_in_fan_out), approx.singular_values, approx.error,
                         approx.relative_error, approx.energy, approx.norm)

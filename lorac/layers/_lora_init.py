"""How a new LoRA adapter starts: lora_A, lora_B and, for PiSSA, a new base weight.

Pure functions: they read shapes, an optional base weight and a random
generator and return fresh arrays.  Nothing is mutated, so a layer assigns
the result only after every array exists (bad input leaves it unchanged).

Geometry (that of every lorac LoRA layer).  An adapter of rank r over
``groups`` adapted output blocks of ``group_out`` features each has

    lora_A (groups * r, fan_in)         lora_B (groups * group_out, r)

where group e owns A[e r:(e+1) r] and B[e og:(e+1) og].  Linear: fan_in =
in_features, group_out = out_features, one group.  Embedding: fan_in =
num_embeddings, group_out = embedding_dim, one group.  MergedLinear: one
group per enabled projection.  In the weight's (out, in) view, block e
is rows ``block_starts[e] : block_starts[e] + group_out``.  The stored
weight is that view, or its transpose when ``transposed``
(``fan_in_fan_out``, and always for an Embedding's (num, dim) weight).

Initialisations (``init``):

- ``'kaiming'`` (default; loralib's): Linear / MergedLinear A is
  kaiming-uniform with a = sqrt(5) (bound 1 / sqrt(fan_in)) and B = 0.
  Embedding (``kind='embedding'``) is the other way round: A = 0 and
  B ~ N(0, 1).  Either way the adapter starts as a no-op.
- ``'gaussian'``: A ~ N(0, std^2) and B = 0.  std defaults to 0.01, the
  seeds' value.  PEFT's ``'gaussian'`` uses std = 1 / r; pass std=1/r for
  that.
- ``'zeros_A'``: A = 0 and B ~ N(0, std^2), std 1 by default: loralib's
  Embedding convention, on any layer.
- ``'pissa'`` (PiSSA, Meng et al. 2024): A and B come from the top-r SVD of
  the base weight W0 (``lorac.lowrank.lora_factors``), so that
  ``scaling * B A = U_r S_r V_r^T``, the best rank-r approximation of W0.
  A MergedLinear takes each adapted block of W0 separately.  The residual
  ``W0 - scaling * B A`` comes back as the new base weight, so the layer
  computes the same function as before (up to rounding), but its saved
  base weight is the residual, not W0: keep the pretrained W0 if you need
  it.  The SVD runs in float64 and the residual is formed from the factors
  already rounded to the layer's dtype.  If r exceeds min(group_out,
  fan_in), the extra directions start as 'kaiming' ones: they add nothing
  to the product and still train.
- ``'pissa_niter_N'``: PiSSA with the randomized SVD and N power
  iterations (PEFT's name), for large weights.  ``lorac.lowrank.approx``
  documents its accuracy.
- ``'olora'`` (OLoRA, Buyukakyuz 2024; PEFT's ``'olora'``): the thin QR
  factorisation W0 = Q R of each adapted block gives B = Q[:, :r] and
  A = R[:r], and the base weight becomes the residual ``W0 - scaling * B
  A``, as with PiSSA (any finite scaling: the output does not change).
  The QR runs in float64.  Extra directions beyond min(group_out, fan_in)
  start as 'kaiming' ones.
- ``'orthogonal'`` (PEFT's ``'orthogonal'``; r even): Q from the QR of an
  (r, r) N(0, 1) draw; A = (G_A Q[0::2])^T / 10 and B = G_B^T Q[1::2] / 10
  with G_A (fan_in, r / 2), G_B (r / 2, group_out) N(0, 1).  The rows of
  Q[0::2] and Q[1::2] are orthogonal, so B A = 0: both factors start
  non-zero and the adapter still starts as a no-op (up to rounding to the
  layer's dtype).  Each group draws its own.
- ``'mica'`` (MiCA, minor component adaptation; PEFT's ``'mica'``): B = the
  r left singular vectors of each adapted block of W0 with the *smallest*
  singular values (the SVD in float64), A = 0: the adapter starts as a
  no-op and the base weight is untouched.  MiCA trains A only: the layers
  keep lora_B frozen (``set_adapter``, ``mark_only_lora_as_trainable`` and
  ``get_peft_model`` leave it so).  r must be <= min(group_out, fan_in).
- ``True`` / ``False``: PEFT's ``init_lora_weights``.  True means
  'kaiming'.  False makes both factors random, a non-trivial adapter for
  tests: A and B kaiming-uniform (Embedding: both N(0, 1)).

``std`` applies only to 'gaussian' and 'zeros_A'; with any other init it is
an error.
"""

import numbers
import re
from collections import namedtuple

import numpy as np

from .. import init as _init
from .._arrays import as_generator, float_dtype, non_negative_int

INITS = ("kaiming", "gaussian", "zeros_A", "pissa", "olora", "orthogonal", "mica")
BASE_CHANGING = ("pissa", "olora")   # inits that factor the base weight and replace it by the residual
FROM_WEIGHT = BASE_CHANGING + ("mica",)   # inits that read the base weight
DEFAULT_STD = {"gaussian": 0.01, "zeros_A": 1.0}
KINDS = ("linear", "embedding")
_PISSA_NITER = re.compile(r"pissa_niter_([0-9]+)\Z")

# A checked init: name one of INITS or "random" (PEFT's False); std for the
# normal factor of 'gaussian' / 'zeros_A' (else None); niter: None for the
# exact SVD of 'pissa', N for 'pissa_niter_N'.
InitSpec = namedtuple("InitSpec", ["name", "std", "niter"])

# What init_adapter returns: lora_A (groups * r, fan_in), lora_B
# (groups * group_out, r) in the layer's dtype, and weight, the new base
# weight in its stored layout ('pissa'), or None (keep the weight as it is).
AdapterInit = namedtuple("AdapterInit", ["lora_A", "lora_B", "weight"])


def check_init(init, std=None, func="init"):
    """Validate ``init`` and ``std``; returns an InitSpec (module docstring for the choices).

    An InitSpec (already checked) passes through when std is None.  TypeError
    for a wrong type, ValueError for an unknown name or a bad std."""
    choices = ("'kaiming', 'gaussian', 'zeros_A', 'pissa', 'pissa_niter_N', 'olora', 'orthogonal', 'mica' "
               "(or PEFT's True / False)")
    niter = None
    if isinstance(init, InitSpec) and std is None:
        return init
    if isinstance(init, (bool, np.bool_)):
        name = "kaiming" if init else "random"
    elif isinstance(init, str):
        match = _PISSA_NITER.match(init)
        if match:
            name, niter = "pissa", int(match.group(1))
        elif init in INITS:
            name = init
        else:
            raise ValueError(f"{func}: init must be one of {choices}, got {init!r}")
    else:
        raise TypeError(f"{func}: init must be one of {choices}, got {type(init).__name__} {init!r}")
    if std is None:
        return InitSpec(name, DEFAULT_STD.get(name), niter)
    if name not in DEFAULT_STD:
        raise ValueError(f"{func}: std applies to init='gaussian' and init='zeros_A' only, got std={std!r} "
                         f"with init={init!r}")
    if isinstance(std, bool) or not isinstance(std, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{func}: std must be a real number > 0, got {type(std).__name__}")
    std = float(std)
    if not (np.isfinite(std) and std > 0):
        raise ValueError(f"{func}: std must be a finite number > 0, got {std}")
    return InitSpec(name, std, niter)


def init_adapter(init, r, fan_in, group_out, *, kind="linear", block_starts=(0,), out_features=None,
                 weight=None, scaling=1.0, transposed=False, std=None, rng=None, dtype=np.float32,
                 func="init_adapter"):
    """The starting (lora_A, lora_B, new base weight or None) of a rank-r adapter.

    The geometry and the inits are described in the module docstring.
    block_starts: for each adapted group, the first output row of its block
    in the weight's (out, in) view.  There are len(block_starts) groups.
    out_features is the weight's number of output rows, by default
    len(block_starts) * group_out.  weight is needed by 'pissa' and 'olora'
    only (ignored otherwise): the base weight in its stored layout, (out,
    in), or (in, out) when ``transposed``.  scaling is the adapter's
    scaling, > 0 for 'pissa', finite for 'olora'.  rng: None, a seed or a
    numpy Generator.  Draws from it in the same order as the layers always
    have, so seeded layers come out as before.  Returns an AdapterInit.
    """
    spec = check_init(init, std, func)
    r = non_negative_int(r, f"{func}: r")
    if r == 0:
        raise ValueError(f"{func}: r must be >= 1 for an adapter, got 0")
    fan_in = non_negative_int(fan_in, f"{func}: fan_in")
    group_out = non_negative_int(group_out, f"{func}: group_out")
    if kind not in KINDS:
        raise ValueError(f"{func}: kind must be 'linear' or 'embedding', got {kind!r}")
    starts = tuple(non_negative_int(s, f"{func}: block_starts") for s in block_starts)
    if not starts:
        raise ValueError(f"{func}: block_starts must name at least one adapted block, got none")
    rows = len(starts) * group_out if out_features is None else non_negative_int(out_features,
                                                                                 f"{func}: out_features")
    if max(starts) + group_out > rows:
        raise ValueError(f"{func}: block_starts {list(starts)} with blocks of {group_out} rows do not fit in "
                         f"out_features = {rows}")
    dtype = float_dtype(dtype, f"{func}: dtype")
    rng = as_generator(rng, f"{func}: rng")
    if spec.name in FROM_WEIGHT:   # every check before any draw or factorisation
        w_view = _base_weight(weight, rows, fan_in, transposed, spec.name, func)
    if spec.name in BASE_CHANGING:
        scaling = _residual_scaling(scaling, spec.name, func)
    if spec.name == "mica" and r > min(group_out, fan_in):
        raise ValueError(f"{func}: init='mica' needs r <= min(out, in) of each adapted block = "
                         f"{min(group_out, fan_in)} (B takes that many minor singular directions), got r = {r}")
    if spec.name == "orthogonal" and r % 2:
        raise ValueError(f"{func}: init='orthogonal' needs an even r (its A and B take r / 2 orthogonal "
                         f"directions each), got r = {r}")

    groups = len(starts)
    if spec.name == "mica":
        return AdapterInit(*_minor_factors(w_view, r, group_out, starts, dtype), None)
    if spec.name == "orthogonal":
        return AdapterInit(*_orthogonal_factors(groups, r, fan_in, group_out, rng, dtype), None)
    a, b = _random_factors(spec, kind, groups * r, fan_in, groups * group_out, r, rng, dtype)
    if spec.name == "pissa":
        def factor(block, k):
            from ..lowrank.extract import lora_factors

            lora_a, lora_b, _ = lora_factors(block, k, scaling, randomized=spec.niter is not None,
                                             niter=spec.niter or 0, rng=rng, func=func)
            return lora_a, lora_b
    elif spec.name == "olora":
        def factor(block, k):
            q, rr = np.linalg.qr(block)          # (og, min) and (min, in), float64
            return rr[:k], q[:, :k]
    else:
        return AdapterInit(a, b, None)
    return _factor_blocks(w_view, a, b, r, group_out, starts, scaling, transposed, dtype, factor)


def linear_init(init, in_features, out_features, r, *, fan_in_fan_out=False, weight=None, scaling=1.0, std=None,
                rng=None, dtype=np.float32, func="Linear"):
    """init_adapter for a ``lorac.Linear``: lora_A (r, in), lora_B (out, r); weight (out, in),
    or (in, out) when fan_in_fan_out."""
    return init_adapter(init, r, in_features, out_features, kind="linear", weight=weight, scaling=scaling,
                        transposed=bool(fan_in_fan_out), std=std, rng=rng, dtype=dtype, func=func)


def embedding_init(init, num_embeddings, embedding_dim, r, *, weight=None, scaling=1.0, std=None, rng=None,
                   dtype=np.float32, func="Embedding"):
    """init_adapter for a ``lorac.Embedding``: lora_A (r, num), lora_B (dim, r); weight (num, dim)."""
    return init_adapter(init, r, num_embeddings, embedding_dim, kind="embedding", weight=weight,
                        scaling=scaling, transposed=True, std=std, rng=rng, dtype=dtype, func=func)


def merged_linear_init(init, in_features, out_features, r, enable_lora, *, fan_in_fan_out=False, weight=None,
                       scaling=1.0, std=None, rng=None, dtype=np.float32, func="MergedLinear"):
    """init_adapter for a ``lorac.MergedLinear``: lora_A (r * n_enabled, in), lora_B (og * n_enabled, r),
    og = out / len(enable_lora).  'pissa' factors each enabled block of the weight."""
    flags = [bool(flag) for flag in enable_lora]
    if not flags or out_features % len(flags) or not any(flags):
        raise ValueError(f"{func}: enable_lora must be a non-empty sequence whose length divides out_features "
                         f"= {out_features}, with some group enabled; got {list(enable_lora)}")
    group_out = out_features // len(flags)
    starts = [g * group_out for g, flag in enumerate(flags) if flag]
    return init_adapter(init, r, in_features, group_out, kind="linear", block_starts=starts,
                        out_features=out_features, weight=weight, scaling=scaling,
                        transposed=bool(fan_in_fan_out), std=std, rng=rng, dtype=dtype, func=func)


# -- the pieces -------------------------------------------------------------------
def _random_factors(spec, kind, a_rows, fan_in, b_rows, r, rng, dtype):
    """(A (a_rows, fan_in), B (b_rows, r)) for every init but PiSSA's SVD part
    ('pissa' starts from the 'kaiming' arrays and overwrites its top directions)."""
    name = spec.name
    if name == "gaussian":
        return _init.normal((a_rows, fan_in), spec.std, rng, dtype), _init.zeros((b_rows, r), dtype)
    if name == "zeros_A" or (kind == "embedding" and name in ("kaiming", "pissa")):
        std = spec.std if name == "zeros_A" else 1.0
        return _init.zeros((a_rows, fan_in), dtype), _init.normal((b_rows, r), std, rng, dtype)
    if kind == "embedding":   # "random"
        return _init.normal((a_rows, fan_in), 1.0, rng, dtype), _init.normal((b_rows, r), 1.0, rng, dtype)
    a = _init.kaiming_uniform((a_rows, fan_in), fan_in, rng, dtype)
    if name == "random":
        return a, _init.kaiming_uniform((b_rows, r), r, rng, dtype)
    return a, _init.zeros((b_rows, r), dtype)


def _base_weight(weight, rows, fan_in, transposed, name, func):
    """The base weight as a float64 (out, in) array (a copy), after checking it."""
    from ..lowrank._checks import as_matrix

    if weight is None:
        raise ValueError(f"{func}: init={name!r} needs the base weight (its factorisation gives lora_A and "
                         "lora_B), got None")
    w = as_matrix(weight, "weight", func)
    expected = (fan_in, rows) if transposed else (rows, fan_in)
    if w.shape != expected:
        layout = " (stored transposed: (in, out))" if transposed else ""
        raise ValueError(f"{func}: init={name!r}: weight must have shape {expected}{layout}, got {tuple(w.shape)}")
    w = w.astype(np.float64)          # always a copy: the residual is formed in it
    return w.T if transposed else w


def _residual_scaling(scaling, name, func):
    """The scaling the residual W0 - scaling * B A uses: PiSSA's splits sqrt(S / scaling), so > 0."""
    if isinstance(scaling, bool) or not isinstance(scaling, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{func}: scaling must be a real number, got {type(scaling).__name__}")
    scaling = float(scaling)
    if name == "pissa" and not (np.isfinite(scaling) and scaling > 0):
        raise ValueError(f"{func}: init='pissa' needs scaling = lora_alpha / r > 0 (lora_alpha > 0), got {scaling}")
    if not np.isfinite(scaling):
        raise ValueError(f"{func}: init={name!r} needs a finite scaling = lora_alpha / r, got {scaling}")
    return scaling


def _minor_factors(w_view, r, group_out, starts, dtype):
    """MiCA's start for each group: (A = 0 (groups * r, fan_in), B (groups * group_out, r) = the r left
    singular vectors of the group's block of w_view (float64 (out, in)) with the smallest singular values)."""
    fan_in = w_view.shape[1]
    a = np.zeros((len(starts) * r, fan_in), dtype)
    b = np.empty((len(starts) * group_out, r), dtype)
    for e, start in enumerate(starts):
        u = np.linalg.svd(w_view[start:start + group_out], full_matrices=False)[0]      # (og, min)
        b[e * group_out:(e + 1) * group_out] = u[:, u.shape[1] - r:]
    return a, b


def _orthogonal_factors(groups, r, fan_in, group_out, rng, dtype):
    """PEFT's 'orthogonal' start for each group: (A (groups * r, fan_in), B (groups * group_out, r)), B A = 0."""
    a = np.empty((groups * r, fan_in), dtype)
    b = np.empty((groups * group_out, r), dtype)
    half = r // 2
    for e in range(groups):
        q = np.linalg.qr(rng.standard_normal((r, r)))[0]        # (r, r) orthogonal
        a[e * r:(e + 1) * r] = (rng.standard_normal((fan_in, half)) @ q[0::2]).T / 10.0
        b[e * group_out:(e + 1) * group_out] = rng.standard_normal((half, group_out)).T @ q[1::2] / 10.0
    return a, b


def _factor_blocks(w_view, a, b, r, group_out, starts, scaling, transposed, dtype, factor):
    """Overwrite each group's top k = min(r, group_out, fan_in) directions of (a, b) with
    ``factor(block, k)`` -> (A_k (k, in), B_k (og, k)) of its block of w_view (float64 (out, in));
    returns AdapterInit with the residual weight W0 - scaling * B A."""
    fan_in = w_view.shape[1]
    k = min(r, group_out, fan_in)
    for e, start in enumerate(starts if k else ()):   # k = 0: empty blocks, nothing to factor
        block = w_view[start:start + group_out]                 # (og, in), a view into the copy
        lora_a, lora_b = factor(block, k)
        a_e = a[e * r:e * r + k]                                # (k, in)
        b_e = b[e * group_out:(e + 1) * group_out, :k]          # (og, k)
        a_e[...] = lora_a
        b_e[...] = lora_b
        # The residual from the factors as the layer will hold them (rounded to dtype).
        block -= scaling * (b_e.astype(np.float64) @ a_e.astype(np.float64))
    residual = w_view.T if transposed else w_view
    return AdapterInit(a, b, np.ascontiguousarray(residual, dtype=dtype))

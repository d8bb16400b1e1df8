"""Catalogue of every public entry point of lorac._C (test helper, issue 7).

One table, ``ENTRY_POINTS``: for each C function, how to build a random VALID
call (``build(draw) -> Case``), which of its arguments it updates in place,
and its NumPy float64 reference (``reference(kwargs) -> Expected``).  The
property tests, the fuzzer, the leak test and the size-limit test all iterate
over this table, so adding one ``EntryPoint`` here covers a new C function
everywhere; ``test_catalogue_is_complete`` (tests/property) fails while a
function of lorac._C is missing from it.

``draw`` is a ``HypothesisDraw`` (inside a hypothesis test: shrinks) or a
``RandomDraw`` (a numpy Generator: the fuzzer and the leak test).  Draws decide
the structure (sizes, dtype, options, hyper-parameters); array values come
from a numpy Generator seeded by one draw, uniform in [-1, 1) (finite; NaN and
infinity are covered by tests/test_bad_input_matrix.py).
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

FLOATS = (np.float32, np.float64)
INDEX_DTYPES = (np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint32, np.uint64, np.intp)
SIGNED_INDEX_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.intp)


# --------------------------------------------------------------------------
# draws
# --------------------------------------------------------------------------

class RandomDraw:
    """Draws from a numpy Generator (no shrinking)."""

    def __init__(self, rng):
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def int(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))

    def float(self, lo, hi):
        return float(self.rng.uniform(lo, hi))

    def bool(self):
        return bool(self.rng.integers(2))

    def choice(self, options):
        return options[self.int(0, len(options) - 1)]


class HypothesisDraw:
    """Draws from hypothesis' ``st.data()`` (shrinks towards small sizes)."""

    def __init__(self, data):
        from hypothesis import strategies as st
        self._st = st
        self.data = data

    def int(self, lo, hi):
        return self.data.draw(self._st.integers(lo, hi))

    def float(self, lo, hi):
        return self.data.draw(self._st.floats(lo, hi, allow_nan=False, allow_infinity=False))

    def bool(self):
        return self.data.draw(self._st.booleans())

    def choice(self, options):
        return self.data.draw(self._st.sampled_from(options))


class Values:
    """Array values for one case: uniform in [-1, 1) from a seed the draw picks."""

    def __init__(self, draw):
        self.rng = np.random.default_rng(draw.int(0, 2**32 - 1))

    def array(self, shape, dtype):
        return self.rng.uniform(-1, 1, size=shape).astype(dtype)

    def mask(self, shape):
        return (self.rng.random(shape) >= 0.4).astype(np.uint8)

    def integers(self, lo, hi, shape, dtype):
        return np.asarray(self.rng.integers(lo, hi, size=shape)).astype(dtype)


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------

@dataclass
class Case:
    """A valid call: keyword arguments (the C names) and the float dtype."""
    kwargs: dict
    dtype: type


@dataclass
class Expected:
    """What a call must give: its return value (same structure, float64) and
    the final value of every in-place argument that was not None."""
    returns: object
    inplace: dict = field(default_factory=dict)


class Ambiguous(Exception):
    """The reference cannot decide (a near tie of a discontinuous choice, e.g.
    MoLoRA's top-k); property tests discard such an example."""


@dataclass
class EntryPoint:
    name: str                                   # function of lorac._C
    build: Callable                             # draw -> Case (valid arguments)
    reference: Callable                         # kwargs (float64-able copies) -> Expected
    inplace: tuple = ()                         # arguments updated in place
    rtol32: float = 1e-5                        # float32 tolerance, relative to max |expected| (>= 1)
    rtol64: float = 1e-12


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _dtype(draw):
    return draw.choice(FLOATS)


def _opt(draw, value):
    return value if draw.bool() else None


# ---- LoRA Linear ----------------------------------------------------------

def _linear_common(draw, vals, dtype, with_lora=None):
    n, fin, fout = draw.int(0, 7), draw.int(0, 7), draw.int(0, 7)
    r = draw.int(0, 4)
    fan = draw.bool()
    lora = draw.bool() if with_lora is None else with_lora
    mask = vals.mask((n, fin)) if lora and draw.bool() else None
    keep = 1.0 / (1.0 - draw.float(0.0, 0.9)) if mask is not None else 1.0
    kw = dict(x=vals.array((n, fin), dtype),
              weight=vals.array((fin, fout) if fan else (fout, fin), dtype),
              lora_A=vals.array((r, fin), dtype) if lora else None,
              lora_B=vals.array((fout, r), dtype) if lora else None,
              scaling=draw.choice([0.0, 1.0, draw.float(-2.0, 2.0)]),
              fan_in_fan_out=fan, mask=mask, keep_scale=keep)
    return kw, (n, fin, fout, r)


def _drop(x, mask, keep):
    return x if mask is None else x * f64(mask) * keep


def _w_out_in(w, fan):
    return w.T if fan else w


def build_linear_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, (n, fin, fout, r) = _linear_common(draw, vals, dtype)
    kw["bias"] = _opt(draw, vals.array((fout,), dtype))
    return Case(kw, dtype)


def ref_linear_forward(kw):
    x, w, a, b = f64(kw["x"]), f64(kw["weight"]), f64(kw["lora_A"]), f64(kw["lora_B"])
    y = x @ _w_out_in(w, kw["fan_in_fan_out"]).T
    if kw["bias"] is not None:
        y = y + f64(kw["bias"])
    if a is None:
        return Expected((y, None))
    u = _drop(x, kw["mask"], kw["keep_scale"]) @ a.T
    return Expected((y + kw["scaling"] * u @ b.T, u))


def build_linear_backward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, (n, fin, fout, r) = _linear_common(draw, vals, dtype)
    lora = kw["lora_A"] is not None
    kw["grad_output"] = vals.array((n, fout), dtype)
    kw["u"] = vals.array((n, r), dtype) if lora else None
    kw["need_input_grad"] = draw.bool()
    kw["grad_weight"] = _opt(draw, vals.array(kw["weight"].shape, dtype))
    kw["grad_bias"] = _opt(draw, vals.array((fout,), dtype))
    kw["grad_lora_A"] = _opt(draw, vals.array((r, fin), dtype)) if lora else None
    kw["grad_lora_B"] = _opt(draw, vals.array((fout, r), dtype)) if lora else None
    return Case(kw, dtype)


def ref_linear_backward(kw):
    g, x, w = f64(kw["grad_output"]), f64(kw["x"]), f64(kw["weight"])
    fan, s = kw["fan_in_fan_out"], kw["scaling"]
    w_oi = _w_out_in(w, fan)
    dx = g @ w_oi
    inplace = {}
    if kw["grad_weight"] is not None:
        dw = g.T @ x
        inplace["grad_weight"] = f64(kw["grad_weight"]) + (dw.T if fan else dw)
    if kw["grad_bias"] is not None:
        inplace["grad_bias"] = f64(kw["grad_bias"]) + g.sum(axis=0)
    if kw["lora_A"] is not None:
        a, b, u = f64(kw["lora_A"]), f64(kw["lora_B"]), f64(kw["u"])
        m = 1.0 if kw["mask"] is None else f64(kw["mask"]) * kw["keep_scale"]
        gb = g @ b
        dx = dx + s * (gb @ a) * m
        if kw["grad_lora_A"] is not None:
            inplace["grad_lora_A"] = f64(kw["grad_lora_A"]) + s * gb.T @ (x * m)
        if kw["grad_lora_B"] is not None:
            inplace["grad_lora_B"] = f64(kw["grad_lora_B"]) + s * g.T @ u
    return Expected(dx if kw["need_input_grad"] else None, inplace)


def build_linear_merge(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    fin, fout, r, fan = draw.int(0, 7), draw.int(0, 7), draw.int(0, 4), draw.bool()
    kw = dict(weight=vals.array((fin, fout) if fan else (fout, fin), dtype),
              lora_A=vals.array((r, fin), dtype), lora_B=vals.array((fout, r), dtype),
              alpha=draw.choice([0.0, 1.0, -1.0, draw.float(-2.0, 2.0)]), fan_in_fan_out=fan)
    return Case(kw, dtype)


def ref_linear_merge(kw):
    delta = kw["alpha"] * f64(kw["lora_B"]) @ f64(kw["lora_A"])
    return Expected(None, {"weight": f64(kw["weight"]) + (delta.T if kw["fan_in_fan_out"] else delta)})


# ---- optimizers -----------------------------------------------------------

def build_sgd_step(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    n = draw.int(0, 12)
    momentum = draw.choice([0.0, draw.float(0.0, 0.99)])
    kw = dict(param=vals.array((n,), dtype), grad=vals.array((n,), dtype),
              momentum_buffer=vals.array((n,), dtype) if momentum != 0 else None,
              lr=draw.float(0.0, 0.5), momentum=momentum, dampening=draw.choice([0.0, draw.float(0, 1)]),
              weight_decay=draw.choice([0.0, draw.float(0, 0.1)]), nesterov=draw.bool(),
              maximize=draw.bool(), init_buffer=draw.bool())
    return Case(kw, dtype)


def ref_sgd_step(kw):
    p, g = f64(kw["param"]), f64(kw["grad"])
    d = -g if kw["maximize"] else g
    if kw["weight_decay"] != 0:
        d = d + kw["weight_decay"] * p
    inplace = {}
    if kw["momentum_buffer"] is not None:
        buf = d if kw["init_buffer"] else kw["momentum"] * f64(kw["momentum_buffer"]) + (1 - kw["dampening"]) * d
        inplace["momentum_buffer"] = buf
        d = d + kw["momentum"] * buf if kw["nesterov"] else buf
    inplace["param"] = p - kw["lr"] * d
    return Expected(None, inplace)


def build_adam_step(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    n = draw.int(0, 12)
    amsgrad = draw.bool()
    kw = dict(param=vals.array((n,), dtype), grad=vals.array((n,), dtype),
              exp_avg=vals.array((n,), dtype), exp_avg_sq=np.abs(vals.array((n,), dtype)),
              max_exp_avg_sq=np.abs(vals.array((n,), dtype)) if amsgrad else None,
              step=draw.int(1, 1000), lr=draw.float(0.0, 0.1), beta1=draw.float(0.0, 0.99),
              beta2=draw.float(0.5, 0.9999), eps=draw.choice([1e-8, draw.float(1e-6, 1e-2)]),
              weight_decay=draw.choice([0.0, draw.float(0, 0.1)]), decoupled=draw.bool(),
              amsgrad=amsgrad, maximize=draw.bool())
    return Case(kw, dtype)


def ref_adam_step(kw):
    p, g = f64(kw["param"]), f64(kw["grad"])
    g = -g if kw["maximize"] else g
    wd, lr, b1, b2, step = kw["weight_decay"], kw["lr"], kw["beta1"], kw["beta2"], kw["step"]
    if wd != 0 and kw["decoupled"]:
        p = p * (1 - lr * wd)
    elif wd != 0:
        g = g + wd * p
    m = f64(kw["exp_avg"]) + (1 - b1) * (g - f64(kw["exp_avg"]))
    v = f64(kw["exp_avg_sq"]) * b2 + (1 - b2) * g * g
    inplace = {"exp_avg": m, "exp_avg_sq": v}
    if kw["amsgrad"]:
        v = np.maximum(f64(kw["max_exp_avg_sq"]), v)
        inplace["max_exp_avg_sq"] = v
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** step) + kw["eps"]
    inplace["param"] = p - lr / (1 - b1 ** step) * (m / denom)
    return Expected(None, inplace)


# ---- losses ----------------------------------------------------------------

def _targets(draw, vals, n, c):
    ignore = draw.choice([-100, -1, 0, 3])
    t = vals.integers(0, max(c, 1), (n,), np.int64) if c > 0 else np.full(n, ignore, np.int64)
    if n and draw.bool():  # some rows ignored
        t[vals.rng.random(n) < 0.3] = ignore
    return t, ignore


def build_cross_entropy_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    n, c = draw.int(0, 8), draw.int(0, 6)
    target, ignore = _targets(draw, vals, n, c)
    return Case(dict(logits=4 * vals.array((n, c), dtype), target=target, ignore_index=ignore), dtype)


def _lse(x):
    if x.shape[1] == 0:
        return np.full(x.shape[0], -np.inf)
    mx = x.max(axis=1)
    return mx + np.log(np.exp(x - mx[:, None]).sum(axis=1))


def ref_cross_entropy_forward(kw):
    x, t, ig = f64(kw["logits"]), kw["target"], kw["ignore_index"]
    keep = t != ig
    lse = np.where(keep, _lse(x), 0.0)
    picked = x[np.arange(len(t)), np.where(keep, t, 0)] if x.shape[1] else np.zeros(len(t))
    loss = np.where(keep, lse - picked, 0.0)
    return Expected((loss, lse, float(loss.sum()), int(keep.sum())))


def build_cross_entropy_backward(draw):
    case = build_cross_entropy_forward(draw)
    kw = case.kwargs
    vals = Values(draw)
    kw["lse"] = ref_cross_entropy_forward(kw).returns[1]
    kw["scale"] = draw.float(-2.0, 2.0)
    kw["grad"] = _opt(draw, vals.array((len(kw["target"]),), case.dtype))
    return case


def ref_cross_entropy_backward(kw):
    x, t, ig = f64(kw["logits"]), kw["target"], kw["ignore_index"]
    keep = t != ig
    w = kw["scale"] * (1.0 if kw["grad"] is None else f64(kw["grad"]))
    d = np.exp(x - f64(kw["lse"])[:, None]) * np.broadcast_to(w, (len(t),))[:, None]
    rows = np.nonzero(keep)[0]
    d[rows, t[rows]] -= np.broadcast_to(w, (len(t),))[rows]
    d[~keep] = 0
    return Expected(d)


def build_mse_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    n = draw.int(0, 12)
    return Case(dict(pred=vals.array((n,), dtype), target=vals.array((n,), dtype),
                     elementwise=draw.bool()), dtype)


def ref_mse_forward(kw):
    sq = (f64(kw["pred"]) - f64(kw["target"])) ** 2
    return Expected((float(sq.sum()), sq if kw["elementwise"] else None))


def build_mse_backward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    n = draw.int(0, 12)
    return Case(dict(pred=vals.array((n,), dtype), target=vals.array((n,), dtype), scale=draw.float(-2, 2),
                     grad=_opt(draw, vals.array((n,), dtype))), dtype)


def ref_mse_backward(kw):
    g = 1.0 if kw["grad"] is None else f64(kw["grad"])
    return Expected(kw["scale"] * 2 * (f64(kw["pred"]) - f64(kw["target"])) * g)


# ---- activations -----------------------------------------------------------

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "tanh")
_erf = np.vectorize(math.erf, otypes=[np.float64])
_BETA, _KAPPA = math.sqrt(2 / math.pi), 0.044715


def activation_value(kind, x):
    """f(x) in float64."""
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(_BETA * (x + _KAPPA * x ** 3)))
    return np.tanh(x)


def build_activation_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    return Case(dict(kind=draw.choice(ACTIVATIONS), x=4 * vals.array((draw.int(0, 12),), dtype)), dtype)


def ref_activation_forward(kw):
    return Expected(activation_value(kw["kind"], f64(kw["x"])))


def build_activation_backward(draw):
    case = build_activation_forward(draw)
    kw = case.kwargs
    vals = Values(draw)
    x = kw.pop("x")
    # saved: the forward's output for relu and tanh, its input for the GELUs
    kw["saved"] = activation_value(kw["kind"], f64(x)).astype(case.dtype) if kw["kind"] in ("relu", "tanh") else x
    kw["grad_output"] = vals.array(x.shape, case.dtype)
    return case


def ref_activation_backward(kw):
    kind, s, g = kw["kind"], f64(kw["saved"]), f64(kw["grad_output"])
    if kind == "relu":
        return Expected(np.where(s <= 0, 0.0, g))
    if kind == "tanh":
        return Expected(g * (1 - s * s))
    if kind == "gelu":
        return Expected(g * (0.5 * (1 + _erf(s / math.sqrt(2))) + s * np.exp(-s * s / 2) / math.sqrt(2 * math.pi)))
    t = np.tanh(_BETA * (s + _KAPPA * s ** 3))
    return Expected(g * (0.5 * (1 + t) + 0.5 * s * (1 - t * t) * _BETA * (1 + 3 * _KAPPA * s * s)))


# ---- LayerNorm -------------------------------------------------------------

def build_layernorm_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    n, d = draw.int(0, 7), draw.int(0, 9)
    return Case(dict(x=vals.array((n, d), dtype), weight=_opt(draw, vals.array((d,), dtype)),
                     bias=_opt(draw, vals.array((d,), dtype)), eps=draw.choice([1e-5, draw.float(1e-5, 1.0)])),
                dtype)


def ref_layernorm_forward(kw):
    x = f64(kw["x"])
    d = x.shape[1]
    mean = x.mean(axis=1) if d else np.zeros(x.shape[0])
    var = ((x - mean[:, None]) ** 2).mean(axis=1) if d else np.zeros(x.shape[0])
    rstd = 1 / np.sqrt(var + kw["eps"])
    y = (x - mean[:, None]) * rstd[:, None]
    if kw["weight"] is not None:
        y = y * f64(kw["weight"])
    if kw["bias"] is not None:
        y = y + f64(kw["bias"])
    return Expected((y, mean, rstd))


def build_layernorm_backward(draw):
    case = build_layernorm_forward(draw)
    kw = case.kwargs
    vals = Values(draw)
    _, mean, rstd = ref_layernorm_forward(kw).returns
    d = kw["x"].shape[1]
    kw.pop("bias")
    kw.pop("eps")
    kw.update(grad_output=vals.array(kw["x"].shape, case.dtype), mean=mean.astype(case.dtype),
              rstd=rstd.astype(case.dtype), need_input_grad=draw.bool(),
              grad_weight=_opt(draw, vals.array((d,), case.dtype)), grad_bias=_opt(draw, vals.array((d,), case.dtype)))
    return case


def ref_layernorm_backward(kw):
    g, x = f64(kw["grad_output"]), f64(kw["x"])
    mean, rstd = f64(kw["mean"]), f64(kw["rstd"])
    d = x.shape[1]
    xhat = (x - mean[:, None]) * rstd[:, None]
    gw = g * (1.0 if kw["weight"] is None else f64(kw["weight"]))
    inplace = {}
    if kw["grad_weight"] is not None:
        inplace["grad_weight"] = f64(kw["grad_weight"]) + (g * xhat).sum(axis=0)
    if kw["grad_bias"] is not None:
        inplace["grad_bias"] = f64(kw["grad_bias"]) + g.sum(axis=0)
    if not kw["need_input_grad"]:
        return Expected(None, inplace)
    if d == 0:
        return Expected(np.zeros_like(x), inplace)
    dx = rstd[:, None] * (gw - gw.mean(axis=1, keepdims=True) - xhat * (gw * xhat).mean(axis=1, keepdims=True))
    return Expected(dx, inplace)


# ---- Embedding ---------------------------------------------------------------

def _indices(draw, vals, num):
    shape = draw.choice([(), (draw.int(0, 8),), (draw.int(0, 3), draw.int(0, 3))])
    dtype = draw.choice(INDEX_DTYPES)
    if num == 0:
        shape = (0,) * max(len(shape), 1)
    return vals.integers(0, max(num, 1), shape, dtype)


def _embedding_common(draw, vals, dtype):
    num, dim, r = draw.int(0, 7), draw.int(0, 6), draw.int(0, 4)
    lora = draw.bool()
    kw = dict(indices=_indices(draw, vals, num), weight=vals.array((num, dim), dtype),
              lora_A=vals.array((r, num), dtype) if lora else None,
              lora_B=vals.array((dim, r), dtype) if lora else None,
              scaling=draw.choice([0.0, 1.0, draw.float(-2.0, 2.0)]))
    return kw, (num, dim, r)


def build_embedding_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, _ = _embedding_common(draw, vals, dtype)
    return Case(kw, dtype)


def ref_embedding_forward(kw):
    idx = np.asarray(kw["indices"]).reshape(-1).astype(np.intp)
    y = f64(kw["weight"])[idx]
    if kw["lora_A"] is None:
        return Expected((y, None))
    u = f64(kw["lora_A"])[:, idx].T
    return Expected((y + kw["scaling"] * u @ f64(kw["lora_B"]).T, u))


def build_embedding_backward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, (num, dim, r) = _embedding_common(draw, vals, dtype)
    n = kw["indices"].size
    lora = kw["lora_A"] is not None
    kw.update(grad_output=vals.array((n, dim), dtype), u=vals.array((n, r), dtype) if lora else None,
              padding_idx=draw.int(0, num - 1) if num and draw.bool() else None,
              grad_weight=_opt(draw, vals.array((num, dim), dtype)),
              grad_lora_A=_opt(draw, vals.array((r, num), dtype)) if lora else None,
              grad_lora_B=_opt(draw, vals.array((dim, r), dtype)) if lora else None)
    return Case(kw, dtype)


def ref_embedding_backward(kw):
    idx = np.asarray(kw["indices"]).reshape(-1).astype(np.intp)
    g = f64(kw["grad_output"])
    keep = idx != (-1 if kw["padding_idx"] is None else kw["padding_idx"])
    inplace = {}
    if kw["grad_weight"] is not None:
        dw = f64(kw["grad_weight"]).copy()
        np.add.at(dw, idx[keep], g[keep])
        inplace["grad_weight"] = dw
    if kw["lora_A"] is not None:
        s = kw["scaling"]
        if kw["grad_lora_B"] is not None:
            inplace["grad_lora_B"] = f64(kw["grad_lora_B"]) + s * g.T @ f64(kw["u"])
        if kw["grad_lora_A"] is not None:
            da = f64(kw["grad_lora_A"]).copy().T  # (num, r) view for np.add.at
            np.add.at(da, idx[keep], s * (g @ f64(kw["lora_B"]))[keep])
            inplace["grad_lora_A"] = da.T
    return Expected(None, inplace)


# ---- MergedLinear --------------------------------------------------------------

def _merged_common(draw, vals, dtype, with_lora=None, need_enabled=False):
    n, fin = draw.int(0, 6), draw.int(0, 6)
    groups, og = draw.int(1, 3), draw.int(0, 3)
    fout = groups * og
    enable = [draw.bool() for _ in range(groups)]
    if need_enabled and not any(enable):
        enable[draw.int(0, groups - 1)] = True
    n_en = sum(enable)
    r = draw.int(0, 3)
    fan = draw.bool()
    lora = n_en > 0 and (draw.bool() if with_lora is None else with_lora)
    mask = vals.mask((n, fin)) if lora and draw.bool() else None
    kw = dict(x=vals.array((n, fin), dtype),
              weight=vals.array((fin, fout) if fan else (fout, fin), dtype),
              lora_A=vals.array((n_en * r, fin), dtype) if lora else None,
              lora_B=vals.array((n_en * og, r), dtype) if lora else None,
              enable_lora=enable if draw.bool() else tuple(np.array(enable, dtype=bool)),
              scaling=draw.choice([0.0, 1.0, draw.float(-2.0, 2.0)]), fan_in_fan_out=fan, mask=mask,
              keep_scale=1.0 / (1.0 - draw.float(0.0, 0.9)) if mask is not None else 1.0)
    return kw, (n, fin, fout, r)


def _merged_delta_rows(kw, factor):
    """The (out, in) update scaling * blockdiag(B_e) A_e placed at the enabled blocks."""
    enable = [bool(e) for e in kw["enable_lora"]]
    a, b = f64(kw["lora_A"]), f64(kw["lora_B"])
    w = f64(kw["weight"])
    fout = w.shape[1] if kw["fan_in_fan_out"] else w.shape[0]
    fin = w.shape[0] if kw["fan_in_fan_out"] else w.shape[1]
    og = fout // len(enable)
    r = a.shape[0] // max(sum(enable), 1)
    delta = np.zeros((fout, fin))
    for e, block in enumerate(i for i, on in enumerate(enable) if on):
        delta[block * og:(block + 1) * og] = factor * b[e * og:(e + 1) * og] @ a[e * r:(e + 1) * r]
    return delta


def _merged_expand_b(kw):
    """lora_B as one (out, n_enabled r) matrix: block-diagonal over the enabled groups."""
    enable = [bool(e) for e in kw["enable_lora"]]
    a, b = f64(kw["lora_A"]), f64(kw["lora_B"])
    n_en = sum(enable)
    fout = len(enable) * (b.shape[0] // n_en)
    og, r = b.shape[0] // n_en, a.shape[0] // n_en
    big = np.zeros((fout, n_en * r))
    for e, block in enumerate(i for i, on in enumerate(enable) if on):
        big[block * og:(block + 1) * og, e * r:(e + 1) * r] = b[e * og:(e + 1) * og]
    return big


def build_merged_linear_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, (n, fin, fout, r) = _merged_common(draw, vals, dtype)
    kw["bias"] = _opt(draw, vals.array((fout,), dtype))
    return Case(kw, dtype)


def ref_merged_linear_forward(kw):
    x, w = f64(kw["x"]), f64(kw["weight"])
    y = x @ _w_out_in(w, kw["fan_in_fan_out"]).T
    if kw["bias"] is not None:
        y = y + f64(kw["bias"])
    if kw["lora_A"] is None:
        return Expected((y, None))
    u = _drop(x, kw["mask"], kw["keep_scale"]) @ f64(kw["lora_A"]).T
    return Expected((y + kw["scaling"] * u @ _merged_expand_b(kw).T, u))


def build_merged_linear_backward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, (n, fin, fout, r) = _merged_common(draw, vals, dtype)
    lora = kw["lora_A"] is not None
    kw.update(grad_output=vals.array((n, fout), dtype),
              u=vals.array((n, kw["lora_A"].shape[0]), dtype) if lora else None,
              need_input_grad=draw.bool(), grad_weight=_opt(draw, vals.array(kw["weight"].shape, dtype)),
              grad_bias=_opt(draw, vals.array((fout,), dtype)),
              grad_lora_A=_opt(draw, vals.array(kw["lora_A"].shape, dtype)) if lora else None,
              grad_lora_B=_opt(draw, vals.array(kw["lora_B"].shape, dtype)) if lora else None)
    return Case(kw, dtype)


def ref_merged_linear_backward(kw):
    g, x, w = f64(kw["grad_output"]), f64(kw["x"]), f64(kw["weight"])
    fan, s = kw["fan_in_fan_out"], kw["scaling"]
    dx = g @ _w_out_in(w, fan)
    inplace = {}
    if kw["grad_weight"] is not None:
        dw = g.T @ x
        inplace["grad_weight"] = f64(kw["grad_weight"]) + (dw.T if fan else dw)
    if kw["grad_bias"] is not None:
        inplace["grad_bias"] = f64(kw["grad_bias"]) + g.sum(axis=0)
    if kw["lora_A"] is not None:
        a, big_b, u = f64(kw["lora_A"]), _merged_expand_b(kw), f64(kw["u"])
        m = 1.0 if kw["mask"] is None else f64(kw["mask"]) * kw["keep_scale"]
        gb = g @ big_b
        dx = dx + s * (gb @ a) * m
        if kw["grad_lora_A"] is not None:
            inplace["grad_lora_A"] = f64(kw["grad_lora_A"]) + s * gb.T @ (x * m)
        if kw["grad_lora_B"] is not None:
            full = s * g.T @ u  # (out, n_en r): keep the block-diagonal part, stacked like lora_B
            enable = [bool(e) for e in kw["enable_lora"]]
            n_en = sum(enable)
            og, r = kw["lora_B"].shape[0] // n_en, a.shape[0] // n_en
            stacked = np.concatenate([full[blk * og:(blk + 1) * og, e * r:(e + 1) * r]
                                      for e, blk in enumerate(i for i, on in enumerate(enable) if on)])
            inplace["grad_lora_B"] = f64(kw["grad_lora_B"]) + stacked
    return Expected(dx if kw["need_input_grad"] else None, inplace)


def build_merged_linear_merge(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, _ = _merged_common(draw, vals, dtype, with_lora=True, need_enabled=True)
    for name in ("x", "mask", "keep_scale", "scaling"):
        kw.pop(name)
    kw["alpha"] = draw.choice([1.0, -1.0, draw.float(-2.0, 2.0)])
    return Case(kw, dtype)


def ref_merged_linear_merge(kw):
    delta = _merged_delta_rows(kw, kw["alpha"])
    return Expected(None, {"weight": f64(kw["weight"]) + (delta.T if kw["fan_in_fan_out"] else delta)})


# ---- many adapters (issue 6) -----------------------------------------------------

def _adapters(draw, vals, dtype, k, fin, fout_rows, groups):
    """k adapters with per-adapter ranks: A_j (groups r_j, fin), B_j (groups fout_rows, r_j)."""
    ranks = [draw.int(0, 3) for _ in range(k)]
    return ([vals.array((groups * r, fin), dtype) for r in ranks],
            [vals.array((groups * fout_rows, r), dtype) for r in ranks],
            [draw.choice([0.0, 1.0, draw.float(-2.0, 2.0)]) for _ in range(k)])


def build_multi_linear_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    n, fin, fan = draw.int(0, 8), draw.int(0, 6), draw.bool()
    merged = draw.bool()
    groups, og = (draw.int(1, 3), draw.int(0, 3)) if merged else (1, draw.int(0, 6))
    enable = [draw.bool() for _ in range(groups)] if merged else None
    if merged and not any(enable):
        enable[draw.int(0, groups - 1)] = True
    n_en = sum(enable) if merged else 1
    fout = groups * og
    k = draw.int(0, 3)
    As, Bs, scalings = _adapters(draw, vals, dtype, k, fin, og, n_en)
    ids = vals.integers(-1, k, (n,), draw.choice(SIGNED_INDEX_DTYPES))
    if draw.bool():  # runs of equal ids (the contiguous path)
        ids = np.sort(ids)
    kw = dict(x=vals.array((n, fin), dtype), weight=vals.array((fin, fout) if fan else (fout, fin), dtype),
              bias=_opt(draw, vals.array((fout,), dtype)), lora_As=As, lora_Bs=Bs, scalings=scalings,
              ids=ids, fan_in_fan_out=fan, enable_lora=enable, contiguous_runs=draw.bool())
    return Case(kw, dtype)


def ref_multi_linear_forward(kw):
    x, w = f64(kw["x"]), f64(kw["weight"])
    y = x @ _w_out_in(w, kw["fan_in_fan_out"]).T
    if kw["bias"] is not None:
        y = y + f64(kw["bias"])
    ids = np.asarray(kw["ids"]).astype(np.intp)
    enable = kw["enable_lora"] if kw["enable_lora"] is not None else [True]
    for j, (a, b, s) in enumerate(zip(kw["lora_As"], kw["lora_Bs"], kw["scalings"])):
        rows = ids == j
        fake = dict(lora_A=a, lora_B=b, enable_lora=enable, weight=w, fan_in_fan_out=kw["fan_in_fan_out"])
        y[rows] += s * (x[rows] @ f64(a).T) @ _merged_expand_b(fake).T
    return Expected(y)


def build_multi_embedding_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    num, dim, k = draw.int(0, 7), draw.int(0, 6), draw.int(0, 3)
    indices = _indices(draw, vals, num)
    As, Bs, scalings = _adapters(draw, vals, dtype, k, num, dim, 1)
    kw = dict(indices=indices, weight=vals.array((num, dim), dtype), lora_As=As, lora_Bs=Bs, scalings=scalings,
              ids=vals.integers(-1, k, (indices.size,), draw.choice(SIGNED_INDEX_DTYPES)))
    return Case(kw, dtype)


def ref_multi_embedding_forward(kw):
    idx = np.asarray(kw["indices"]).reshape(-1).astype(np.intp)
    y = f64(kw["weight"])[idx]
    ids = np.asarray(kw["ids"]).astype(np.intp)
    for j, (a, b, s) in enumerate(zip(kw["lora_As"], kw["lora_Bs"], kw["scalings"])):
        rows = ids == j
        y[rows] += s * f64(a)[:, idx[rows]].T @ f64(b).T
    return Expected(y)


def _molora_common(draw, vals, dtype):
    n, fin, fout = draw.int(0, 6), draw.int(0, 6), draw.int(0, 6)
    experts, rb = draw.int(1, 3), draw.int(0, 2)
    r = experts * rb
    mask = vals.mask((n, fin)) if draw.bool() else None
    kw = dict(x=vals.array((n, fin), dtype), weight=vals.array((fout, fin), dtype),
              lora_A=vals.array((r, fin), dtype), lora_B=vals.array((fout, r), dtype),
              lora_router=2 * vals.array((experts, fin), dtype), scaling=draw.choice([1.0, draw.float(-2.0, 2.0)]),
              top_k=draw.int(1, experts), mask=mask,
              keep_scale=1.0 / (1.0 - draw.float(0.0, 0.9)) if mask is not None else 1.0)
    return kw, (n, fin, fout, r, experts)


def molora_gates(z, top_k, check_ties=True):
    """probs = softmax(z), gates = softmax over each row's top_k logits (0 elsewhere)."""
    n, experts = z.shape
    probs = np.exp(z - z.max(axis=1, keepdims=True)) if experts else z.copy()
    probs /= probs.sum(axis=1, keepdims=True) if experts else 1
    gates = np.zeros_like(probs)
    for i in range(n):
        order = np.argsort(-z[i], kind="stable")
        # exact ties (e.g. in == 0) go to the lower index in both; near ties may not
        if check_ties and top_k < experts and 0 < z[i, order[top_k - 1]] - z[i, order[top_k]] < 1e-4:
            raise Ambiguous(f"row {i}: top-{top_k} logits nearly tie")
        chosen = order[:top_k]
        gates[i, chosen] = probs[i, chosen] / probs[i, chosen].sum()
    return probs, gates


def build_molora_forward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, (n, fin, fout, r, e) = _molora_common(draw, vals, dtype)
    kw["bias"] = _opt(draw, vals.array((fout,), dtype))
    return Case(kw, dtype)


def ref_molora_forward(kw, check_ties=True):
    x, w, a, b = f64(kw["x"]), f64(kw["weight"]), f64(kw["lora_A"]), f64(kw["lora_B"])
    y = x @ w.T
    if kw.get("bias") is not None:
        y = y + f64(kw["bias"])
    probs, gates = molora_gates(x @ f64(kw["lora_router"]).T, kw["top_k"], check_ties)
    u = _drop(x, kw["mask"], kw["keep_scale"]) @ a.T
    rb = a.shape[0] // gates.shape[1]
    h = u * np.repeat(gates, rb, axis=1)
    return Expected((y + kw["scaling"] * h @ b.T, u, probs, gates))


def build_molora_backward(draw):
    dtype = _dtype(draw)
    vals = Values(draw)
    kw, (n, fin, fout, r, e) = _molora_common(draw, vals, dtype)
    _, u, probs, gates = ref_molora_forward(dict(kw, bias=None), check_ties=False).returns
    kw.update(grad_output=vals.array((n, fout), dtype), u=u.astype(dtype), probs=probs.astype(dtype),
              gates=gates.astype(dtype), aux=_opt(draw, vals.array((e,), np.float64)),
              need_input_grad=draw.bool(), grad_weight=_opt(draw, vals.array((fout, fin), dtype)),
              grad_bias=_opt(draw, vals.array((fout,), dtype)), grad_lora_A=_opt(draw, vals.array((r, fin), dtype)),
              grad_lora_B=_opt(draw, vals.array((fout, r), dtype)),
              grad_lora_router=_opt(draw, vals.array((e, fin), dtype)))
    return Case(kw, dtype)


def ref_molora_backward(kw):
    """Mirrors molora_backward for ANY given u, probs and gates (the chosen
    experts are where gates != 0 only through the formula gates * (...))."""
    g, x, w = f64(kw["grad_output"]), f64(kw["x"]), f64(kw["weight"])
    a, b, router = f64(kw["lora_A"]), f64(kw["lora_B"]), f64(kw["lora_router"])
    u, probs, gates = f64(kw["u"]), f64(kw["probs"]), f64(kw["gates"])
    s = kw["scaling"]
    experts = router.shape[0]
    rb = a.shape[0] // experts
    m = 1.0 if kw["mask"] is None else f64(kw["mask"]) * kw["keep_scale"]
    gate_cols = np.repeat(gates, rb, axis=1)
    gh = g @ b                                            # (n, r)
    dgate = s * (gh * u).reshape(len(u), experts, rb).sum(axis=2) if rb else np.zeros_like(gates)
    dz = gates * (dgate - (gates * dgate).sum(axis=1, keepdims=True))
    if kw["aux"] is not None:
        aux = f64(kw["aux"])
        dz = dz + probs * (aux - (probs * aux).sum(axis=1, keepdims=True))
    du = s * gh * gate_cols
    dx = g @ w + dz @ router + (du @ a) * m
    inplace = {}
    for name, value in (("grad_weight", g.T @ x), ("grad_bias", g.sum(axis=0)),
                        ("grad_lora_A", du.T @ (x * m)), ("grad_lora_B", s * g.T @ (u * gate_cols)),
                        ("grad_lora_router", dz.T @ x)):
        if kw[name] is not None:
            inplace[name] = f64(kw[name]) + value
    return Expected(dx if kw["need_input_grad"] else None, inplace)


# ---- the table ------------------------------------------------------------------

_GRADS = ("grad_weight", "grad_bias", "grad_lora_A", "grad_lora_B")

ENTRY_POINTS = [
    EntryPoint("linear_forward", build_linear_forward, ref_linear_forward),
    EntryPoint("linear_backward", build_linear_backward, ref_linear_backward, _GRADS),
    EntryPoint("linear_merge", build_linear_merge, ref_linear_merge, ("weight",)),
    EntryPoint("sgd_step", build_sgd_step, ref_sgd_step, ("param", "momentum_buffer")),
    EntryPoint("adam_step", build_adam_step, ref_adam_step, ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    EntryPoint("cross_entropy_forward", build_cross_entropy_forward, ref_cross_entropy_forward),
    EntryPoint("cross_entropy_backward", build_cross_entropy_backward, ref_cross_entropy_backward),
    EntryPoint("mse_forward", build_mse_forward, ref_mse_forward),
    EntryPoint("mse_backward", build_mse_backward, ref_mse_backward),
    EntryPoint("activation_forward", build_activation_forward, ref_activation_forward),
    EntryPoint("activation_backward", build_activation_backward, ref_activation_backward),
    # float32 LayerNorm: x - mean loses bits when the row's spread is small; rstd <= 1/sqrt(eps) amplifies it
    EntryPoint("layernorm_forward", build_layernorm_forward, ref_layernorm_forward, rtol32=1e-4),
    EntryPoint("layernorm_backward", build_layernorm_backward, ref_layernorm_backward, ("grad_weight", "grad_bias"),
               rtol32=1e-4),
    EntryPoint("embedding_forward", build_embedding_forward, ref_embedding_forward),
    EntryPoint("embedding_backward", build_embedding_backward, ref_embedding_backward,
               ("grad_weight", "grad_lora_A", "grad_lora_B")),
    EntryPoint("merged_linear_forward", build_merged_linear_forward, ref_merged_linear_forward),
    EntryPoint("merged_linear_backward", build_merged_linear_backward, ref_merged_linear_backward, _GRADS),
    EntryPoint("merged_linear_merge", build_merged_linear_merge, ref_merged_linear_merge, ("weight",)),
    EntryPoint("multi_linear_forward", build_multi_linear_forward, ref_multi_linear_forward),
    EntryPoint("multi_embedding_forward", build_multi_embedding_forward, ref_multi_embedding_forward),
    EntryPoint("molora_forward", build_molora_forward, ref_molora_forward),
    EntryPoint("molora_backward", build_molora_backward, ref_molora_backward, _GRADS + ("grad_lora_router",)),
]
BY_NAME = {ep.name: ep for ep in ENTRY_POINTS}

# Functions of lorac._C that are not kernels: the fuzzer and the leak test
# call them too; their own tests live in tests/test_config.py and friends.
UTILITIES = {
    "blas_info": lambda C: (),
    "get_num_threads": lambda C: (),
    "set_num_threads": lambda C: (C.get_num_threads(),),
}


def public_functions(module):
    """Names of the public callables of lorac._C."""
    return sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))


def build(name, seed):
    """A valid Case for entry point `name` from an int seed (no hypothesis)."""
    return BY_NAME[name].build(RandomDraw(seed))


# --------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------

def tolerance(ep, dtype):
    return ep.rtol32 if np.dtype(dtype) == np.float32 else ep.rtol64


def assert_matches(actual, expected, rtol, what="result"):
    """Recursive comparison: None is None, ints exactly, floats and arrays
    with |a - e| <= rtol * (|e| + max(1, max |e|))."""
    if expected is None:
        assert actual is None, f"{what}: expected None, got {type(actual).__name__}"
        return
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), f"{what}: expected a {len(expected)}-tuple"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_matches(a, e, rtol, f"{what}[{i}]")
        return
    if isinstance(expected, int) and not isinstance(expected, bool):
        assert actual == expected, f"{what}: expected {expected}, got {actual}"
        return
    exp = np.asarray(expected, dtype=np.float64)
    act = np.asarray(actual)
    assert act.shape == exp.shape, f"{what}: shape {act.shape}, expected {exp.shape}"
    if isinstance(actual, np.ndarray):
        assert act.dtype.kind == "f", f"{what}: dtype {act.dtype}"
    scale = max(1.0, float(np.max(np.abs(exp)))) if exp.size else 1.0
    np.testing.assert_allclose(act.astype(np.float64), exp, rtol=rtol, atol=rtol * scale, err_msg=what)


# --------------------------------------------------------------------------
# memory layouts
# --------------------------------------------------------------------------

LAYOUTS = ("C", "F", "negative", "step", "offset")


def relayout(a, layout, draw=None):
    """A copy of array `a` with the same values in another memory layout:
    C, F (Fortran), negative (reversed along an axis), step (every other
    element of a bigger array: non-unit strides), offset (a window into a
    bigger array: unaligned start, row stride > row length)."""
    if not isinstance(a, np.ndarray) or a.ndim == 0:
        return a
    if layout == "C":
        return np.ascontiguousarray(a).copy()
    if layout == "F":
        return np.asfortranarray(a).copy()
    if layout == "negative":
        axis = 0 if draw is None else draw.int(0, a.ndim - 1)
        flipped = np.flip(a, axis).copy()
        return np.flip(flipped, axis)
    if layout == "step":
        big = np.zeros(tuple(2 * d for d in a.shape), a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "offset":
        lead = 1 if draw is None else draw.int(0, 2)
        pad = tuple(d + 3 for d in a.shape)
        big = np.zeros(pad, a.dtype)
        view = big[tuple(slice(lead, lead + d) for d in a.shape)]
        view[...] = a
        return view
    raise ValueError(layout)


def kernel_accepts_in_place(a):
    """Mirror of the binding's rule for an in-place argument: aligned,
    native-endian, unit inner stride, positive row stride >= the row length
    (checked only where it matters: more than one column / row, not empty)."""
    if not a.flags.aligned or not a.dtype.isnative or not a.flags.writeable:
        return False
    if a.size == 0:
        return True
    cols = a.shape[-1] if a.ndim in (1, 2) else 1
    if cols > 1 and a.strides[-1] != a.itemsize:
        return False
    if a.ndim == 2 and a.shape[0] > 1:
        s = a.strides[0]
        return s > 0 and s % a.itemsize == 0 and s // a.itemsize >= cols
    return True


def arrays_in(kwargs):
    """(name, array) for every ndarray argument, lists included ('lora_As[1]')."""
    for name, value in kwargs.items():
        if isinstance(value, np.ndarray):
            yield name, value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, np.ndarray):
                    yield f"{name}[{i}]", item


def snapshot(kwargs):
    """A deep copy of the arguments' values (arrays copied, lists rebuilt)."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, np.ndarray):
            out[name] = value.copy()
        elif isinstance(value, list):
            out[name] = [v.copy() if isinstance(v, np.ndarray) else v for v in value]
        else:
            out[name] = value
    return out

"""lorac.DoRALinear: weight-decomposed LoRA (DoRA, Liu et al. 2024) as PEFT's
``LoraConfig(use_dora=True)`` computes it, on the Linear kernels.

The adapted weight is split into a direction and a trained magnitude m (out,):

    V = W0 + s B A                      (out, in) view; s = scaling
    c = m / ||V||_row                   ||V||_row (out,): each output row's norm,
                                        treated as a constant (no gradient), as
                                        the paper and PEFT do
    y = b + c * (x W0^T + s (x A^T) B^T)                      without dropout
    y = b + x W0^T + (c - 1) * (x~ W0^T) + c * s (x~ A^T) B^T  with dropout

where x~ is the dropped-out input (PEFT's formula: with dropout the
magnitude scales the base product of the dropped input).  The second form
is computed as ``b + c * z + (1 - c) * ((x - x~) W0^T)`` with ``z = x W0^T
+ s (x~ A^T) B^T``, the fused kernel's output: one extra product with W0
only when dropout is on.  Rows with ||V|| = 0 get c = 0 (PEFT gives NaN).

The row norms come from ``||W0_o||^2 + 2 s B_o . (W0 A^T)_o + s^2 B_o (A
A^T) B_o^T``: one pass over W0 for its row norms (in the layer's dtype, as
PEFT computes them), one (r, in) x (in, out) product with W0, the small
terms in float64, no (out, in) temporary.  ``lora_magnitude_vector`` starts at ||V||_row, so a new
layer computes what its base does.

Merging (eval() with merge_weights) stores W = c * (W0 + s B A) row-wise
and keeps c, so unmerging divides by the same c (rows with c = 0 are kept
aside and restored exactly).  state_dict() holds the unmerged weight, and
loading into a merged layer equals loading then merging, as for Linear.

DoRALinear holds exactly one adapter ("default"): named adapters, weighted
combinations, hot swaps and mixed batches are refused.
"""

import numpy as np

from .. import _C
from .._arrays import as_rows
from ..module import Parameter
from ._grads import grad_accumulators, forget_created
from ._threading import layer_lock, locked, thread_state
from .linear import Linear

_DORA = "dora"  # first item of a DoRA forward cache (Linear's caches never start with it)


class DoRALinear(Linear):
    """lorac.Linear with DoRA (module docstring); Linear's arguments, r >= 1.

    Parameters: Linear's, plus ``lora_magnitude_vector`` (out,), trainable
    (PEFT's name, so lora_state_dict and mark_only_lora_as_trainable treat
    it as part of the adapter)."""

    use_dora = True

    def __init__(self, in_features, out_features, r=8, lora_alpha=1, lora_dropout=0.0, fan_in_fan_out=False,
                 merge_weights=True, bias=True, dtype=np.float32, rng=None, use_rslora=False, init="kaiming",
                 init_std=None):
        if isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r == 0:
            raise ValueError("DoRALinear: r must be >= 1 (DoRA needs an adapter; use lorac.Linear for r = 0)")
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights,
                         bias, dtype, rng, use_rslora, init, init_std)
        self.lora_magnitude_vector = Parameter(self.dora_row_norms().astype(self.dtype))
        self._dora_merge = None  # (c, rows with c = 0, their unmerged values) of the current merge

    # -- the direction's norms -------------------------------------------------
    def dora_row_norms(self, weight=None):
        """||W0 + s B A|| per output row (out,), float64, for the base weight
        ``weight`` in its stored layout (default: the layer's, unmerged)."""
        w = self._parameters["weight"].data if weight is None else weight
        a, b = self._parameters["lora_A"].data, self._parameters["lora_B"].data
        view = w.T if self.fan_in_fan_out else w
        squares = np.einsum("oi,oi->o", view, view).astype(np.float64)   # in the layer's dtype: 6x faster
        wa_t = _C.linear_forward(a, w, None, None, None, 0.0, self.fan_in_fan_out)[0]   # (r, out) = A W0^T
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        gram = _C.linear_forward(a64, a64, None, None, None, 0.0, False)[0]             # (r, r) = A A^T
        bg = _C.linear_forward(b64, gram, None, None, None, 0.0, False)[0]              # (out, r) = B G
        s = self.scaling
        norms2 = squares + 2 * s * np.einsum("ok,ko->o", b64, wa_t, dtype=np.float64) + s * s * np.einsum(
            "ok,ok->o", bg, b64)
        return np.sqrt(np.maximum(norms2, 0.0))

    def _magnitude_scale(self, weight=None):
        """(c, 1 / ||V||): the magnitude over the row norms, both (out,) float64, 0 where ||V|| = 0."""
        norms = self.dora_row_norms(weight)
        inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return self._parameters["lora_magnitude_vector"].data.astype(np.float64) * inverse, inverse

    def _dora_on(self):
        """Whether the forward applies DoRA (else it is the base layer's or the merged one's)."""
        return (not self.merged_adapters and not self._adapters_disabled and self.active_adapters == ("default",))

    # -- forward / backward ----------------------------------------------------
    def forward(self, x):
        with self.__dict__.get("_lock") or layer_lock(self):
            x = self._checked_input(x)
            if self._mixed_row_ids(x.shape[:-1]) is not None:   # Linear's would drop the magnitude
                raise RuntimeError("DoRALinear: a mixed batch (adapter_names / adapter_ids) needs plain LoRA "
                                   "layers; DoRA layers serve one adapter")
            if not self._dora_on():
                return Linear.forward(self, x)
            out_shape = x.shape[:-1] + (self.out_features,)
            x2 = as_rows(x)
            params = self._parameters
            w = params["weight"].data
            c64, inverse = self._magnitude_scale()
            c = c64.astype(self.dtype)
            p = self.lora_dropout
            mask = self._dropout_mask(x2.shape, p) if self.training and p else None
            keep_scale = 1.0 / (1.0 - p)
            z, u = _C.linear_forward(x2, w, None, params["lora_A"].data, params["lora_B"].data, self.scaling,
                                     self.fan_in_fan_out, mask, keep_scale)
            y = z * c
            rest = off = None
            if mask is not None:   # (1 - c) * ((x - x~) W0^T): the base product of what dropout removed
                off = (1.0 - mask * np.asarray(keep_scale, self.dtype)).astype(self.dtype)
                rest = _C.linear_forward(x2 * off, w, None, None, None, 0.0, self.fan_in_fan_out)[0]
                y += rest * (1 - c)
            bias = params["bias"]
            if bias is not None:
                y += bias.data
            thread_state(self).cache = (_DORA, x2, u, mask, keep_scale, z, rest, off, c, inverse, out_shape,
                                        self._adapter_version)
            return y.reshape(out_shape)

    def backward(self, grad_output):
        with self.__dict__.get("_lock") or layer_lock(self):
            cache = getattr(self.__dict__.get("_tls"), "cache", None)
            if cache is None or cache[0] is not _DORA:
                return Linear.backward(self, grad_output)
            _, x2, u, mask, keep_scale, z, rest, off, c, inverse, out_shape, version = cache
            if version != self._adapter_version:
                self._stale_branch()
            g = as_rows(self._checked_grad_output(grad_output, out_shape))
            params = self._parameters
            weight, bias, magnitude = params["weight"], params["bias"], params["lora_magnitude_vector"]
            grads, created = grad_accumulators(weight, bias, params["lora_A"], params["lora_B"], magnitude)
            grad_w, grad_b, grad_a, grad_bb, grad_m = grads
            try:
                dx = _C.linear_backward(g * c, x2, weight.data, params["lora_A"].data, params["lora_B"].data, u,
                                        self.scaling, self.fan_in_fan_out, mask, keep_scale, True, grad_w, None,
                                        grad_a, grad_bb)
                if rest is not None:
                    dx += off * _C.linear_backward(g * (1 - c), x2 * off, weight.data, None, None, None, 0.0,
                                                   self.fan_in_fan_out, None, 1.0, True, grad_w, None)
                if grad_b is not None:
                    grad_b += g.sum(axis=0)
                if grad_m is not None:   # d y / d m = (z - rest) / ||V||: the dropped input's full output
                    direction = z if rest is None else z - rest
                    grad_m += (np.einsum("no,no->o", g, direction, dtype=np.float64) * inverse).astype(grad_m.dtype)
            except BaseException:
                forget_created(created)
                raise
            self._tls.cache = None
            return dx.reshape(out_shape[:-1] + (self.in_features,))

    # -- merging: W = c * (W0 + s B A) row-wise, undone with the same c ------------
    def _apply_adapter_delta(self, weight, name, sign):
        a, b = self._parameters["lora_A"].data, self._parameters["lora_B"].data
        rows = weight.T if self.fan_in_fan_out else weight   # (out, in) view
        if sign > 0:
            c = self._magnitude_scale(weight)[0]
            zero = np.flatnonzero(c == 0)
            self._delta_into(weight, a, b, self.scaling)
            kept = rows[zero].copy()
            rows *= c.astype(weight.dtype)[:, None]
            self._dora_merge = (c, zero, kept)
            return
        if self._dora_merge is None:
            raise RuntimeError("DoRALinear: unmerge without a merge")
        c, zero, kept = self._dora_merge
        safe = np.where(c == 0, 1.0, c).astype(weight.dtype)
        rows /= safe[:, None]
        rows[zero] = kept
        self._delta_into(weight, a, b, -self.scaling)

    @locked
    def _load_state_items(self, values, assign=False):
        """Loading into a merged layer: unmerge, load, merge again (the magnitude
        and the factors all enter the merged weight)."""
        merged = self.merged_adapters
        if not merged or not values:
            return super()._load_state_items(values, assign)
        self.unmerge()
        try:
            super()._load_state_items(values, assign)
        finally:
            self.merge(merged)

    @locked
    def reset_adapter(self, name="default", init="kaiming", init_std=None, rng=None):
        """Linear's reset_adapter, then the magnitude restarts at the new ||W0 + s B A|| (the output
        is the base layer's again, or PiSSA's unchanged one)."""
        super().reset_adapter(name, init, init_std, rng)
        magnitude = self._parameters["lora_magnitude_vector"]
        magnitude.data[...] = self.dora_row_norms()
        magnitude.grad = None
        return self

    # -- one adapter only ------------------------------------------------------
    def add_adapter(self, name, *args, **kwargs):
        raise ValueError(f"DoRALinear holds one adapter (DoRA); named adapters such as {name!r} need "
                         "lorac.Linear")

    def _replace_adapter(self, name, a, b, config=None):
        raise ValueError("DoRALinear: hot-swapping lora_A / lora_B would leave the magnitude vector behind; "
                         "load a whole state dict (lora_state_dict) instead")

    def _unloaded_class(self):
        return Linear

    def extra_repr(self):
        return super().extra_repr() + ", use_dora=True"

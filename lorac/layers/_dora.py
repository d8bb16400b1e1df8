"""DoRAMagnitude: what DoRALinear and DoRAEmbedding share (layers/dora.py has the math).

The magnitude vector m, one entry per row of the adapted weight's (out, in)
view -- out_features for a Linear, embedding_dim for an Embedding, whose
(num_embeddings, embedding_dim) weight is that view transposed --, the row
norms ||W0 + s B A|| it is divided by, merging c * (W0 + s B A) and undoing
it with the same c, loading into a merged layer, and the one-adapter rule.
"""

import numpy as np

from .. import _C
from ..module import Parameter
from ._lora_init import check_init
from ._threading import locked


def _refuse_mica(init, init_std, func):
    """Check ``init``; MiCA's frozen lora_B is not a DoRA layer's."""
    if check_init(init, init_std, func).name == "mica":
        raise ValueError(f"{func}: init='mica' (MiCA: lora_B frozen) does not combine with DoRA")


class DoRAMagnitude:
    """Mixin placed before a LoRA layer class (Linear, Embedding) in the bases.

    The layer provides ``_weight_layout()`` (its third item: weight stored as
    the transpose of the (out, in) view), ``_delta_into`` and Linear's /
    Embedding's state; the subclass sets ``_plain_class``, the class left by
    merge_and_unload / unload."""

    use_dora = True
    _plain_class = None

    @staticmethod
    def _require_rank(r, name, init="kaiming", init_std=None):
        """The checks a DoRA layer makes before its plain layer's constructor: r >= 1, not MiCA."""
        if isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r == 0:
            raise ValueError(f"{name}: r must be >= 1 (DoRA needs an adapter; use the plain layer for r = 0)")
        _refuse_mica(init, init_std, name)

    def _init_magnitude(self):
        """lora_magnitude_vector = ||W0 + s B A||_row (the new layer computes what its base does)."""
        self.lora_magnitude_vector = Parameter(self.dora_row_norms().astype(self.dtype))
        self._dora_merge = None  # (c, rows with c = 0, their unmerged values) of the current merge

    # -- the direction's norms -------------------------------------------------
    def dora_row_norms(self, weight=None):
        """||W0 + s B A|| per row of the (out, in) view (out,), float64, for the
        base weight ``weight`` in its stored layout (default: the layer's, unmerged)."""
        w = self._parameters["weight"].data if weight is None else weight
        a, b = self._parameters["lora_A"].data, self._parameters["lora_B"].data
        transposed = self._weight_layout()[2]
        view = w.T if transposed else w
        squares = np.einsum("oi,oi->o", view, view).astype(np.float64)   # in the layer's dtype: 6x faster
        wa_t = _C.linear_forward(a, w, None, None, None, 0.0, transposed)[0]             # (r, out) = A W0^T
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

    def _refuse_mixed_batch(self, lead_shape):
        if self._mixed_row_ids(lead_shape) is not None:   # the plain layer's would drop the magnitude
            raise RuntimeError(f"{type(self).__name__}: a mixed batch (adapter_names / adapter_ids) needs plain "
                               "LoRA layers; DoRA layers serve one adapter")

    # -- merging: W = c * (W0 + s B A) row-wise, undone with the same c ------------
    def _apply_adapter_delta(self, weight, name, sign):
        a, b = self._parameters["lora_A"].data, self._parameters["lora_B"].data
        rows = weight.T if self._weight_layout()[2] else weight   # (out, in) view
        if sign > 0:
            c = self._magnitude_scale(weight)[0]
            zero = np.flatnonzero(c == 0)
            self._delta_into(weight, a, b, self.scaling)
            kept = rows[zero].copy()
            rows *= c.astype(weight.dtype)[:, None]
            self._dora_merge = (c, zero, kept)
            return
        if self._dora_merge is None:
            raise RuntimeError(f"{type(self).__name__}: unmerge without a merge")
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
        """The plain layer's reset_adapter, then the magnitude restarts at the new
        ||W0 + s B A|| (the output is the base layer's again, or PiSSA's unchanged one).
        A merged layer is unmerged around it: the norms and the merge need the new values."""
        self._require_adapter(name)
        _refuse_mica(init, init_std, f"{type(self).__name__}.reset_adapter")   # checks init before anything changes
        merged = self.merged_adapters
        self.unmerge()
        try:
            super().reset_adapter(name, init, init_std, rng)
            magnitude = self._parameters["lora_magnitude_vector"]
            magnitude.data[...] = self.dora_row_norms()
            magnitude.grad = None
        finally:
            if merged:
                self.merge(merged)
        return self

    # -- one adapter only ------------------------------------------------------
    def add_adapter(self, name, *args, **kwargs):
        raise ValueError(f"{type(self).__name__} holds one adapter (DoRA); named adapters such as {name!r} need "
                         f"lorac.{self._plain_class.__name__}")

    def _replace_adapter(self, name, a, b, config=None):
        raise ValueError(f"{type(self).__name__}: hot-swapping lora_A / lora_B would leave the magnitude vector "
                         "behind; load a whole state dict (lora_state_dict) instead")

    def _unloaded_class(self):
        return self._plain_class

    def extra_repr(self):
        return super().extra_repr() + ", use_dora=True"

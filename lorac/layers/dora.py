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

DoRALinear and DoRAEmbedding (layers/dora_embedding.py) hold exactly one
adapter ("default"): named adapters, weighted combinations, hot swaps and
mixed batches are refused.
"""

import numpy as np

from .. import _C
from .._arrays import as_rows
from ._dora import DoRAMagnitude
from ._grads import grad_accumulators, forget_created
from ._threading import layer_lock, thread_state
from .linear import Linear

_DORA = "dora"  # first item of a DoRA forward cache (Linear's caches never start with it)


class DoRALinear(DoRAMagnitude, Linear):
    """lorac.Linear with DoRA (module docstring); Linear's arguments, r >= 1.

    Parameters: Linear's, plus ``lora_magnitude_vector`` (out,), trainable
    (PEFT's name, so lora_state_dict and mark_only_lora_as_trainable treat
    it as part of the adapter).  The magnitude, its norms, merging and the
    one-adapter rule: DoRAMagnitude (layers/_dora.py)."""

    _plain_class = Linear

    def __init__(self, in_features, out_features, r=8, lora_alpha=1, lora_dropout=0.0, fan_in_fan_out=False,
                 merge_weights=True, bias=True, dtype=np.float32, rng=None, use_rslora=False, init="kaiming",
                 init_std=None):
        self._require_rank(r, "DoRALinear", init, init_std)
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights,
                         bias, dtype, rng, use_rslora, init, init_std)
        self._init_magnitude()

    # -- forward / backward ----------------------------------------------------
    def forward(self, x):
        with self.__dict__.get("_lock") or layer_lock(self):
            x = self._checked_input(x)
            self._refuse_mixed_batch(x.shape[:-1])
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

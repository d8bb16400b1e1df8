"""lorac.DoRAEmbedding: DoRA on an Embedding, as PEFT's ``LoraConfig(use_dora=True)``
computes it for ``nn.Embedding``, on the Embedding gather kernels.

The (num_embeddings, embedding_dim) weight is the transpose of the adapted
(out, in) = (embedding_dim, num_embeddings) view, so the magnitude m has one
entry per embedding dimension and the norms are taken down the vocabulary:

    V = W0^T + s B A                    (dim, num); s = scaling
    c = m / ||V||_row                   (dim,), a constant in the gradient
    y = c * (W0[idx] + s A^T[idx] B^T)  (..., dim)

(no dropout: lorac's Embedding, like loralib's and PEFT's forward, has
none).  The backward is the Embedding's with grad_output * c, plus dm =
sum over lookups of grad_output * (W0[idx] + s A^T[idx] B^T) / ||V||.
Merging, loading into a merged layer and the one-adapter rule are
DoRALinear's (layers/_dora.py); merge stores c * (W0 + s (B A)^T) column-wise.
"""

import numpy as np

from .._arrays import as_rows
from ._dora import DoRAMagnitude
from ._threading import layer_lock, load_cache, store_cache
from .embedding import Embedding, _as_indices

_DORA = "dora-embedding"  # first item of a DoRA forward cache (Embedding's start with the indices)


class DoRAEmbedding(DoRAMagnitude, Embedding):
    """lorac.Embedding with DoRA (module docstring); Embedding's arguments, r >= 1.

    Parameters: Embedding's, plus ``lora_magnitude_vector`` (embedding_dim,),
    trainable, PEFT's name and shape."""

    _plain_class = Embedding

    def __init__(self, num_embeddings, embedding_dim, r=8, lora_alpha=1, merge_weights=True, padding_idx=None,
                 dtype=np.float32, rng=None, use_rslora=False, init="kaiming", init_std=None):
        self._require_rank(r, "DoRAEmbedding", init, init_std)
        super().__init__(num_embeddings, embedding_dim, r, lora_alpha, merge_weights, padding_idx, dtype, rng,
                         use_rslora, init, init_std)
        self._init_magnitude()

    def forward(self, indices):
        with self.__dict__.get("_lock") or layer_lock(self):
            idx = indices
            if type(idx) is not np.ndarray or idx.dtype.kind not in "iu":
                idx = _as_indices(idx, f"{type(self).__name__}.forward: indices")
            self._refuse_mixed_batch(idx.shape)
            if not self._dora_on():
                return Embedding.forward(self, idx)
            c64, inverse = self._magnitude_scale()
            c = c64.astype(self.dtype)
            z = Embedding.forward(self, idx)          # W0[idx] + s A^T[idx] B^T; its cache is kept inside ours
            store_cache(self, (_DORA, load_cache(self), z, c, inverse, self._adapter_version))
            return z * c

    def backward(self, grad_output):
        with self.__dict__.get("_lock") or layer_lock(self):
            cache = load_cache(self)
            if cache is None or cache[0] is not _DORA:
                return Embedding.backward(self, grad_output)
            _, inner, z, c, inverse, version = cache
            if version != self._adapter_version:
                self._stale_branch()
            g = self._checked_grad_output(grad_output, z.shape)
            magnitude = self._parameters["lora_magnitude_vector"]
            dm = None
            if magnitude.requires_grad:   # d y / d m = z / ||V||, summed over the lookups
                dm = np.einsum("no,no->o", as_rows(g), as_rows(z), dtype=np.float64) * inverse
            store_cache(self, inner)
            try:
                Embedding.backward(self, g * c)
            except BaseException:
                store_cache(self, cache)   # the layer as it was: backward may be called again
                raise
            if dm is not None:
                if magnitude.grad is None:
                    magnitude.grad = magnitude.grad_buffer()
                magnitude.grad += dm.astype(magnitude.grad.dtype)
            return None

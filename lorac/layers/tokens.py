"""PEFT's trainable tokens: chosen rows of an Embedding trained on their own.

``TrainableTokensEmbedding`` is a plain ``lorac.Embedding`` (r = 0, its
weight frozen) whose rows ``token_indices`` (k,) are replaced, in the
forward, by the trainable ``trainable_tokens_delta`` (k, embedding_dim)
(PEFT's name: despite it, the new rows themselves, not a difference).  It
is how PEFT's ``LoraConfig(trainable_token_indices=...)`` trains the
embeddings of new special tokens without training the whole table:

    y[i] = delta[p]    if indices[i] == token_indices[p]
           W[indices[i]]  otherwise

The gradient of delta[p] is the sum of the output gradients of the
positions holding token_indices[p]; the base weight (if trainable) gets no
gradient for those rows.  ``disable_adapters()`` gives the base rows back
for its duration.  ``merged_weight()`` is W with the rows written in, what
``lorac.merge_and_unload`` leaves.  The layer keeps the Embedding's
state-dict keys and adds ``trainable_tokens_delta``.
"""

from contextlib import contextmanager

import numpy as np

from ..module import Parameter
from ._threading import forget_thread_state, load_cache, locked, thread_state
from .embedding import Embedding

DELTA = "trainable_tokens_delta"


def checked_token_indices(token_indices, num_embeddings, func):
    """token_indices as a (k,) intp array of distinct ints in [0, num_embeddings), k >= 1."""
    values = list(token_indices) if not isinstance(token_indices, np.ndarray) else token_indices.tolist()
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise TypeError(f"{func}: token_indices must be a non-empty list of ints, got {token_indices!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{func}: token_indices must be distinct, got {values}")
    bad = [v for v in values if not 0 <= v < num_embeddings]
    if bad:
        raise ValueError(f"{func}: token_indices {bad} are outside [0, {num_embeddings}) (num_embeddings)")
    return np.asarray(values, dtype=np.intp)


class TrainableTokensEmbedding(Embedding):
    """An Embedding (r = 0) with trainable rows ``token_indices`` (module docstring).  Build it
    with ``from_embedding``."""

    @classmethod
    def from_embedding(cls, embedding, token_indices, values=None):
        """A layer sharing ``embedding``'s weight (frozen) whose rows token_indices train, starting
        at ``values`` (k, dim) or at the current rows (PEFT's init_weights=True)."""
        func = "TrainableTokensEmbedding"
        if type(embedding) is not Embedding or embedding.r > 0:
            raise TypeError(f"{func}: trainable tokens go on a plain lorac.Embedding (r = 0), got "
                            f"{type(embedding).__name__}" + (f" with r = {embedding.r}" if embedding.r else "")
                            + " (PEFT refuses them on a LoRA layer too)")
        indices = checked_token_indices(token_indices, embedding.num_embeddings, func)
        rows = embedding.weight.data[indices]
        if values is not None:
            values = np.asarray(values)
            if values.shape != rows.shape or values.dtype.kind != "f" or not np.isfinite(values).all():
                raise ValueError(f"{func}: the token rows must be a finite float array of shape {rows.shape}, got "
                                 f"shape {values.shape} dtype {values.dtype}")
        new = embedding._copy_sharing_contents(embedding._parameters.items(), cls)
        forget_thread_state(new)
        new.token_indices = indices
        position = np.full(embedding.num_embeddings, -1, dtype=np.intp)
        position[indices] = np.arange(len(indices))
        new._token_position = position
        new._tokens_disabled = 0
        new.weight.requires_grad = False
        new.weight.grad = None
        new.register_parameter(DELTA, Parameter((rows if values is None else values).astype(embedding.dtype)))
        return new

    def _token_rows(self, indices):
        """(positions in the flattened lookup that hold a token, their rows of delta)."""
        flat = np.asarray(indices).reshape(-1)
        position = self._token_position[flat]
        where = np.flatnonzero(position >= 0) if not self._tokens_disabled else np.empty(0, np.intp)
        return where, position[where]

    @locked
    def forward(self, indices):
        y = super().forward(indices)
        where, rows = self._token_rows(indices)
        if where.size:
            y.reshape(-1, self.embedding_dim)[where] = self._parameters[DELTA].data[rows]
        thread_state(self).tokens = (where, rows)
        return y

    @locked
    def backward(self, grad_output):
        cache = load_cache(self)
        tokens = getattr(self.__dict__.get("_tls"), "tokens", None)
        if cache is None or tokens is None:
            return super().backward(grad_output)     # raises: backward before forward
        expected = cache[3] + (self.embedding_dim,)
        g = grad_output
        if type(g) is not np.ndarray or g.dtype != self.dtype or g.shape != expected:
            g = self._checked_grad_output(g, expected)
        where, rows = tokens
        g2 = g.reshape(-1, self.embedding_dim)
        delta = self._parameters[DELTA]
        if where.size and self.weight.requires_grad:
            base_g = g2.copy()
            base_g[where] = 0          # replaced rows: no gradient for the base weight
            super().backward(base_g.reshape(expected))
        else:
            super().backward(g)
        if delta.requires_grad:   # a gradient array even when no position held a token (as the other layers')
            np.add.at(delta.grad_buffer(), rows, g2[where])
        thread_state(self).tokens = None
        return None

    @contextmanager
    def disable_adapters(self):
        """The base rows for the duration (PEFT's disable_adapter()); nested uses are fine."""
        self._tokens_disabled += 1
        try:
            yield self
        finally:
            self._tokens_disabled -= 1

    def merged_weight(self):
        """A copy of the weight with the token rows written in (num, dim)."""
        weight = self.weight.data.copy()
        weight[self.token_indices] = self._parameters[DELTA].data
        return weight

    def plain(self, merge):
        """The plain lorac.Embedding holding the weight (the token rows written in when ``merge``):
        what merge_and_unload (merge) and unload (not) leave; this layer is left as it is."""
        weight = Parameter(self.merged_weight() if merge else self.weight.data, requires_grad=True)
        new = self._copy_sharing_contents([("weight", weight)], Embedding)
        forget_thread_state(new)
        for key in ("token_indices", "_token_position", "_tokens_disabled"):
            new.__dict__.pop(key, None)
        return new

    def extra_repr(self):
        return super().extra_repr() + f", trainable_tokens={self.token_indices.tolist()}"

"""lorac.Embedding: loralib's LoRA Embedding on the C gather kernels (csrc/lora_embedding*)."""

import numpy as np

from .. import _C
from .. import init as _init
from .._arrays import as_generator, as_rows, float_dtype, non_negative_int
from ..module import Module, Parameter
from ._threading import locked, store_cache
from ._grads import GradBuffers
from ._lora_init import check_init
from .adapters import DEFAULT
from .base import LoRALayer

# What backward needs from a forward, a plain tuple (layers/base.py says why):
#   (flat_indices, u, lora_on, lead_shape, branch)
# the flat indices, u = A^T[idx], whether the adapter branch ran, the
# indices' shape, and the named-adapter Branch (None on the fast path).


class Embedding(LoRALayer, Module):
    """y = W0[idx] + scaling * A^T[idx] B^T, with loralib's API.

    Parameters (loralib's names and shapes): ``weight`` (num_embeddings,
    embedding_dim) drawn from N(0, 1) like ``torch.nn.Embedding`` with the
    ``padding_idx`` row zeroed, ``lora_A`` (r, num_embeddings) zeros,
    ``lora_B`` (embedding_dim, r) N(0, 1), ``scaling = lora_alpha / r``
    (loralib's Embedding is the other way round from its Linear: A starts at
    zero, so the adapter starts as a no-op all the same).  No dropout.  With
    r > 0 the base weight is frozen.

    ``forward(indices)`` takes integer indices of any shape and returns
    ``indices.shape + (embedding_dim,)``; ``backward(grad_output)`` returns
    None (indices have no gradient) and accumulates the parameters'
    gradients, where repeated indices add up and ``padding_idx`` gets none.
    ``eval()`` merges ``scaling * (B A)^T`` into the weight and ``train()``
    unmerges it when ``merge_weights``; ``state_dict()`` always holds the
    unmerged weight.
    """

    def __init__(self, num_embeddings, embedding_dim, r=0, lora_alpha=1, merge_weights=True,
                 padding_idx=None, dtype=np.float32, rng=None, use_rslora=False, init="kaiming", init_std=None):
        Module.__init__(self)
        self.num_embeddings = non_negative_int(num_embeddings, "num_embeddings")
        self.embedding_dim = non_negative_int(embedding_dim, "embedding_dim")
        self.padding_idx = _normalized_padding_idx(padding_idx, self.num_embeddings)
        self._init_lora(r, lora_alpha, 0.0, merge_weights, use_rslora)
        self.dtype = float_dtype(dtype)
        self.rng = as_generator(rng)
        self._cache = None
        spec = check_init(init, init_std, type(self).__name__)

        weight = _init.normal((self.num_embeddings, self.embedding_dim), 1.0, self.rng, self.dtype)
        if self.padding_idx is not None:
            weight[self.padding_idx] = 0
        self.weight = Parameter(weight, requires_grad=self.r == 0)
        if self.r > 0:
            start = self._start_arrays(spec, self.r, self.scaling, self.rng, type(self).__name__)
            self.lora_A = Parameter(start.lora_A)
            self.lora_B = Parameter(start.lora_B)
            if start.weight is not None:   # 'pissa': the base becomes W0 - scaling * (B A)^T
                self.weight.data[...] = start.weight
            self._follow_init(DEFAULT, spec)

    # -- forward / backward ---------------------------------------------
    @locked
    def forward(self, indices):
        idx = indices
        if type(idx) is not np.ndarray or idx.dtype.kind not in "iu":
            idx = _as_indices(idx, f"{type(self).__name__}.forward: indices")
        params = self._parameters
        flat = idx if idx.ndim == 1 else idx.reshape(-1)
        if self._plain:  # loralib's state: "default" only (layers/adapters.py)
            lora_on = self.r > 0 and not self.merged
            a = params["lora_A"].data if lora_on else None
            b = params["lora_B"].data if lora_on else None
            scaling, branch = self.scaling, None
        else:  # named adapters, disabled adapters or a mixed batch
            ids = self._mixed_row_ids(idx.shape)
            if ids is not None:
                return self._mixed_forward(flat, ids, idx.shape)
            branch = self._branch()
            a, b, scaling = branch.a, branch.b, branch.scaling
            lora_on = a is not None
        y, u = _C.embedding_forward(flat, params["weight"].data, a, b, scaling)
        store_cache(self, (flat, u, lora_on, idx.shape, branch))
        return y if idx.ndim == 1 else y.reshape(idx.shape + (self.embedding_dim,))

    def _mixed_forward(self, flat, ids, lead_shape):
        """Inference on a mixed batch: lookup i gets adapter ids[i] (-1: none), in C."""
        As, Bs, scalings = self._mixed_operands()
        y = _C.multi_embedding_forward(flat, self._parameters["weight"].data, As, Bs, scalings, ids)
        self._cache = None
        return y.reshape(tuple(lead_shape) + (self.embedding_dim,))

    @locked
    def backward(self, grad_output):
        """Accumulates .grad of the trainable parameters; returns None (indices have no gradient)."""
        flat_indices, u, lora_on, lead_shape, branch = self._require_cache()
        g = grad_output
        expected = lead_shape + (self.embedding_dim,)
        if type(g) is not np.ndarray or g.dtype != self.dtype or g.shape != expected:
            g = self._checked_grad_output(g, expected)
        params = self._parameters
        g2 = g if g.ndim == 2 else as_rows(g)
        if branch is None:  # the fast path's forward
            lora_a, lora_b = (params["lora_A"], params["lora_B"]) if lora_on else (None, None)
            grads = {"grad_weight": params["weight"], "grad_lora_A": lora_a, "grad_lora_B": lora_b}
            with GradBuffers(grads) as buffers:
                _C.embedding_backward(
                    g2, flat_indices, params["weight"].data, None if lora_a is None else lora_a.data,
                    None if lora_b is None else lora_b.data, u, self.scaling, self.padding_idx, **buffers)
        else:  # named adapters (layers/adapters.py)
            with GradBuffers({"grad_weight": params["weight"]}) as buffers, \
                    self._branch_grads(branch) as lora_buffers:
                _C.embedding_backward(g2, flat_indices, params["weight"].data, branch.a, branch.b, u,
                                      branch.scaling, self.padding_idx, **buffers, **lora_buffers)
        store_cache(self, None)
        return None

    # -- merging and named adapters (the bookkeeping: layers/adapters.py) --------
    # W0 (num, dim) += alpha * (B A)^T is the Linear merge of a weight stored
    # (in, out) = (num_embeddings, embedding_dim): the same kernel, transposed.
    def _delta_into(self, weight, a, b, alpha):
        _C.linear_merge(weight, a, b, alpha, True)

    def _adapter_geometry(self):
        return 1, self.num_embeddings, self.embedding_dim, "embedding"

    def _weight_layout(self):
        """(first (out, in)-view row of each adapted block, out rows, weight stored transposed?):
        the (num, dim) weight is the transpose of the adapter's (dim, num) delta."""
        return (0,), self.embedding_dim, True

    def extra_repr(self):
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        if self.r > 0:
            text += f", r={self.r}, lora_alpha={self.lora_alpha:g}"
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        return text


def _normalized_padding_idx(padding_idx, num_embeddings):
    """None, or an int in [-num, num) -> None or its index in [0, num) (torch's rule)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
        raise TypeError(f"padding_idx must be None or an int, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}) "
                         f"(num_embeddings), got {padding_idx}")
    return int(padding_idx) % num_embeddings


def _as_indices(indices, name):
    """Integer indices as an ndarray (any integer dtype; the kernel checks the range)."""
    idx = indices if isinstance(indices, np.ndarray) else np.asarray(indices)
    if idx.dtype.kind not in "iu":
        if idx.size == 0 and not isinstance(indices, np.ndarray):  # [] parses as float64
            return idx.astype(np.intp)
        raise TypeError(f"{name} must be an array of integers, got dtype {idx.dtype}")
    return idx

"""lorac.Linear: loralib's LoRA Linear on the fused C kernels (csrc/lora_linear*)."""

import numpy as np

from .. import _C
from .. import init as _init
from .._arrays import as_generator, as_rows, float_dtype, non_negative_int
from ..module import Module, Parameter
from ._threading import layer_lock, thread_state
from ._grads import GradBuffers, forget_created, grad_accumulators
from ._lora_init import check_init
from .adapters import DEFAULT, LORA_BIAS, _checked_bool
from .base import LoRALayer

# What backward needs from a forward, a plain tuple (layers/base.py says why):
#   (x2, u, mask, keep_scale, lora_on, out_shape, branch)
# the 2-D input, u = drop(x) A^T, the dropout mask and its 1 / (1 - p),
# whether the adapter branch ran, the output's shape, and the
# named-adapter Branch (None on the fast path).


class Linear(LoRALayer, Module):
    """y = x W0^T + b + scaling * (dropout(x) A^T) B^T, with loralib's API.

    Parameters (loralib's names and shapes): ``weight`` (out, in) — (in, out)
    when ``fan_in_fan_out`` —, ``bias`` (out,), ``lora_A`` (r, in) kaiming-
    uniform, ``lora_B`` (out, r) zeros, ``scaling = lora_alpha / r``.  With
    r > 0 the base weight is frozen; r = 0 is a plain trainable linear layer.
    ``eval()`` merges the adapter into the weight and ``train()`` unmerges it
    when ``merge_weights``.  Dropout applies to the LoRA branch input only,
    in training, drawn from ``rng`` (a seed or numpy Generator).

    ``state_dict()`` always holds the unmerged base weight, so a checkpoint
    means the same whether it was taken in train() or eval() mode.

    ``init`` chooses how the adapter starts (layers/_lora_init.py): 'kaiming'
    (loralib's, the default), 'gaussian' (A ~ N(0, init_std^2), init_std
    0.01 by default; B = 0), 'zeros_A' (A = 0, B ~ N(0, init_std^2),
    default 1), 'pissa' (A, B from the top-r SVD of the weight, which
    becomes the residual W0 - scaling * B A: the layer's output does not
    change, but its saved base weight is the residual), 'olora' (the same
    with the QR factorisation: B = Q_r, A = R_r) or 'orthogonal' (PEFT's:
    A and B random with B A = 0; r even).  At construction
    'pissa' factors the freshly drawn weight; to factor pretrained weights,
    load them first and call ``reset_adapter(init='pissa')``.

    ``lora_bias`` (PEFT's): the adapter also has a trainable bias
    ``lora_bias`` (out,) on lora_B, added as ``scaling * lora_bias``; zeros at
    init 'kaiming', PEFT's U(-1/sqrt(r), 1/sqrt(r)) at init False.  It needs
    the layer's bias (merging adds ``scaling * lora_bias`` into it) and r > 0,
    and takes those two inits only, as PEFT.  Such a layer runs the adapter
    outside the loralib fast path.
    """

    _lora_bias_capable = True

    def __init__(self, in_features, out_features, r=0, lora_alpha=1, lora_dropout=0.0,
                 fan_in_fan_out=False, merge_weights=True, bias=True, dtype=np.float32, rng=None,
                 use_rslora=False, init="kaiming", init_std=None, lora_bias=False):
        Module.__init__(self)
        self.in_features = non_negative_int(in_features, "in_features")
        self.out_features = non_negative_int(out_features, "out_features")
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.dtype = float_dtype(dtype)
        self.rng = as_generator(rng)
        self._cache = None
        spec = check_init(init, init_std, type(self).__name__)
        if _checked_bool(lora_bias, "lora_bias") and self.r == 0:
            raise ValueError(f"{type(self).__name__}: lora_bias=True needs an adapter (r > 0), got r=0")

        weight = _init.kaiming_uniform((self.out_features, self.in_features), self.in_features,
                                       self.rng, self.dtype)
        if self.fan_in_fan_out:
            weight = np.ascontiguousarray(weight.T)
        self.weight = Parameter(weight, requires_grad=self.r == 0)
        if bias:
            bound = 1.0 / np.sqrt(self.in_features) if self.in_features > 0 else 0.0
            self.bias = Parameter(_init.uniform((self.out_features,), bound, self.rng, self.dtype))
        else:
            self.register_parameter("bias", None)
        if lora_bias:
            self._check_lora_bias_allowed(type(self).__name__, spec)
        if self.r > 0:
            start = self._start_arrays(spec, self.r, self.scaling, self.rng, type(self).__name__)
            self.lora_A = Parameter(start.lora_A)
            self.lora_B = Parameter(start.lora_B)
            if start.weight is not None:   # 'pissa': the base becomes W0 - scaling * B A
                self.weight.data[...] = start.weight
            if lora_bias:
                self._register_lora_bias(DEFAULT, spec, self.r, self.rng)
            self._follow_init(DEFAULT, spec)

    # -- forward / backward ---------------------------------------------
    def forward(self, x):
        # The hot path of a small batch (benchmarks/bench_overhead.py).  The
        # instance dict is read once and indexed: with Module.__getattr__
        # defined, CPython does not specialise `self.name` (52 ns a lookup on
        # a Linear against 11 ns on a plain object, hot; worse when a large
        # product has just evicted the class's MRO from the caches).  No
        # helper calls or reshapes that a 2-D input of the right dtype does
        # not need; the lock and the per-thread cache taken inline.  Measured
        # at in = out = 1024, one row, r = 8, against self.name and the
        # cache helpers, in one process: the training step 0.2-7 us faster
        # (median ~3 us, 2%), the forward ~1 us.
        d = self.__dict__
        with d.get("_lock") or layer_lock(self):
            # The dtype by identity: NumPy's builtin dtypes are singletons, and
            # an equal but distinct dtype object only takes the checked route.
            checked = type(x) is not np.ndarray or x.dtype is not d["dtype"]
            if checked:
                x = self._checked_input(x)
            shape = x.shape
            if len(shape) == 2 and shape[1] == d["in_features"]:
                x2, out_shape = x, (shape[0], d["out_features"])
            else:  # (..., in_features); any other shape raises in _checked_input
                x2 = as_rows(x if checked else self._checked_input(x))
                out_shape = shape[:-1] + (d["out_features"],)
            params = d["_parameters"]
            if d["_plain"]:  # loralib's state: "default" only (layers/adapters.py)
                lora_on = d["r"] > 0 and not d["merged"]
                a = params["lora_A"].data if lora_on else None
                b = params["lora_B"].data if lora_on else None
                scaling, dropout, branch = d["scaling"], d["lora_dropout"], None
            else:  # named adapters, disabled adapters or a mixed batch
                ids = self._mixed_row_ids(shape[:-1])
                if ids is not None:
                    return self._mixed_forward(x2, ids, shape[:-1])
                branch = self._branch()
                a, b, scaling, dropout = branch.a, branch.b, branch.scaling, branch.dropout
                lora_on = a is not None
            mask = self._dropout_mask(x2.shape, dropout) if lora_on and d["training"] and dropout else None
            keep_scale = 1.0 / (1.0 - dropout)
            bias = params["bias"]
            y, u = _C.linear_forward(x2, params["weight"].data, None if bias is None else bias.data, a, b,
                                     scaling, d["fan_in_fan_out"], mask, keep_scale)
            if branch is not None and branch.bias is not None:   # PEFT's lora_bias
                y += branch.bias
            (d.get("_tls") or thread_state(self)).cache = (x2, u, mask, keep_scale, lora_on, out_shape, branch)
            return y if x2 is x else y.reshape(out_shape)

    def _mixed_forward(self, x2, ids, lead_shape):
        """Inference on a mixed batch: row i gets adapter ids[i] (-1: none), in C."""
        As, Bs, scalings = self._mixed_operands()
        bias = self._parameters["bias"]
        y = _C.multi_linear_forward(x2, self._parameters["weight"].data, None if bias is None else bias.data,
                                    As, Bs, scalings, ids, self.fan_in_fan_out)
        self._add_mixed_lora_biases(y, ids)
        self._cache = None
        return y.reshape(lead_shape + (self.out_features,))

    def backward(self, grad_output):
        """Gradient w.r.t. the input; accumulates .grad of trainable parameters."""
        d = self.__dict__  # indexed, not self.name, as in forward
        with d.get("_lock") or layer_lock(self):
            cache = getattr(d.get("_tls"), "cache", None)
            # the fast path's forward, the adapter still (un)merged as then;
            # anything else (no forward, a merge since, a named-adapter
            # branch) goes to _require_cache, which raises or checks it
            if cache is None or cache[-1] is not None or cache[-3] != (d["r"] > 0 and not d["merged"]):
                cache = self._require_cache()
            x2, u, mask, keep_scale, lora_on, out_shape, branch = cache
            g = grad_output
            if type(g) is not np.ndarray or g.dtype is not d["dtype"] or g.shape != out_shape:
                g = self._checked_grad_output(g, out_shape)
            params = d["_parameters"]
            weight = params["weight"]
            g2 = g if len(out_shape) == 2 else as_rows(g)
            if branch is None:  # the fast path's forward
                lora_a, lora_b = (params["lora_A"], params["lora_B"]) if lora_on else (None, None)
                grads, created = grad_accumulators(weight, params["bias"], lora_a, lora_b)
                try:  # positional: C parses keywords ~0.3 us slower
                    dx = _C.linear_backward(
                        g2, x2, weight.data, None if lora_a is None else lora_a.data,
                        None if lora_b is None else lora_b.data, u, d["scaling"], d["fan_in_fan_out"],
                        mask, keep_scale, True, *grads)
                except BaseException:
                    forget_created(created)
                    raise
            else:  # named adapters (layers/adapters.py)
                base_grads = GradBuffers({"grad_weight": weight, "grad_bias": params["bias"]})
                with base_grads as buffers, self._branch_grads(branch) as lora_buffers:
                    dx = _C.linear_backward(g2, x2, weight.data, branch.a, branch.b, u, branch.scaling,
                                            d["fan_in_fan_out"], mask, keep_scale, True, **buffers, **lora_buffers)
                self._lora_bias_grads(branch, g2)
            d["_tls"].cache = None
            return dx if len(out_shape) == 2 else dx.reshape(out_shape[:-1] + (d["in_features"],))

    def _dropout_mask(self, shape, p):
        """uint8 keep-mask (1 = keep) for the LoRA branch input, drawn from self.rng."""
        keep = self.rng.random(shape, dtype=np.float32) >= p
        return keep.view(np.uint8)

    # -- merging and named adapters (the bookkeeping: layers/adapters.py) --------
    def _delta_into(self, weight, a, b, alpha):
        _C.linear_merge(weight, a, b, alpha, self.fan_in_fan_out)

    def _adapter_geometry(self):
        return 1, self.in_features, self.out_features, "linear"

    def _weight_layout(self):
        """(first (out, in)-view row of each adapted block, out rows, weight stored transposed?)"""
        return (0,), self.out_features, self.fan_in_fan_out

    def extra_repr(self):
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
        return text + self._lora_repr() + (", lora_bias=True" if LORA_BIAS in self._parameters else "")


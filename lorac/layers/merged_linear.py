"""lorac.MergedLinear: loralib's fused-projection LoRA layer on the C kernels
(csrc/lora_merged_linear*)."""

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
#   (x2, u, mask, keep_scale, lora_on, lead_shape, branch)
# the 2-D input, u = drop(x) A^T, the dropout mask and its 1 / (1 - p),
# whether the adapter branch ran, the input's leading shape, and the
# named-adapter Branch (None on the fast path).


class MergedLinear(LoRALayer, Module):
    """One linear layer over several stacked projections (e.g. q, k, v), with a
    LoRA adapter on the enabled ones only — loralib's ``MergedLinear``.

    The output's ``out_features`` split into ``len(enable_lora)`` equal
    blocks; block g gets an adapter when ``enable_lora[g]`` (e.g.
    ``[True, False, True]`` adapts q and v).  Parameters (loralib's names and
    shapes, so state dicts interchange): ``weight`` (out, in) — (in, out)
    when ``fan_in_fan_out`` —, ``bias`` (out,), ``lora_A``
    (r * n_enabled, in) kaiming-uniform and ``lora_B``
    (out / len(enable_lora) * n_enabled, r) zeros, the rows of enabled group e
    (counting enabled groups only) being ``lora_A[e*r:(e+1)*r]`` and
    ``lora_B[e*og:(e+1)*og]``.

    Forward adds ``scaling * (drop(x) A_e^T) B_e^T`` into each enabled block
    of the output, never building the dense block-diagonal delta that
    loralib forms on every call.  Merging adds ``scaling * B_e A_e`` into the
    weight's rows of each enabled block.  With no enabled group (or r = 0)
    there is no adapter: the layer is a plain, trainable linear layer (where
    loralib raises AttributeError in forward when r > 0).

    ``lora_ind`` (bool, (out,)) marks the output features that have an
    adapter, as in loralib.
    """

    def __init__(self, in_features, out_features, r=0, lora_alpha=1, lora_dropout=0.0,
                 enable_lora=(False,), fan_in_fan_out=False, merge_weights=True, bias=True,
                 dtype=np.float32, rng=None, use_rslora=False, init="kaiming", init_std=None):
        Module.__init__(self)
        self.in_features = non_negative_int(in_features, "in_features")
        self.out_features = non_negative_int(out_features, "out_features")
        self.enable_lora = _checked_enable_lora(enable_lora, self.out_features)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.dtype = float_dtype(dtype)
        self.rng = as_generator(rng)
        self._cache = None
        n_enabled = sum(self.enable_lora)
        self._adapter = self.r > 0 and n_enabled > 0
        spec = check_init(init, init_std, type(self).__name__)

        weight = _init.kaiming_uniform((self.out_features, self.in_features), self.in_features,
                                       self.rng, self.dtype)
        if self.fan_in_fan_out:
            weight = np.ascontiguousarray(weight.T)
        self.weight = Parameter(weight, requires_grad=not self._adapter)
        if bias:
            bound = 1.0 / np.sqrt(self.in_features) if self.in_features > 0 else 0.0
            self.bias = Parameter(_init.uniform((self.out_features,), bound, self.rng, self.dtype))
        else:
            self.register_parameter("bias", None)
        if self._adapter:
            start = self._start_arrays(spec, self.r, self.scaling, self.rng, type(self).__name__)
            self.lora_A = Parameter(start.lora_A)
            self.lora_B = Parameter(start.lora_B)
            if start.weight is not None:   # 'pissa': each enabled block becomes W0_g - scaling * B_g A_g
                self.weight.data[...] = start.weight
            self._follow_init(DEFAULT, spec)

    @property
    def lora_ind(self):
        """bool (out_features,): True for the output features of enabled groups."""
        return np.repeat(np.array(self.enable_lora, dtype=bool), self.out_features // len(self.enable_lora))

    # -- forward / backward ---------------------------------------------
    @locked
    def forward(self, x):
        # Hot path for small batches: a 2-D input of the right dtype goes
        # straight to the kernel, without reshapes or attribute hooks.
        if type(x) is not np.ndarray or x.dtype != self.dtype or x.ndim == 0 \
                or x.shape[-1] != self.in_features:
            x = self._checked_input(x)
        params = self._parameters
        x2 = x if x.ndim == 2 else as_rows(x)
        bias = params["bias"]
        bias = None if bias is None else bias.data
        lead_shape = x.shape[:-1]
        if self._plain:  # loralib's state: "default" only (layers/adapters.py)
            lora_on = self._adapter and not self.merged
            a = params["lora_A"].data if lora_on else None
            b = params["lora_B"].data if lora_on else None
            scaling, dropout, branch = self.scaling, self.lora_dropout, None
        else:  # named adapters, disabled adapters or a mixed batch
            ids = self._mixed_row_ids(lead_shape)
            if ids is not None:
                return self._mixed_forward(x2, ids, lead_shape)
            branch = self._branch()
            a, b, scaling, dropout = branch.a, branch.b, branch.scaling, branch.dropout
            lora_on = a is not None
        mask, keep_scale = None, 1.0 / (1.0 - dropout)
        if lora_on:
            if self.training and dropout:
                mask = self._dropout_mask(x2.shape, dropout)
            y, u = _C.merged_linear_forward(x2, params["weight"].data, bias, a, b, self.enable_lora, scaling,
                                            self.fan_in_fan_out, mask, keep_scale)
        else:  # merged or no adapter: the base layer only
            y, u = _C.linear_forward(x2, params["weight"].data, bias, None, None, 0.0, self.fan_in_fan_out)
        store_cache(self, (x2, u, mask, keep_scale, lora_on, lead_shape, branch))
        return y if x.ndim == 2 else y.reshape(lead_shape + (self.out_features,))

    def _mixed_forward(self, x2, ids, lead_shape):
        """Inference on a mixed batch: row i gets adapter ids[i] (-1: none), in C."""
        As, Bs, scalings = self._mixed_operands()
        bias = self._parameters["bias"]
        y = _C.multi_linear_forward(x2, self._parameters["weight"].data, None if bias is None else bias.data,
                                    As, Bs, scalings, ids, self.fan_in_fan_out, self.enable_lora)
        self._cache = None
        return y.reshape(lead_shape + (self.out_features,))

    @locked
    def backward(self, grad_output):
        """Gradient w.r.t. the input; accumulates .grad of trainable parameters."""
        x2, u, mask, keep_scale, lora_on, lead_shape, branch = self._require_cache()
        g = grad_output
        expected = lead_shape + (self.out_features,)
        if type(g) is not np.ndarray or g.dtype != self.dtype or g.shape != expected:
            g = self._checked_grad_output(g, expected)
        g2 = g if g.ndim == 2 else as_rows(g)
        params = self._parameters
        weight = params["weight"]
        if lora_on and branch is None:  # the fast path's forward
            lora_a, lora_b = params["lora_A"], params["lora_B"]
            grads = {"grad_weight": weight, "grad_bias": params["bias"],
                     "grad_lora_A": lora_a, "grad_lora_B": lora_b}
            with GradBuffers(grads) as buffers:
                dx = _C.merged_linear_backward(
                    g2, x2, weight.data, lora_a.data, lora_b.data, u, self.enable_lora,
                    self.scaling, self.fan_in_fan_out, mask, keep_scale, True, **buffers)
        elif lora_on:  # named adapters (layers/adapters.py)
            base_grads = GradBuffers({"grad_weight": weight, "grad_bias": params["bias"]})
            with base_grads as buffers, self._branch_grads(branch) as lora_buffers:
                dx = _C.merged_linear_backward(
                    g2, x2, weight.data, branch.a, branch.b, u, self.enable_lora, branch.scaling,
                    self.fan_in_fan_out, mask, keep_scale, True, **buffers, **lora_buffers)
        else:
            with GradBuffers({"grad_weight": weight, "grad_bias": params["bias"]}) as buffers:
                dx = _C.linear_backward(g2, x2, weight.data, None, None, None, 0.0,
                                        self.fan_in_fan_out, None, 1.0, True, **buffers)
        store_cache(self, None)
        return dx if len(lead_shape) == 1 else dx.reshape(lead_shape + (self.in_features,))

    def _dropout_mask(self, shape, p):
        """uint8 keep-mask (1 = keep) of the LoRA branch input, shared by all
        groups as in loralib, drawn from self.rng."""
        keep = self.rng.random(shape, dtype=np.float32) >= p
        return keep.view(np.uint8)

    # -- merging and named adapters (the bookkeeping: layers/adapters.py) --------
    def _default_adapter_on(self):
        return bool(self._adapter)

    def _delta_into(self, weight, a, b, alpha):
        _C.merged_linear_merge(weight, a, b, self.enable_lora, alpha, self.fan_in_fan_out)

    def _adapter_capable(self):
        return any(self.enable_lora)

    def _init_adapters(self):
        super()._init_adapters()
        self._adapter = "default" in self._adapters  # loralib's adapter: r > 0 and a group enabled

    def _adapter_geometry(self):
        return sum(self.enable_lora), self.in_features, self.out_features // len(self.enable_lora), "linear"

    def _weight_layout(self):
        """(first (out, in)-view row of each adapted block, out rows, weight stored transposed?)"""
        og = self.out_features // len(self.enable_lora)
        return tuple(g * og for g, on in enumerate(self.enable_lora) if on), self.out_features, self.fan_in_fan_out

    def extra_repr(self):
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, enable_lora={list(self.enable_lora)}")
        return text + self._lora_repr()


def _checked_enable_lora(enable_lora, out_features):
    """A non-empty sequence of bools whose length divides out_features -> tuple of bools."""
    if isinstance(enable_lora, (str, bytes)) or not hasattr(enable_lora, "__len__"):
        raise TypeError(f"enable_lora must be a sequence of bools, got {type(enable_lora).__name__}")
    flags = tuple(enable_lora)
    for position, flag in enumerate(flags):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"enable_lora must be a sequence of bools, got {type(flag).__name__} "
                            f"at position {position}")
    if not flags:
        raise ValueError("enable_lora must be a non-empty sequence of bools, got an empty one")
    if out_features % len(flags) != 0:
        raise ValueError(f"len(enable_lora) = {len(flags)} must divide out_features = {out_features}")
    return tuple(bool(flag) for flag in flags)

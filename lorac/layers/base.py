"""LoRALayer: the hyper-parameters and merge bookkeeping every LoRA layer shares."""

import math

from .._arrays import as_float_array, check_last_dim, non_negative_int, probability, real_number
from ._threading import load_cache
from .adapters import NamedAdapters


class LoRALayer(NamedAdapters):
    """Mixin with loralib's attributes: r, lora_alpha, scaling, lora_dropout,
    merge_weights, merged (and use_rslora: scaling = lora_alpha / sqrt(r)).

    These describe the "default" adapter; named adapters, merging and the
    state-dict handling of a merged weight come from NamedAdapters
    (layers/adapters.py)."""

    def _init_lora(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora=False):
        self.r = non_negative_int(r, "r")
        self.lora_alpha = real_number(lora_alpha, "lora_alpha")
        self.lora_dropout = probability(lora_dropout, "lora_dropout")
        self.merge_weights = bool(merge_weights)
        self.use_rslora = bool(use_rslora)
        self.merged = False
        if self.r > 0:
            self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        else:
            self.scaling = 0.0
        self._init_adapters()

    def train(self, mode=True):
        """train() unmerges and eval() merges the adapter when merge_weights is set
        (deferred to the end of a disable_adapters() block)."""
        super().train(mode)
        if self._adapters_disabled:
            return self
        if mode:
            if self.merge_weights and self.merged:
                self.unmerge()
        elif self.merge_weights and not self.merged:
            self.merge()
        return self

    def _delta_into(self, weight, a, b, alpha):
        """weight += alpha * (the delta of adapter a, b) in weight's stored layout."""
        raise NotImplementedError

    def _default_adapter_on(self):
        """Whether the constructor's adapter has a branch (MergedLinear: any group enabled)."""
        return self.r > 0

    # -- argument checks and the forward cache, shared by the layer kinds ------
    def _checked_input(self, x):
        name = f"{type(self).__name__}.forward: input"
        x = as_float_array(x, self.dtype, name)
        check_last_dim(x, self.in_features, name)
        return x

    def _checked_grad_output(self, g, expected):
        name = f"{type(self).__name__}.backward: grad_output"
        g = as_float_array(g, self.dtype, name)
        if g.shape != expected:
            raise ValueError(f"{name} must have shape {expected} (the output's), got {g.shape}")
        return g

    # A layer's forward cache (what its backward needs) is a plain tuple that
    # ends with (lora_on, a shape, branch); each layer's backward unpacks it
    # by name.  Not a namedtuple: that one's constructor is a Python function,
    # ~0.6 us on every forward when a large matrix product has just evicted the
    # interpreter's data from L2 (benchmarks/bench_overhead.py).
    def _require_cache(self):
        """This thread's forward cache, checked against what changed since."""
        cache = load_cache(self)
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called without a preceding forward() "
                               "(or twice for one forward)")
        lora_on, branch = cache[-3], cache[-1]
        if branch is None:
            if lora_on != (self._default_adapter_on() and not self.merged):
                raise RuntimeError(f"{type(self).__name__}.backward(): the adapter was merged or unmerged "
                                   "(train()/eval()) between forward() and backward(); run forward() again")
        elif branch.version != self._adapter_version:
            self._stale_branch()
        return cache

    def _lora_repr(self):
        """The ", r=..., lora_alpha=..." part of a layer's repr (only what differs from the defaults)."""
        text = ""
        if self.r > 0:
            text += f", r={self.r}, lora_alpha={self.lora_alpha:g}"
            if self.lora_dropout:
                text += f", lora_dropout={self.lora_dropout:g}"
        if getattr(self, "fan_in_fan_out", False):
            text += ", fan_in_fan_out=True"
        if self.dtype != "float32":
            text += f", dtype={self.dtype}"
        return text

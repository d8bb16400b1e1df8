"""Named adapters on one LoRA layer: the bookkeeping Linear, Embedding and
MergedLinear share (mixed into ``LoRALayer``).

A layer keeps one frozen base weight and any number of named adapters:

- ``"default"`` is the constructor's adapter.  Its parameters keep loralib's
  names ``lora_A`` / ``lora_B`` (state-dict keys unchanged) and the layer's
  ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout``, ``use_rslora``
  describe it.  It exists when the layer was built with r > 0.
- ``add_adapter(name, r, ...)`` adds adapter ``name`` (a Python identifier,
  not ``"__base__"``) with its own rank, alpha, dropout and rsLoRA flag, as
  parameters ``lora_A_<name>`` (groups * r, in) and ``lora_B_<name>``
  (groups * og, r) -- the same shapes as the layer's default adapter -- so
  ``lora_state_dict(model)`` saves it and ``lora_state_dict(model,
  adapter=name)`` saves it alone under loralib's plain keys.
- ``active_adapters``: the adapters the forward adds (``set_adapter(name or
  list)``; a list sums them: y = base + sum_k s_k B_k A_k x).  New adapters
  are not active until set.  The ids of a mixed batch (``adapter_ids``)
  count adapters in the order they were added (``adapter_names``).
- ``merge(names=None)`` adds the named (default: active) adapters into the
  base weight; ``unmerge()`` takes every merged adapter out again.
  ``merged_adapters`` lists them; ``merged`` is loralib's flag (eval()
  merges, train() unmerges when ``merge_weights``).  The forward adds the
  active adapters that are not merged.
- ``disable_adapters()``: a context manager under which the forward is the
  base layer's (see its docstring for the merged case).
- PEFT's ``lora_bias`` (Linear layers with a bias): an adapter may have a
  trainable (out,) bias on lora_B -- ``lora_bias`` for "default",
  ``lora_bias_<name>`` for a named one -- that it adds as ``s * lora_bias``
  (PEFT's ``lora_B.bias``); merging adds it into the base bias.

A layer in loralib's state (only "default", active, merged or not, no mixed
batch, no unmerged lora_bias) takes the layers' unchanged fast path (``_plain``); anything else goes
through ``_branch()``, which stacks several active adapters into one rank-R
branch (A stacked by rows, B by columns with each s_k folded in), so the same
fused kernels serve one adapter or many.
"""

import math
import threading
from collections import OrderedDict, namedtuple
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .._arrays import as_generator, non_negative_int, probability, real_number
from ..module import Parameter
from ._grads import GradBuffers
from ._threading import ThreadState, locked
from ._lora_init import BASE_CHANGING, check_init, init_adapter

DEFAULT = "default"
LORA_BIAS = "lora_bias"    # the default adapter's bias on lora_B (PEFT's lora_bias), when it has one
_NAMED_PREFIXES = ("lora_A_", "lora_B_", "lora_bias_")   # a named adapter's parameters
KEEP = object()            # _replace_adapter: leave the adapter's lora_bias as it is
BASE = "__base__"          # the name of "no adapter" in a mixed batch

_TLS = threading.local()   # .batch: this thread's current mixed batch (MixedBatch) or absent
_LOCK = threading.RLock()  # guards the layers' _mixed_users counters and _plain flags

# A mixed batch in progress: ids (rows,) intp of model-level adapter ids (-1:
# none) and, per layer (by id()), the table mapping a model-level id to the
# layer's own adapter index (last entry -1, so that ids == -1 map to -1).
MixedBatch = namedtuple("MixedBatch", ["ids", "tables"])

# The LoRA branch of one forward outside the fast path.  names: the adapters
# it adds; a, b, scaling: the kernel's operands (None, None when no adapter);
# dropout: their dropout probability; params: ((lora_A, lora_B, scaling), ...)
# per adapter; version: the layer's _adapter_version at forward time; bias:
# what the adapters add to every output row (s * lora_bias), None for nothing.
Branch = namedtuple("Branch", ["names", "a", "b", "scaling", "dropout", "params", "version", "bias"],
                    defaults=(None,))


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of one named adapter (rank, alpha, dropout, rsLoRA)."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scaling(self):
        """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (0 when r = 0)."""
        if self.r == 0:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def param_names(name):
    """(lora_A name, lora_B name) of adapter `name`: loralib's for "default"."""
    if name == DEFAULT:
        return "lora_A", "lora_B"
    return f"lora_A_{name}", f"lora_B_{name}"


def bias_param_name(name):
    """The parameter name of adapter `name`'s lora_bias (PEFT's lora_B.bias)."""
    return LORA_BIAS if name == DEFAULT else f"{LORA_BIAS}_{name}"


def check_new_name(name, what="adapter name"):
    """A valid name for a new adapter: a Python identifier other than "__base__"."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if not name.isidentifier() or name == BASE:
        raise ValueError(f"{what} must be a Python identifier other than {BASE!r} (which means 'no "
                         f"adapter' in a mixed batch), got {name!r}")
    return name


def names_list(adapter_names, what="adapter_names"):
    """A str or a sequence of str -> tuple of str (duplicates refused)."""
    if isinstance(adapter_names, str):
        return (adapter_names,)
    try:
        names = tuple(adapter_names)
    except TypeError:
        raise TypeError(f"{what} must be a str or a list of str, got {type(adapter_names).__name__}") from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what} must be a str or a list of str, got an item of type {type(name).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} must not repeat a name, got {list(names)}")
    return names


def current_batch():
    """This thread's mixed batch in progress, or None."""
    return getattr(_TLS, "batch", None)


@contextmanager
def mixed_batch(layers_tables, ids):
    """Run a forward with per-row adapter ids on `layers_tables` ({layer: table}).

    Thread-safe: the ids live in thread-local storage, and each layer only
    counts how many threads run a mixed batch through it (to leave its fast
    path), so other threads' ordinary forwards stay correct meanwhile."""
    previous = current_batch()
    _TLS.batch = MixedBatch(ids, {id(layer): table for layer, table in layers_tables.items()})
    with _LOCK:
        for layer in layers_tables:
            layer._mixed_users += 1
            layer._refresh_plain()
    try:
        yield
    finally:
        with _LOCK:
            for layer in layers_tables:
                layer._mixed_users -= 1
                layer._refresh_plain()
        _TLS.batch = previous


class NamedAdapters(ThreadState):
    """Mixin of LoRALayer: several named adapters on one base weight (module doc).

    A layer class provides ``_adapter_geometry()`` -> (groups, fan_in, og,
    kind) -- adapter A is (groups * r, fan_in), B (groups * og, r), kind
    "linear" or "embedding" (initialisation) --, ``_delta_into(weight, a, b,
    alpha)`` (weight += alpha * delta in its stored layout) and
    ``_mixed_forward``."""

    _named_adapters = True   # layer kinds without named adapters (MoLoRALinear) set False
    _lora_bias_capable = False   # lorac.Linear: its adapters may have PEFT's lora_bias
    use_dora = False         # DoRALinear: one adapter, no named ones (layers/dora.py)

    def _unloaded_class(self):
        """The class of the plain layer unload / merge_and_unload leave in this one's place."""
        return type(self)

    def _init_adapters(self):
        """(Re)set the adapter bookkeeping to "default" only (called by _init_lora)."""
        params = self.__dict__.get("_parameters")
        if params:  # a layer rebuilt from another one drops the old one's named adapters
            for key in [k for k in params if k.startswith(_NAMED_PREFIXES)]:
                del params[key]
        has_default = self.r > 0 and self._adapter_capable()
        self._adapters = OrderedDict([(DEFAULT, None)] if has_default else [])
        self.active_adapters = (DEFAULT,) if has_default else ()
        self.merged_adapters = ()
        self._adapters_disabled = 0
        self._train_on_enable = None   # disable_adapters(): set_adapter's rule to apply on exit, if called inside
        self._mixed_users = 0
        self._adapter_version = 0
        self._plain = True
        self._frozen_lora_b = set()   # adapters whose lora_B never trains (MiCA)

    def _adapter_capable(self):
        """Can this layer hold an adapter at all (MergedLinear: some group enabled)?"""
        return True

    # -- queries ------------------------------------------------------------
    @property
    def adapter_names(self):
        """The layer's adapters in the order they were added (their mixed-batch ids)."""
        return tuple(self._adapters)

    def adapter_config(self, name):
        """AdapterConfig of adapter `name` ("default": from the layer's loralib attributes)."""
        self._require_adapter(name)
        if name == DEFAULT:
            return AdapterConfig(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora)
        return self._adapters[name]

    def adapter_parameters(self, name):
        """(lora_A, lora_B) Parameters of adapter `name`."""
        self._require_adapter(name)
        a_name, b_name = param_names(name)
        return self._parameters[a_name], self._parameters[b_name]

    def _require_adapter(self, name):
        if name not in self._adapters:
            raise ValueError(f"{type(self).__name__} has no adapter {name!r}; it has {list(self._adapters)}")

    def _scaling_of(self, name):
        return self.scaling if name == DEFAULT else self._adapters[name].scaling

    def _dropout_of(self, name):
        return self.lora_dropout if name == DEFAULT else self._adapters[name].lora_dropout

    def adapter_owned_parameters(self, name):
        """Every Parameter of adapter `name`: lora_A, lora_B, its lora_bias if any, and for
        "default" a DoRA layer's lora_magnitude_vector (what PEFT's set_adapter trains or freezes)."""
        owned = list(self.adapter_parameters(name))
        owned += [p for p in (self.lora_bias_parameter(name),
                              self._parameters.get("lora_magnitude_vector") if name == DEFAULT else None)
                  if p is not None]
        return owned

    def lora_bias_parameter(self, name=DEFAULT):
        """The Parameter ``lora_bias`` (out,) of adapter `name` (PEFT's lora_bias), or None."""
        return self._parameters.get(bias_param_name(name))

    def _has_lora_bias(self):
        return any(self.lora_bias_parameter(name) is not None for name in self._adapters)

    # -- state changes --------------------------------------------------------
    def _refresh_plain(self):
        """Recompute whether loralib's fast path applies (see the module doc)."""
        default = (DEFAULT,) if DEFAULT in self._adapters else ()
        # an unmerged lora_bias takes the branch path, which adds it (Branch.bias)
        bias_pending = LORA_BIAS in self._parameters and self.merged_adapters != default
        with _LOCK:  # against a mixed batch starting or ending in another thread
            self._plain = (not self._adapters_disabled and not self._mixed_users and self.active_adapters == default
                           and self.merged_adapters in ((), default) and not bias_pending)

    def _changed(self):
        """Any change of adapters, activity or merging: a pending backward of a
        forward outside the fast path refuses to run (see _stale_branch)."""
        self._adapter_version += 1
        self._refresh_plain()

    @locked
    def add_adapter(self, name, r, lora_alpha=1, lora_dropout=0.0, use_rslora=False, init="kaiming", rng=None,
                    init_std=None, lora_bias=False):
        """Add adapter `name` of rank r (>= 1) with its own alpha, dropout and rsLoRA flag.

        init, init_std: how it starts (layers/_lora_init.py): 'kaiming' (the
        layer's constructor init: Linear / MergedLinear A kaiming-uniform and
        B zero, Embedding A zero and B N(0, 1); a no-op adapter), 'gaussian'
        (A ~ N(0, init_std^2), default 0.01; B zero), 'zeros_A', 'pissa' (A, B
        from the top-r SVD of the base weight, which becomes the residual;
        only on a layer with no other adapter, unmerged), 'olora' (the same
        with the QR factorisation), 'orthogonal' (B A = 0, both random), or PEFT's True
        ('kaiming') / False (both random: a non-trivial adapter, for tests).  rng: seed or
        Generator (default: the layer's).  The base weight is frozen (as in
        any LoRA layer).  The adapter is not active until ``set_adapter``,
        which also makes it trainable: until then it is frozen, as PEFT's.
        lora_bias: PEFT's, as ``Linear(lora_bias=True)`` (a Linear layer with
        a bias; init 'kaiming' or False), as parameter ``lora_bias_<name>``.
        "default" is the constructor's adapter and cannot be added."""
        check_new_name(name)
        if name == DEFAULT:
            raise ValueError(f"{DEFAULT!r} is the constructor's adapter (loralib's lora_A / lora_B): build "
                             "the layer with r > 0 or use lorac.inject_lora; give the new adapter another name")
        if name in self._adapters:
            raise ValueError(f"{type(self).__name__} already has an adapter {name!r}")
        r = non_negative_int(r, "r")
        if r == 0:
            raise ValueError("r must be >= 1 for an adapter, got 0")
        config = AdapterConfig(r, real_number(lora_alpha, "lora_alpha"), probability(lora_dropout, "lora_dropout"),
                               _checked_bool(use_rslora, "use_rslora"))
        groups, fan_in, og, kind = self._adapter_geometry()
        if kind == "embedding" and config.lora_dropout:
            raise ValueError(f"lora_dropout must be 0 for an Embedding adapter (loralib's Embedding has no "
                             f"dropout), got {config.lora_dropout}")
        if not self._adapter_capable():
            raise ValueError(f"{type(self).__name__} with enable_lora={list(self.enable_lora)} has no group "
                             "to adapt")
        func = f"{type(self).__name__}.add_adapter"
        spec = check_init(init, init_std, func)
        if _checked_bool(lora_bias, "lora_bias"):
            self._check_lora_bias_allowed(func, spec)
        if spec.name in BASE_CHANGING:
            self._check_base_change_allowed(spec, func, others=tuple(self._adapters))
        gen = self.rng if rng is None else as_generator(rng)
        start = self._start_arrays(spec, r, config.scaling, gen, func)   # everything checked: now change
        a_name, b_name = param_names(name)
        self.register_parameter(a_name, Parameter(start.lora_A, requires_grad=False))   # inactive: frozen
        self.register_parameter(b_name, Parameter(start.lora_B, requires_grad=False))
        if lora_bias:
            self._register_lora_bias(name, spec, r, gen, requires_grad=False)
        self._adapters[name] = config
        self._follow_init(name, spec)
        weight = self._parameters["weight"]
        if start.weight is not None:
            weight.data[...] = start.weight
        weight.requires_grad = False
        weight.grad = None
        self._changed()
        return self

    @locked
    def reset_adapter(self, name=DEFAULT, init="kaiming", init_std=None, rng=None):
        """Re-initialise adapter `name`'s lora_A / lora_B in place with `init` (see add_adapter).

        With init='pissa' / 'olora' the current base weight W0 is factored and replaced by
        W0 - scaling * B A: load the pretrained weights first.  They need an
        unmerged layer whose only adapter is `name`.  A merged adapter is
        unmerged with its old values and merged with the new ones.  Gradients of the two
        parameters are dropped; an optimizer's state for them (Adam moments) is
        not reset -- build the optimizer after this call."""
        func = f"{type(self).__name__}.reset_adapter"
        self._require_adapter(name)
        spec = check_init(init, init_std, func)
        if spec.name in BASE_CHANGING:
            self._check_base_change_allowed(spec, func, others=tuple(n for n in self._adapters if n != name))
        config = self.adapter_config(name)
        gen = self.rng if rng is None else as_generator(rng)
        start = self._start_arrays(spec, config.r, config.scaling, gen, func)
        lora_bias = self.lora_bias_parameter(name)
        bias_start = None if lora_bias is None else lora_bias_start(spec, config.r, gen, lora_bias.shape,
                                                                     self.dtype)
        # everything checked: a merged adapter leaves the base weight (and bias) while its values change
        merged = self.merged_adapters if name in self.merged_adapters else ()
        if merged:
            self.unmerge()
        lora_a, lora_b = self.adapter_parameters(name)
        lora_a.data[...], lora_b.data[...] = start.lora_A, start.lora_B
        lora_a.grad = lora_b.grad = None
        if lora_bias is not None:
            lora_bias.data[...] = bias_start
            lora_bias.grad = None
        if start.weight is not None:   # 'pissa' / 'olora': only on an unmerged layer (checked above)
            self._parameters["weight"].data[...] = start.weight
        self._follow_init(name, spec)
        if merged:
            self.merge(merged)
        self._changed()
        return self

    def _register_lora_bias(self, name, spec, r, rng, requires_grad=True):
        """Give adapter `name` (rank r, initialised as ``spec`` says) a new lora_bias, started by
        lora_bias_start; the fast-path flag follows (the caller has checked _check_lora_bias_allowed)."""
        out = self._adapter_geometry()[2]
        self.register_parameter(bias_param_name(name), Parameter(lora_bias_start(spec, r, rng, (out,), self.dtype),
                                                                 requires_grad=requires_grad))
        self._refresh_plain()

    def _check_lora_bias_allowed(self, func, spec=None):
        """lora_bias: a plain Linear layer (one group) with a bias, PEFT's inits True / False only
        (``spec``: the adapter's checked init; None: a loaded lora_bias, no init to check)."""
        if not self._lora_bias_capable or self.use_dora:
            raise ValueError(f"{func}: lora_bias=True is for Linear layers (as PEFT's), not a {type(self).__name__}")
        if self._parameters.get("bias") is None:
            raise ValueError(f"{func}: lora_bias=True needs the layer's bias (merging adds scaling * lora_bias "
                             "into it); this layer has none")
        if spec is not None and spec.name not in ("kaiming", "random"):
            raise ValueError(f"{func}: lora_bias=True takes init 'kaiming' (True) or False only, as PEFT's, "
                             f"got init={spec.name!r}")

    def _check_base_change_allowed(self, spec, func, others):
        """For an init that factors the base weight and replaces it by the residual ('pissa', 'olora')."""
        if self.merged_adapters:
            raise ValueError(f"{func}: init={spec.name!r} factors the unmerged base weight, but adapters "
                             f"{list(self.merged_adapters)} are merged into it; unmerge first (train())")
        if others:
            raise ValueError(f"{func}: init={spec.name!r} replaces the shared base weight by W0 - scaling * B A, "
                             f"which would change what the layer's other adapters {list(others)} compute; use it "
                             "on a layer with no other adapter")

    def _start_arrays(self, spec, r, scaling, rng, func):
        """AdapterInit (lora_A, lora_B, new weight or None) of a new rank-r adapter (layers/_lora_init.py)."""
        _, fan_in, og, kind = self._adapter_geometry()
        starts, out_rows, transposed = self._weight_layout()
        return init_adapter(spec, r, fan_in, og, kind=kind, block_starts=starts, out_features=out_rows,
                            weight=self._parameters["weight"].data, scaling=scaling, transposed=transposed,
                            rng=rng, dtype=self.dtype, func=func)

    @locked
    def set_adapter(self, adapter_names, inference_mode=False):
        """Make `adapter_names` (a name or a list, summed) the active adapters.

        As PEFT's: the active adapters' parameters become trainable (frozen
        with ``inference_mode``) and every other adapter's frozen.  A merged
        layer (eval() with merge_weights) stays merged: the old adapters are
        unmerged and the new ones merged."""
        names = names_list(adapter_names)
        for name in names:
            self._require_adapter(name)
        inference_mode = _checked_bool(inference_mode, "inference_mode")
        if self._adapters_disabled:   # frozen until disable_adapters() ends, which then applies this rule
            self._train_on_enable = not inference_mode
            self.active_adapters = names
            self._changed()
            return self
        self._train_only(names, not inference_mode)
        was_merged = self.merged
        self.unmerge()
        self.active_adapters = names
        if was_merged:
            self.merge()
        self._changed()
        return self

    def _train_only(self, names, trainable=True):
        """requires_grad = trainable for adapters `names`, False for every other adapter (and for the
        parameters an adapter never trains, MiCA's lora_B)."""
        frozen = self.frozen_adapter_parameters()
        for name in self._adapters:
            for param in self.adapter_owned_parameters(name):
                param.requires_grad = trainable and name in names and id(param) not in frozen

    def frozen_adapter_parameters(self):
        """{id(Parameter)} of the adapter parameters that never train (MiCA's lora_B; PEFT's frozen
        peft weights)."""
        return {id(self.adapter_parameters(name)[1]) for name in self._frozen_lora_b}

    def _follow_init(self, name, spec):
        """After adapter `name` started with `spec`: MiCA ('mica') trains lora_A only, so its lora_B is
        frozen and stays so; any other init lifts that (lora_B trains as lora_A does)."""
        lora_a, lora_b = self.adapter_parameters(name)
        if spec.name == "mica":
            self._frozen_lora_b.add(name)
            lora_b.requires_grad = False
            lora_b.grad = None
        elif name in self._frozen_lora_b:
            self._frozen_lora_b.discard(name)
            lora_b.requires_grad = lora_a.requires_grad

    @locked
    def delete_adapter(self, name):
        """Remove adapter `name` and its parameters.  "default", an active
        adapter or a merged one cannot be deleted (set_adapter / unmerge first)."""
        if name == DEFAULT:
            raise ValueError(f"{DEFAULT!r} holds loralib's lora_A / lora_B and cannot be deleted (zero it, load "
                             "another adapter into it, or lorac.unload the model)")
        self._require_adapter(name)
        if name in self.active_adapters:
            raise ValueError(f"adapter {name!r} is active; set_adapter() to other adapters before deleting it")
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge() before deleting it")
        for pname in param_names(name) + (bias_param_name(name),):
            self._parameters.pop(pname, None)
        del self._adapters[name]
        self._frozen_lora_b.discard(name)
        self._changed()
        return self

    @contextmanager
    def disable_adapters(self):
        """Context manager: the forward is the base layer's (no adapter at all).

        Merged adapters are unmerged on entry and merged again on exit, so the
        outputs are those of the base weight exactly when nothing was merged,
        and within the rounding of one merge / unmerge round trip otherwise
        (as PEFT).  Nested uses are fine; train()/eval() inside keep the
        weight unmerged and take effect on exit.  As PEFT's, the adapters'
        parameters are frozen inside; on exit each gets back the
        requires_grad it had on entry (set_adapter inside: its rule)."""
        if self._adapters_disabled:
            self._adapters_disabled += 1
            try:
                yield self
            finally:
                self._adapters_disabled -= 1
            return
        merged, was_merged, training = self.merged_adapters, self.merged, self.training
        owned = [p for name in self._adapters for p in self.adapter_owned_parameters(name)]
        trainable = [p.requires_grad for p in owned]
        self.unmerge()
        self._adapters_disabled = 1
        self._train_on_enable = None   # set_adapter inside: whether its adapters train on exit
        for param in owned:
            param.requires_grad = False
        self._changed()
        try:
            yield self
        finally:
            self._adapters_disabled = 0
            if self._train_on_enable is None:
                for param, flag in zip(owned, trainable):
                    param.requires_grad = flag
            else:
                self._train_only(self.active_adapters, self._train_on_enable)
            self._changed()
            if self.training != training and self.merge_weights:
                if not self.training:   # eval() inside: merge now, as eval() would have
                    self.merge()
            elif was_merged:
                self.merge(merged)

    # -- merging --------------------------------------------------------------
    @locked
    def merge(self, adapter_names=None):
        """Add s_k B_k A_k of the named adapters (default: the active ones) into
        the base weight; adapters already merged are skipped."""
        names = self.active_adapters if adapter_names is None else names_list(adapter_names)
        for name in names:
            self._require_adapter(name)
        if self._adapters_disabled:
            raise RuntimeError(f"{type(self).__name__}.merge(): adapters are disabled (inside disable_adapters())")
        todo = tuple(n for n in names if n not in self.merged_adapters)
        self.merged = True
        if todo:
            for name in todo:
                self._apply_adapter_delta(self._parameters["weight"].data, name, +1)
                self._apply_bias_delta(name, +1)
            self.merged_adapters = self.merged_adapters + todo
            self._cache = None  # the weight changed under the cached forward
            self._changed()

    @locked
    def unmerge(self):
        """Subtract every merged adapter from the base weight (no-op when none)."""
        self.merged = False
        if self.merged_adapters:
            for name in reversed(self.merged_adapters):
                self._apply_adapter_delta(self._parameters["weight"].data, name, -1)
                self._apply_bias_delta(name, -1)
            self.merged_adapters = ()
            self._cache = None
            self._changed()

    def _apply_adapter_delta(self, weight, name, sign):
        """weight += sign * s B A of adapter `name` (weight in its stored layout)."""
        a_name, b_name = param_names(name)
        scaling = self._scaling_of(name)
        if scaling:
            self._delta_into(weight, self._parameters[a_name].data, self._parameters[b_name].data, sign * scaling)

    def _apply_bias_delta(self, name, sign, bias=None):
        """bias (default: the base bias's array) += sign * s * lora_bias of adapter `name` (no-op without one)."""
        lora_bias = self.lora_bias_parameter(name)
        if lora_bias is None:
            return
        if bias is None:
            bias = self._parameters["bias"].data
        bias += bias.dtype.type(sign * self._scaling_of(name)) * lora_bias.data

    # -- state dicts (the weight is always saved unmerged) ---------------------
    def _state_items(self):
        merged = self.merged_adapters
        for name, value in super()._state_items():
            if name == "weight" and merged:
                value = value.copy()
                for adapter in reversed(merged):
                    self._apply_adapter_delta(value, adapter, -1)
            elif name == "bias" and merged and self._has_lora_bias():
                value = value.copy()
                for adapter in reversed(merged):
                    self._apply_bias_delta(adapter, -1, value)
            yield name, value

    @locked
    def _load_state_items(self, values, assign=False):
        """Loading equals: take the merged adapters whose arrays change out of
        the weight (all of them when the weight itself changes), copy, merge
        them again.  An unmerged adapter is a plain in-place copy.  With
        assign, a new weight is unmerged (as saved) and the merged adapters
        go into it, so it is copied first: merging must not write into an
        array the caller (or another model) still holds.  A merged lora_bias:
        unmerge, load, merge again (the base bias holds it)."""
        if self.merged_adapters and values and self._has_lora_bias():
            merged = self.merged_adapters
            if assign:   # merging writes into the new weight and bias
                values = {k: (v.copy() if k in ("weight", "bias") else v) for k, v in values.items()}
            self.unmerge()
            try:
                return self._load_state_items(values, assign)
            finally:
                self.merge(merged)
        touched = set()
        for name in values:
            if name == "weight":
                touched.update(self.merged_adapters)
            for adapter in self.merged_adapters:
                if name in param_names(adapter):
                    touched.add(adapter)
        redo = tuple(n for n in self.merged_adapters if n in touched)
        if assign and "weight" in values and redo:
            values = {**values, "weight": values["weight"].copy()}
        if not (assign and "weight" in values):  # an assigned weight replaces the merged one whole
            for adapter in reversed(redo):
                self._apply_adapter_delta(self._parameters["weight"].data, adapter, -1)
        super()._load_state_items(values, assign)
        for adapter in redo:
            self._apply_adapter_delta(self._parameters["weight"].data, adapter, +1)
        if redo:
            self._cache = None

    @locked
    def _replace_adapter(self, name, a, b, config=None, lora_bias=KEEP):
        """Hot swap: adapter `name` takes arrays a, b (and config, if given;
        lora_bias: its new lora_bias (out,), None for none, KEEP: unchanged).

        Same shapes: copied in place (no reallocation); a merged adapter is
        unmerged with its old values and merged with the new ones.  Other
        shapes (another rank): new Parameters, keeping requires_grad.  For
        "default" the layer's r / lora_alpha / scaling / use_rslora follow."""
        A, B = self.adapter_parameters(name)
        merged = name in self.merged_adapters
        weight = self._parameters["weight"].data
        if merged:
            self._apply_adapter_delta(weight, name, -1)
            self._apply_bias_delta(name, -1)
        if A.shape == a.shape and B.shape == b.shape:
            np.copyto(A.data, a, casting="unsafe")
            np.copyto(B.data, b, casting="unsafe")
        else:
            a_name, b_name = param_names(name)
            for pname, old, value in ((a_name, A, a), (b_name, B, b)):
                self.register_parameter(pname, Parameter(np.array(value, dtype=self.dtype),
                                                         requires_grad=old.requires_grad))
        if config is not None:
            if name == DEFAULT:
                self.r, self.lora_alpha, self.use_rslora = config.r, config.lora_alpha, config.use_rslora
                self.lora_dropout = config.lora_dropout
                self.scaling = config.scaling
            else:
                self._adapters[name] = config
        if lora_bias is not KEEP:
            self._set_lora_bias(name, lora_bias, A.requires_grad)
        if merged:
            self._apply_adapter_delta(weight, name, +1)
            self._apply_bias_delta(name, +1)
        self._changed()

    def _set_lora_bias(self, name, value, requires_grad):
        """Adapter `name`'s lora_bias becomes ``value`` (copied into the existing one, or new), or
        goes away for None; the fast-path flag follows."""
        pname = bias_param_name(name)
        current = self._parameters.get(pname)
        if value is None:
            self._parameters.pop(pname, None)
        elif current is not None:
            np.copyto(current.data, value, casting="unsafe")
        else:
            self.register_parameter(pname, Parameter(np.array(value, dtype=self.dtype), requires_grad=requires_grad))

    # -- the forward outside the fast path --------------------------------------
    def _branch(self):
        """The Branch the forward adds: active, unmerged adapters (none when disabled)."""
        names = () if self._adapters_disabled else tuple(
            n for n in self.active_adapters if n not in self.merged_adapters)
        if not names:
            return Branch((), None, None, 0.0, 0.0, (), self._adapter_version)
        bias = None
        for name in names:   # PEFT's lora_bias: s_k * lora_bias_k of each adapter that has one
            lora_bias = self.lora_bias_parameter(name)
            if lora_bias is not None:
                term = lora_bias.data * lora_bias.data.dtype.type(self._scaling_of(name))
                bias = term if bias is None else bias + term
        params = []
        for name in names:
            a_name, b_name = param_names(name)
            params.append((self._parameters[a_name], self._parameters[b_name], self._scaling_of(name)))
        dropouts = [self._dropout_of(n) for n in names]
        if len(names) == 1:
            A, B, scaling = params[0]
            return Branch(names, A.data, B.data, scaling, dropouts[0], tuple(params), self._adapter_version, bias)
        if self.training and len(set(dropouts)) > 1:
            raise ValueError(f"{type(self).__name__}: the active adapters {list(names)} have different "
                             f"lora_dropout {dropouts}; training several adapters at once draws one dropout "
                             "mask, so they must agree")
        a, b = self._stacked(params)
        return Branch(names, a, b, 1.0, dropouts[0], tuple(params), self._adapter_version, bias)

    def _stacked(self, params):
        """Several adapters as one: A (groups * R, in) with each group's rows
        stacked, B (groups * og, R) with s_k B_k stacked by columns (R = sum r_k)."""
        groups, fan_in, og, _ = self._adapter_geometry()
        a = np.concatenate([A.data.reshape(groups, -1, fan_in) for A, _, _ in params], axis=1)
        b = np.concatenate([(B.data * B.data.dtype.type(s)).reshape(groups, og, -1) for _, B, s in params], axis=2)
        return a.reshape(-1, fan_in), b.reshape(groups * og, -1)

    @contextmanager
    def _branch_grads(self, branch):
        """Gradient buffers {grad_lora_A, grad_lora_B} for the backward of `branch`.

        One adapter: its own .grad arrays (GradBuffers).  Several: stacked
        temporaries, split into each trainable adapter's .grad on success
        (dA_k: its rows; dB_k = s_k * its columns, since B was stacked as s_k B_k)."""
        if len(branch.params) <= 1:
            A, B = branch.params[0][:2] if branch.params else (None, None)
            with GradBuffers({"grad_lora_A": A, "grad_lora_B": B}) as buffers:
                yield buffers
            return
        want_a = any(A.requires_grad for A, _, _ in branch.params)
        want_b = any(B.requires_grad for _, B, _ in branch.params)
        buffers = {"grad_lora_A": np.zeros_like(branch.a) if want_a else None,
                   "grad_lora_B": np.zeros_like(branch.b) if want_b else None}
        yield buffers
        groups, fan_in, og, _ = self._adapter_geometry()
        offset = 0
        for A, B, s in branch.params:
            r = A.shape[0] // groups
            if want_a and A.requires_grad:
                da = buffers["grad_lora_A"].reshape(groups, -1, fan_in)[:, offset:offset + r]
                A.grad_buffer()[...] += da.reshape(A.shape)
            if want_b and B.requires_grad:
                db = buffers["grad_lora_B"].reshape(groups, og, -1)[:, :, offset:offset + r]
                B.grad_buffer()[...] += db.reshape(B.shape) * db.dtype.type(s)
            offset += r

    def _stale_branch(self):
        """backward() of a forward outside the fast path after the adapters changed."""
        raise RuntimeError(f"{type(self).__name__}.backward(): the layer's adapters changed (set_adapter, "
                           "merge, add/delete_adapter, disable_adapters, ...) between forward() and "
                           "backward(); run forward() again")

    # -- mixed batches ------------------------------------------------------------
    def _mixed_row_ids(self, lead_shape):
        """This layer's adapter index per flattened input row, when this thread
        runs a mixed batch through it; None otherwise."""
        batch = current_batch()
        table = None if batch is None else batch.tables.get(id(self))
        if table is None:
            return None
        if self.training:
            raise RuntimeError(f"{type(self).__name__}: a mixed batch (adapter_names / adapter_ids) is for "
                               "inference only; call model.eval() first")
        if self.merged_adapters:
            raise RuntimeError(f"{type(self).__name__}: adapters {list(self.merged_adapters)} are merged into the "
                               "base weight; a mixed batch needs unmerged adapters (lorac.unmerge_adapter(model))")
        rows = batch.ids.shape[0]
        if len(lead_shape) == 0 or lead_shape[0] != rows:
            raise ValueError(f"{type(self).__name__}: the mixed batch has {rows} rows (adapter ids) but this "
                             f"layer's input has leading shape {tuple(lead_shape)}; its first axis must be the "
                             "batch")
        ids = table[batch.ids]
        per_row = int(np.prod(lead_shape[1:], dtype=np.int64))
        return ids if per_row == 1 else np.repeat(ids, per_row)

    def _add_mixed_lora_biases(self, y, ids):
        """y (rows, out) += s_k * lora_bias_k on the rows of adapter k (ids: layer indices), in place."""
        for index, name in enumerate(self._adapters):
            lora_bias = self.lora_bias_parameter(name)
            if lora_bias is not None:
                y[ids == index] += lora_bias.data * y.dtype.type(self._scaling_of(name))

    def _lora_bias_grads(self, branch, g2):
        """d(s_k lora_bias_k) = s_k * the sum of grad_output's rows, for each trainable lora_bias of
        the branch's adapters (after the kernels succeeded)."""
        if branch.bias is None:
            return
        total = None
        for name in branch.names:
            lora_bias = self.lora_bias_parameter(name)
            if lora_bias is not None and lora_bias.requires_grad:
                total = g2.sum(axis=0) if total is None else total
                lora_bias.grad_buffer()[...] += total * g2.dtype.type(self._scaling_of(name))

    def _mixed_operands(self):
        """(lora_As, lora_Bs, scalings) of every adapter, in adapter-id order."""
        As, Bs, scalings = [], [], []
        for name in self._adapters:
            a_name, b_name = param_names(name)
            As.append(self._parameters[a_name].data)
            Bs.append(self._parameters[b_name].data)
            scalings.append(self._scaling_of(name))
        return As, Bs, scalings


def lora_bias_start(spec, r, rng, shape, dtype):
    """A new lora_bias: zeros (PEFT's init True), or PEFT's nn.Linear bias draw U(-1/sqrt(r), 1/sqrt(r))
    under its init False ('random')."""
    if spec.name == "random":
        return rng.uniform(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r), size=shape).astype(dtype)
    return np.zeros(shape, dtype)


def _checked_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)

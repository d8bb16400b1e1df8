"""Parameter and Module: a small, explicit-gradient take on torch.nn.Module.

A Module's attributes that are Parameters or Modules register themselves, so
``named_parameters()``, ``state_dict()`` and friends see them with torch's
dotted names; ``register_buffer`` adds arrays that are state but not
parameters (saved unless ``persistent=False``, never trained).  Gradients
are explicit: ``forward`` keeps what ``backward`` needs;
``backward(grad_output)`` returns the input's gradient and accumulates
``Parameter.grad`` for parameters with ``requires_grad``.
"""

import copy
from collections import OrderedDict, namedtuple
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np

from . import _hooks
from ._device import parse_to_arguments

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class StateDictKeyError(KeyError):
    """Strict load_state_dict found missing or unexpected keys (lists in the message)."""

    def __init__(self, message, missing_keys, unexpected_keys):
        super().__init__(message)
        self.missing_keys = missing_keys
        self.unexpected_keys = unexpected_keys

    def __str__(self):
        return self.args[0]


class Parameter:
    """A trainable array: ``data`` (C-contiguous ndarray), ``requires_grad``, ``grad``.

    ``grad`` is None until a backward pass accumulates into it; a parameter
    with ``requires_grad=False`` never gets a gradient array.
    """

    __slots__ = ("data", "requires_grad", "grad")

    def __init__(self, data, requires_grad=True):
        data = np.require(np.asarray(data), requirements=["C", "A", "W"])
        if data.dtype.kind not in "fiu":
            raise TypeError(f"Parameter data must be a numeric array, got dtype {data.dtype}")
        self.data = data
        self.requires_grad = bool(requires_grad)
        self.grad = None

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    nbytes = property(lambda self: self.data.nbytes)

    def numpy(self):
        return self.data

    def numel(self):
        """The number of scalars (torch's Tensor.numel(); NumPy's ``size``)."""
        return self.data.size

    def __array__(self, dtype=None, copy=None):
        if dtype is None or np.dtype(dtype) == self.data.dtype:
            return self.data.copy() if copy else self.data
        return self.data.astype(dtype)

    def requires_grad_(self, requires_grad=True):
        """Set requires_grad in place and return self, as torch's Tensor.requires_grad_."""
        self.requires_grad = bool(requires_grad)
        return self

    def grad_buffer(self):
        """The gradient accumulator, allocated (zeros) on first use."""
        if self.grad is None:
            self.grad = np.zeros_like(self.data)
        return self.grad

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"


class Module:
    """Base class of lorac layers, mirroring torch.nn.Module's bookkeeping."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent_buffers", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration ---------------------------------------------------
    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        modules = self.__dict__.get("_modules")
        buffers = self.__dict__.get("_buffers")
        if params is not None and name not in params and name not in modules and name not in buffers \
                and not isinstance(value, (Parameter, Module)):
            object.__setattr__(self, name, value)  # plain attribute: the common, fast case
            return
        if params is None:
            raise AttributeError(f"call Module.__init__() before assigning attributes ({name!r})")
        if isinstance(value, Parameter):
            self._forget_name(name, params)
            params[name] = value
        elif isinstance(value, Module):
            self._forget_name(name, modules)
            modules[name] = value
        elif name in buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"cannot assign {type(value).__name__} as buffer {name!r} "
                                "(expected a numpy.ndarray or None)")
            buffers[name] = None if value is None else _checked_buffer(name, value)
        elif name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as parameter {name!r} "
                                "(expected a lorac.Parameter or None)")
            params[name] = None
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as child module {name!r} "
                                "(expected a lorac.Module or None)")
            modules[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        if "_parameters" in d and name in d["_parameters"]:
            return d["_parameters"][name]
        if "_modules" in d and name in d["_modules"]:
            return d["_modules"][name]
        if "_buffers" in d and name in d["_buffers"]:
            return d["_buffers"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._modules:
            del self._modules[name]
        elif name in self._buffers:
            del self._buffers[name]
            self._non_persistent_buffers.discard(name)
        else:
            object.__delattr__(self, name)

    def _forget_name(self, name, keep):
        """Drop `name` as a plain attribute and from every registry but `keep`,
        the one it is about to be set in (where it keeps its place, as in torch)."""
        self.__dict__.pop(name, None)
        for registry in (self._parameters, self._modules, self._buffers):
            if registry is not keep:
                registry.pop(name, None)
        self._non_persistent_buffers.discard(name)

    def _copy_sharing_contents(self, parameters, cls=None):
        """A new instance of this module's class (or of `cls`) with its
        attributes, children and buffers, but registries of its own, holding
        `parameters` ((name, Parameter) pairs): a layer rebuilt around the
        same arrays."""
        new = object.__new__(type(self) if cls is None else cls)
        new.__dict__.update(self.__dict__)
        new.__dict__["_parameters"] = OrderedDict(parameters)
        new.__dict__["_modules"] = OrderedDict(self._modules)
        new.__dict__["_buffers"] = OrderedDict(self._buffers)
        new.__dict__["_non_persistent_buffers"] = set(self._non_persistent_buffers)
        return new

    def _name_taken(self, name, keep):
        """Whether `name` is already an attribute, a method or an entry of a
        registry other than `keep` (where re-registering it is allowed)."""
        if name in keep:
            return False
        return (any(name in registry for registry in (self._parameters, self._modules, self._buffers)) or
                hasattr(type(self), name) or name in self.__dict__)

    def register_parameter(self, name, param):
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter({name!r}): expected a lorac.Parameter or None, "
                            f"got {type(param).__name__}")
        self._forget_name(name, self._parameters)
        self._parameters[name] = param

    def add_module(self, name, module):
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module({name!r}): expected a lorac.Module or None, got {type(module).__name__}")
        self._forget_name(name, self._modules)
        self._modules[name] = module

    def register_buffer(self, name, array, persistent=True):
        """Register `array` (a numpy.ndarray, or None) as state that is not a parameter,
        as torch's register_buffer: reachable as an attribute, listed by
        named_buffers(), cast by to(dtype) when floating-point, and saved in
        state_dict() (and loaded by load_state_dict) unless persistent=False.
        The array is kept as given (not copied) when C-contiguous and writable."""
        if not isinstance(name, str):
            raise TypeError(f"register_buffer: name must be a str, got {type(name).__name__}")
        if not name or "." in name:
            raise KeyError(f"register_buffer: name must be a non-empty str without '.', got {name!r}")
        if "_buffers" not in self.__dict__:
            raise AttributeError(f"call Module.__init__() before register_buffer({name!r})")
        if self._name_taken(name, self._buffers):
            raise KeyError(f"register_buffer: attribute {name!r} already exists")
        if array is not None and not isinstance(array, np.ndarray):
            raise TypeError(f"register_buffer({name!r}): expected a numpy.ndarray or None, "
                            f"got {type(array).__name__}")
        self._buffers[name] = None if array is None else _checked_buffer(name, array)
        if persistent:
            self._non_persistent_buffers.discard(name)
        else:
            self._non_persistent_buffers.add(name)

    # -- traversal ------------------------------------------------------
    def named_children(self):
        for name, module in self._modules.items():
            if module is not None:
                yield name, module

    def children(self):
        for _, module in self.named_children():
            yield module

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        """(dotted path, module) of this module and then every descendant, depth
        first, as torch's: a module reached by two paths is listed once (at
        the first) unless remove_duplicate=False; `memo` is the set of modules
        already listed."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(memo, f"{prefix}.{name}" if prefix else name, remove_duplicate)

    def modules(self, remove_duplicate=True):
        for _, module in self.named_modules(remove_duplicate=remove_duplicate):
            yield module

    def get_submodule(self, target):
        """The module at dotted path `target` ("" is this module), as in torch."""
        if not isinstance(target, str):
            raise TypeError(f"get_submodule: target must be a dotted str path, got {type(target).__name__}")
        module, walked = self, []
        for name in target.split(".") if target else []:
            child = module._modules.get(name)
            if child is None:
                owner = f"{_where('.'.join(walked))} ({type(module).__name__})"
                if module._parameters.get(name) is not None:
                    raise AttributeError(f"get_submodule({target!r}): {name!r} is a parameter of {owner}, "
                                         "not a module")
                raise AttributeError(f"get_submodule({target!r}): {name!r} is not a child of {owner}, whose "
                                     f"children are {[n for n, _ in module.named_children()]}")
            module = child
            walked.append(name)
        return module

    def get_parameter(self, target):
        """The Parameter at dotted path `target` (e.g. "0.lora_A"), as in torch."""
        return self._get_registered("get_parameter", "parameter", "_parameters", target)

    def get_buffer(self, target):
        """The buffer at dotted path `target` (e.g. "0.mask"), as in torch."""
        return self._get_registered("get_buffer", "buffer", "_buffers", target)

    def _get_registered(self, method, kind, registry, target):
        """The entry of `registry` (a module's "_parameters" or "_buffers") at dotted path `target`."""
        if not isinstance(target, str):
            raise TypeError(f"{method}: target must be a dotted str path, got {type(target).__name__}")
        module_path, _, name = target.rpartition(".")
        module = self.get_submodule(module_path)
        entries = getattr(module, registry)
        value = entries.get(name)
        if value is None:
            raise AttributeError(f"{method}({target!r}): {name!r} is not a {kind} of {_where(module_path)} "
                                 f"({type(module).__name__}), whose {kind}s are "
                                 f"{[n for n, v in entries.items() if v is not None]}")
        return value

    def apply(self, fn):
        """Call fn on every child module, recursively, then on this one; returns self (torch's order)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        """(dotted name, array) of every buffer, as torch's named_buffers: each
        array once unless remove_duplicate=False."""
        return self._named_registered("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse=True):
        for _, array in self.named_buffers(recurse=recurse):
            yield array

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        """(dotted name, Parameter) of every parameter, as torch's
        named_parameters: a shared (tied) one once, under its first name,
        unless remove_duplicate=False."""
        return self._named_registered("_parameters", prefix, recurse, remove_duplicate)

    def _named_registered(self, registry, prefix, recurse, remove_duplicate):
        """(dotted name, value) of every non-None entry of each module's
        `registry`, each object once when remove_duplicate."""
        seen = set()
        modules = self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate) if recurse \
            else [(prefix, self)]
        for module_prefix, module in modules:
            for name, value in getattr(module, registry).items():
                if value is None or (remove_duplicate and id(value) in seen):
                    continue
                seen.add(id(value))
                yield (f"{module_prefix}.{name}" if module_prefix else name), value

    def parameters(self, recurse=True):
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    # -- state dicts ----------------------------------------------------
    def _state_items(self):
        """(local name, array) of this module's own state, in registration order:
        parameters, then persistent buffers (torch's order).

        The arrays are the live parameter data (like torch's detached tensors);
        layers whose stored weight differs from the canonical one (a merged
        LoRA layer) override this."""
        for name, param in self._parameters.items():
            if param is not None:
                yield name, param.data
        for name, array in self._persistent_buffers():
            yield name, array

    def _persistent_buffers(self):
        """(local name, array) of this module's buffers that state_dict saves."""
        for name, array in self._buffers.items():
            if array is not None and name not in self._non_persistent_buffers:
                yield name, array

    def _load_state_items(self, values, assign=False):
        """Put already validated arrays {local name: array} into this module:
        copied into the existing arrays, or (assign=True, each array already
        of the target's dtype, C-contiguous and writable) taken as they are."""
        for name, value in values.items():
            param = self._parameters.get(name)
            if not assign:
                np.copyto(self._buffers[name] if param is None else param.data, value, casting="unsafe")
            elif param is None:
                self._buffers[name] = value
            else:
                param.data = value
        if assign and values:
            self._forget_forward()

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        """Every parameter and persistent buffer by dotted name, with torch's
        keys and order (a module or parameter reachable by two paths is under
        both), in `destination` (returned) or a new OrderedDict.

        The values are the live arrays, as torch's are detached tensors
        sharing storage: a parameter's data, or with keep_vars=True the
        Parameter itself.  A merged LoRA layer's weight (and a bias holding a
        merged lora_bias) is the exception: it is saved unmerged, as a
        computed array no Parameter holds."""
        if not isinstance(prefix, str):
            raise TypeError(f"state_dict: prefix must be a str, got {type(prefix).__name__}")
        out = OrderedDict() if destination is None else destination
        with _every_lock(self):
            for module_prefix, module in self.named_modules(remove_duplicate=False):
                full = prefix + (module_prefix + "." if module_prefix else "")
                for name, value in module._state_items():
                    param = module._parameters.get(name) if keep_vars else None
                    out[full + name] = param if param is not None and value is param.data else value
        return out

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load arrays by name; all-or-nothing.

        Every value is checked (shape, numeric dtype) before anything is
        written, so a failed load leaves the model unchanged.  strict=True
        raises StateDictKeyError (a KeyError) listing missing and unexpected keys; strict=False
        loads what matches and returns ``IncompatibleKeys(missing_keys,
        unexpected_keys)``.  A shape mismatch always raises ValueError naming
        the key, the expected and the found shape.

        Values are copied into the model's arrays (cast to their dtype).
        assign=True, as torch's, makes the model take the arrays themselves
        instead -- no copy -- where an array already has the parameter's (or
        buffer's) dtype and is C-contiguous, aligned and writable; others are
        converted first.  The Parameter objects stay (an optimizer keeps
        them) and so does requires_grad.  From then on the model owns those
        arrays: training steps and merging change them in place, as the
        caller will see.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping of str -> array, got {type(state_dict).__name__}")
        if not isinstance(assign, bool):
            raise TypeError(f"load_state_dict: assign must be a bool, got {type(assign).__name__}")
        with _every_lock(self):
            return self._load_state_dict_locked(state_dict, strict, assign)

    def _load_state_dict_locked(self, state_dict, strict, assign):
        targets = {}  # full key -> (module, local name, Parameter or buffer array)
        for module_prefix, module in self.named_modules(remove_duplicate=False):
            owned = [(n, p) for n, p in module._parameters.items() if p is not None]
            for name, holder in owned + list(module._persistent_buffers()):
                key = f"{module_prefix}.{name}" if module_prefix else name
                targets.setdefault(key, (module, name, holder))
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict.keys() if k not in targets]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append("missing keys: " + ", ".join(repr(k) for k in missing))
            if unexpected:
                parts.append("unexpected keys: " + ", ".join(repr(k) for k in unexpected))
            raise StateDictKeyError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                                    + "; ".join(parts), missing, unexpected)

        per_module = OrderedDict()
        for key, (module, name, param) in targets.items():
            if key not in state_dict:
                continue
            value = _checked_value(key, state_dict[key], param)
            if assign:
                value = np.require(value, dtype=param.dtype, requirements=["C", "A", "W"])
            per_module.setdefault(id(module), (module, {}))[1][name] = value
        for module, values in per_module.values():
            module._load_state_items(values, assign)
        return IncompatibleKeys(missing, unexpected)

    # -- modes and gradients ---------------------------------------------
    def train(self, mode=True):
        if not isinstance(mode, bool):
            raise ValueError(f"train(mode): mode must be a bool, got {type(mode).__name__} {mode!r}")
        object.__setattr__(self, "training", mode)
        for child in self.children():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        for param in self.parameters():
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad[...] = 0

    def requires_grad_(self, requires_grad=True):
        for param in self.parameters():
            param.requires_grad = bool(requires_grad)
        return self

    # -- dtype ------------------------------------------------------------
    def to(self, *args, **kwargs):
        """Cast every floating-point parameter, and its gradient, and every
        floating-point buffer to dtype (float32 or float64) in place and return
        self, as torch's module.to(dtype).

        Takes torch's forms: to(dtype), to(device), to(device, dtype) and the
        keywords device=, dtype=, non_blocking=.  The device must be the CPU
        ('cpu', 'cpu:0' or torch.device('cpu')), where lorac computes: a
        device alone changes nothing, and another device raises ValueError.

        The Parameter objects stay, so an optimizer built before still holds
        them, but its state keeps the old dtype and its step raises: build the
        optimizer after casting, as torch advises, or reload its state_dict()
        (loading casts the state to the parameters' dtype).  Layers then
        expect inputs of the new dtype, and a forward run before the cast has
        no backward after it.  Every new array is made before any is swapped
        in, so a failure (MemoryError) leaves the model as it was."""
        dtype = parse_to_arguments(args, kwargs)
        if dtype is None:
            return self
        with _every_lock(self):
            casts, seen = [], set()
            for module in self.modules():
                own = []
                for param in module._parameters.values():
                    if param is None or id(param) in seen or param.dtype.kind != "f":
                        continue
                    seen.add(id(param))
                    grad = None if param.grad is None else param.grad.astype(dtype, copy=False)
                    own.append((param, param.data.astype(dtype, copy=False), grad))
                buffers = {name: array.astype(dtype, copy=False) for name, array in module._buffers.items()
                           if array is not None and array.dtype.kind == "f"}
                casts.append((module, own, buffers))
            for module, own, buffers in casts:
                module._take_cast(own, dtype, buffers)
        return self

    def cpu(self):
        """self: lorac's arrays are always in the CPU's memory (as torch's module.cpu())."""
        return self

    def cuda(self, device=None):
        raise ValueError(f"cuda(): lorac computes on the CPU only, so a model cannot move to "
                         f"{'cuda' if device is None else device!r}; use the model as it is, or .cpu()")

    def float(self):
        return self.to(np.float32)

    def double(self):
        return self.to(np.float64)

    def half(self):
        """Refused (TypeError): the C kernels compute in float32 and float64 only."""
        raise _half_precision_refused("half")

    def bfloat16(self):
        """Refused (TypeError): the C kernels compute in float32 and float64 only."""
        raise _half_precision_refused("bfloat16")

    def _take_cast(self, casts, dtype, buffers):
        """Swap in this module's cast arrays [(param, data, grad)], its cast
        buffers {name: array} and its new dtype."""
        for param, data, grad in casts:
            param.data, param.grad = data, grad
        self._buffers.update(buffers)
        if "dtype" in self.__dict__:
            self.dtype = dtype
        self._forget_forward()

    # -- whole-model operations and threads ------------------------------------
    def _exclusive(self):
        """A context keeping other threads from changing this module's own
        state while it is held: nothing for a plain Module; a LoRA layer's
        re-entrant lock (layers/_threading.py)."""
        return nullcontext()

    def __deepcopy__(self, memo):
        """copy.deepcopy, holding every layer's lock until the whole copy is
        made, so that no layer is copied half-merged by another thread."""
        with _every_lock(self):
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            state = getattr(self, "__getstate__", lambda: self.__dict__)()
            new.__dict__.update(copy.deepcopy(state, memo))
        return new

    def _forget_forward(self):
        """Drop what the last forward kept for backward.  A no-op here: modules
        whose cache follows the input's dtype check it in backward themselves."""

    # -- calling --------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if kwargs or "_forward_hooks" in self.__dict__:
            return self._call_with_extras(args, kwargs)
        return self.forward(*args)  # the hot path: no keywords, no hooks

    def _call_with_extras(self, args, kwargs):
        hooks = self.__dict__.get("_forward_hooks")
        if hooks is not None:
            return _hooks.call_with_hooks(self, hooks, self._call_forward, args, kwargs)
        return self._call_forward(args, kwargs)

    def _call_forward(self, args, kwargs):
        """__call__ without the hooks: forward, or a mixed batch across adapters (issue 6)."""
        if kwargs and ("adapter_names" in kwargs or "adapter_ids" in kwargs):
            from .adapters import mixed_batch_call
            return mixed_batch_call(self, args, kwargs)
        return self.forward(*args, **kwargs)

    def register_forward_pre_hook(self, hook, *, prepend=False, with_kwargs=False):
        """Call ``hook(module, args)`` before each forward (``hook(module, args,
        kwargs)`` with with_kwargs), as torch's; returns a handle whose
        remove() takes it away.  In eval mode the hook may return new args
        (or (args, kwargs)); in training mode it may only observe
        (lorac/_hooks.py says why)."""
        return _hooks.register(self, "pre", hook, prepend, with_kwargs)

    def register_forward_hook(self, hook, *, prepend=False, with_kwargs=False, always_call=False):
        """Call ``hook(module, args, output)`` after each forward (``hook(module,
        args, kwargs, output)`` with with_kwargs), as torch's; always_call: also
        when forward raises (output None).  In eval mode the hook may return a
        new output; in training mode it may only observe."""
        return _hooks.register(self, "post", hook, prepend, with_kwargs, always_call)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} does not define backward()")

    def __dir__(self):
        """Attributes plus registered parameters and children (tab completion), as in torch."""
        names = set(super().__dir__()) | set(self._parameters) | set(self._modules) | set(self._buffers)
        return sorted(name for name in names if not name[:1].isdigit())

    # -- printing -------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"({name}): " + repr(child).replace("\n", "\n  ") for name, child in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def _half_precision_refused(method):
    return TypeError(f"{method}(): lorac computes in float32 or float64 only, so a model cannot be cast to "
                     f"{method}; use float() or double()")


@contextmanager
def _every_lock(module):
    """Hold the lock of every layer under `module` (itself included) for a
    whole-model operation: to(), state_dict(), load_state_dict(), deepcopy.
    The locks are taken in one global order (by id), so two threads doing
    this on models that share layers cannot deadlock; every other operation
    holds at most one layer's lock at a time."""
    with ExitStack() as stack:
        for each in sorted(module.modules(), key=id):
            stack.enter_context(each._exclusive())
        yield


def _where(path):
    """A dotted module path for a message; "" is the model itself."""
    return repr(path) if path else "the model"


def _checked_buffer(name, array):
    """A buffer's array: numeric or bool, C-contiguous and writable (loading copies into it in place)."""
    if array.dtype.kind not in "fiub":
        raise TypeError(f"buffer {name!r}: expected a numeric or bool array, got dtype {array.dtype}")
    return np.require(array, requirements=["C", "A", "W"])


def _checked_value(key, value, param):
    """value as an ndarray that can be copied into `param`, or ValueError/TypeError."""
    if isinstance(value, Parameter):
        value = value.data
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - report any conversion failure uniformly
        raise TypeError(f"state_dict[{key!r}]: expected an array, got {type(value).__name__} ({exc})") from None
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"state_dict[{key!r}]: expected a numeric array, got dtype {arr.dtype}")
    if arr.shape != param.shape:
        raise ValueError(f"state_dict[{key!r}]: size mismatch, expected shape {param.shape}, "
                         f"found shape {arr.shape}")
    return arr

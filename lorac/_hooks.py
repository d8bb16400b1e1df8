"""Forward hooks of a Module, as torch's register_forward_pre_hook /
register_forward_hook.

A module's hooks live in one ``ForwardHooks`` object in its ``__dict__``
(under ``_forward_hooks``), made on the first registration and dropped when
the last hook is removed, so a module without hooks pays one dict lookup per
call.

Hooks see what torch's see: a pre-hook ``hook(module, args)`` (or
``hook(module, args, kwargs)`` with ``with_kwargs=True``) before forward, a
hook ``hook(module, args, output)`` (or ``hook(module, args, kwargs,
output)``) after it.  Returning None observes.  Returning a value replaces
the input or the output as in torch -- but only in eval mode: lorac's
backward is explicit and cannot differentiate through a hook, so in training
mode a hook that returns a value raises instead of giving wrong gradients.
"""

import itertools
import weakref
from collections import OrderedDict

_KEYS = itertools.count()


class RemovableHandle:
    """What the register_* methods return: ``remove()`` (idempotent), also as
    a context manager (the hook is removed on exit), as torch's handle."""

    def __init__(self, module, key):
        self._module = weakref.ref(module)
        self.id = key

    def remove(self):
        module = self._module()
        hooks = None if module is None else module.__dict__.get("_forward_hooks")
        if hooks is None:
            return
        hooks.pre.pop(self.id, None)
        hooks.post.pop(self.id, None)
        if not hooks.pre and not hooks.post:
            del module.__dict__["_forward_hooks"]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.remove()


class ForwardHooks:
    """A module's hooks: ``pre`` and ``post``, OrderedDicts of key -> (hook, with_kwargs, always_call)."""

    def __init__(self):
        self.pre = OrderedDict()
        self.post = OrderedDict()


def register(module, kind, hook, prepend, with_kwargs, always_call=False):
    """Add ``hook`` to the module's ``kind`` ("pre" or "post") hooks; returns a RemovableHandle."""
    func = "register_forward_pre_hook" if kind == "pre" else "register_forward_hook"
    if not callable(hook):
        raise TypeError(f"{func}: hook must be callable, got {type(hook).__name__}")
    for name, flag in (("prepend", prepend), ("with_kwargs", with_kwargs), ("always_call", always_call)):
        if not isinstance(flag, bool):
            raise TypeError(f"{func}: {name} must be a bool, got {type(flag).__name__}")
    hooks = module.__dict__.get("_forward_hooks")
    if hooks is None:
        hooks = module.__dict__["_forward_hooks"] = ForwardHooks()
    table = hooks.pre if kind == "pre" else hooks.post
    key = next(_KEYS)
    table[key] = (hook, with_kwargs, always_call)
    if prepend:
        table.move_to_end(key, last=False)
    return RemovableHandle(module, key)


def _replacing(module, hook, what):
    """Check that a hook may replace `what` (the input or output): eval mode only."""
    if module.training:
        raise RuntimeError(f"forward hook {getattr(hook, '__name__', hook)!r} of {type(module).__name__} returned "
                           f"a new {what} in training mode; lorac's backward is explicit and cannot differentiate "
                           "through a hook, so hooks may only observe (return None) while training -- switch to "
                           "eval() to let a hook change what forward takes or returns")


def call_with_hooks(module, hooks, call, args, kwargs):
    """Run the pre-hooks, ``call(args, kwargs)`` (the module's own call) and the
    hooks after it, in registration order (prepended ones first).  If the
    call raises, the hooks registered with always_call=True still run, with
    output None, and the error propagates."""
    for hook, with_kwargs, _ in list(hooks.pre.values()):
        if with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                _replacing(module, hook, "input")
                if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
                    raise RuntimeError("a forward pre-hook with with_kwargs=True must return None or a tuple "
                                       f"(new_args, new_kwargs), got {type(result).__name__}")
                args, kwargs = tuple(result[0]), result[1]
        else:
            result = hook(module, args)
            if result is not None:
                _replacing(module, hook, "input")
                args = result if isinstance(result, tuple) else (result,)
    post = list(hooks.post.values())
    try:
        output = call(args, kwargs)
    except Exception:
        for hook, with_kwargs, always_call in post:
            if always_call:
                hook(module, args, kwargs, None) if with_kwargs else hook(module, args, None)
        raise
    for hook, with_kwargs, _ in post:
        result = hook(module, args, kwargs, output) if with_kwargs else hook(module, args, output)
        if result is not None:
            _replacing(module, hook, "output")
            output = result
    return output

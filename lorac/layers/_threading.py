"""The thread rules of LoRA layers.

- A layer's forward cache (what backward needs) is kept per thread, so
  threads may run forward/backward pairs on one shared layer and each
  backward sees its own thread's forward.
- Every operation that reads or changes a layer's weights as a whole --
  forward, backward, merge, unmerge, loading a state dict, adding, setting,
  deleting or resetting adapters -- holds the layer's re-entrant lock.  So a
  merge() in one thread waits for a forward() running in another (and the
  other way round): nothing sees a half-merged weight, and gradients
  accumulate one backward at a time.  Different layers have different
  locks, and the C kernels release the GIL, so threads working on separate
  layers run in parallel.
- Whole-model operations -- Module.to, state_dict, load_state_dict and
  copy.deepcopy -- hold every layer's lock at once (module._every_lock), so
  they never see one layer before and another after a change.  Pickling
  holds none: pickle a model no other thread is changing.
"""

import functools
import threading

_CREATE = threading.Lock()  # guards the lazy creation of per-layer state
_THREAD_STATE = ("_lock", "_tls", "_cache")  # instance-dict keys never copied from one layer to another


def _lazy(obj, key, factory):
    value = obj.__dict__.get(key)
    if value is None:
        with _CREATE:
            value = obj.__dict__.get(key)
            if value is None:
                value = obj.__dict__[key] = factory()
    return value


def layer_lock(layer):
    """The layer's re-entrant lock (created on first use)."""
    return _lazy(layer, "_lock", threading.RLock)


def forget_thread_state(layer):
    """For a layer built by copying another's __dict__: drop the copied lock
    and per-thread caches so the copy gets its own."""
    for key in _THREAD_STATE:
        layer.__dict__.pop(key, None)


def locked(method):
    """Decorator: run the method holding the layer's lock."""
    @functools.wraps(method)
    def run_locked(self, *args, **kwargs):
        with self.__dict__.get("_lock") or layer_lock(self):  # the lock exists after the first call: no call
            return method(self, *args, **kwargs)
    return run_locked


def load_cache(layer):
    """This thread's layer._cache (None until its first forward), without the
    descriptor's call (backward's hot path)."""
    return getattr(layer.__dict__.get("_tls"), "cache", None)


def thread_state(layer):
    """The layer's threading.local holding each thread's forward cache
    (created on first use)."""
    return _lazy(layer, "_tls", threading.local)


def store_cache(layer, value):
    """layer._cache = value for this thread, without the ~0.3 us of
    Module.__setattr__ and the descriptor (forward/backward's hot path)."""
    (layer.__dict__.get("_tls") or thread_state(layer)).cache = value


class PerThreadCache:
    """Data descriptor for a layer's ``_cache``: one value per thread (None
    until that thread's first forward); load_cache / store_cache underneath."""

    def __get__(self, layer, owner=None):
        return self if layer is None else load_cache(layer)

    def __set__(self, layer, value):
        store_cache(layer, value)


class ThreadState:
    """Mixin of the layers under these rules: the per-thread forward cache
    (``_cache``), and copies made by copy.copy, copy.deepcopy or pickle
    without the lock and the caches (a lock and a threading.local cannot be
    pickled, and a copy's backward must follow a forward of its own)."""

    _cache = PerThreadCache()

    def _exclusive(self):
        return layer_lock(self)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in _THREAD_STATE:
            state.pop(key, None)
        return state

    @locked
    def _take_cast(self, casts, dtype, buffers):
        """Module.to's swap, under the layer's lock (a running forward sees
        all old or all new arrays)."""
        super()._take_cast(casts, dtype, buffers)

    @locked
    def _load_state_items(self, values, assign=False):
        """Module's load, under the layer's lock (a running forward sees all
        old or all new values)."""
        super()._load_state_items(values, assign)

    def _forget_forward(self):
        self.__dict__.pop("_tls", None)  # every thread's forward cache

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
"""

import functools
import threading

_CREATE = threading.Lock()  # guards the lazy creation of per-layer state


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
    layer.__dict__.pop("_lock", None)
    layer.__dict__.pop("_tls", None)
    layer.__dict__.pop("_cache", None)


def locked(method):
    """Decorator: run the method holding the layer's lock."""
    @functools.wraps(method)
    def run_locked(self, *args, **kwargs):
        lock = self.__dict__.get("_lock")  # forward/backward of a one-row batch take ~2 us: skip a call
        with lock if lock is not None else layer_lock(self):
            return method(self, *args, **kwargs)
    return run_locked


def store_cache(layer, value):
    """layer._cache = value for this thread, without the ~0.3 us of
    Module.__setattr__ and the descriptor (forward/backward's hot path)."""
    tls = layer.__dict__.get("_tls")
    if tls is None:
        tls = _lazy(layer, "_tls", threading.local)
    tls.cache = value


class PerThreadCache:
    """Data descriptor for a layer's ``_cache``: one value per thread (None
    until that thread's first forward)."""

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        tls = layer.__dict__.get("_tls")
        return None if tls is None else getattr(tls, "cache", None)

    def __set__(self, layer, value):
        _lazy(layer, "_tls", threading.local).cache = value

"""Models or state dicts in, plain ``{key: ndarray}`` out, for lorac.lowrank."""

from collections.abc import Mapping

import numpy as np

from ..module import Module


def state_of(source, name, func):
    """(state dict {str: ndarray}, model or None) from a lorac Module or a mapping.

    Mapping values may be ndarrays, ``lorac.Parameter``s or array-likes."""
    if isinstance(source, Module):
        return dict(source.state_dict()), source
    if not isinstance(source, Mapping):
        raise TypeError(f"{func}: {name} must be a lorac Module or a state dict (a mapping of str to arrays), "
                        f"got {type(source).__name__}")
    state = {}
    for key, value in source.items():
        if not isinstance(key, str):
            raise TypeError(f"{func}: {name} keys must be str, got {type(key).__name__} {key!r}")
        data = getattr(value, "data", None)
        state[key] = data if isinstance(data, np.ndarray) and not isinstance(value, np.ndarray) \
            else np.asarray(value)
    return state, None


def split_key(key):
    """(module path, parameter name): "a.b.weight" -> ("a.b", "weight"), "weight" -> ("", "weight")."""
    path, _, param = key.rpartition(".")
    return path, param


def lora_pairs(state, func):
    """{path: (lora_A, lora_B)} for every ``<path>.lora_A`` / ``<path>.lora_B`` pair of ``state``,
    in the state's order; a half without its partner is a ValueError."""
    halves = {}
    for key, value in state.items():
        path, param = split_key(key)
        if param in ("lora_A", "lora_B"):
            halves.setdefault(path, {})[param] = value
    pairs = {}
    for path, half in halves.items():
        if len(half) != 2:
            have = next(iter(half))
            raise ValueError(f"{func}: {path + '.' if path else ''}{have} has no matching "
                             f"{'lora_B' if have == 'lora_A' else 'lora_A'}")
        pairs[path] = (half["lora_A"], half["lora_B"])
    return pairs

"""PEFT's rules for which modules get an adapter, and with which r and alpha.

Each rule reads like PEFT 0.21's (``check_target_module_exists`` and
``get_pattern_key``), so a model and a LoraConfig select the same layers in
lorac as in PEFT:

- ``target_modules``: a str is a regular expression that must match a
  module's whole dotted path; a list of names matches a path equal to a name
  or ending in ``"." + name``.  ``"all-linear"`` (any case) stands for the
  list of every Linear layer's path (``expand_all_linear``; PEFT's shorthand,
  with PEFT's rule for models that are not transformers models: no output
  head is left out -- exclude one with exclude_modules).
- ``exclude_modules``: the same forms; an excluded path never gets an
  adapter.  None or empty: nothing is excluded.
- ``layers_to_transform`` (an int or a list of ints), only with a list of
  target names, keeps a path matched by suffix only when its layer index is
  listed.  The index is the first number in the path that follows
  ``<layers_pattern>.`` (any of them, when a list), or without a
  layers_pattern, the first number that is the third or later part of the
  path (``model.layers.3.q`` -> 3).  A path equal to a target name is kept
  whatever its index, as in PEFT.
- ``rank_pattern`` / ``alpha_pattern``: dicts whose keys are regular
  expressions; a path takes the value of the first key (in the dict's order)
  for which ``(.*\\.)?(<key>)$`` matches the path from its start.
"""

import numbers
import re
import warnings

from .._arrays import non_negative_int, real_number


ALL_LINEAR = "all-linear"


def expand_all_linear(target_modules, linear_paths, func, layers_to_transform=None, layers_pattern=None):
    """target_modules, or for PEFT's ``"all-linear"`` the list of ``linear_paths``
    (the model's Linear layers).  ValueError if there are none, or with
    layers_to_transform / layers_pattern (a str target_modules: PEFT's
    LoraConfig refuses the combination)."""
    if not (isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR):
        return target_modules
    if layers_to_transform is not None or layers_pattern is not None:
        raise ValueError(f"{func}: layers_to_transform / layers_pattern cannot be used with target_modules "
                         f"{target_modules!r} (a str; PEFT refuses the combination too)")
    if not linear_paths:
        raise ValueError(f"{func}: target_modules {target_modules!r}: the model has no Linear layer to adapt")
    return list(linear_paths)


def compile_matcher(target_modules, name="target_modules"):
    """PEFT's target_modules rule as a predicate on module paths."""
    if isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"{name}: {target_modules!r} is not a valid regular expression: {exc}") from None
        return lambda path: regex.fullmatch(path) is not None
    try:
        names = list(target_modules)
    except TypeError:
        raise TypeError(f"{name} must be a regex str or a list of module names, got "
                        f"{type(target_modules).__name__}") from None
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad or not names:
        raise ValueError(f"{name} must be a non-empty list of module names, got {names!r}")
    exact = set(names)
    suffixes = tuple("." + n for n in names)
    return lambda path: path in exact or path.endswith(suffixes)


def compile_exclusion(exclude_modules):
    """PEFT's exclude_modules rule as a predicate on module paths (None or empty: nothing is excluded)."""
    return compile_matcher(exclude_modules, "exclude_modules") if exclude_modules else (lambda path: False)


def compile_selector(target_modules, exclude_modules=None, layers_to_transform=None, layers_pattern=None):
    """The predicate path -> gets an adapter, from PEFT's four fields (module docstring)."""
    is_target = compile_matcher(target_modules)
    is_excluded = compile_exclusion(exclude_modules)
    if isinstance(target_modules, str) and (layers_to_transform is not None or layers_pattern is not None):
        raise ValueError("layers_to_transform / layers_pattern need target_modules as a list of names; with a "
                         "regex, select the layers in the regex (PEFT refuses the combination too)")
    layer_of = _layer_index_reader(layers_to_transform, layers_pattern)
    if layer_of is None:
        return lambda path: not is_excluded(path) and is_target(path)
    wanted = layer_of.wanted
    exact = set(target_modules)

    def selected(path):
        if is_excluded(path) or not is_target(path):
            return False
        return path in exact or layer_of(path) in wanted
    return selected


def _layer_index_reader(layers_to_transform, layers_pattern):
    """A function path -> layer index (int or None) with the set of wanted
    indexes as its ``wanted``, or None when layers_to_transform is not used."""
    if layers_pattern and layers_to_transform is None:
        raise ValueError("layers_pattern needs layers_to_transform (the layer indexes to adapt)")
    if layers_to_transform is None or (isinstance(layers_to_transform, list) and not layers_to_transform):
        return None
    indexes = [layers_to_transform] if isinstance(layers_to_transform, numbers.Integral) else layers_to_transform
    try:
        indexes = list(indexes)
    except TypeError:
        raise TypeError("layers_to_transform must be an int or a list of ints, got "
                        f"{type(layers_to_transform).__name__}") from None
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in indexes):
        raise TypeError(f"layers_to_transform must be an int or a list of ints, got {layers_to_transform!r}")
    if not layers_pattern:
        regexes = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        if not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"layers_pattern must be a str or a list of str, got {layers_pattern!r}")
        try:
            regexes = [re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns]
        except re.error as exc:
            raise ValueError(f"layers_pattern {layers_pattern!r} is not a valid regular expression: {exc}") from None

    def layer_of(path):
        for regex in regexes:
            match = regex.match(path)
            if match:
                return int(match.group("idx"))
        return None
    layer_of.wanted = frozenset(int(i) for i in indexes)
    return layer_of


def compile_patterns(patterns, name):
    """[(key, compiled regex, value)] of a rank_pattern / alpha_pattern dict (None: [])."""
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        raise TypeError(f"{name} must be a dict of regex str -> value, got {type(patterns).__name__}")
    out = []
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {type(key).__name__} {key!r}")
        try:
            regex = re.compile(rf"(.*\.)?({key})$")
        except re.error as exc:
            raise ValueError(f"{name} key {key!r} is not a valid regular expression: {exc}") from None
        out.append((key, regex, value))
    return out


def pattern_value(patterns, path, default):
    """The value of the first pattern matching ``path``, else ``default``."""
    for _, regex, value in patterns:
        if regex.match(path):
            return value
    return default


def unmatched_keys(patterns, paths):
    """The keys of ``patterns`` that match none of ``paths``, sorted."""
    return sorted(key for key, regex, _ in patterns if not any(regex.match(p) for p in paths))


def per_layer_settings(paths, r, lora_alpha, rank_pattern, alpha_pattern, func):
    """[(r, lora_alpha)] for each of ``paths`` under the patterns, whose values
    are checked first (ranks ints >= 1, alphas finite); keys that fit none
    of the paths are warned about (RuntimeWarning), as PEFT does."""
    ranks = [(key, regex, _pattern_rank(value, key, func)) for key, regex, value in
             compile_patterns(rank_pattern, "rank_pattern")]
    alphas = [(key, regex, real_number(value, f"alpha_pattern[{key!r}]")) for key, regex, value in
              compile_patterns(alpha_pattern, "alpha_pattern")]
    for name, patterns in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        unmatched = unmatched_keys(patterns, paths)
        if unmatched:
            warnings.warn(f"{func}: {name} keys {unmatched} match no adapted layer and are ignored",
                          RuntimeWarning, stacklevel=3)
    return [(pattern_value(ranks, path, r), pattern_value(alphas, path, lora_alpha)) for path in paths]


def _pattern_rank(value, key, func):
    rank = non_negative_int(value, f"rank_pattern[{key!r}]")
    if rank == 0:
        raise ValueError(f"{func}: rank_pattern[{key!r}] must be >= 1, got 0")
    return rank

"""What a data-driven preprocessing step (CorDA's preprocess_corda, LoRA-GA's
preprocess_loraga) leaves on the base model's Linear layers for
get_peft_model, and how get_peft_model starts an adapter from it.

The step runs on the base model, before get_peft_model: it selects the
plain Linear layers (r = 0) the LoraConfig targets and leaves ``(method,
data)`` in each one's ``__dict__`` under PREPARED.  get_peft_model checks
that every layer it will adapt carries data of its method (and of the
right rank) before anything changes, injects the adapters, then gives each
layer the factors computed from its data with the residual base weight
``W - s B A``, so the model computes what it did.
"""

import numpy as np

from .select import compile_patterns, pattern_value
from .targets import config_selector, layer_kind

PREPARED = "_peft_prepared"


def plain_linear_targets(model, config, func, method):
    """[(path, layer)]: the plain lorac.Linear layers (r = 0) the config's target fields select; an
    Embedding or an already adapted layer among them is an error (``method`` names the init)."""
    modules = dict(model.named_modules())
    selected = config_selector(modules, config, func)
    targets = [(p, m) for p, m in modules.items() if p and layer_kind(m) == "linear" and selected(p)]
    embeddings = [p for p, m in modules.items() if p and layer_kind(m) == "embedding" and selected(p)]
    if embeddings:
        raise ValueError(f"{func}: {method} starts Linear layers only; target_modules also selects the Embedding "
                         f"layers {embeddings} (exclude them, or adapt them in a separate config)")
    adapted = [p for p, m in targets if m.r > 0]
    if adapted:
        raise ValueError(f"{func}: layers {adapted} already have an adapter; {method} starts from the base model "
                         "(preprocess, then get_peft_model)")
    if not targets:
        raise ValueError(f"{func}: no Linear layer matches target_modules={config.target_modules!r}; {method} has "
                         "nothing to compute")
    return targets


def config_ranks(targets, config):
    """{path: the rank the config gives the layer} (rank_pattern, else r)."""
    patterns = compile_patterns(config.rank_pattern or None, "rank_pattern")
    return {path: pattern_value(patterns, path, config.r) for path, _ in targets}


def stored_entry(stored, key, shape, where, func, entry=None, hint=""):
    """stored[key] (a loaded cache / covariance file) as float64, checked to be there, of ``shape``
    and finite; else ValueError "<func>: <where> has no finite <shape> entry <entry or key><hint>"."""
    value = stored.get(key)
    if value is None or value.shape != shape or not np.isfinite(value).all():
        raise ValueError(f"{func}: {where} has no finite {shape} entry {key if entry is None else entry}{hint}")
    return value.astype(np.float64)


def attach(layer, method, data):
    layer.__dict__[PREPARED] = (method, data)


def prepared_data(model, config, func, method, label, noun, preprocess):
    """{path: data} of the layers get_peft_model adapts with init ``method``, checked to carry it
    (for the messages: ``label`` names the method, ``noun`` the data, ``preprocess`` the call that
    makes it)."""
    out = {}
    for path, layer in plain_linear_targets(model, config, func, label):
        found = layer.__dict__.get(PREPARED)
        if found is None or found[0] != method:
            raise ValueError(f"{func}: init_lora_weights={method!r}: layer {path!r} has no {label} {noun}; call "
                             f"lorac.{preprocess} first")
        out[path] = found[1]
    return out


def start_from(layer, lora_a, lora_b):
    """An injected layer (rank r, its scaling) takes lora_A (r, in) and lora_B (out, r) and the residual
    base weight W - s B A, formed from the factors as the layer holds them (rounded to its dtype)."""
    lora_a = np.asarray(lora_a).astype(layer.dtype)
    lora_b = np.asarray(lora_b).astype(layer.dtype)
    merged = layer.merged
    layer.unmerge()
    delta = layer.scaling * (lora_b.astype(np.float64) @ lora_a.astype(np.float64))       # (out, in)
    weight = layer.weight.data.astype(np.float64) - (delta.T if layer.fan_in_fan_out else delta)
    layer.lora_A.data[...] = lora_a
    layer.lora_B.data[...] = lora_b
    layer.weight.data[...] = weight
    if "lora_magnitude_vector" in layer._parameters:   # DoRA: the norms of the (unchanged) W = residual + s B A
        layer.lora_magnitude_vector.data[...] = layer.dora_row_norms()
    layer.__dict__.pop(PREPARED, None)
    layer._changed()
    if merged:
        layer.merge()

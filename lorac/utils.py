"""loralib's model-level helpers: which parameters train, which are saved,
and PEFT's parameter counts."""

import sys
from collections import OrderedDict

from .layers.base import LoRALayer

_BIAS_MODES = ("none", "all", "lora_only")


def is_adapter_key(name):
    """Whether a parameter / state-dict key belongs to an adapter: a "lora_" one, or PEFT's trainable
    token rows (``trainable_tokens_delta``, layers/tokens.py)."""
    return "lora_" in name or name.endswith("trainable_tokens_delta")


def _check_bias_mode(bias):
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")


def mark_only_lora_as_trainable(model, bias="none"):
    """Freeze every parameter whose name lacks "lora_" and make the "lora_" ones trainable.

    bias: "none" (biases frozen), "all" (every parameter named "...bias"
    trains) or "lora_only" (only biases of layers with an adapter, r > 0, train).  Unlike
    loralib, "lora_" parameters are (re)enabled here, not just left as they were.
    Trainable token rows (``trainable_tokens_delta``) count as adapter parameters; MiCA's lora_B
    stays frozen.
    """
    _check_bias_mode(bias)
    frozen = set()   # adapter parameters that never train (MiCA's lora_B)
    for module in model.modules():
        if isinstance(module, LoRALayer):
            frozen |= module.frozen_adapter_parameters()
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_key(name) and id(param) not in frozen
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        # Layers with an adapter (r > 0).  A lorac layer with r = 0 plays the
        # role of loralib users' plain nn.Linear, whose bias stays frozen.
        for module in model.modules():
            if isinstance(module, LoRALayer) and module.r > 0 and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True
    return model


def lora_state_dict(model, bias="none", adapter=None):
    """The adapter part of model.state_dict(), with loralib's selection rules.

    bias: "none" (only keys containing "lora_"), "all" (also every key
    containing "bias") or "lora_only" (also the bias of each module that has
    "lora_" keys).

    adapter: None (every adapter: "default" under loralib's keys, named ones
    as ``lora_A_<name>`` / ``lora_B_<name>``), or a name: that adapter alone
    under loralib's plain keys ``<layer>.lora_A`` / ``<layer>.lora_B``, from
    the layers holding it -- a loralib-compatible file that
    ``lorac.load_adapter`` can load into any named adapter.  A DoRA layer's
    adapter ("default") also gives ``<layer>.lora_magnitude_vector``, and
    one with PEFT's lora_bias ``<layer>.lora_bias``.  Trainable token rows
    (``<layer>.trainable_tokens_delta``) are part of the whole-model dict
    (adapter=None), not of a named adapter's."""
    _check_bias_mode(bias)
    if adapter is not None:
        return _one_adapter_state_dict(model, bias, adapter)
    state = model.state_dict()
    if bias == "none":
        return OrderedDict((k, v) for k, v in state.items() if is_adapter_key(k))
    if bias == "all":
        return OrderedDict((k, v) for k, v in state.items() if is_adapter_key(k) or "bias" in k)
    out = OrderedDict()
    for key, value in state.items():
        if is_adapter_key(key):
            out[key] = value
            bias_key = key.split("lora_")[0] + "bias"
            if bias_key in state:
                out[bias_key] = state[bias_key]
    return out


def _one_adapter_state_dict(model, bias, adapter):
    """lora_state_dict(model, bias, adapter=name) (issue 6: named adapters)."""
    if not isinstance(adapter, str):
        raise TypeError(f"adapter must be None or an adapter name (str), got {type(adapter).__name__}")
    state = model.state_dict() if bias != "none" else None
    out = OrderedDict()
    for path, module in model.named_modules():
        if not (isinstance(module, LoRALayer) and module._named_adapters and adapter in module.adapter_names):
            continue
        prefix = path + "." if path else ""
        lora_a, lora_b = module.adapter_parameters(adapter)
        out[prefix + "lora_A"] = lora_a.data
        out[prefix + "lora_B"] = lora_b.data
        if module.use_dora:   # a DoRA layer's one adapter: its magnitude belongs to it
            out[prefix + "lora_magnitude_vector"] = module.lora_magnitude_vector.data
        lora_bias = module.lora_bias_parameter(adapter)
        if lora_bias is not None:   # so is PEFT's lora_bias
            out[prefix + "lora_bias"] = lora_bias.data
        if bias == "lora_only" and prefix + "bias" in state:
            out[prefix + "bias"] = state[prefix + "bias"]
    if not out:
        raise ValueError(f"no LoRA layer of the model holds an adapter {adapter!r}")
    if bias == "all":
        out.update((k, v) for k, v in state.items() if "bias" in k)
    return out


def count_parameters(model, trainable_only=False):
    """Number of scalar parameters (only those with requires_grad if trainable_only)."""
    return sum(p.size for p in model.parameters() if p.requires_grad or not trainable_only)


def get_nb_trainable_parameters(model):
    """(trainable, all): scalar counts of the model's parameters, a shared
    (tied) one once, as PEFT's ``PeftModel.get_nb_trainable_parameters``."""
    trainable = total = 0
    for param in model.parameters():
        total += param.size
        if param.requires_grad:
            trainable += param.size
    return trainable, total


def print_trainable_parameters(model, file=None):
    """Print PEFT's line ``trainable params: 1,234 || all params: 5,678 ||
    trainable%: 21.7330`` for the model (to ``file``, default stdout)."""
    trainable, total = get_nb_trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}",
          file=sys.stdout if file is None else file)

"""loralib's model-level helpers: which parameters train, which are saved."""

from collections import OrderedDict

from .layers.base import LoRALayer

_BIAS_MODES = ("none", "all", "lora_only")


def _check_bias_mode(bias):
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")


def mark_only_lora_as_trainable(model, bias="none"):
    """Freeze every parameter whose name lacks "lora_" and make the "lora_" ones trainable.

    bias: "none" (biases frozen), "all" (every parameter named "...bias"
    trains) or "lora_only" (only biases of layers with an adapter, r > 0, train).  Unlike
    loralib, "lora_" parameters are (re)enabled here, not just left as they were.
    """
    _check_bias_mode(bias)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
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


def lora_state_dict(model, bias="none"):
    """The adapter part of model.state_dict(), with loralib's selection rules.

    bias: "none" (only keys containing "lora_"), "all" (also every key
    containing "bias") or "lora_only" (also the bias of each module that has
    "lora_" keys)."""
    _check_bias_mode(bias)
    state = model.state_dict()
    if bias == "none":
        return OrderedDict((k, v) for k, v in state.items() if "lora_" in k)
    if bias == "all":
        return OrderedDict((k, v) for k, v in state.items() if "lora_" in k or "bias" in k)
    out = OrderedDict()
    for key, value in state.items():
        if "lora_" in key:
            out[key] = value
            bias_key = key.split("lora_")[0] + "bias"
            if bias_key in state:
                out[bias_key] = state[bias_key]
    return out


def count_parameters(model, trainable_only=False):
    """Number of scalar parameters (only those with requires_grad if trainable_only)."""
    return sum(p.size for p in model.parameters() if p.requires_grad or not trainable_only)

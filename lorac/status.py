"""get_layer_status / get_model_status: PEFT's adapter introspection on a lorac model.

Each adapter layer (a LoRA layer holding at least one adapter, or a
MoLoRALinear with r > 0) is described by a ``TunerLayerStatus`` with PEFT's
fields: whether its adapters are enabled (not inside ``disable_adapters``),
which are active, merged and available, and per adapter whether its
parameters train (True, False, or "irregular" for a mix) and their devices
(always ``["cpu"]``).  ``get_model_status`` folds them into one
``TunerModelStatus`` as PEFT does, "irregular" marking layers that disagree.

An adapter's parameters are its lora_A and lora_B, and for "default" also a
DoRA layer's ``lora_magnitude_vector`` and a ``lora_bias`` (PEFT's
lora_magnitude_vector and lora_B.bias) -- a MoLoRALinear's ``lora_router``.
Unlike PEFT, lorac has no wrapper model: ``base_model_type`` is the
model's class name, ``adapter_model_type`` "lorac" and every adapter's
``peft_types`` entry "LORA".
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from .layers import LoRALayer, MoLoRALinear
from .layers.adapters import DEFAULT
from .module import Module
from .utils import get_nb_trainable_parameters

IRREGULAR = "irregular"


@dataclass
class TunerLayerStatus:
    """One adapter layer's state (PEFT's fields of the same names)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list
    merged_adapters: list
    requires_grad: dict
    available_adapters: list
    devices: dict
    quantization_backend: Optional[str] = None


@dataclass
class TunerModelStatus:
    """The model's adapter state over its layers (PEFT's fields of the same names)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: object
    active_adapters: object
    merged_adapters: object
    requires_grad: dict
    available_adapters: list
    devices: dict = field(default_factory=dict)
    quantization_backend: Optional[str] = None


def _agreement(values):
    """True / False when every value is that, else "irregular"."""
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return IRREGULAR


def _adapter_parameters(layer, name):
    """The Parameters that make up adapter `name` of `layer` (module docstring)."""
    if isinstance(layer, MoLoRALinear):
        return [layer.lora_A, layer.lora_B, layer.lora_router]
    return layer.adapter_owned_parameters(name)


def _layer_status(path, layer):
    if isinstance(layer, MoLoRALinear):   # one adapter, always on, never merged
        names, active, merged, enabled = [DEFAULT], [DEFAULT], [], True
    else:
        names, active = list(layer.adapter_names), list(layer.active_adapters)
        merged, enabled = list(layer.merged_adapters), not layer._adapters_disabled
    return TunerLayerStatus(
        name=path, module_type=f"lorac.{type(layer).__name__}", enabled=enabled, active_adapters=active,
        merged_adapters=merged,
        requires_grad={n: _agreement(p.requires_grad for p in _adapter_parameters(layer, n)) for n in names},
        available_adapters=sorted(names), devices={n: ["cpu"] for n in names})


def _is_adapter_layer(module):
    if isinstance(module, MoLoRALinear):
        return module.r > 0
    return isinstance(module, LoRALayer) and bool(module.adapter_names)


def get_layer_status(model):
    """[TunerLayerStatus] of every adapter layer of `model` (itself included), in
    ``named_modules()`` order; ValueError when there is none, as PEFT's."""
    if not isinstance(model, Module):
        raise TypeError(f"get_layer_status: model must be a lorac.Module, got {type(model).__name__}")
    found = [_layer_status(path, m) for path, m in model.named_modules() if _is_adapter_layer(m)]
    if not found:
        raise ValueError(f"get_layer_status: {type(model).__name__} has no adapter layer (a LoRA layer with r > 0 "
                         "or a named adapter)")
    return found


def get_model_status(model):
    """TunerModelStatus of `model`: its layers' statuses folded as PEFT's get_model_status
    folds them ("irregular" where layers disagree), and its parameter counts."""
    layers = get_layer_status(model)
    trainable, total = get_nb_trainable_parameters(model)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    available = sorted(set().union(*(s.available_adapters for s in layers)))
    merged_somewhere = set().union(*(s.merged_adapters for s in layers))
    irregular_merge = any(merged_somewhere & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers)
    grads = defaultdict(list)
    for status in layers:
        for name, value in status.requires_grad.items():
            grads[name].append(value)
    return TunerModelStatus(
        base_model_type=type(model).__name__, adapter_model_type="lorac", peft_types={n: "LORA" for n in available},
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else IRREGULAR,
        active_adapters=list(active.pop()) if len(active) == 1 else IRREGULAR,
        merged_adapters=IRREGULAR if irregular_merge else sorted(merged_somewhere),
        requires_grad={name: _agreement(values) for name, values in grads.items()},
        available_adapters=available, devices={n: ["cpu"] for n in available})

"""LoRA+ (Hayou, Ghosh and Yu 2024): train lora_B with a larger learning rate
than lora_A, as PEFT's ``peft.optimizers.create_loraplus_optimizer``.

Every trainable parameter goes to one of four groups, by PEFT's rules:

- ``embedding``: the parameters of a lorac.Embedding that holds an adapter,
  at ``loraplus_lr_embedding`` (default 1e-6, PEFT's);
- ``B``: lora_B parameters (any name containing "lora_B") and every 1-D
  parameter (biases, LayerNorm weights), at ``lr * loraplus_lr_ratio``, with
  ``loraplus_weight_decay``;
- ``B, no decay``: those of the previous group that are biases or belong to
  a LayerNorm, at the same learning rate without weight decay;
- ``A``: the rest (lora_A, trainable matrices), at ``lr``, with
  ``loraplus_weight_decay``.

The groups are passed to ``optimizer_cls`` in that order, A, embedding, B,
B no decay, empty ones included, as PEFT does.
"""

import math
import numbers

from ..layers import Embedding, LayerNorm
from ..module import Module
from .optimizer import Optimizer


def create_loraplus_optimizer(model, optimizer_cls, *, lr, loraplus_lr_ratio, **kwargs):
    """An ``optimizer_cls`` (a lorac.optim optimizer class) over the model's
    trainable parameters in LoRA+'s four groups (module docstring).

    lr: lora_A's learning rate.  loraplus_lr_ratio: lora_B's over lora_A's
    (the paper suggests 2**4 for many tasks; > 0).  Keywords
    ``loraplus_weight_decay`` (default 0) and ``loraplus_lr_embedding``
    (default 1e-6) set those; the remaining keywords go to optimizer_cls.
    """
    func = "create_loraplus_optimizer"
    if not isinstance(model, Module):
        raise TypeError(f"{func}: model must be a lorac.Module, got {type(model).__name__}")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(f"{func}: optimizer_cls must be a lorac.optim optimizer class (SGD, Adam, AdamW, ...), "
                        f"got {optimizer_cls!r}")
    lr = _non_negative(lr, "lr", func)
    ratio = _non_negative(loraplus_lr_ratio, "loraplus_lr_ratio", func)
    if ratio == 0:
        raise ValueError(f"{func}: loraplus_lr_ratio must be > 0, got 0")
    weight_decay = _non_negative(kwargs.pop("loraplus_weight_decay", 0.0), "loraplus_weight_decay", func)
    lr_embedding = _non_negative(kwargs.pop("loraplus_lr_embedding", 1e-6), "loraplus_lr_embedding", func)

    groups = {"A": [], "embedding": [], "B": [], "B no decay": []}
    seen = set()
    for path, module in model.named_modules():
        lora_embedding = isinstance(module, Embedding) and bool(module.adapter_names)
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            if not param.requires_grad:
                continue
            full = f"{path}.{name}" if path else name
            if lora_embedding:
                groups["embedding"].append(param)
            elif "lora_B" in full or param.ndim == 1:
                decays = "bias" not in full and not isinstance(module, LayerNorm)
                groups["B" if decays else "B no decay"].append(param)
            else:
                groups["A"].append(param)
    return optimizer_cls([
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["B no decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ], lr=lr, **kwargs)


def _non_negative(value, name, func):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{func}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)

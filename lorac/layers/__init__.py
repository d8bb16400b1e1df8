"""LoRA layers (loralib's names)."""

from .base import LoRALayer
from .linear import Linear

__all__ = ["LoRALayer", "Linear"]

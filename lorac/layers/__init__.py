"""LoRA layers (loralib's names)."""

from .base import LoRALayer
from .linear import Linear
from .embedding import Embedding  # issue 3
from .merged_linear import MergedLinear  # issue 3
from .activations import GELU, Dropout, ReLU, Tanh  # issue 5
from .layernorm import LayerNorm  # issue 5
from .molora import MoLoRALinear  # issue 6

__all__ = ["LoRALayer", "Linear", "Embedding", "MergedLinear",
           "ReLU", "GELU", "Tanh", "Dropout", "LayerNorm",
           "MoLoRALinear"]  # issue 6

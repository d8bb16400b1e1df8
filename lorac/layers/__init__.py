"""Layers: the LoRA layers (loralib's names) and the plain ones they compose with."""

from .base import LoRALayer
from .linear import Linear
from .dora import DoRALinear
from .embedding import Embedding
from .dora_embedding import DoRAEmbedding
from .merged_linear import MergedLinear
from .activations import GELU, Dropout, ReLU, Tanh
from .layernorm import LayerNorm
from .molora import MoLoRALinear
from .tokens import TrainableTokensEmbedding

__all__ = ["LoRALayer", "Linear", "DoRALinear", "Embedding", "DoRAEmbedding", "MergedLinear",
           "ReLU", "GELU", "Tanh", "Dropout", "LayerNorm",
           "MoLoRALinear", "TrainableTokensEmbedding"]

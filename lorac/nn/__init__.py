"""lorac.nn: the modules in one torch.nn-like namespace.

    from lorac import nn
    model = nn.Sequential(nn.Linear(64, 512, r=8), nn.ReLU(), nn.LayerNorm(512), nn.Linear(512, 10, r=8))
    criterion = nn.CrossEntropyLoss()

``nn.functional`` is lorac.functional; ``nn.utils`` has torch's gradient
clipping (``clip_grad_norm_``, ``clip_grad_value_``).
"""

from .. import functional
from . import utils
from ..containers import ModuleDict, ModuleList, Sequential
from ..layers import GELU, Dropout, LayerNorm, Linear, LoRALayer, ReLU, Tanh
from ..losses import CrossEntropyLoss, MSELoss
from ..module import Module, Parameter

__all__ = ["Module", "Parameter", "Sequential", "ModuleList", "ModuleDict", "LoRALayer", "Linear", "ReLU",
           "GELU", "Tanh", "Dropout", "LayerNorm", "CrossEntropyLoss", "MSELoss", "functional", "utils"]

# Layers other issues add to lorac.layers, exported when present.
from .. import layers as _layers  # noqa: E402

for _name in ("DoRALinear", "Embedding", "DoRAEmbedding", "MergedLinear", "Conv1d", "Conv2d", "Conv3d"):
    if hasattr(_layers, _name):
        globals()[_name] = getattr(_layers, _name)
        __all__.append(_name)
del _layers, _name

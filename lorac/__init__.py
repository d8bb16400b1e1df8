"""lorac: LoRA (low-rank adaptation) for Python with a fused C core on OpenBLAS.

The loralib workflow without PyTorch::

    import lorac
    layer = lorac.Linear(in_features, out_features, r=16)
    lorac.mark_only_lora_as_trainable(model)
    ...  # train: y = model(x); model.backward(dL_dy); optimizer step
    lorac.save(lorac.lora_state_dict(model), "adapter.safetensors")
    model.load_state_dict(lorac.load("pretrained.safetensors"), strict=False)
    model.load_state_dict(lorac.load("adapter.safetensors"), strict=False)
"""

__version__ = "0.1.0"

from .config import blas_info, get_num_threads, set_num_threads, show_config
from .module import IncompatibleKeys, Module, Parameter, StateDictKeyError
from .containers import Sequential
from .layers import LoRALayer, Linear
from .layers import Embedding, MergedLinear  # issue 3
from .layers import GELU, Dropout, LayerNorm, ReLU, Tanh  # issue 5
from .losses import CrossEntropyLoss, MSELoss  # issue 5
from . import functional, nn, optim  # issue 5
from .utils import count_parameters, lora_state_dict, mark_only_lora_as_trainable

try:  # the checkpoint package is developed alongside; keep the core importable
    from .checkpoint import load, save
except ImportError:  # pragma: no cover
    pass
from .peft import inject_lora, load_peft_adapter, save_peft_adapter  # issue 4 (PEFT)
from . import lowrank  # issue 8 (low-rank toolkit)
from .layers import MoLoRALinear  # issue 6 (many adapters)
from .adapters import (add_adapter, add_weighted_adapter, adapter_names, delete_adapter,  # issue 6
                       disable_adapters, load_adapter, merge_adapter, merge_and_unload, save_adapter,
                       set_adapter, unload, unmerge_adapter)
from .lowrank import (extract_adapter, extract_lora, projection_distance, rank_report,  # issue 8
                      subspace_similarity)

__all__ = [
    "__version__",
    "blas_info", "get_num_threads", "set_num_threads", "show_config",
    "Module", "Parameter", "IncompatibleKeys", "StateDictKeyError", "Sequential",
    "LoRALayer", "Linear",
    "Embedding", "MergedLinear",  # issue 3
    "ReLU", "GELU", "Tanh", "Dropout", "LayerNorm", "CrossEntropyLoss", "MSELoss",  # issue 5
    "functional", "nn", "optim",  # issue 5
    "mark_only_lora_as_trainable", "lora_state_dict", "count_parameters",
    "save", "load",
    "load_peft_adapter", "save_peft_adapter", "inject_lora",  # issue 4 (PEFT)
    "lowrank", "extract_lora", "extract_adapter", "subspace_similarity", "projection_distance",  # issue 8
    "rank_report",  # issue 8
    "MoLoRALinear", "add_adapter", "set_adapter", "delete_adapter", "disable_adapters",  # issue 6
    "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "add_weighted_adapter",  # issue 6
    "load_adapter", "save_adapter", "adapter_names",  # issue 6
]

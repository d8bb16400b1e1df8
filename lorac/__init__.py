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

# layers and model bookkeeping
from .config import blas_info, get_num_threads, set_num_threads, show_config
from .module import IncompatibleKeys, Module, Parameter, StateDictKeyError
from .containers import ModuleDict, ModuleList, Sequential
from .layers import (GELU, DoRAEmbedding, DoRALinear, Dropout, Embedding, LayerNorm, Linear, LoRALayer, MergedLinear,
                     MoLoRALinear, ReLU, Tanh, TrainableTokensEmbedding)
from .losses import CrossEntropyLoss, MSELoss
from . import functional, nn, optim
from .utils import (count_parameters, get_nb_trainable_parameters, lora_state_dict, mark_only_lora_as_trainable,
                    print_trainable_parameters)
# checkpoints and PEFT
from .checkpoint import load, save
from .peft import (CordaConfig, EvaConfig, LoraConfig, LoraGAConfig, add_trainable_tokens, get_eva_state_dict,
                   get_peft_model, initialize_lora_eva_weights, inject_lora, load_peft_adapter, preprocess_corda,
                   preprocess_loraga, save_peft_adapter)
# many adapters on one base
from .adapters import (add_adapter, add_weighted_adapter, adapter_names, delete_adapter, disable_adapters,
                       load_adapter, merge_adapter, merge_and_unload, save_adapter, set_adapter, unload,
                       unmerge_adapter)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
# the low-rank toolkit
from . import lowrank
from .lowrank import extract_adapter, extract_lora, projection_distance, rank_report, subspace_similarity

__all__ = [
    "__version__",
    "blas_info", "get_num_threads", "set_num_threads", "show_config",
    "Module", "Parameter", "IncompatibleKeys", "StateDictKeyError", "Sequential", "ModuleList", "ModuleDict",
    "LoRALayer", "Linear", "DoRALinear", "Embedding", "DoRAEmbedding", "MergedLinear", "MoLoRALinear",
    "TrainableTokensEmbedding", "add_trainable_tokens",
    "ReLU", "GELU", "Tanh", "Dropout", "LayerNorm", "CrossEntropyLoss", "MSELoss",
    "functional", "nn", "optim",
    "mark_only_lora_as_trainable", "lora_state_dict", "count_parameters", "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "save", "load", "load_peft_adapter", "save_peft_adapter", "inject_lora", "LoraConfig", "get_peft_model",
    "EvaConfig", "get_eva_state_dict", "initialize_lora_eva_weights", "CordaConfig", "preprocess_corda",
    "LoraGAConfig", "preprocess_loraga",
    "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "merge_adapter", "unmerge_adapter",
    "merge_and_unload", "unload", "add_weighted_adapter", "load_adapter", "save_adapter", "adapter_names",
    "get_layer_status", "get_model_status", "TunerLayerStatus", "TunerModelStatus",
    "lowrank", "extract_lora", "extract_adapter", "subspace_similarity", "projection_distance", "rank_report",
]

"""PEFT interoperability: LoRA adapter folders in and out, and inject_lora.

- ``load_peft_adapter(model, path, adapter_name=None, strict=True)``: a PEFT
  adapter folder onto a lorac model (all-or-nothing; see load.py).
- ``save_peft_adapter(model, path, base_model_name_or_path=None)``: a folder
  that ``peft.PeftModel.from_pretrained`` loads onto the equivalent torch
  model (see save.py).
- ``inject_lora(model, target_modules, r, ...)``: LoRA on chosen plain
  layers, pretrained weights kept (see inject.py).
- ``LoraConfig`` / ``get_peft_model(model, config)``: PEFT's one-call setup
  (inject, freeze all but the adapters, remember the config; see
  peft_model.py).
- ``EvaConfig`` / ``get_eva_state_dict`` / ``initialize_lora_eva_weights``:
  EVA, PEFT's data-driven start of lora_A (see eva.py).
- ``CordaConfig`` / ``preprocess_corda``: CorDA, PEFT's start from the SVD of
  each weight times its inputs' covariance (see corda.py).
- ``LoraGAConfig`` / ``preprocess_loraga``: LoRA-GA, PEFT's start from the
  SVD of the weights' gradients (see loraga.py).
- ``add_trainable_tokens(model, token_indices)``: PEFT's trainable tokens
  (see tokens.py).
- ``adapter_metadata(model)``: safetensors metadata recording the adapters'
  scaling for lorac files (see adapter.py).

Module map: keys.py (PEFT key grammar), config.py (adapter_config.json),
adapter.py (format-neutral adapter, lorac-file metadata), folder.py (folder
I/O), targets.py (layer kinds, matching, rebuilding); the data-driven
inits eva.py, corda.py and loraga.py (the last two share _prepared.py),
subconfig.py (their config fields), tokens.py (trainable tokens).
"""

from .adapter import Adapter, AdapterError, LayerAdapter, from_lorac_state
from .config import PeftConfigError
from .corda import CordaConfig, preprocess_corda
from .loraga import LoraGAConfig, preprocess_loraga
from .tokens import add_trainable_tokens
from .eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from .folder import PeftFolderError, is_peft_folder, read_peft_folder, write_peft_folder
from .inject import inject_lora
from .load import AdapterMismatchError, load_peft_adapter
from .peft_model import LoraConfig, get_peft_model
from .save import adapter_from_model, adapter_metadata, save_peft_adapter

__all__ = [
    "load_peft_adapter", "save_peft_adapter", "inject_lora", "adapter_metadata", "LoraConfig", "get_peft_model",
    "EvaConfig", "get_eva_state_dict", "initialize_lora_eva_weights", "CordaConfig", "preprocess_corda",
    "LoraGAConfig", "preprocess_loraga", "add_trainable_tokens",
    "Adapter", "LayerAdapter", "AdapterError", "AdapterMismatchError", "PeftConfigError", "PeftFolderError",
    "adapter_from_model", "from_lorac_state", "is_peft_folder", "read_peft_folder", "write_peft_folder",
]

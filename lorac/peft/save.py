"""save_peft_adapter and friends: a lorac model's adapters as a PEFT folder or
as a lorac file's metadata."""

from collections import Counter

from ..module import Module
from .adapter import Adapter, LayerAdapter
from .folder import write_peft_folder
from .keys import lorac_key
from .targets import layer_kind


def adapter_from_model(model):
    """Adapter holding copies of the lora_A / lora_B of every lorac.Linear and
    lorac.Embedding with r > 0 (other LoRA layer kinds raise ValueError)."""
    if not isinstance(model, Module):
        raise TypeError(f"expected a lorac.Module, got {type(model).__name__}")
    adapter = Adapter()
    dropouts = []
    for path, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            if getattr(module, "r", 0) and "lora_A" in getattr(module, "_parameters", {}):
                raise ValueError(f"{path!r} is a {type(module).__name__} with a LoRA adapter; PEFT adapters "
                                 "can only hold lorac.Linear and lorac.Embedding layers")
            continue
        if module.r == 0:
            continue
        if not path:
            raise ValueError(f"the model itself is a LoRA {type(module).__name__}; PEFT adapts child modules "
                             "only (wrap it, e.g. lorac.Sequential(layer))")
        adapter.layers[path] = LayerAdapter(
            module.lora_A.data.copy(), module.lora_B.data.copy(), kind=kind, lora_alpha=module.lora_alpha,
            use_rslora=module.use_rslora, fan_in_fan_out=getattr(module, "fan_in_fan_out", False),
            keys=(lorac_key(path, "lora_A"), lorac_key(path, "lora_B")))
        if kind == "linear":
            dropouts.append(module.lora_dropout)
    if dropouts:
        adapter.lora_dropout = Counter(dropouts).most_common(1)[0][0]
    return adapter


def save_peft_adapter(model, path, base_model_name_or_path=None):
    """Write the model's LoRA adapters as a PEFT adapter folder at ``path``.

    The folder (created if needed) gets ``adapter_model.safetensors`` with
    PEFT's keys (``base_model.model.<path>.lora_A.weight``, ...,
    ``lora_embedding_A`` / ``_B`` for embeddings) and ``adapter_config.json``
    such that ``peft.PeftModel.from_pretrained(torch_model, path)`` rebuilds
    the same adapters on the equivalent torch model (same module names):

    - ``target_modules`` is a regex matching exactly the adapted paths;
    - ``r`` / ``lora_alpha`` are the most common values; other layers get
      anchored ``rank_pattern`` / ``alpha_pattern`` entries;
    - ``use_rslora`` is the majority; a layer of the other kind gets the
      alpha giving its own scaling under the global rule;
    - ``fan_in_fan_out`` is true only if every adapted Linear stores (in,
      out) (PEFT corrects it per layer type anyway; lora_A/B do not depend
      on it); ``lora_dropout`` is the Linear layers' most common value.

    Only adapter tensors are written (no biases, no modules_to_save).  The
    model is read, never changed; merged layers are fine (lora_A/B are the
    same).  Raises ValueError if the model has no LoRA layer.  Returns the
    config dict written.
    """
    adapter = adapter_from_model(model)
    if not adapter.layers:
        raise ValueError(f"save_peft_adapter: {type(model).__name__} has no LoRA layer (r > 0) to save")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError("save_peft_adapter: base_model_name_or_path must be a str or None, got "
                        f"{type(base_model_name_or_path).__name__}")
    return write_peft_folder(adapter, path, base_model_name_or_path)


def adapter_metadata(model):
    """safetensors metadata (str -> str) recording how each adapter of ``model``
    scales, for ``lorac.save(lorac.lora_state_dict(model), path, metadata=...)``;
    ``lorac merge`` and ``lorac convert`` read it (format: lorac.peft.adapter)."""
    return adapter_from_model(model).metadata()

"""save_peft_adapter and friends: a lorac model's adapters as a PEFT folder or
as a lorac file's metadata."""

from collections import Counter

import numpy as np

from ..layers.tokens import TrainableTokensEmbedding
from ..module import Module
from .adapter import Adapter, LayerAdapter
from .folder import write_peft_folder
from .keys import lorac_key, peft_key, peft_module_key
from .targets import layer_kind


def adapter_from_model(model, adapter_name="default"):
    """Adapter holding copies of the lora_A / lora_B of adapter ``adapter_name``
    of every lorac.Linear and lorac.Embedding holding it (other LoRA layer
    kinds raise ValueError)."""
    if not isinstance(model, Module):
        raise TypeError(f"expected a lorac.Module, got {type(model).__name__}")
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
    adapter = Adapter()
    dropouts = []
    for path, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            if getattr(module, "r", 0) and "lora_A" in getattr(module, "_parameters", {}):
                raise ValueError(f"{path!r} is a {type(module).__name__} with a LoRA adapter; PEFT adapters "
                                 "can only hold lorac.Linear and lorac.Embedding layers")
            continue
        if adapter_name not in module.adapter_names:
            continue
        if not path:
            raise ValueError(f"the model itself is a LoRA {type(module).__name__}; PEFT adapts child modules "
                             "only (wrap it, e.g. lorac.Sequential(layer))")
        lora_a, lora_b = module.adapter_parameters(adapter_name)
        lora_bias = module.lora_bias_parameter(adapter_name)
        config = module.adapter_config(adapter_name)
        adapter.layers[path] = LayerAdapter(
            lora_a.data.copy(), lora_b.data.copy(), kind=kind, lora_alpha=config.lora_alpha,
            use_rslora=config.use_rslora, fan_in_fan_out=getattr(module, "fan_in_fan_out", False),
            keys=(lorac_key(path, "lora_A"), lorac_key(path, "lora_B")),
            magnitude=module.lora_magnitude_vector.data.copy() if module.use_dora else None,
            lora_bias=None if lora_bias is None else lora_bias.data.copy(),
            frozen_b=adapter_name in module._frozen_lora_b)
        if kind == "linear":
            dropouts.append(config.lora_dropout)
    if dropouts:
        adapter.lora_dropout = Counter(dropouts).most_common(1)[0][0]
    if adapter_name == "default":   # trainable tokens go with the default adapter (PEFT's)
        adapter.tokens = {path: (m.token_indices.copy(), m.trainable_tokens_delta.data.copy())
                          for path, m in model.named_modules() if isinstance(m, TrainableTokensEmbedding)}
    return adapter


BIAS_MODES = ("none", "all", "lora_only")


def save_peft_adapter(model, path, base_model_name_or_path=None, *, bias=None, modules_to_save=None,
                      adapter_name="default", path_initial_model_for_weight_conversion=None):
    """Write the model's LoRA adapter ``adapter_name`` (default: loralib's
    lora_A / lora_B) as a PEFT adapter folder at ``path``.

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

    Other trained tensors go in as PEFT's LoraConfig fields of the same
    names say (PEFT saves and loads them the same way):

    - ``bias``: "none", "all" (every module's bias; a LoRA layer's as
      ``<path>.base_layer.bias``) or "lora_only" (the LoRA layers'
      biases);
    - ``modules_to_save``: names of modules (a path, or the last parts of
      one) whose whole state is saved, such as a classifier head trained
      in full.  Each name must match a module that is not and does not
      hold a LoRA layer; the config lists the matched paths.

    Not given (None), these and base_model_name_or_path come from the
    LoraConfig ``lorac.get_peft_model`` recorded on the model for the
    adapter, else bias "none" and nothing.

    ``path_initial_model_for_weight_conversion`` (PEFT's keyword): for an
    adapter whose init changed the base weights (PiSSA, OLoRA, CorDA), the
    folder this function wrote right after that init.  The adapter is then
    saved as the plain LoRA adapter of the same fine-tuning on the
    *original* base weights: with W = W_res + s B0 A0 and the trained
    W_res + s B A, the change is s (B A - B0 A0) = s' [B, -B0] [A; A0], rank
    2r, alpha doubled (times sqrt(2) with rsLoRA) so that s' = s.  Unlike
    PEFT, rsLoRA with per-layer ranks converts too (each layer's alpha is
    written).  DoRA and lora_bias adapters are refused (their change is not
    a low-rank product).

    The model is read, never changed; merged layers are fine (lora_A/B and
    the biases are the same).  Raises ValueError if the model has no LoRA
    layer or for a bad argument.  Returns the config dict written.
    """
    bias, modules_to_save, base_model_name_or_path = _config_defaults(model, adapter_name, bias, modules_to_save,
                                                                      base_model_name_or_path)
    adapter = adapter_from_model(model, adapter_name)
    if not adapter.layers:
        what = "no LoRA layer (r > 0)" if adapter_name == "default" else f"no LoRA layer holding {adapter_name!r}"
        raise ValueError(f"save_peft_adapter: {type(model).__name__} has {what} to save")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError("save_peft_adapter: base_model_name_or_path must be a str or None, got "
                        f"{type(base_model_name_or_path).__name__}")
    if bias not in BIAS_MODES:
        raise ValueError(f"save_peft_adapter: bias must be one of {BIAS_MODES}, got {bias!r}")
    if path_initial_model_for_weight_conversion is not None:
        adapter = _converted_to_plain_lora(adapter, path_initial_model_for_weight_conversion)
    saved = select_modules_to_save(model, modules_to_save, adapter.layers, "save_peft_adapter")
    tensors = {}
    for mpath, module in saved.items():
        for name, value in module.state_dict().items():
            tensors[peft_module_key(mpath, name)] = np.array(value)
    if bias != "none":
        for mpath, module in model.named_modules():
            param = module._parameters.get("bias")
            if param is None or not mpath or any(_inside(mpath, s) for s in saved):
                continue
            if mpath in adapter.layers:
                tensors[peft_key(mpath, "bias", None)] = param.data.copy()
            elif bias == "all":
                tensors[peft_module_key(mpath, "bias")] = param.data.copy()
    return write_peft_folder(adapter, path, base_model_name_or_path, bias=bias,
                             modules_to_save=list(saved) or None, peft_tensors=tensors)


def _converted_to_plain_lora(adapter, initial_folder):
    """The Adapter whose layers hold [A; A0] and [B, -B0] (rank 2r, the same scaling), A0 / B0 the
    initial adapter's in ``initial_folder`` (checked to cover the same layers with the same shapes,
    kinds and scalings)."""
    from .folder import read_peft_folder

    func = "save_peft_adapter"
    initial = read_peft_folder(initial_folder)[0]
    if set(initial.layers) != set(adapter.layers):
        raise ValueError(f"{func}: the initial adapter in {initial_folder!r} adapts {sorted(initial.layers)}, the "
                         f"model {sorted(adapter.layers)}; give the folder saved right after the adapters' init")
    converted = Adapter(extra=dict(adapter.extra), lora_dropout=adapter.lora_dropout)
    for path, layer in adapter.layers.items():
        start = initial.layers[path]
        if layer.magnitude is not None or layer.lora_bias is not None:
            what = "DoRA" if layer.magnitude is not None else "lora_bias"
            raise ValueError(f"{func}: layer {path!r} is a {what} adapter; only plain LoRA converts to the "
                             "original base weights")
        if (start.lora_A.shape, start.lora_B.shape) != (layer.lora_A.shape, layer.lora_B.shape) or \
                (start.kind not in (None, layer.kind)):
            raise ValueError(f"{func}: layer {path!r}: the initial adapter's lora_A {start.lora_A.shape} / lora_B "
                             f"{start.lora_B.shape} do not match the model's {layer.lora_A.shape} / "
                             f"{layer.lora_B.shape}")
        if not np.isclose(start.scaling, layer.scaling, rtol=1e-9, atol=0):
            raise ValueError(f"{func}: layer {path!r}: the initial adapter's scaling {start.scaling} is not the "
                             f"model's {layer.scaling}")
        factor = np.sqrt(2.0) if layer.use_rslora else 2.0
        converted.layers[path] = LayerAdapter(
            np.concatenate([layer.lora_A, start.lora_A.astype(layer.lora_A.dtype)], axis=0),
            np.concatenate([layer.lora_B, -start.lora_B.astype(layer.lora_B.dtype)], axis=1),
            kind=layer.kind, lora_alpha=layer.lora_alpha * factor, use_rslora=layer.use_rslora,
            fan_in_fan_out=layer.fan_in_fan_out, keys=layer.keys)
    return converted


def _config_defaults(model, adapter_name, bias, modules_to_save, base_model_name_or_path):
    """bias / modules_to_save / base_model_name_or_path not given: from the LoraConfig
    lorac.get_peft_model recorded for the adapter, else "none" / None / None."""
    from .peft_model import LoraConfig   # peft_model imports this module
    configs = getattr(model, "__dict__", {}).get("peft_config")
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    if not isinstance(config, LoraConfig):
        return ("none" if bias is None else bias), modules_to_save, base_model_name_or_path
    return (config.bias if bias is None else bias,
            config.modules_to_save if modules_to_save is None else modules_to_save,
            config.base_model_name_or_path if base_model_name_or_path is None else base_model_name_or_path)


def _inside(path, root):
    return path == root or path.startswith(root + ".")


def select_modules_to_save(model, names, adapted_paths, func, label="modules_to_save", adapted="a LoRA layer"):
    """{path: module} of the modules that ``names`` (PEFT's modules_to_save: a path, or its
    last components) select, each checked not to be or hold one of ``adapted_paths``
    (``adapted`` says what those are in the error).  ``label`` names the argument."""
    if names is None:
        return {}
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{func}: {label} must be a list of module names, got {names!r}")
    modules = dict(model.named_modules())
    saved = {}
    for name in names:
        found = [p for p in modules if p and (p == name or p.endswith("." + name))]
        if not found:
            raise ValueError(f"{func}: {label} entry {name!r} matches no module of the model")
        for mpath in found:
            inner = [p for p in adapted_paths if _inside(p, mpath)]
            if inner:
                raise ValueError(f"{func}: {label} entry {name!r} selects {mpath!r}, which "
                                 f"{'is' if inner == [mpath] else 'holds'} {adapted} ({inner[0]!r}); "
                                 "PEFT saves a module either as an adapter or whole, not both")
            saved[mpath] = modules[mpath]
    return saved


def adapter_metadata(model):
    """safetensors metadata (str -> str) recording how each adapter of ``model``
    scales, for ``lorac.save(lorac.lora_state_dict(model), path, metadata=...)``;
    ``lorac merge`` and ``lorac convert`` read it (format: lorac.peft.adapter)."""
    return adapter_from_model(model).metadata()

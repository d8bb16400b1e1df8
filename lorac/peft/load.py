"""load_peft_adapter: a PEFT LoRA adapter folder onto a lorac model."""

from ..layers._lora_init import check_init
from ..layers.adapters import DEFAULT
from ..layers.embedding import Embedding
from ..layers.tokens import DELTA, TrainableTokensEmbedding
from ..module import IncompatibleKeys, Module, StateDictKeyError, _checked_value
from .folder import read_peft_folder
from .keys import lorac_key, peft_tokens_key
from .targets import build_layer, describe, layer_dims, layer_kind, swap_layer
from .tokens import install_tokens


class AdapterMismatchError(ValueError):
    """The adapter does not fit the model (shapes or layer kinds)."""


def load_peft_adapter(model, path, adapter_name=None, strict=True):
    """Load the PEFT LoRA adapter in folder ``path`` into ``model``; all-or-nothing.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
    (or ``adapter_model.bin``, read without torch and without running code).
    ``adapter_name``: PEFT saves a non-default adapter in ``path/<name>``;
    that subfolder is used when it exists.

    Each adapter tensor ``base_model.model.<path>.lora_A.weight`` (or
    ``lora_embedding_A``, ...; see lorac.peft.keys) goes to the module at
    ``<path>``, which must be a ``lorac.Linear`` or ``lorac.Embedding`` with
    matching sizes.  Every layer that receives an adapter is rebuilt with the
    file's rank and scaling -- r and lora_alpha from the config or its
    rank_pattern / alpha_pattern, use_rslora, lora_dropout -- keeping its
    base ``weight`` and ``bias`` (see lorac.peft.targets): a plain layer
    (r = 0) gains an adapter and a LoRA layer of any rank is replaced.  A
    layer's own weight layout is kept: PEFT's lora_A / lora_B do not depend
    on fan_in_fan_out.  Base parameters the file carries (bias="all" /
    "lora_only", modules_to_save) are loaded into the model too.  The loaded
    adapters are trainable (lora_A / lora_B requires_grad), the base weights
    frozen, as in any lorac LoRA layer; train/eval mode is kept.  A DoRA
    adapter (use_dora) makes its layers ``lorac.DoRALinear`` /
    ``lorac.DoRAEmbedding`` holding the file's magnitude vectors; one with
    PEFT's lora_bias gives its Linear layers ``lora_bias`` (which needs the
    layer's bias: merging adds into it; a layer the file gives no lora_B.bias
    gets zeros, as PEFT's init).  Trainable tokens (the config's
    ``trainable_token_indices``) make their plain lorac.Embedding layers
    ``lorac.TrainableTokensEmbedding`` holding the file's rows.

    Everything -- config fields (other peft_types, QALoRA, ... are
    refused with an error naming them), keys, layer kinds, shapes and dtypes
    -- is checked before the model is touched.

    strict=True raises StateDictKeyError (a KeyError) when the file has keys
    for modules the model lacks (``unexpected_keys``, file keys) or the model
    has LoRA layers the file does not cover (``missing_keys``, model keys,
    which would otherwise keep their current adapters).  strict=False loads
    what matches.  Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``.
    """
    if not isinstance(model, Module):
        raise TypeError(f"load_peft_adapter: model must be a lorac.Module, got {type(model).__name__}")
    adapter, config = read_peft_folder(path, adapter_name)
    modules = dict(model.named_modules())
    unexpected = []

    plans = []  # (path, old module, LayerAdapter)
    for mpath, layer in adapter.layers.items():
        module = modules.get(mpath) if mpath else None
        if module is None:
            unexpected.extend(layer.keys)
            continue
        kind = layer_kind(module)
        if kind is None:
            raise AdapterMismatchError(
                f"{layer.keys[0]!r}: the module at {mpath!r} is a {describe(module)}; PEFT LoRA adapters "
                "load into lorac.Linear and lorac.Embedding layers only")
        if kind != layer.kind:
            raise AdapterMismatchError(
                f"{layer.keys[0]!r} is a {layer.kind} adapter but {mpath!r} is a {describe(module)}")
        if config.lora_bias and module.bias is None:
            raise AdapterMismatchError(
                f"{layer.keys[0]!r}: the adapter has PEFT's lora_bias but the module at {mpath!r} has no bias, "
                "which lorac's lora_bias needs (merging adds scaling * lora_bias into it)")
        fin, fout = layer_dims(module)
        for key, arr, expected in ((layer.keys[0], layer.lora_A, (layer.r, fin)),
                                   (layer.keys[1], layer.lora_B, (fout, layer.r))):
            if tuple(arr.shape) != expected:
                raise AdapterMismatchError(f"size mismatch for {key!r} (module {mpath!r}): expected shape "
                                           f"{expected}, found shape {tuple(arr.shape)}")
        plans.append((mpath, module, layer))
    token_plans = _token_plans(adapter.tokens, modules, unexpected)
    extras = {}  # module path -> {param name: value}; applied to the final module objects
    for key, value in adapter.extra.items():
        mpath, _, name = key.rpartition(".")
        module = modules.get(mpath)
        param = None if module is None else module._parameters.get(name)
        if param is None:
            unexpected.append(key)
            continue
        extras.setdefault(mpath, {})[name] = _checked_value(key, value, param)

    covered = {p for p, _, _ in plans}
    missing = [lorac_key(p, name) for p, m in modules.items()
               if layer_kind(m) is not None and m.r > 0 and p not in covered
               for name in ("lora_A", "lora_B")]
    missing += [lorac_key(p, DELTA) for p, m in modules.items()
                if isinstance(m, TrainableTokensEmbedding) and p not in adapter.tokens]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append("missing keys (LoRA layers the adapter does not cover): "
                         + ", ".join(repr(k) for k in missing))
        if unexpected:
            parts.append("unexpected keys (no such module or parameter in the model): "
                         + ", ".join(repr(k) for k in unexpected))
        raise StateDictKeyError(f"Error(s) in loading PEFT adapter {path} into {type(model).__name__}: "
                                + "; ".join(parts), missing, unexpected)

    # Everything is validated: build the new layers (no change to the model yet), then swap them in.
    news = [build_layer(m, layer.r, layer.lora_alpha, layer.use_rslora, config.lora_dropout, None,
                        use_dora=layer.magnitude is not None, lora_bias=config.lora_bias)[0]
            for _, m, layer in plans]
    for (mpath, module, layer), new in zip(plans, news):
        swap_layer(modules, mpath, module, new, layer.lora_A, layer.lora_B, magnitude=layer.magnitude,
                   lora_bias=layer.lora_bias)
        if layer.frozen_b:   # MiCA: lora_B stays frozen, as PEFT trains it
            new._follow_init(DEFAULT, check_init("mica"))
        modules[mpath] = new
    for mpath, module, ids, rows in token_plans:
        install_tokens(modules, mpath, module, ids, rows)
    for mpath, values in extras.items():
        modules[mpath]._load_state_items(values)
    return IncompatibleKeys(missing, unexpected)


def _token_plans(tokens, modules, unexpected):
    """[(path, module, ids, rows)] of the file's trainable tokens, each checked against its module (a
    plain lorac.Embedding, or one with trainable tokens already); keys for missing modules go to
    ``unexpected``."""
    plans = []
    for path, (ids, rows) in tokens.items():
        module = modules.get(path) if path else None
        if module is None:
            unexpected.append(peft_tokens_key(path))
            continue
        if type(module) not in (Embedding, TrainableTokensEmbedding) or module.r > 0:
            raise AdapterMismatchError(f"{peft_tokens_key(path)!r}: trainable tokens go on a plain lorac.Embedding; "
                                       f"the module at {path!r} is a {describe(module)}")
        if rows.shape != (len(ids), module.embedding_dim) or ids.max() >= module.num_embeddings:
            raise AdapterMismatchError(f"size mismatch for {peft_tokens_key(path)!r} (module {path!r}): "
                                       f"{len(ids)} token rows of {module.embedding_dim} values with ids below "
                                       f"{module.num_embeddings} expected, found shape {rows.shape} and largest id "
                                       f"{int(ids.max())}")
        plans.append((path, module, ids, rows))
    return plans

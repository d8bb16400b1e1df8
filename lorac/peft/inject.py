"""inject_lora: give chosen layers of an existing model a LoRA adapter, keeping
their pretrained weights."""

import warnings

from .._arrays import as_generator, non_negative_int, probability, real_number
from ..module import Module
from .targets import build_layer, compile_matcher, describe, layer_kind, swap_layer


def inject_lora(model, target_modules, r, lora_alpha=1, lora_dropout=0.0, fan_in_fan_out=False,
                use_rslora=False, rng=None):
    """Replace the matching plain ``lorac.Linear`` / ``lorac.Embedding`` layers
    (r = 0) of ``model`` by LoRA layers of rank ``r``; returns ``model``.

    The new layers keep the old ones' ``weight`` and ``bias`` (the same
    Parameter objects: pretrained weights are never re-initialised -- unlike
    re-creating loralib layers, loralib #55), freeze the weight, and get a
    fresh adapter: Linear lora_A kaiming-uniform and lora_B zero, Embedding
    lora_A zero and lora_B normal, so the model's outputs do not change.
    They keep the old layers' train/eval mode, layout and dtype.

    target_modules: like PEFT, a regex str that must match a module's whole
        dotted path (``named_modules()`` names), or a list of names, each
        matching a path equal to it or ending in ``"." + name``.
    r: the rank (>= 1).  lora_alpha: scaling = lora_alpha / r (loralib's
        default 1), or lora_alpha / sqrt(r) with ``use_rslora``.
    lora_dropout: dropout on the input of Linear adapters (Embedding has none).
    fan_in_fan_out: the layout PEFT would be told the base weights have.  A
        lorac layer knows its own layout, which always wins; when it differs
        from this flag a warning says so (as PEFT does).  None: no check.
    rng: seed or numpy Generator for the adapter initialisation.

    Raises ValueError if nothing matches, if a matching module is of another
    kind (names it and its type) or already has an adapter; the model is
    left unchanged then.
    """
    if not isinstance(model, Module):
        raise TypeError(f"inject_lora: model must be a lorac.Module, got {type(model).__name__}")
    matches = compile_matcher(target_modules)
    r = non_negative_int(r, "r")
    if r == 0:
        raise ValueError("inject_lora: r must be >= 1, got 0")
    lora_alpha = real_number(lora_alpha, "lora_alpha")
    lora_dropout = probability(lora_dropout, "lora_dropout")
    if fan_in_fan_out is not None and not isinstance(fan_in_fan_out, bool):
        raise TypeError(f"inject_lora: fan_in_fan_out must be a bool or None, got {type(fan_in_fan_out).__name__}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"inject_lora: use_rslora must be a bool, got {type(use_rslora).__name__}")
    rng = as_generator(rng)

    modules = dict(model.named_modules())
    chosen = []
    for path, module in modules.items():
        if not path or not matches(path):
            continue
        if layer_kind(module) is None:
            raise ValueError(f"inject_lora: target_modules matched {path!r}, a {describe(module)}; only "
                             "lorac.Linear and lorac.Embedding layers can be given a LoRA adapter")
        if module.r > 0:
            raise ValueError(f"inject_lora: {path!r} already has a LoRA adapter (r={module.r})")
        chosen.append((path, module))
    if not chosen:
        adaptable = [p for p, m in modules.items() if p and layer_kind(m) is not None]
        raise ValueError(f"inject_lora: target_modules {target_modules!r} matched no module; "
                         f"the model's Linear/Embedding layers are {adaptable[:20]}"
                         + (" ..." if len(adaptable) > 20 else ""))

    for path, module in chosen:
        if fan_in_fan_out is not None and layer_kind(module) == "linear" \
                and module.fan_in_fan_out != fan_in_fan_out:
            warnings.warn(f"inject_lora: fan_in_fan_out={fan_in_fan_out} but {path!r} stores its weight "
                          f"{'(in, out)' if module.fan_in_fan_out else '(out, in)'}; "
                          f"using the layer's own layout (fan_in_fan_out={module.fan_in_fan_out})",
                          UserWarning, stacklevel=2)
    new_layers = [build_layer(module, r, lora_alpha, use_rslora, lora_dropout, rng) for _, module in chosen]
    for (path, module), new in zip(chosen, new_layers):
        swap_layer(modules, path, module, new)
    return model

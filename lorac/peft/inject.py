"""inject_lora: give chosen layers of an existing model a LoRA adapter, keeping
their pretrained weights."""

import warnings

from .._arrays import as_generator, non_negative_int, probability, real_number
from ..layers._lora_init import check_init
from ..module import Module
from .select import compile_selector, expand_all_linear, per_layer_settings
from .targets import build_layer, describe, layer_kind, swap_layer


def inject_lora(model, target_modules, r, lora_alpha=1, lora_dropout=0.0, fan_in_fan_out=False,
                use_rslora=False, rng=None, *, exclude_modules=None, rank_pattern=None, alpha_pattern=None,
                layers_to_transform=None, layers_pattern=None, init="kaiming", init_std=None, use_dora=False,
                embedding_init=None, lora_bias=False):
    """Replace the matching plain ``lorac.Linear`` / ``lorac.Embedding`` layers
    (r = 0) of ``model`` by LoRA layers; returns ``model``.  The selection
    and per-layer settings follow PEFT's LoraConfig fields of the same
    names (lorac/peft/select.py spells the rules out), so a model selects
    the same layers here as its torch twin does under ``get_peft_model``.

    The new layers keep the old ones' ``weight`` and ``bias`` (the same
    Parameter objects: pretrained weights are never re-initialised -- unlike
    re-creating loralib layers, loralib #55), freeze the weight, and get a
    fresh adapter that leaves the model's outputs unchanged (with the
    default init).  They keep the old layers' train/eval mode, layout and
    dtype.

    target_modules: a regex str that must match a module's whole dotted path
        (``named_modules()`` names), or a list of names, each matching a
        path equal to it or ending in ``"." + name``, or ``"all-linear"``
        (PEFT's shorthand: every Linear layer, an output head included, as
        PEFT does for models that are not transformers models).
    r: the rank (>= 1).  lora_alpha: scaling = lora_alpha / r (loralib's
        default 1), or lora_alpha / sqrt(r) with ``use_rslora``.
    lora_dropout: dropout on the input of Linear adapters (Embedding has none).
    fan_in_fan_out: the layout PEFT would be told the base weights have.  A
        lorac layer knows its own layout, which always wins; when it differs
        from this flag a warning says so (as PEFT does).  None: no check.
    rng: seed or numpy Generator for the adapter initialisation.
    exclude_modules: paths never adapted, in target_modules' two forms.
    rank_pattern / alpha_pattern: {regex: r} / {regex: lora_alpha} for the
        layers whose path the first matching key fits (PEFT's
        get_pattern_key); keys that fit no adapted layer are warned about,
        as PEFT does.
    layers_to_transform / layers_pattern: with a list target_modules, adapt
        only the layers of these indexes (an int or a list), the index being
        the number after ``<layers_pattern>.`` in the path.
    init, init_std: how adapters start, as ``Linear(init=...)``: 'kaiming'
        (default), 'gaussian' (std 0.01 unless init_std; PEFT's is 1 / r),
        'zeros_A', 'pissa' / 'pissa_niter_N' / 'olora' (the base weight
        becomes the residual), 'orthogonal', or PEFT's True / False.  PEFT
        starts an Embedding at its default init under 'pissa', 'olora' and
        'orthogonal'; lorac applies them to Embeddings too, unless
        ``embedding_init`` says otherwise.
    embedding_init: the init of Embedding layers (same choices), None: init.
        ``lorac.get_peft_model`` passes PEFT's rule.
    use_dora: make the layers ``lorac.DoRALinear`` / ``lorac.DoRAEmbedding``
        (DoRA, PEFT's use_dora), their magnitudes starting at the row norms
        so the outputs do not change.
    lora_bias: PEFT's lora_bias: each adapter also gets ``lora_bias`` (out,)
        (``Linear(lora_bias=True)``); as PEFT, Linear layers only, not with
        use_dora, init 'kaiming' / True / False only; lorac also needs each
        layer's bias (merging adds into it).

    Raises ValueError if nothing matches, if a matching module is of another
    kind (names it and its type) or already has an adapter, or for a bad
    argument (TypeError for a wrong type); the model is left unchanged then.
    """
    func = "inject_lora"
    if not isinstance(model, Module):
        raise TypeError(f"{func}: model must be a lorac.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    target_modules = expand_all_linear(target_modules, [p for p, m in modules.items()
                                                        if p and layer_kind(m) == "linear"], func,
                                       layers_to_transform, layers_pattern)
    selected = compile_selector(target_modules, exclude_modules, layers_to_transform, layers_pattern)
    r = non_negative_int(r, "r")
    if r == 0:
        raise ValueError(f"{func}: r must be >= 1, got 0")
    lora_alpha = real_number(lora_alpha, "lora_alpha")
    lora_dropout = probability(lora_dropout, "lora_dropout")
    if fan_in_fan_out is not None and not isinstance(fan_in_fan_out, bool):
        raise TypeError(f"{func}: fan_in_fan_out must be a bool or None, got {type(fan_in_fan_out).__name__}")
    for name, flag in (("use_rslora", use_rslora), ("use_dora", use_dora), ("lora_bias", lora_bias)):
        if not isinstance(flag, bool):
            raise TypeError(f"{func}: {name} must be a bool, got {type(flag).__name__}")
    spec = check_init(init, init_std, func)
    embedding_spec = spec if embedding_init is None else check_init(embedding_init, None, func)
    rng = as_generator(rng)

    chosen = []
    for path, module in modules.items():
        if not path or not selected(path):
            continue
        if layer_kind(module) is None:
            raise ValueError(f"{func}: target_modules matched {path!r}, a {describe(module)}; only "
                             "lorac.Linear and lorac.Embedding layers can be given a LoRA adapter")
        if module.r > 0:
            raise ValueError(f"{func}: {path!r} already has a LoRA adapter (r={module.r})")
        chosen.append((path, module))
    if not chosen:
        adaptable = [p for p, m in modules.items() if p and layer_kind(m) is not None]
        raise ValueError(f"{func}: target_modules {target_modules!r} matched no module"
                         + ("" if exclude_modules is None and layers_to_transform is None
                            else " (after exclude_modules / layers_to_transform)")
                         + f"; the model's Linear/Embedding layers are {adaptable[:20]}"
                         + (" ..." if len(adaptable) > 20 else ""))

    if lora_bias:
        _check_lora_bias(chosen, spec, use_dora, func)
    if use_dora and "mica" in (spec.name, embedding_spec.name):
        raise ValueError(f"{func}: init='mica' (MiCA: lora_B frozen) does not combine with use_dora=True")
    settings = per_layer_settings([path for path, _ in chosen], r, lora_alpha, rank_pattern, alpha_pattern, func)
    for path, module in chosen:
        if fan_in_fan_out is not None and layer_kind(module) == "linear" \
                and module.fan_in_fan_out != fan_in_fan_out:
            warnings.warn(f"{func}: fan_in_fan_out={fan_in_fan_out} but {path!r} stores its weight "
                          f"{'(in, out)' if module.fan_in_fan_out else '(out, in)'}; "
                          f"using the layer's own layout (fan_in_fan_out={module.fan_in_fan_out})",
                          UserWarning, stacklevel=2)
    # every adapter (and PiSSA's SVD) is made before any layer is swapped in
    builds = [build_layer(module, layer_r, layer_alpha, use_rslora, lora_dropout, rng,
                          embedding_spec if layer_kind(module) == "embedding" else spec, use_dora, lora_bias)
              for (_, module), (layer_r, layer_alpha) in zip(chosen, settings)]
    for (path, module), (new, weight) in zip(chosen, builds):
        swap_layer(modules, path, module, new, weight=weight)
    return model



def _check_lora_bias(chosen, spec, use_dora, func):
    """lora_bias=True: PEFT's rules (Linear layers, no DoRA, init True / False) and a bias on every layer."""
    if use_dora:
        raise ValueError(f"{func}: lora_bias=True is not supported with use_dora=True (as in PEFT)")
    for path, module in chosen:
        module._check_lora_bias_allowed(f"{func}: {path!r}", spec)

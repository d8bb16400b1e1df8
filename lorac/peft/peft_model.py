"""lorac.LoraConfig and lorac.get_peft_model: PEFT's one-call setup on a lorac model.

    config = lorac.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                              modules_to_save=["classifier"])
    model = lorac.get_peft_model(model, config)
    lorac.print_trainable_parameters(model)
    ...train...
    lorac.save_peft_adapter(model, "out")      # PEFT's folder, the config's bias / modules_to_save

get_peft_model does what PEFT's does, on the model itself (lorac has no
wrapper class): ``inject_lora`` with the config's fields, then every
parameter frozen except the adapters, the biases ``bias`` names ("all" /
"lora_only") and the modules ``modules_to_save`` names, which train.  The
config is kept as ``model.peft_config["default"]``; ``save_peft_adapter``
takes its bias, modules_to_save and base_model_name_or_path when not told.

As in PEFT: r = 8 and lora_alpha = 8 by default; init_lora_weights
"gaussian" draws A with std 1 / r of each layer; an Embedding starts at
its default init (A = 0, B ~ N(0, 1)) under every init but False and
'mica' (MiCA's start, which PEFT gives Embedding layers too).
The data-driven inits take their sub-configs as PEFT's: "eva" (eva_config;
lora_A kaiming and lora_B zero until lorac.initialize_lora_eva_weights,
eva.py), "corda" (corda_config; after lorac.preprocess_corda, corda.py) and
"lora_ga" (lora_ga_config; after lorac.preprocess_loraga, loraga.py).
``trainable_token_indices`` (a list for the layer "embed_tokens", or
{layer name: ids}) makes those rows of plain Embedding layers trainable
(lorac/peft/tokens.py), as PEFT's.
Unlike PEFT, a module to save trains in place: PEFT trains a copy and
keeps the original for ``disable_adapter()``, which lorac cannot give
back (save the original state first if you need it).
"""

import warnings
from dataclasses import dataclass, field, replace

from ..module import Module
from ..utils import is_adapter_key, mark_only_lora_as_trainable
from ._prepared import start_from
from .corda import CordaConfig, corda_eigens, corda_factors
from .eva import EvaConfig
from .loraga import LoraGAConfig, loraga_factors, loraga_grads
from .subconfig import sub_config
from .tokens import add_trainable_tokens, token_plan
from .inject import inject_lora
from .save import BIAS_MODES, select_modules_to_save
from .targets import config_selector, layer_kind

DEFAULT = "default"


@dataclass
class LoraConfig:
    """The fields of PEFT's LoraConfig that lorac implements, with PEFT's
    defaults; a field PEFT has and lorac does not is a TypeError (unexpected
    keyword).  ``task_type`` is accepted for scripts written for PEFT and
    changes nothing; ``inference_mode`` freezes the adapters and the modules
    to save, as PEFT's (the biases ``bias`` names still train there too)."""

    r: int = 8
    target_modules: object = None
    exclude_modules: object = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list = None
    init_lora_weights: object = True
    layers_to_transform: object = None
    layers_pattern: object = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    base_model_name_or_path: str = None
    task_type: str = None
    inference_mode: bool = False
    eva_config: object = None
    corda_config: object = None
    lora_ga_config: object = None
    trainable_token_indices: object = None


def get_peft_model(model, peft_config, adapter_name=DEFAULT, rng=None):
    """Give ``model`` the LoRA adapters ``peft_config`` (a LoraConfig) describes
    and leave only them (and the config's biases / modules to save)
    trainable, as PEFT's get_peft_model (module docstring); returns ``model``.
    rng: seed or Generator for the adapters' initialisation.  Everything is
    checked before the model changes."""
    func = "get_peft_model"
    if not isinstance(model, Module):
        raise TypeError(f"{func}: model must be a lorac.Module, got {type(model).__name__}")
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"{func}: peft_config must be a lorac.LoraConfig, got {type(peft_config).__name__}")
    config = peft_config
    if adapter_name != DEFAULT:
        raise ValueError(f"{func}: adapter_name must be {DEFAULT!r} (the layers' own adapter), got "
                         f"{adapter_name!r}; add further adapters with lorac.add_adapter")
    if config.target_modules is None:
        raise ValueError(f"{func}: LoraConfig.target_modules is required (PEFT's per-architecture defaults "
                         "need transformers); give names, a regex or 'all-linear'")
    if config.bias not in BIAS_MODES:
        raise ValueError(f"{func}: LoraConfig.bias must be one of {BIAS_MODES}, got {config.bias!r}")
    saved = _modules_to_save(model, config, func)
    tokens = _token_plan(model, config, saved, func)
    init = config.init_lora_weights
    gaussian = isinstance(init, str) and init == "gaussian"
    config = _with_sub_configs(config, func)
    data_driven = init if isinstance(init, str) and init in ("eva", "corda", "lora_ga") else None
    if data_driven and config.lora_bias:
        raise ValueError(f"{func}: lora_bias=True needs init_lora_weights True or False (as PEFT), got "
                         f"{data_driven!r}")
    prepared = {}
    if data_driven == "corda":
        prepared = corda_eigens(model, config, func)
    elif data_driven == "lora_ga":
        prepared = loraga_grads(model, config, func)
    if data_driven:
        init = True   # lora_A kaiming, lora_B zero: EVA's start (initialize_lora_eva_weights does the rest)
    adapted_before = {id(m) for m in model.modules() if layer_kind(m) is not None and m.r > 0}
    inject_lora(model, config.target_modules, config.r, config.lora_alpha, config.lora_dropout,
                config.fan_in_fan_out, config.use_rslora, rng, exclude_modules=config.exclude_modules,
                rank_pattern=config.rank_pattern or None, alpha_pattern=config.alpha_pattern or None,
                layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
                init=init, use_dora=config.use_dora, embedding_init=_embedding_init(init), lora_bias=config.lora_bias)
    for module in model.modules():   # PEFT's gaussian std, 1 / r of each layer this call adapted
        if gaussian and layer_kind(module) == "linear" and module.r > 0 and id(module) not in adapted_before:
            module.reset_adapter(init="gaussian", init_std=1.0 / module.r)
    for path, data in prepared.items():   # CorDA / LoRA-GA: factors from what the preprocessing left
        layer = model.get_submodule(path)
        if data_driven == "corda":
            start_from(layer, *corda_factors(layer, data))
        else:
            start_from(layer, *loraga_factors(layer, data, config.lora_ga_config, layer.rng))
    if tokens:
        add_trainable_tokens(model, {path: indices for path, _, indices in tokens}, func)
    mark_only_lora_as_trainable(model, config.bias)
    if config.inference_mode:   # PEFT's: adapters and modules to save frozen, its bias rule kept
        for name, param in model.named_parameters():
            if is_adapter_key(name):
                param.requires_grad = False
    else:
        for module in saved:
            for param in module.parameters():
                param.requires_grad = True
    model.peft_config = {DEFAULT: config}
    return model


def _embedding_init(init):
    """PEFT's start of an Embedding adapter: its default (A = 0, B ~ N(0, 1)) under every init but
    False (both random) and 'mica' (which PEFT's Embedding layers take too)."""
    if isinstance(init, str) and init == "mica":
        return init
    return init is not False


def _with_sub_configs(config, func):
    """config with eva_config an EvaConfig, corda_config a CordaConfig and lora_ga_config a
    LoraGAConfig (dicts of their fields are accepted): PEFT's default one (and a warning) for init
    'eva' / 'corda' without it (an error for 'lora_ga', as PEFT); a warning for one another init ignores."""
    changes = {}
    init = config.init_lora_weights
    for field_name, name, cls in (("eva_config", "eva", EvaConfig), ("corda_config", "corda", CordaConfig),
                                  ("lora_ga_config", "lora_ga", LoraGAConfig)):
        value = sub_config(getattr(config, field_name), cls, field_name, func)
        chosen = isinstance(init, str) and init == name
        if chosen and value is None and name == "lora_ga":   # PEFT has no default LoRA-GA config either
            raise ValueError(f"{func}: init_lora_weights='lora_ga' needs lora_ga_config=lorac.LoraGAConfig(...)")
        if chosen and value is None:
            warnings.warn(f"{func}: init_lora_weights is {name!r} but {field_name} is not given; using the "
                          f"default {cls.__name__}()", UserWarning, stacklevel=3)
            value = cls()
        elif value is not None and not chosen:
            warnings.warn(f"{func}: {field_name} is ignored: init_lora_weights is {init!r}, not {name!r}",
                          UserWarning, stacklevel=3)
        if value is not getattr(config, field_name):
            changes[field_name] = value
    return replace(config, **changes) if changes else config


def _adapted_paths(model, config, func):
    """The module paths the config's target fields select."""
    modules = dict(model.named_modules())
    selected = config_selector(modules, config, func)
    return [p for p in modules if p and selected(p)]


def _modules_to_save(model, config, func):
    """The modules config.modules_to_save selects, checked not to be or hold a layer the
    config adapts (PEFT saves a module one way or the other)."""
    if config.modules_to_save is None:
        return []
    return list(select_modules_to_save(model, config.modules_to_save, _adapted_paths(model, config, func), func,
                                       "LoraConfig.modules_to_save", "a target of the adapter").values())


def _token_plan(model, config, saved, func):
    """add_trainable_tokens' plan for config.trainable_token_indices ([] without), checked against the
    LoRA targets and the modules to save (PEFT refuses both overlaps)."""
    if config.trainable_token_indices is None:
        return []
    plan = token_plan(model, config.trainable_token_indices, func, adapted=set(_adapted_paths(model, config, func)))
    for path, layer, _ in plan:
        if any(layer is m or any(layer is sub for sub in m.modules()) for m in saved):
            raise ValueError(f"{func}: {path!r} is in modules_to_save (trained whole) and has trainable tokens; "
                             "give it one or the other (as PEFT)")
    return plan

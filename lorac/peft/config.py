"""adapter_config.json: what lorac accepts, refuses and writes.

Reading (``parse_config``) follows PEFT's LoraConfig field by field:

- ``peft_type`` must be ``"LORA"``.
- Used: ``r``, ``lora_alpha``, ``use_rslora`` (scaling lora_alpha / sqrt(r)),
  ``rank_pattern`` / ``alpha_pattern`` (per-layer r and alpha; a pattern key
  matches a module path the way PEFT's ``get_pattern_key`` does: the regex
  ``(.*\\.)?(<key>)$``, first key in file order wins), ``fan_in_fan_out``,
  ``lora_dropout`` (given to rebuilt layers), ``bias`` and ``modules_to_save``
  (their tensors, when present, are loaded into the model's parameters).
- ``use_dora``: DoRA; its layers load as ``lorac.DoRALinear`` /
  ``lorac.DoRAEmbedding``.
- ``lora_bias``: a bias on lora_B; its Linear layers load with
  ``lora_bias=True``.
- ``trainable_token_indices``: a list of token ids (for "embed_tokens") or
  ``{layer name: ids}``; the layers load as TrainableTokensEmbedding.
- Refused with PeftConfigError naming the field:
  ``use_qalora``, ``alora_invocation_tokens``, ``use_bdlora``,
  ``arrow_config``, ``kasa_config``, ``monteclora_config``,
  ``layer_replication``, ``target_parameters``, ``megatron_config``, the old ``enable_lora`` (fused layers), and
  ``init_lora_weights`` values that change the base model's weights (pissa*,
  olora, corda, loftq, lora_ga) or that lorac does not know.
- ``init_lora_weights="mica"`` (MiCA) leaves the base weights alone: its
  layers load with lora_B frozen, as PEFT trains them (lora_A only).
- Ignored: ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
  ``layers_pattern`` -- the tensors in the file say which layers carry an
  adapter -- and bookkeeping fields (task_type, revision, ...).
- ``velora_config`` is accepted with a warning (its forward is plain LoRA;
  lorac computes exact gradients).  Keys PEFT 0.21 does not have are
  tolerated with one warning listing them.

Writing (``build_config``) produces the fields PEFT's ``LoraConfig`` needs;
per-layer ranks and alphas go to rank_pattern / alpha_pattern under
anchored, escaped keys (``^<path>$``) so they match exactly one module.
"""

import math
import numbers
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

from .select import compile_patterns, pattern_value

CONFIG_NAME = "adapter_config.json"

# Fields of PEFT's LoraConfig (0.21) and its PeftConfig base, plus older names.
KNOWN_FIELDS = frozenset("""
    alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path bias
    corda_config ensure_weight_tying eva_config exclude_modules fan_in_fan_out inference_mode
    init_lora_weights kasa_config layer_replication layers_pattern layers_to_transform loftq_config
    lora_alpha lora_bias lora_dropout lora_ga_config megatron_config megatron_core modules_to_save
    monteclora_config peft_type peft_version qalora_group_size r rank_pattern revision runtime_config
    target_modules target_parameters task_type trainable_token_indices use_bdlora use_dora use_qalora
    use_rslora velora_config enable_lora merge_weights
""".split())

# field -> what it is; refused when set to anything but null/false/empty.
REFUSED_FIELDS = {
    "use_qalora": "QALoRA (quantisation-aware pooling)",
    "alora_invocation_tokens": "activated LoRA (token-dependent adapter)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (singular-value adaptation)",
    "monteclora_config": "MonteCLoRA sampling",
    "layer_replication": "layer replication (changes the model's structure)",
    "target_parameters": "LoRA on bare parameters",
    "megatron_config": "Megatron tensor-parallel layers",
    "enable_lora": "fused (merged) LoRA layers from old PEFT",
}

# init_lora_weights values that leave the base weights untouched.
SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class PeftConfigError(ValueError):
    """adapter_config.json is malformed or asks for something lorac cannot do."""


def _is_set(value):
    return value not in (None, False, 0, "", [], {})


def _pattern_regexes(patterns, name, source):
    try:
        return compile_patterns(patterns, name)
    except (TypeError, ValueError) as exc:
        raise PeftConfigError(f"{source}: {exc}") from None


def _real(value, name, source, positive=False, integer=False):
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise PeftConfigError(f"{source}: {name} must be {kind}, got {value!r}")
    if positive and value <= 0:
        raise PeftConfigError(f"{source}: {name} must be > 0, got {value!r}")
    return int(value) if integer else float(value)


def _token_indices(value, source):
    """trainable_token_indices as {layer name: [ids]} (None when not set)."""
    if value is None or value == [] or value == {}:
        return None
    spec = {"embed_tokens": value} if isinstance(value, list) else value
    if not isinstance(spec, dict) or not all(
            isinstance(name, str) and name and isinstance(ids, list) and ids
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
            for name, ids in spec.items()):
        raise PeftConfigError(f"{source}: trainable_token_indices must be a list of token ids or a dict "
                              f"{{layer name: [ids]}}, got {value!r}")
    return {name: list(ids) for name, ids in spec.items()}


def _flag(raw, name, source):
    value = raw.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise PeftConfigError(f"{source}: {name} must be true or false, got {value!r}")
    return value


@dataclass
class PeftAdapterConfig:
    """The parts of a LoRA adapter_config.json that lorac uses."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    lora_dropout: float = 0.0
    use_dora: bool = False
    lora_bias: bool = False
    mica: bool = False       # init_lora_weights "mica": lora_B stays frozen
    trainable_token_indices: dict = None   # {layer name: [ids]} (a list means {"embed_tokens": list})
    bias: str = "none"
    modules_to_save: list = field(default_factory=list)
    base_model_name_or_path: str = None
    rank_pattern: list = field(default_factory=list)   # [(key, compiled regex, r)]
    alpha_pattern: list = field(default_factory=list)  # [(key, compiled regex, alpha)]

    def rank_for(self, path):
        """r of the layer at ``path`` (rank_pattern, else r)."""
        return pattern_value(self.rank_pattern, path, self.r)

    def alpha_for(self, path):
        """lora_alpha of the layer at ``path`` (alpha_pattern, else lora_alpha)."""
        return pattern_value(self.alpha_pattern, path, self.lora_alpha)


def parse_config(raw, source):
    """Validate a decoded adapter_config.json; returns PeftAdapterConfig.

    ``source`` (the file's path) starts every message.  Raises
    PeftConfigError for anything lorac cannot honour; warns (UserWarning)
    about unknown fields.
    """
    if not isinstance(raw, dict):
        raise PeftConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise PeftConfigError(f"{source}: peft_type must be 'LORA', got {peft_type!r}; lorac loads LoRA adapters only")
    for name, what in REFUSED_FIELDS.items():
        if _is_set(raw.get(name)):
            raise PeftConfigError(f"{source}: {name}={raw[name]!r} asks for {what}, which lorac does not implement")
    init = raw.get("init_lora_weights", True)
    if init not in SAFE_INITS:
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise PeftConfigError(
                f"{source}: init_lora_weights={init!r} changes the base model's weights, so the adapter "
                "does not apply to the original model; convert it to a plain LoRA adapter first "
                "(path_initial_model_for_weight_conversion=... of PEFT's save_pretrained or of "
                "lorac.save_peft_adapter)")
        raise PeftConfigError(f"{source}: init_lora_weights={init!r} is not one lorac knows "
                              f"(expected one of {SAFE_INITS})")
    if _is_set(raw.get("velora_config")):
        warnings.warn(f"{source}: velora_config only changes how PEFT trains; lorac applies the "
                      "adapter as plain LoRA and computes exact gradients", UserWarning, stacklevel=3)
    unknown = sorted(set(raw) - KNOWN_FIELDS)
    if unknown:
        warnings.warn(f"{source}: ignoring adapter_config.json fields unknown to lorac "
                      f"(written by a newer PEFT?): {', '.join(unknown)}", UserWarning, stacklevel=3)

    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise PeftConfigError(f"{source}: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    dropout = _real(raw.get("lora_dropout", 0.0) or 0.0, "lora_dropout", source)
    if not 0.0 <= dropout < 1.0:
        raise PeftConfigError(f"{source}: lora_dropout must be in [0, 1), got {dropout}")
    modules_to_save = raw.get("modules_to_save") or []
    if not isinstance(modules_to_save, list) or not all(isinstance(m, str) for m in modules_to_save):
        raise PeftConfigError(f"{source}: modules_to_save must be a list of names, got {modules_to_save!r}")
    base = raw.get("base_model_name_or_path")
    config = PeftAdapterConfig(
        r=_real(raw.get("r", 8), "r", source, positive=True, integer=True),
        lora_alpha=_real(raw.get("lora_alpha", 8), "lora_alpha", source),
        use_rslora=_flag(raw, "use_rslora", source),
        fan_in_fan_out=_flag(raw, "fan_in_fan_out", source),
        lora_dropout=dropout,
        use_dora=_flag(raw, "use_dora", source),
        lora_bias=_flag(raw, "lora_bias", source),
        mica=isinstance(init, str) and init == "mica",
        trainable_token_indices=_token_indices(raw.get("trainable_token_indices"), source),
        bias=bias,
        modules_to_save=list(modules_to_save),
        base_model_name_or_path=base if isinstance(base, str) else None,
        rank_pattern=_pattern_regexes(raw.get("rank_pattern"), "rank_pattern", source),
        alpha_pattern=_pattern_regexes(raw.get("alpha_pattern"), "alpha_pattern", source),
    )
    if config.mica and config.use_dora:
        raise PeftConfigError(f"{source}: init_lora_weights='mica' with use_dora: lorac's DoRA layers do not take "
                              "MiCA's frozen lora_B")
    if config.lora_bias and config.use_dora:
        raise PeftConfigError(f"{source}: lora_bias and use_dora are both set, which PEFT's LoraConfig refuses")
    if config.lora_bias and init not in (True, False):
        raise PeftConfigError(f"{source}: lora_bias is set with init_lora_weights={init!r}; PEFT's LoraConfig "
                              "takes lora_bias with true or false only")
    config.rank_pattern = [(key, regex, _real(value, f"rank_pattern[{key!r}]", source, positive=True, integer=True))
                           for key, regex, value in config.rank_pattern]
    config.alpha_pattern = [(key, regex, _real(value, f"alpha_pattern[{key!r}]", source))
                            for key, regex, value in config.alpha_pattern]
    return config


def exact_pattern(path):
    """A rank/alpha_pattern key that PEFT matches to the module ``path`` only."""
    return "^" + re.escape(path) + "$"


def exact_targets(paths):
    """target_modules for PEFT selecting exactly ``paths``: a regex PEFT fullmatches."""
    return "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def _mode(values):
    """Most common value; ties go to the first seen."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def _number(value):
    return int(value) if float(value).is_integer() else float(value)


def build_config(layers, base_model_name_or_path=None, lora_dropout=0.0, bias="none", modules_to_save=None,
                 use_dora=False, lora_bias=False, mica=False, trainable_token_indices=None):
    """adapter_config.json content (a dict) for ``layers``: {path: LayerAdapter};
    ``bias`` and ``modules_to_save`` say which other tensors the folder holds.

    Each layer's own scaling is reproduced exactly: the global use_rslora is
    the layers' majority, and a layer of the other kind gets the alpha that
    gives its scaling under the global rule (alpha_pattern).
    """
    if not layers:
        raise ValueError("no LoRA layers (r > 0) to save")
    paths = list(layers)
    use_rslora = _mode([layers[p].use_rslora for p in paths])
    ranks = {p: layers[p].r for p in paths}
    alphas = {}
    for p in paths:
        layer = layers[p]
        if layer.use_rslora == use_rslora:
            alphas[p] = layer.lora_alpha
        else:
            alphas[p] = layer.scaling * (math.sqrt(layer.r) if use_rslora else layer.r)
    r = _mode([ranks[p] for p in paths])
    alpha = _mode([alphas[p] for p in paths])
    linear = [layers[p] for p in paths if layers[p].kind != "embedding"]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": float(lora_dropout),
        "use_rslora": bool(use_rslora),
        "fan_in_fan_out": bool(linear) and all(layer.fan_in_fan_out for layer in linear),
        "target_modules": exact_targets(paths),
        "rank_pattern": {exact_pattern(p): ranks[p] for p in paths if ranks[p] != r},
        "alpha_pattern": {exact_pattern(p): _number(alphas[p]) for p in paths if alphas[p] != alpha},
        "bias": bias,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": "mica" if mica else True,   # MiCA: PEFT keeps lora_B frozen when it loads
        "inference_mode": True,
        "use_dora": bool(use_dora),
        "lora_bias": bool(lora_bias),
        "trainable_token_indices": trainable_token_indices or None,
    }

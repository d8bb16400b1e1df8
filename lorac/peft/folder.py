"""Read and write PEFT adapter folders (adapter_config.json + weights).

Reading takes ``adapter_model.safetensors`` or else ``adapter_model.bin``
(a ``torch.save`` zip, read by lorac's safe reader: no torch, no code run).
Every key is mapped with ``keys.parse_key`` and every tensor checked
(2-D float lora tensors, ranks that agree with each other and with
rank_pattern) before an Adapter is returned; a key lorac cannot place raises
PeftFolderError naming it.

Writing creates the folder if needed and writes ``adapter_model.safetensors``
(metadata ``{"format": "pt"}``, as PEFT does) and then
``adapter_config.json``, each atomically.

adapter_config.json has one ``fan_in_fan_out`` for all layers.  When the
saved Linear layers store their weights both ways, the weights file's
metadata also holds ``LAYOUT_KEY``: a JSON object mapping each layer whose
layout differs from the config's to its own fan_in_fan_out, so that what
reads the folder back (``lorac merge`` into a base checkpoint above all)
knows each layer's layout.  PEFT ignores the entry (and needs none: lora_A
and lora_B do not depend on the layout).
"""

import json
import os

import numpy as np

from .. import checkpoint
from ..checkpoint.atomic import atomic_write
from .adapter import Adapter, AdapterError, LayerAdapter
from .config import CONFIG_NAME, build_config, parse_config
from .keys import UnsupportedKeyError, lorac_key, parse_key, peft_key, peft_magnitude_key, peft_tokens_key

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
LAYOUT_KEY = "lorac_fan_in_fan_out"   # weights-file metadata: {layer path: fan_in_fan_out} (module docstring)
MAX_CONFIG_BYTES = 16 * 2**20


class PeftFolderError(ValueError):
    """A PEFT adapter folder is missing files or holds tensors lorac cannot place."""


def is_peft_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def resolve_folder(path, adapter_name=None):
    """The folder holding adapter_config.json: ``path`` or ``path/<adapter_name>``
    (PEFT saves a non-default adapter in a subfolder)."""
    path = os.fspath(path)
    if adapter_name is not None and is_peft_folder(os.path.join(path, adapter_name)):
        return os.path.join(path, adapter_name)
    if is_peft_folder(path):
        return path
    if not os.path.isdir(path):
        raise PeftFolderError(f"{path}: expected a PEFT adapter folder (holding {CONFIG_NAME}), "
                              f"found {'a file' if os.path.exists(path) else 'nothing'}")
    where = path if adapter_name is None else f"{path} (or its subfolder {adapter_name!r})"
    raise PeftFolderError(f"{where}: no {CONFIG_NAME}; not a PEFT adapter folder")


def read_raw_config(folder):
    """The decoded adapter_config.json of a folder (any JSON value; at most 16 MiB)."""
    name = os.path.join(folder, CONFIG_NAME)
    with open(name, "rb") as fh:
        text = fh.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise PeftFolderError(f"{name}: larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:   # RecursionError: absurdly deep nesting
        raise PeftFolderError(f"{name}: not valid JSON: {type(exc).__name__}: {exc}") from None


def read_config(folder):
    """The validated PeftAdapterConfig of a folder."""
    return parse_config(read_raw_config(folder), os.path.join(folder, CONFIG_NAME))


def weights_file(folder):
    for name in WEIGHT_NAMES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise PeftFolderError(f"{folder}: no adapter weights ({' or '.join(WEIGHT_NAMES)})")


def read_peft_folder(path, adapter_name=None):
    """(Adapter, PeftAdapterConfig) of a PEFT LoRA adapter folder, fully validated."""
    folder = resolve_folder(path, adapter_name)
    config = read_config(folder)
    source = weights_file(folder)
    state = checkpoint.load(source)
    names = ("default",) if adapter_name in (None, "default") else ("default", adapter_name)

    halves, extra, extra_source = {}, {}, {}
    vectors = {"dora": {}, "lora_bias": {}, "tokens": {}}   # kind -> {path: (key, value)}: magnitudes,
    #                                                         lora_biases, trainable token rows
    for key, value in state.items():
        try:
            parsed = parse_key(key, names)
        except UnsupportedKeyError as exc:
            raise PeftFolderError(f"{source}: {exc}") from None
        if parsed is None:
            raise PeftFolderError(f"{source}: unexpected key {key!r}: not a LoRA tensor, a base_layer "
                                  "parameter or a modules_to_save parameter")
        if parsed.ignored:
            continue
        if parsed.kind in vectors:   # one (out,) vector per layer
            found = vectors[parsed.kind]
            if parsed.path in found:
                what = {"dora": "DoRA magnitude", "lora_bias": "lora_bias", "tokens": "trainable tokens"}[parsed.kind]
                raise PeftFolderError(f"{source}: {key!r} and {found[parsed.path][0]!r} both give the "
                                      f"{what} of {parsed.path!r}")
            found[parsed.path] = (key, value)
            continue
        if parsed.kind is not None:
            slot = halves.setdefault(parsed.path, {})
            if parsed.param in slot:
                raise PeftFolderError(f"{source}: {key!r} and {slot[parsed.param][0]!r} both give "
                                      f"{lorac_key(parsed.path, parsed.param)}")
            slot[parsed.param] = (key, parsed.kind, value)
            continue
        target = lorac_key(parsed.path, parsed.param)
        if target in extra:
            if not np.array_equal(extra[target], value):
                raise PeftFolderError(f"{source}: {key!r} and {extra_source[target]!r} both give {target} "
                                      "with different values")
            continue
        extra[target], extra_source[target] = value, key

    adapter = Adapter(extra=extra, lora_dropout=config.lora_dropout,
                      base_model_name_or_path=config.base_model_name_or_path)
    for path, slot in halves.items():
        if set(slot) != {"lora_A", "lora_B"}:
            (have, (key, _, _)), = slot.items()
            raise PeftFolderError(f"{source}: {key!r} has no matching {'lora_B' if have == 'lora_A' else 'lora_A'}")
        (a_key, a_kind, a), (b_key, b_kind, b) = slot["lora_A"], slot["lora_B"]
        if a_kind != b_kind:
            raise PeftFolderError(f"{source}: {a_key!r} and {b_key!r} mix Linear and Embedding LoRA names")
        for key, arr in ((a_key, a), (b_key, b)):
            if arr.ndim != 2 or arr.dtype.kind != "f":
                raise PeftFolderError(f"{source}: {key!r} must be a 2-D float tensor, found shape "
                                      f"{arr.shape} dtype {arr.dtype}")
        r = config.rank_for(path)
        if a.shape[0] != r:
            raise PeftFolderError(f"{source}: size mismatch for {a_key!r}: expected shape {(r, a.shape[1])} "
                                  f"(r={r} from adapter_config.json), found shape {tuple(a.shape)}")
        if b.shape[1] != r:
            raise PeftFolderError(f"{source}: size mismatch for {b_key!r}: expected shape {(b.shape[0], r)} "
                                  f"(r={r} from adapter_config.json), found shape {tuple(b.shape)}")
        adapter.layers[path] = LayerAdapter(
            a, b, kind=a_kind, lora_alpha=config.alpha_for(path), use_rslora=config.use_rslora,
            fan_in_fan_out=config.fan_in_fan_out if a_kind == "linear" else False, keys=(a_key, b_key),
            frozen_b=config.mica)
    _apply_layouts(adapter, checkpoint.read_metadata(source).get(LAYOUT_KEY), source)
    _attach_magnitudes(adapter, vectors["dora"], config, source)
    _attach_lora_biases(adapter, vectors["lora_bias"], config, source)
    adapter.tokens = _token_rows(vectors["tokens"], config, source)
    return adapter, config


def _apply_layouts(adapter, text, source):
    """Per-layer fan_in_fan_out from the weights file's LAYOUT_KEY entry (None: none), checked."""
    if text is None:
        return
    try:
        layouts = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PeftFolderError(f"{source}: metadata {LAYOUT_KEY!r} is not valid JSON: {exc}") from None
    if not isinstance(layouts, dict) or not all(isinstance(v, bool) for v in layouts.values()):
        raise PeftFolderError(f"{source}: metadata {LAYOUT_KEY!r} must map layer paths to true / false, got "
                              f"{text[:80]!r}")
    for path, transposed in layouts.items():
        layer = adapter.layers.get(path)
        if layer is None or layer.kind != "linear":
            raise PeftFolderError(f"{source}: metadata {LAYOUT_KEY!r} names {path!r}, which is not a Linear "
                                  "LoRA layer of the file")
        layer.fan_in_fan_out = transposed


def _attach_magnitudes(adapter, magnitudes, config, source):
    """Give each DoRA layer its magnitude vector: with use_dora, every adapted
    layer needs one (out,) float vector (an Embedding's out: embedding_dim);
    without, there must be none."""
    _attach_vectors(adapter, magnitudes, config.use_dora, "use_dora", "a DoRA magnitude vector", "attach_magnitude",
                    source)
    if config.use_dora:
        lacking = [p for p, layer in adapter.layers.items() if layer.magnitude is None]
        if lacking:
            raise PeftFolderError(f"{source}: use_dora is set but layer {lacking[0]!r} has no "
                                  "lora_magnitude_vector")


def _attach_lora_biases(adapter, lora_biases, config, source):
    """Give each Linear layer its lora_bias (lora_B.bias, (out,)): only with lora_bias set in the config,
    which Embedding adapters refuse, as PEFT does.  A Linear layer the file gives none keeps None:
    PEFT's own load would leave its bias at its zero init."""
    if config.lora_bias:
        embedding = next((p for p, layer in adapter.layers.items() if layer.kind == "embedding"), None)
        if embedding is not None:
            raise PeftFolderError(f"{source}: lora_bias is set but {embedding!r} is an Embedding adapter; PEFT's "
                                  "lora_bias is for Linear layers only")
    _attach_vectors(adapter, lora_biases, config.lora_bias, "lora_bias", "a lora_bias (lora_B.bias)",
                    "attach_lora_bias", source)


def _token_rows(found, config, source):
    """{path: (token ids (k,), rows (k, dim))} of the file's trainable tokens, each matched to its
    config entry (a layer name the path is or ends with) and checked."""
    spec = config.trainable_token_indices or {}
    if found and not spec:
        key = next(iter(found.values()))[0]
        raise PeftFolderError(f"{source}: {key!r} holds trainable tokens but adapter_config.json sets no "
                              "trainable_token_indices")
    out = {}
    for path, (key, value) in found.items():
        names = [name for name in spec if path == name or path.endswith("." + name)]
        if not names:
            raise PeftFolderError(f"{source}: {key!r}: no trainable_token_indices entry names the layer {path!r} "
                                  f"(the config names {sorted(spec)})")
        ids = np.asarray(spec[names[0]], dtype=np.intp)
        if value.ndim != 2 or value.shape[0] != len(ids) or value.dtype.kind != "f":
            raise PeftFolderError(f"{source}: {key!r} must be a float array of {len(ids)} rows (the config's "
                                  f"token ids for {path!r}), got shape {value.shape} dtype {value.dtype}")
        out[path] = (ids, value)
    return out


def _attach_vectors(adapter, found, allowed, field, what, method, source):
    """Hand each per-layer vector of ``found`` ({path: (key, value)}) to its LayerAdapter's ``method``,
    which checks it; PeftFolderError when the config's ``field`` does not allow them (``allowed``
    false), for a vector without its layer, or for one the method refuses."""
    if found and not allowed:
        key = next(iter(found.values()))[0]
        raise PeftFolderError(f"{source}: {key!r} is {what} but adapter_config.json does not set {field}")
    for path, (key, value) in found.items():
        layer = adapter.layers.get(path)
        if layer is None:
            raise PeftFolderError(f"{source}: {key!r} has no lora_A / lora_B of its layer {path!r}")
        try:
            getattr(layer, method)(value, key, source)
        except AdapterError as exc:
            raise PeftFolderError(str(exc)) from None


def write_peft_folder(adapter, path, base_model_name_or_path=None, bias="none", modules_to_save=None,
                      peft_tensors=None):
    """Write ``adapter`` as a PEFT LoRA folder loadable by PeftModel.from_pretrained.

    The LoRA tensors are written, and ``peft_tensors`` ({PEFT key: array}:
    the biases and modules_to_save tensors that ``bias`` and
    ``modules_to_save`` declare in the config) if given; ``adapter.extra``
    is not (PEFT would need to know what each tensor is).  Returns the
    config dict.
    """
    layers = adapter.layers
    for path_, layer in layers.items():
        if layer.lora_alpha is None:
            raise AdapterError(f"lora_alpha of layer {path_!r} is unknown; give it (e.g. --alpha)")
    dora = [p for p, layer in layers.items() if layer.magnitude is not None]
    if dora and len(dora) != len(layers):
        plain = next(p for p, layer in layers.items() if layer.magnitude is None)
        raise AdapterError(f"layers {dora[0]!r} (DoRA) and {plain!r} (plain LoRA) cannot share one PEFT adapter: "
                           "its adapter_config.json has one use_dora for every layer; save them separately")
    biased = [p for p, layer in layers.items() if layer.lora_bias is not None]
    embedding = next((p for p, layer in layers.items() if layer.kind == "embedding"), None)
    if biased and embedding is not None:
        raise AdapterError(f"layers {biased[0]!r} (with lora_bias) and {embedding!r} (an Embedding) cannot share "
                           "one PEFT adapter: its adapter_config.json has one lora_bias, which PEFT refuses on "
                           "Embedding layers; save them separately")
    mica = [p for p, layer in layers.items() if layer.frozen_b]
    if mica and len(mica) != len(layers):
        plain = next(p for p, layer in layers.items() if not layer.frozen_b)
        raise AdapterError(f"layers {mica[0]!r} (MiCA: lora_B frozen) and {plain!r} (plain LoRA) cannot share one "
                           "PEFT adapter: its adapter_config.json has one init_lora_weights; save them separately")
    config = build_config(layers, base_model_name_or_path or adapter.base_model_name_or_path,
                          adapter.lora_dropout, bias, modules_to_save, use_dora=bool(dora), lora_bias=bool(biased),
                          mica=bool(mica),
                          trainable_token_indices={p: ids.tolist() for p, (ids, _) in adapter.tokens.items()})
    tensors = dict(peft_tensors or {})
    for path_, (_, rows) in adapter.tokens.items():
        tensors[peft_tokens_key(path_)] = rows
    for path_ in dora:
        tensors[peft_magnitude_key(path_)] = layers[path_].magnitude
    for path_, layer in layers.items():   # one lora_bias for all: a layer without one gets zeros (the same output)
        if biased:
            tensors[peft_key(path_, "lora_bias", "linear")] = (
                layer.lora_bias if layer.lora_bias is not None else np.zeros(layer.out_features, layer.lora_B.dtype))
    for path_, layer in layers.items():
        kind = layer.kind or "linear"
        tensors[peft_key(path_, "lora_A", kind)] = layer.lora_A
        tensors[peft_key(path_, "lora_B", kind)] = layer.lora_B
    metadata = {"format": "pt"}
    layouts = {p: bool(layer.fan_in_fan_out) for p, layer in layers.items()
               if layer.kind != "embedding" and layer.fan_in_fan_out is not None
               and bool(layer.fan_in_fan_out) != config["fan_in_fan_out"]}
    if layouts:
        metadata[LAYOUT_KEY] = json.dumps(layouts, sort_keys=True)
    os.makedirs(path, exist_ok=True)
    checkpoint.save(tensors, os.path.join(path, WEIGHT_NAMES[0]), metadata=metadata)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    with atomic_write(os.path.join(path, CONFIG_NAME)) as fh:
        fh.write(text.encode("utf-8"))
    return config

"""A format-neutral LoRA adapter: what PEFT folders, lorac files and models share.

``Adapter.layers`` maps a module path to a ``LayerAdapter`` (its lora_A and
lora_B arrays and how to scale them); ``Adapter.extra`` holds other trained
tensors by lorac key (``<path>.bias``, modules_to_save weights).

lorac adapter files are ordinary state dicts (loralib's keys
``<path>.lora_A`` / ``<path>.lora_B``) whose safetensors metadata may record
how to scale them.  Metadata keys (all values str):

- ``lora_alpha``: the alpha of every layer without its own record;
- ``use_rslora``, ``fan_in_fan_out``: ``"true"`` / ``"false"``, same role;
- ``lora_layers``: JSON ``{path: {"kind": "linear"|"embedding", "r": int,
  "lora_alpha": number, "use_rslora": bool, "fan_in_fan_out": bool}}``,
  per layer, which wins over the global keys.

``adapter_metadata(model)`` writes them for a lorac model; ``lorac convert``
writes them when turning a PEFT folder into a lorac file.
"""

import json
import math
from dataclasses import dataclass, field

import numpy as np

from .keys import lorac_key

KINDS = ("linear", "embedding")


class AdapterError(ValueError):
    """An adapter's tensors or scaling information are inconsistent or missing."""


@dataclass
class LayerAdapter:
    """One layer's adapter: lora_A (r, in) and lora_B (out, r), loralib's shapes.

    For an embedding ``in`` is num_embeddings and ``out`` embedding_dim.
    ``kind`` is None when the source did not say (a loralib file without
    metadata); ``lora_alpha`` is None when unknown (scaling then raises);
    ``fan_in_fan_out`` None means "not recorded".
    """

    lora_A: np.ndarray
    lora_B: np.ndarray
    kind: str = None
    lora_alpha: float = None
    use_rslora: bool = False
    fan_in_fan_out: bool = None
    keys: tuple = ()  # the source keys of lora_A and lora_B, for messages
    magnitude: np.ndarray = None  # DoRA's lora_magnitude_vector (out,), None for plain LoRA
    lora_bias: np.ndarray = None  # PEFT's lora_bias (lora_B's bias) (out,), None when the adapter has none
    frozen_b: bool = False  # MiCA: lora_B never trains (init_lora_weights "mica")

    @property
    def r(self):
        return int(self.lora_A.shape[0])

    @property
    def in_features(self):
        return int(self.lora_A.shape[1])

    @property
    def out_features(self):
        return int(self.lora_B.shape[0])

    @property
    def scaling(self):
        if self.lora_alpha is None:
            raise AdapterError(f"lora_alpha of the adapter {self.keys[0] if self.keys else ''} is unknown")
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def transposed(self):
        """True when the base weight is stored (in, out): fan_in_fan_out or an embedding."""
        return self.kind == "embedding" or bool(self.fan_in_fan_out)

    def attach_magnitude(self, value, key, source):
        """Take ``value`` as this layer's DoRA magnitude vector: 1-D float, one
        entry per output (AdapterError naming ``key`` otherwise)."""
        self.magnitude = self._output_vector(value, key, source)

    def attach_lora_bias(self, value, key, source):
        """Take ``value`` as this Linear layer's lora_bias: 1-D float, one entry per
        output (AdapterError naming ``key`` otherwise; PEFT has none on embeddings)."""
        if self.kind == "embedding":
            raise AdapterError(f"{source}: {key!r} is a lora_bias on an Embedding layer; PEFT's lora_bias is for "
                               "Linear layers only")
        self.lora_bias = self._output_vector(value, key, source)

    def _output_vector(self, value, key, source):
        value = np.asarray(value)
        out = self.out_features
        if value.ndim != 1 or value.dtype.kind != "f" or value.shape[0] != out:
            raise AdapterError(f"{source}: {key!r} must be a 1-D float tensor of the layer's {out} outputs, "
                               f"found shape {value.shape} dtype {value.dtype}")
        return value

    def _vectors(self):
        return [v for v in (self.magnitude, self.lora_bias) if v is not None]

    def num_parameters(self):
        return int(self.lora_A.size + self.lora_B.size + sum(v.size for v in self._vectors()))

    def nbytes(self):
        return int(self.lora_A.nbytes + self.lora_B.nbytes + sum(v.nbytes for v in self._vectors()))


@dataclass
class Adapter:
    """layers: {module path: LayerAdapter}; extra: {lorac key: ndarray}.

    ``fused`` lists loralib MergedLinear adapters (lora_A (r * groups, in),
    lora_B (out_enabled, r)): their tensors stay in ``extra`` (a file-to-file
    conversion keeps them) but PEFT and merging cannot use them."""

    layers: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)  # path -> description of a MergedLinear adapter (kept in extra)
    lora_dropout: float = 0.0
    base_model_name_or_path: str = None
    tokens: dict = field(default_factory=dict)  # path -> (token ids (k,), rows (k, dim)): trainable tokens

    def lorac_state_dict(self):
        """lorac / loralib keys -> arrays (``<path>.lora_A``, ``<path>.lora_B``, extras)."""
        out = {}
        for path, layer in self.layers.items():
            out[lorac_key(path, "lora_A")] = layer.lora_A
            out[lorac_key(path, "lora_B")] = layer.lora_B
            if layer.magnitude is not None:
                out[lorac_key(path, "lora_magnitude_vector")] = layer.magnitude
            if layer.lora_bias is not None:
                out[lorac_key(path, "lora_bias")] = layer.lora_bias
        out.update(self.extra)
        return out

    def metadata(self):
        """The safetensors metadata recording every layer's scaling (module docstring)."""
        records = {}
        for path, layer in self.layers.items():
            record = {"kind": layer.kind or "linear", "r": layer.r}
            if layer.lora_alpha is not None:
                record["lora_alpha"] = layer.lora_alpha
            record["use_rslora"] = bool(layer.use_rslora)
            record["fan_in_fan_out"] = bool(layer.fan_in_fan_out)
            records[path] = record
        alphas = {layer.lora_alpha for layer in self.layers.values()}
        meta = {"lora_layers": json.dumps(records, sort_keys=True)}
        if len(alphas) == 1 and None not in alphas:
            meta["lora_alpha"] = _format_number(alphas.pop())
        rslora = {bool(layer.use_rslora) for layer in self.layers.values()}
        if len(rslora) == 1:
            meta["use_rslora"] = _format_bool(rslora.pop())
        return meta


def _format_number(value):
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _format_bool(value):
    return "true" if value else "false"


def _parse_bool(text, name, source):
    if text in ("true", "false"):
        return text == "true"
    raise AdapterError(f"{source}: metadata {name} must be 'true' or 'false', got {text!r}")


def _parse_number(text, name, source):
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value):
        raise AdapterError(f"{source}: metadata {name} must be a finite number, got {text!r}")
    return value


def _layer_records(metadata, source):
    text = metadata.get("lora_layers")
    if text is None:
        return {}
    try:
        records = json.loads(text)
    except ValueError as exc:
        raise AdapterError(f"{source}: metadata lora_layers is not valid JSON: {exc}") from None
    if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()):
        raise AdapterError(f"{source}: metadata lora_layers must map module paths to objects")
    return records


def _checked_pair(path, a_key, b_key, a, b, source):
    for key, arr in ((a_key, a), (b_key, b)):
        if arr.ndim != 2:
            raise AdapterError(f"{source}: {key!r} must be a 2-D array, found shape {arr.shape}")
        if arr.dtype.kind != "f":
            raise AdapterError(f"{source}: {key!r} must hold floating-point values, found dtype {arr.dtype}")
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"{source}: ranks disagree for layer {path!r}: {a_key!r} has shape {a.shape} "
                           f"(r, in) but {b_key!r} has shape {b.shape} (out, r)")


def from_lorac_state(state, metadata=None, source="state dict", lora_alpha=None, use_rslora=None,
                     fan_in_fan_out=None, embeddings=()):
    """Adapter from a lorac/loralib state dict (+ optional metadata, see module doc).

    Keys ``<path>.lora_A`` / ``<path>.lora_B`` form the layers; other keys go
    to ``extra``.  The keyword arguments override the metadata's global values
    (``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``) for every layer;
    ``embeddings`` names layers to treat as embeddings.
    """
    metadata = metadata or {}
    records = _layer_records(metadata, source)
    g_alpha = lora_alpha
    if g_alpha is None and "lora_alpha" in metadata:
        g_alpha = _parse_number(metadata["lora_alpha"], "lora_alpha", source)
    g_rslora = use_rslora
    if g_rslora is None:
        g_rslora = _parse_bool(metadata["use_rslora"], "use_rslora", source) if "use_rslora" in metadata else None
    g_fifo = fan_in_fan_out
    if g_fifo is None and "fan_in_fan_out" in metadata:
        g_fifo = _parse_bool(metadata["fan_in_fan_out"], "fan_in_fan_out", source)

    halves, extra = {}, {}
    for key, value in state.items():
        path, _, param = key.rpartition(".")
        if param in ("lora_A", "lora_B"):
            halves.setdefault(path, {})[param] = (key, np.asarray(value))
        else:
            extra[key] = value
    adapter = Adapter(extra=extra)
    for path, pair in halves.items():
        if len(pair) != 2:
            have = next(iter(pair))
            other = "lora_B" if have == "lora_A" else "lora_A"
            raise AdapterError(f"{source}: {pair[have][0]!r} has no matching {lorac_key(path, other)!r}")
        (a_key, a), (b_key, b) = pair["lora_A"], pair["lora_B"]
        if a.ndim == 2 and b.ndim == 2 and b.shape[1] and a.shape[0] != b.shape[1] and a.shape[0] % b.shape[1] == 0:
            adapter.extra[a_key], adapter.extra[b_key] = a, b
            adapter.fused[path] = (f"a MergedLinear adapter ({a_key!r} {a.shape}, {b_key!r} {b.shape}: "
                                   f"{a.shape[0] // b.shape[1]} enabled groups of rank {b.shape[1]})")
            continue
        _checked_pair(path, a_key, b_key, a, b, source)
        record = records.get(path, {})
        kind = "embedding" if path in embeddings else record.get("kind")
        if kind is not None and kind not in KINDS:
            raise AdapterError(f"{source}: metadata gives layer {path!r} the kind {kind!r}; expected one of {KINDS}")
        alpha = lora_alpha if lora_alpha is not None else record.get("lora_alpha", g_alpha)
        if alpha is not None:
            alpha = _parse_number(alpha, f"lora_layers[{path!r}].lora_alpha", source)
        rslora = use_rslora if use_rslora is not None else record.get("use_rslora", g_rslora)
        fifo = fan_in_fan_out if fan_in_fan_out is not None else record.get("fan_in_fan_out", g_fifo)
        if "r" in record and record["r"] != a.shape[0]:
            raise AdapterError(f"{source}: metadata says layer {path!r} has r={record['r']} but {a_key!r} "
                               f"has shape {a.shape}")
        adapter.layers[path] = LayerAdapter(a, b, kind=kind, lora_alpha=alpha, use_rslora=bool(rslora),
                                            fan_in_fan_out=fifo, keys=(a_key, b_key))
    for path, layer in adapter.layers.items():   # DoRA: <path>.lora_magnitude_vector (out,); <path>.lora_bias
        key = lorac_key(path, "lora_magnitude_vector")
        if key in adapter.extra:
            layer.attach_magnitude(adapter.extra.pop(key), key, source)
        key = lorac_key(path, "lora_bias")
        if key in adapter.extra:
            layer.attach_lora_bias(adapter.extra.pop(key), key, source)
    return adapter

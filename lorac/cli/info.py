"""lorac info FILE: what a checkpoint or PEFT adapter folder holds.

Prints every tensor (key, shape, dtype), the metadata or adapter config, and
for each LoRA layer its kind, inferred rank r (rows of lora_A), in / out
sizes, parameter count and -- when recorded -- lora_alpha and scaling; then
the adapter's total parameter count and bytes.  safetensors files are read
from their header only (dtypes as stored); other formats are loaded by
lorac's safe reader (float16 / bfloat16 show as float32, as lorac loads them).
"""

import json
import math
import os

from .. import checkpoint
from ..peft import is_peft_folder
from ..peft.config import CONFIG_NAME, PeftConfigError, parse_config
from ..peft.folder import read_raw_config, resolve_folder, weights_file
from ..peft.keys import UnsupportedKeyError, parse_key
from . import CommandError

_SAFETENSORS_DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "U16": ("uint16", 2), "I16": ("int16", 2),
    "U32": ("uint32", 4), "I32": ("int32", 4), "U64": ("uint64", 8), "I64": ("int64", 8),
    "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
}


def register(subparsers):
    parser = subparsers.add_parser(
        "info", help="list a checkpoint's tensors and LoRA layers",
        description="List the tensors of a checkpoint (safetensors, .npz, torch .pt/.pth/.bin) or PEFT "
                    "adapter folder: keys, shapes, dtypes, metadata, the LoRA layers with their inferred "
                    "ranks, and the adapter's parameter count and bytes.")
    parser.add_argument("path", metavar="FILE", help="checkpoint file or PEFT adapter folder")
    parser.add_argument("--adapter-name", metavar="NAME", help="PEFT folder: the adapter in subfolder NAME")
    parser.set_defaults(func=run)


def tensor_table(path):
    """[(key, shape, dtype name, nbytes)] and the metadata dict of a checkpoint file."""
    fmt = checkpoint.detect_format(path)
    if fmt == "safetensors":
        import safetensors

        try:
            with safetensors.safe_open(os.fspath(path), framework="numpy") as f:
                rows = []
                for key in f.keys():
                    piece = f.get_slice(key)
                    shape = tuple(piece.get_shape())
                    name, size = _SAFETENSORS_DTYPES.get(piece.get_dtype(), (piece.get_dtype(), 0))
                    rows.append((key, shape, name, math.prod(shape) * size))
                metadata = dict(f.metadata() or {})
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # the Rust parser's errors, panics included (BaseException)
            raise CommandError(f"{path}: invalid safetensors file: {exc}") from None
        return rows, metadata
    state = checkpoint.load(path)
    rows = [(k, tuple(v.shape), str(v.dtype), int(v.nbytes)) for k, v in state.items()]
    return rows, checkpoint.read_metadata(path)


def _layer_of(key):
    """(module path, "lora_A"/"lora_B"/"lora_magnitude_vector"/"lora_bias", kind or None) for adapter
    keys in lorac or PEFT form (a magnitude's kind is "dora", a lora_bias's "lora_bias")."""
    path, _, param = key.rpartition(".")
    if param in ("lora_A", "lora_B"):
        return path, param, None
    if param == "lora_bias":
        return path, param, "lora_bias"
    try:
        parsed = parse_key(key)
    except UnsupportedKeyError:
        return None
    if parsed is None or parsed.kind is None:
        return None
    return parsed.path, parsed.param, parsed.kind


def lora_layers(rows):
    """{path: dict(kind, r, in, out, params, bytes, note)} from the tensor table; a DoRA
    magnitude or a lora_bias counts in its layer's params and bytes."""
    halves, vectors = {}, {}   # vectors: {path: {"dora" / "lora_bias": (size, bytes)}}
    for key, shape, _, nbytes in rows:
        found = _layer_of(key)
        if found is not None and found[2] in ("dora", "lora_bias") and len(shape) == 1:
            vectors.setdefault(found[0], {})[found[2]] = (shape[0], nbytes)
        elif found is not None and len(shape) == 2:
            path, param, kind = found
            halves.setdefault(path, {"kind": kind})[param] = (shape, nbytes)
    layers = {}
    for path, h in halves.items():
        if "lora_A" not in h or "lora_B" not in h:
            continue
        (a_shape, a_bytes), (b_shape, b_bytes) = h["lora_A"], h["lora_B"]
        r, note = a_shape[0], ""
        if b_shape[1] != a_shape[0]:
            r = b_shape[1]
            groups = a_shape[0] // r if r and a_shape[0] % r == 0 else None
            note = f"MergedLinear, {groups} enabled groups" if groups else "ranks of lora_A and lora_B differ"
        params, nbytes = math.prod(a_shape) + math.prod(b_shape), a_bytes + b_bytes
        for what, (size, vbytes) in vectors.get(path, {}).items():
            params, nbytes = params + size, nbytes + vbytes
            note = ("DoRA" if what == "dora" else "lora_bias") + ("; " + note if note else "")
        layers[path] = {"kind": h["kind"], "r": r, "in": a_shape[1], "out": b_shape[0],
                        "params": params, "bytes": nbytes, "note": note}
    return layers


def _scaling_info(metadata, config):
    """path -> (alpha, use_rslora, r per config, kind) from lorac metadata or a PEFT config."""
    if config is not None:
        try:
            parsed = parse_config(config, CONFIG_NAME)
        except PeftConfigError as exc:
            print(f"note: lorac cannot load this adapter: {exc}")
            return lambda path: (None, False, None, None)
        return lambda path: (parsed.alpha_for(path), parsed.use_rslora, parsed.rank_for(path), None)
    records = {}
    try:
        records = json.loads(metadata.get("lora_layers", "{}"))
    except ValueError:
        pass
    alpha = metadata.get("lora_alpha")
    rslora = metadata.get("use_rslora") == "true"

    def lookup(path):
        rec = records.get(path, {}) if isinstance(records, dict) else {}
        a = rec.get("lora_alpha", alpha)
        try:
            a = None if a is None else float(a)
        except (TypeError, ValueError):
            a = None
        kind = rec.get("kind") if rec.get("kind") in ("linear", "embedding") else None
        return a, bool(rec.get("use_rslora", rslora)), None, kind
    return lookup


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def run(args):
    path = args.path
    config = None
    if is_peft_folder(path) or (args.adapter_name and os.path.isdir(path)):
        folder = resolve_folder(path, args.adapter_name)
        config = read_raw_config(folder)
        file = weights_file(folder)
        title = f"{folder}: PEFT adapter folder ({os.path.basename(file)})"
    elif os.path.isdir(path):
        raise CommandError(f"{path}: a folder without {CONFIG_NAME} is not a PEFT adapter")
    else:
        file = path
        title = f"{path}: {checkpoint.detect_format(path)} file"
    rows, metadata = tensor_table(file)
    print(f"{title}, {len(rows)} tensors")
    if config is not None:
        wanted = ("peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "target_modules",
                  "rank_pattern", "alpha_pattern", "bias", "modules_to_save", "trainable_token_indices",
                  "base_model_name_or_path")
        shown = {k: config[k] for k in wanted if isinstance(config, dict) and config.get(k) not in (None, {}, [])}
        print("config: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items()))
    for key, value in sorted(metadata.items()):
        text = value if len(value) <= 200 else value[:197] + "..."
        print(f"metadata: {key} = {text}")
    if rows:
        print()
        print(_table(("key", "shape", "dtype"), [(k, str(tuple(s)), d) for k, s, d, _ in rows]))
    total = sum(b for *_, b in rows)
    print(f"\ntotal: {sum(math.prod(s) for _, s, _, _ in rows)} values, {_fmt_bytes(total)}")

    layers = lora_layers(rows)
    if not layers:
        print("LoRA layers: none")
        return 0
    lookup = _scaling_info(metadata, config)
    table = []
    for lpath, info in layers.items():
        alpha, rslora, cfg_r, kind = lookup(lpath)
        scaling = "?" if alpha is None else f"{alpha / (math.sqrt(info['r']) if rslora else info['r']):.6g}"
        note = info["note"]
        if cfg_r is not None and cfg_r != info["r"]:
            note = (note + "; " if note else "") + f"config says r={cfg_r}"
        table.append((lpath or "(root)", info["kind"] or kind or "-", info["r"], info["in"], info["out"],
                      info["params"], "?" if alpha is None else f"{alpha:g}",
                      scaling + (" (rslora)" if rslora else ""), note))
    print(f"\nLoRA layers: {len(layers)}")
    print(_table(("layer", "kind", "r", "in", "out", "params", "lora_alpha", "scaling", "note"), table))
    params = sum(i["params"] for i in layers.values())
    nbytes = sum(i["bytes"] for i in layers.values())
    size = f"{nbytes} bytes" + (f" ({_fmt_bytes(nbytes)})" if nbytes >= 1024 else "")
    print(f"\nadapter: {params} parameters, {size}")
    return 0


"""lorac merge BASE ADAPTER -o OUT: base weights with an adapter merged in.

For each LoRA layer ``<path>`` of ADAPTER (a lorac/loralib file or a PEFT
folder) the base tensor ``<path>.weight`` becomes

    W += scaling * B A             W stored (out, in)
    W += scaling * (B A)^T         W stored (in, out): fan_in_fan_out, embeddings

with ``scaling = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA), computed by
lorac's C merge kernel (one GEMM per layer).  A DoRA layer (a
``lora_magnitude_vector`` m) then has each row of the (out, in) view
scaled by ``m / ||row||``, as ``lorac.DoRALinear`` / ``DoRAEmbedding`` and
PEFT merge it (a row of norm 0 becomes 0, where PEFT gives NaN).  A
layer with PEFT's lora_bias also has ``<path>.bias += scaling * lora_bias``
(the base needs that bias, as PEFT's merge does; a trained bias the
adapter carries replaces the base's first).

alpha, rsLoRA and the layout come from the adapter's metadata /
adapter_config.json (and, for a PEFT folder whose layers store their
weights both ways, its weights file's layout metadata: lorac.peft.folder),
or --alpha, --rslora, --fan-in-fan-out; a layer whose alpha is unknown is
an error.  When nothing records the layout it is taken from the shape when
in != out;
a square weight is then taken as (out, in) -- torch's nn.Linear, loralib's
default -- unless another layer was found stored (in, out), which is an
error asking for --fan-in-fan-out / --no-fan-in-fan-out.

Other tensors the adapter carries (PEFT bias / modules_to_save, loralib
biases) replace the base's.  OUT holds every base tensor and no LoRA tensor;
it is written atomically (safetensors, .npz by suffix), with the base's
metadata when both are safetensors.  Half-precision bases come out float32
(lorac reads float16 / bfloat16 as float32).  A progress bar (tqdm) shows on
a terminal when the merged weights exceed PROGRESS_BYTES.
"""

import os

import numpy as np

from .. import _C, checkpoint
from ..peft.keys import lorac_key
from ._adapters import add_source_options, read_adapter, require_alpha, require_plain
from . import CommandError

PROGRESS_BYTES = 64 * 2**20


def register(subparsers):
    parser = subparsers.add_parser(
        "merge", help="merge an adapter into base weights",
        description="Write BASE's tensors with ADAPTER merged in: W += (alpha / r) B A for every LoRA "
                    "layer (transposed for fan_in_fan_out and embeddings).")
    parser.add_argument("base", metavar="BASE", help="base checkpoint (safetensors, .npz, torch .pt/.bin)")
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter file (lorac/loralib) or PEFT adapter folder")
    parser.add_argument("-o", "--output", metavar="OUT", required=True,
                        help="merged checkpoint to write (safetensors; .npz by suffix)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    add_source_options(parser)
    parser.set_defaults(func=run)


def _layout(layer, weight, key):
    """True if ``weight`` is stored (in, out), False if (out, in), None if the shape
    cannot tell and nothing records it; checks the shape."""
    out_in = (layer.out_features, layer.in_features)
    in_out = (layer.in_features, layer.out_features)
    if layer.kind == "embedding" or layer.fan_in_fan_out:
        transposed = True
    elif layer.fan_in_fan_out is False:
        transposed = False
    elif out_in == in_out:
        return None if weight.shape == out_in else _mismatch(key, weight, out_in, "(out, in)", "")
    else:  # not recorded: the shape decides
        transposed = weight.shape == in_out
    expected = in_out if transposed else out_in
    if weight.shape != expected:
        hint = ""
        if weight.shape == (out_in if transposed else in_out):
            hint = "; the other layout fits: check --fan-in-fan-out / the adapter's fan_in_fan_out"
        _mismatch(key, weight, expected, "(in, out)" if transposed else "(out, in)", hint)
    return transposed


def _dora_rescale(weight, magnitude, transposed):
    """DoRA's merge, after W += s B A: each row of the (out, in) view times m / ||row|| (0 for a zero row)."""
    rows = weight.T if transposed else weight
    norms = np.sqrt(np.einsum("oi,oi->o", rows, rows, dtype=np.float64))
    c = np.divide(magnitude.astype(np.float64), norms, out=np.zeros_like(norms), where=norms > 0)
    rows *= c.astype(weight.dtype)[:, None]


def _mismatch(key, weight, expected, how, hint):
    raise CommandError(f"size mismatch for {key!r}: the adapter needs shape {expected} {how}, "
                       f"found shape {tuple(weight.shape)}{hint}")


def run(args):
    for path in (args.base, args.adapter):
        if not os.path.exists(path):
            raise CommandError(f"{path}: no such file or folder")
    out = os.path.abspath(args.output)
    if out in (os.path.abspath(args.base), os.path.abspath(args.adapter)):
        raise CommandError("OUT must differ from BASE and ADAPTER")
    adapter, _ = read_adapter(args.adapter, args)
    require_plain(adapter, args.adapter, "lorac merge", tokens_ok=True)
    if not adapter.layers and not adapter.tokens:
        raise CommandError(f"{args.adapter}: no LoRA tensors to merge")
    require_alpha(adapter, args.adapter)
    base = checkpoint.load(args.base)
    lora_keys = [k for k in base if k.rpartition(".")[2] in ("lora_A", "lora_B")]
    if lora_keys:
        raise CommandError(f"{args.base}: BASE already holds LoRA tensors ({lora_keys[0]!r}); give a base "
                           "checkpoint without adapters")

    # Validate everything before computing anything.
    work = []
    for path, layer in adapter.layers.items():
        key = lorac_key(path, "weight")
        if key not in base:
            raise CommandError(f"{args.base}: no tensor {key!r} for the adapter's layer {path!r}")
        weight = base[key]
        if weight.dtype.kind != "f" or weight.ndim != 2:
            raise CommandError(f"{args.base}: {key!r} must be a 2-D float tensor, found shape "
                               f"{tuple(weight.shape)} dtype {weight.dtype}")
        if layer.lora_bias is not None:
            bias_key = lorac_key(path, "bias")
            found = base.get(bias_key)
            if found is None or found.dtype.kind != "f" or tuple(found.shape) != (layer.out_features,):
                raise CommandError(f"{args.base}: the adapter's layer {path!r} has a lora_bias, which merges into "
                                   f"{bias_key!r}; BASE must hold it as a float tensor of shape "
                                   f"({layer.out_features},), found "
                                   f"{'none' if found is None else f'shape {tuple(found.shape)} dtype {found.dtype}'}")
        work.append((key, weight, layer, _layout(layer, weight, key)))
    if any(t is None for *_, t in work):
        if any(t and layer.kind != "embedding" for _, _, layer, t in work):
            key = next(k for k, *_, t in work if t is None)
            raise CommandError(f"{key!r} is square and its layout is not recorded, while other layers of "
                               "the adapter are stored (in, out); say which with --fan-in-fan-out or "
                               "--no-fan-in-fan-out")
        work = [(k, w, layer, bool(t)) for k, w, layer, t in work]   # torch's (out, in)
    for path, (ids, rows) in adapter.tokens.items():   # trainable tokens: rows of the embedding's weight
        key = lorac_key(path, "weight")
        table = base.get(key)
        if table is None or table.ndim != 2 or table.dtype.kind != "f" or table.shape[1] != rows.shape[1] \
                or ids.max() >= table.shape[0]:
            raise CommandError(f"{args.base}: the adapter's trainable tokens of {path!r} ({len(ids)} rows of "
                               f"{rows.shape[1]} values, ids up to {int(ids.max())}) need {key!r} as a float "
                               f"(num, {rows.shape[1]}) table, found "
                               f"{'none' if table is None else f'shape {tuple(table.shape)} dtype {table.dtype}'}")
    for key, value in adapter.extra.items():
        if key not in base:
            raise CommandError(f"{args.adapter}: tensor {key!r} has no counterpart in {args.base}")
        if tuple(value.shape) != tuple(base[key].shape):
            raise CommandError(f"size mismatch for {key!r}: BASE has shape {tuple(base[key].shape)}, "
                               f"ADAPTER has shape {tuple(value.shape)}")

    for key, value in adapter.extra.items():
        base[key] = value.astype(base[key].dtype, copy=True)
    for path, (ids, rows) in adapter.tokens.items():
        table = base[lorac_key(path, "weight")]
        table[ids] = rows.astype(table.dtype)
    total = sum(w.nbytes for _, w, _, _ in work)
    from tqdm import tqdm

    disable = True if (args.no_progress or total < PROGRESS_BYTES) else None  # None: only on a terminal
    for key, weight, layer, transposed in tqdm(work, desc="merging", unit="layer", disable=disable):
        a = layer.lora_A.astype(weight.dtype, copy=False)
        b = layer.lora_B.astype(weight.dtype, copy=False)
        _C.linear_merge(weight, a, b, layer.scaling, transposed)
        if layer.magnitude is not None:
            _dora_rescale(weight, layer.magnitude, transposed)
        if layer.lora_bias is not None:
            bias = base[key[:-len("weight")] + "bias"]
            bias += (layer.scaling * layer.lora_bias.astype(np.float64)).astype(bias.dtype)

    metadata = None
    if not args.output.lower().endswith(".npz") and checkpoint.detect_format(args.base) == "safetensors":
        metadata = checkpoint.read_metadata(args.base) or None
    checkpoint.save(base, args.output, metadata=metadata)
    print(f"wrote {args.output}: {len(work)} layers merged into {len(base)} tensors")
    return 0

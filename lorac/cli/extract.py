"""lorac extract BASE FINETUNED -r R -o OUT: a LoRA file from a fully fine-tuned checkpoint.

For every 2-D ``<path>.weight`` that differs between BASE and FINETUNED the
difference is replaced by its best rank-R approximation, written as
``<path>.lora_A`` (R, in) / ``<path>.lora_B`` (out, R) with
``(alpha / R) B A`` equal to that approximation (lorac.lowrank.extract_lora;
alpha defaults to R, scaling 1).  Weights are taken as torch's (out, in)
unless --fan-in-fan-out or --embedding says otherwise.  OUT (safetensors,
or .npz by suffix) records each layer's alpha and layout in its metadata,
so ``lorac merge BASE OUT`` rebuilds the approximated fine-tuned weights.
With --lora-bias an extracted Linear layer's changed bias is written as
its ``<path>.lora_bias`` (PEFT's lora_bias: the change over the scaling),
which ``lorac merge`` adds back exactly.
A progress bar (tqdm) shows on a terminal; the per-layer relative error
||delta - s B A||_F / ||delta||_F and captured energy are printed.
"""

import os
from functools import partial

from .. import checkpoint
from ..lowrank import extract_adapter
from . import CommandError
from .info import _table


def register(subparsers):
    parser = subparsers.add_parser(
        "extract", help="turn a fully fine-tuned checkpoint into a LoRA adapter file",
        description="Extract a rank-R LoRA adapter from the difference between a fine-tuned checkpoint and "
                    "its base: each changed 2-D weight's delta is replaced by its best rank-R approximation "
                    "(truncated SVD), written as loralib's <path>.lora_A / <path>.lora_B.")
    parser.add_argument("base", metavar="BASE", help="base checkpoint (safetensors, .npz, torch .pt/.bin)")
    parser.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned checkpoint with the same keys")
    parser.add_argument("-r", "--rank", type=int, required=True, metavar="R", help="adapter rank (>= 1)")
    parser.add_argument("-o", "--output", metavar="OUT", required=True,
                        help="adapter file to write (safetensors; .npz by suffix, without metadata)")
    parser.add_argument("--alpha", type=float, metavar="A",
                        help="lora_alpha recorded for every layer (scaling = A / R); default R (scaling 1)")
    parser.add_argument("--rslora", action="store_true", help="scaling = A / sqrt(R) (rank-stabilised LoRA)")
    parser.add_argument("--include", action="append", metavar="PATTERN",
                        help="only layers whose module path matches this fnmatch pattern (repeatable)")
    parser.add_argument("--exclude", action="append", metavar="PATTERN",
                        help="skip layers whose module path matches this fnmatch pattern (repeatable)")
    parser.add_argument("--fan-in-fan-out", action="store_true",
                        help="Linear weights are stored (in, out), as GPT-2's Conv1D")
    parser.add_argument("--embedding", action="append", default=[], metavar="NAME",
                        help="layer NAME is an embedding, its weight (num_embeddings, dim) (repeatable)")
    parser.add_argument("--copy-changed", action="store_true",
                        help="also write changed tensors that are not 2-D weights (biases, norms) whole")
    parser.add_argument("--lora-bias", action="store_true",
                        help="an extracted Linear layer's changed bias becomes its lora_bias (PEFT's lora_bias)")
    parser.add_argument("--randomized", action="store_true",
                        help="randomized SVD (range finder with power iterations), for large layers")
    parser.add_argument("--niter", type=int, default=2, metavar="N", help="--randomized: power iterations (2)")
    parser.add_argument("--seed", type=int, default=0, help="--randomized: random seed (0)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.set_defaults(func=run)


def _percent(value):
    return f"{100.0 * value:.2f}%"


def run(args):
    for path in (args.base, args.finetuned):
        if not os.path.isfile(path):
            raise CommandError(f"{path}: no such file")
    out = os.path.abspath(args.output)
    if out in (os.path.abspath(args.base), os.path.abspath(args.finetuned)):
        raise CommandError("OUT must differ from BASE and FINETUNED")
    if args.rank < 1:
        raise CommandError(f"-r must be >= 1, got {args.rank}")
    base = checkpoint.load(args.base)
    finetuned = checkpoint.load(args.finetuned)

    from tqdm import tqdm

    progress = partial(tqdm, desc="extracting", unit="layer", disable=True if args.no_progress else None)
    result = extract_adapter(finetuned, base, args.rank, args.alpha, include=args.include, exclude=args.exclude,
                             fan_in_fan_out=args.fan_in_fan_out, embeddings=args.embedding,
                             use_rslora=args.rslora, copy_changed=args.copy_changed, lora_bias=args.lora_bias,
                             randomized=args.randomized, niter=args.niter, rng=args.seed, progress=progress)
    unknown = set(args.embedding) - set(result.layers)
    if unknown:
        raise CommandError(f"--embedding {sorted(unknown)[0]!r}: no changed weight of that layer was extracted")
    if not result.layers:
        raise CommandError(f"no changed 2-D weight to extract ({len(result.unchanged)} tensors unchanged, "
                           f"{len(result.skipped)} skipped)")

    rows = []
    for path, layer in result.layers.items():
        shape = f"{layer.lora_B.shape[0]}x{layer.lora_A.shape[1]}"
        rows.append((path or "(root)", shape, f"{layer.relative_error:.3e}", _percent(layer.energy)))
    print(_table(("layer", "out x in", "relative error", "energy"), rows))
    for key, reason in result.skipped.items():
        print(f"skipped {key}: {reason}")
    for key in result.extra:
        print(f"copied {key} whole")
    for path in result.lora_biases:
        print(f"{path}.bias: its change is {path}.lora_bias")

    metadata = None
    if args.output.lower().endswith(".npz"):
        print("note: .npz files hold no metadata; give --alpha to lorac merge / convert")
    else:
        metadata = result.metadata()
    state = result.state_dict()
    checkpoint.save(state, args.output, metadata=metadata)
    params = sum(layer.lora_A.size + layer.lora_B.size for layer in result.layers.values()) + \
        sum(b.size for b in result.lora_biases.values())
    dense = sum(layer.lora_A.shape[1] * layer.lora_B.shape[0] for layer in result.layers.values())
    print(f"wrote {args.output}: {len(result.layers)} layer(s) at r={args.rank}, lora_alpha={result.lora_alpha:g}, "
          f"{params} parameters ({_percent(params / dense)} of the changed weights), "
          f"overall relative error {result.relative_error:.3e}")
    return 0

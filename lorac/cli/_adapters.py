"""What the info / convert / merge / combine subcommands share: reading an adapter from a
PEFT folder or a lorac/loralib file, with command-line overrides."""

import argparse
import os

from .. import checkpoint
from ..peft import from_lorac_state, is_peft_folder, read_peft_folder
from . import CommandError


def add_source_options(parser):
    """--alpha / --rslora / --fan-in-fan-out / --embedding / --adapter-name."""
    group = parser.add_argument_group("adapter scaling (override what the file records)")
    group.add_argument("--alpha", type=float, metavar="A",
                       help="lora_alpha of every layer (scaling = A / r); default: the adapter's "
                            "metadata or adapter_config.json")
    group.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=None,
                       help="scaling = alpha / sqrt(r) (rank-stabilised LoRA), or alpha / r")
    group.add_argument("--fan-in-fan-out", action=argparse.BooleanOptionalAction, default=None,
                       help="every base Linear weight is stored (in, out), as GPT-2's Conv1D, or (out, in)")
    group.add_argument("--embedding", action="append", default=[], metavar="NAME",
                       help="treat layer NAME of a lorac/loralib file as an embedding (repeatable)")
    group.add_argument("--adapter-name", metavar="NAME",
                       help="PEFT folder: read the adapter saved in subfolder NAME")


def add_output_options(parser):
    """--to / --base-model of the commands that write an adapter (convert, combine)."""
    parser.add_argument("--to", choices=("lorac", "peft"),
                        help="output kind (default: peft if OUT is a folder or ends with '/', else lorac)")
    parser.add_argument("--base-model", metavar="NAME",
                        help="PEFT output: base_model_name_or_path to record in adapter_config.json")


def output_kind(args):
    """"peft" or "lorac": --to, else peft when OUT is a folder or ends with a path separator."""
    if args.to:
        return args.to
    if os.path.isdir(args.output) or args.output.endswith(("/", os.sep)):
        return "peft"
    return "lorac"


def read_adapter(path, args):
    """(Adapter, kind) where kind is "peft" or "file"; applies the overrides in args."""
    if is_peft_folder(path) or (args.adapter_name and os.path.isdir(path)):
        adapter, _ = read_peft_folder(path, args.adapter_name)
        for layer in adapter.layers.values():
            if args.alpha is not None:
                layer.lora_alpha = args.alpha
            if args.rslora is not None:
                layer.use_rslora = args.rslora
            if args.fan_in_fan_out is not None and layer.kind == "linear":
                layer.fan_in_fan_out = args.fan_in_fan_out
        return adapter, "peft"
    if os.path.isdir(path):
        raise CommandError(f"{path}: a folder without adapter_config.json is not a PEFT adapter")
    state = checkpoint.load(path)
    adapter = from_lorac_state(state, checkpoint.read_metadata(path), source=path, lora_alpha=args.alpha,
                               use_rslora=args.rslora, fan_in_fan_out=args.fan_in_fan_out,
                               embeddings=set(args.embedding))
    unknown = set(args.embedding) - set(adapter.layers)
    if unknown:
        raise CommandError(f"--embedding {sorted(unknown)[0]!r}: {path} has no LoRA layer of that name")
    return adapter, "file"


def require_plain(adapter, path, what, tokens_ok=False):
    """CommandError if the adapter holds loralib MergedLinear layers (``what``: the action), or, unless
    ``tokens_ok``, PEFT trainable tokens."""
    for name, description in adapter.fused.items():
        raise CommandError(f"{path}: layer {name!r} is {description}; {what} handles plain LoRA layers only")
    if adapter.tokens and not tokens_ok:
        raise CommandError(f"{path}: the adapter also trains token rows of {sorted(adapter.tokens)} "
                           f"(trainable_token_indices), which {what} does not carry; load it with "
                           "lorac.load_peft_adapter, or lorac merge it into a base checkpoint")


def require_alpha(adapter, path):
    for name, layer in adapter.layers.items():
        if layer.lora_alpha is None:
            raise CommandError(f"{path}: lora_alpha of layer {name!r} is not recorded in the file; "
                               "give it with --alpha")

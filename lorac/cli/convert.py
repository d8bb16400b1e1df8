"""lorac convert IN OUT: between checkpoint formats and PEFT adapter folders.

IN is a checkpoint file (safetensors, .npz, torch .pt/.pth/.bin -- e.g. a
loralib ``lora_state_dict`` saved with torch.save) or a PEFT adapter folder.
OUT is a lorac file (safetensors, or .npz by suffix) unless ``--to peft`` is
given or OUT is an existing folder or ends with a path separator; then a
PEFT adapter folder is written.

Key mapping (lorac's keys are loralib's):

    lorac / loralib file          PEFT adapter_model.safetensors
    <path>.lora_A   (r, in)       base_model.model.<path>.lora_A.weight
    <path>.lora_B   (out, r)      base_model.model.<path>.lora_B.weight
    <path>.lora_A   (embedding)   base_model.model.<path>.lora_embedding_A
    <path>.lora_B   (embedding)   base_model.model.<path>.lora_embedding_B
    <path>.<param>                base_model.model.<path>.base_layer.<param>
                                  or ...<path>.modules_to_save.<param> / ...<path>.<param>

- file -> file: every tensor is copied under its own key; the metadata
  records each layer's scaling when lora_alpha is known (file metadata or
  --alpha), see lorac.peft.adapter.
- PEFT -> file: the LoRA tensors and the base parameters the folder carries
  (bias, modules_to_save) under lorac keys; r, lora_alpha (rank_pattern /
  alpha_pattern resolved per layer), use_rslora and fan_in_fan_out go to
  the metadata (safetensors only; .npz cannot hold it).
- file -> PEFT: the LoRA tensors only (other tensors are listed as skipped);
  lora_alpha must be recorded in the file or given with --alpha; layers are
  Linear unless the metadata or --embedding says embedding.
"""

import os
import sys

from .. import checkpoint
from ..peft import write_peft_folder
from ._adapters import add_output_options, add_source_options, output_kind, read_adapter, require_alpha, \
    require_plain
from . import CommandError


def register(subparsers):
    parser = subparsers.add_parser(
        "convert", help="convert between checkpoint formats and PEFT adapter folders",
        description="Convert a checkpoint (loralib .pt, safetensors, .npz) or PEFT adapter folder into a "
                    "lorac file (safetensors, .npz by suffix) or a PEFT adapter folder.",
        epilog="Keys: <path>.lora_A / .lora_B (lorac, loralib) <-> base_model.model.<path>.lora_A.weight / "
               ".lora_B.weight (PEFT; lora_embedding_A / _B for embeddings).")
    parser.add_argument("input", metavar="IN", help="checkpoint file or PEFT adapter folder")
    parser.add_argument("output", metavar="OUT", help="output file, or folder with --to peft")
    add_output_options(parser)
    add_source_options(parser)
    parser.set_defaults(func=run)


def run(args):
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise CommandError("IN and OUT are the same path")
    if not os.path.exists(args.input):
        raise CommandError(f"{args.input}: no such file or folder")
    kind = output_kind(args)
    adapter, source_kind = read_adapter(args.input, args)
    if kind == "peft":
        if os.path.isfile(args.output):
            raise CommandError(f"{args.output}: is a file; a PEFT adapter is written as a folder")
        require_plain(adapter, args.input, "a PEFT adapter", tokens_ok=True)
        if not adapter.layers:
            raise CommandError(f"{args.input}: no LoRA tensors to write as a PEFT adapter")
        require_alpha(adapter, args.input)
        write_peft_folder(adapter, args.output, args.base_model)
        if adapter.extra:
            names = sorted(adapter.extra)
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            print(f"note: {len(names)} non-LoRA tensors not written to the PEFT adapter: {shown}", file=sys.stderr)
        print(f"wrote PEFT adapter {args.output} ({len(adapter.layers)} LoRA layers)")
        return 0

    if adapter.tokens:   # a lorac file records no token ids: they would be lost
        raise CommandError(f"{args.input}: the adapter also trains token rows of {sorted(adapter.tokens)} "
                           "(trainable_token_indices), which a lorac file cannot record; convert to a PEFT "
                           "folder, or load it with lorac.load_peft_adapter")
    if source_kind == "peft":
        state = adapter.lorac_state_dict()
        metadata = adapter.metadata() if adapter.layers else {}
    else:
        state = checkpoint.load(args.input)
        metadata = checkpoint.read_metadata(args.input)
        if adapter.layers and all(layer.lora_alpha is not None for layer in adapter.layers.values()):
            metadata.update(adapter.metadata())
    if args.output.lower().endswith(".npz") and metadata:
        print(f"note: .npz files cannot hold metadata; not recorded: {', '.join(sorted(metadata))}",
              file=sys.stderr)
        metadata = None
    checkpoint.save(state, args.output, metadata=metadata or None)
    print(f"wrote {args.output} ({len(state)} tensors, {len(adapter.layers)} LoRA layers)")
    return 0

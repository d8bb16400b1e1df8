"""lorac rank FILE: how many directions each adapter layer really uses.

For every LoRA layer of FILE (a lorac/loralib file, a checkpoint holding
lora_A / lora_B tensors, or a PEFT folder) prints the singular values of
its delta s B A -- computed from QRs of B and A^T and an r x r SVD, never
the dense product (lorac.lowrank.rank_report) --, the effective rank at
90% and 99% energy and the stable rank ||s B A||_F^2 / ||s B A||_2^2.
The scaling s = alpha / r comes from the file's metadata /
adapter_config.json or --alpha; a layer whose alpha is unknown is reported
with s = 1 (the singular values of B A), which changes the singular values
but not the ranks.
"""

import argparse
import math
import os
import re

from ..lowrank import rank_report
from ._adapters import read_adapter
from . import CommandError
from .info import _table


def register(subparsers):
    parser = subparsers.add_parser(
        "rank", help="per-layer singular values and effective ranks of an adapter",
        description="Report, for each LoRA layer, the singular values of its delta s B A, the effective rank "
                    "at 90%% / 99%% energy and the stable rank.")
    parser.add_argument("path", metavar="FILE", help="adapter or checkpoint file, or PEFT adapter folder")
    parser.add_argument("--alpha", type=float, metavar="A",
                        help="lora_alpha of every layer (scaling = A / r); default: the file's metadata or "
                             "adapter_config.json, else scaling 1")
    parser.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=None,
                        help="scaling = alpha / sqrt(r) (rank-stabilised LoRA), or alpha / r")
    parser.add_argument("--adapter-name", metavar="NAME", help="PEFT folder: the adapter in subfolder NAME")
    parser.add_argument("--top", type=int, default=4, metavar="K", help="singular values to print per layer (4)")
    parser.set_defaults(func=run)


def natural_key(path):
    """Sort key putting "layers.2" before "layers.10"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def _scale(alpha, r, rslora):
    return alpha / (math.sqrt(r) if rslora else r)


def run(args):
    if not os.path.exists(args.path):
        raise CommandError(f"{args.path}: no such file or folder")
    if args.top < 0:
        raise CommandError(f"--top must be >= 0, got {args.top}")
    options = argparse.Namespace(alpha=args.alpha, rslora=args.rslora, fan_in_fan_out=None, embedding=[],
                                 adapter_name=args.adapter_name)
    adapter, _ = read_adapter(args.path, options)
    state, scalings, unknown = {}, {}, []
    for path, layer in adapter.layers.items():
        state[f"{path}.lora_A" if path else "lora_A"] = layer.lora_A
        state[f"{path}.lora_B" if path else "lora_B"] = layer.lora_B
        if layer.lora_alpha is None:
            unknown.append(path)
            scalings[path] = 1.0
        elif layer.r == 0:
            scalings[path] = 0.0
        else:
            scalings[path] = layer.scaling
    for path in adapter.fused:  # MergedLinear pairs: alpha only from --alpha
        a_key, b_key = (f"{path}.lora_A", f"{path}.lora_B") if path else ("lora_A", "lora_B")
        state[a_key], state[b_key] = adapter.extra[a_key], adapter.extra[b_key]
        r = int(state[b_key].shape[1])
        if args.alpha is None:
            unknown.append(path)
        scalings[path] = 1.0 if args.alpha is None else _scale(args.alpha, r, bool(args.rslora))
    if not state:
        raise CommandError(f"{args.path}: no LoRA layers (no <path>.lora_A / <path>.lora_B pairs)")
    report = rank_report(state, scalings=scalings)

    rows = []
    for path, info in sorted(report.items(), key=lambda item: natural_key(item[0])):
        top = " ".join(f"{s:.4g}" for s in info.singular_values[:args.top])
        r = f"{info.r}x{info.groups}" if info.groups > 1 else str(info.r)
        rows.append((path or "(root)", r, info.in_features, info.out_features, f"{info.scaling:.4g}",
                     f"{info.norm:.4g}", info.rank_90, info.rank_99, f"{info.stable_rank:.2f}", top))
    print(_table(("layer", "r", "in", "out", "scaling", "||sBA||_F", "rank@90%", "rank@99%", "stable rank",
                  f"top {args.top} singular values"), rows))
    if unknown:
        print(f"note: lora_alpha unknown for {len(unknown)} layer(s) (e.g. {unknown[0]!r}): reported with "
              "scaling 1; give --alpha")
    return 0

"""lorac similarity ADAPTER1 ADAPTER2: how much two adapters' subspaces overlap.

For every layer both adapters have (or the one named by --layer), the LoRA
paper's normalised similarity

    phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j)

between the top-i directions of ADAPTER1's lora_A (right singular vectors;
--kind B: lora_B's left singular vectors) and the top-j of ADAPTER2's
(lorac.lowrank.subspace_similarity).  Prints per layer r1, r2, phi(1, 1),
the mean of phi over the min(r1, r2)-square corner, and the projection
distance between the full spans.  -o writes every matrix phi (r1, r2) to a
safetensors / .npz file, keyed by layer path.
"""

import argparse
import os

import numpy as np

from .. import checkpoint
from ..lowrank import projection_distance, subspace_similarity
from ._adapters import read_adapter
from . import CommandError
from .info import _table
from .rank import natural_key


def register(subparsers):
    parser = subparsers.add_parser(
        "similarity", help="subspace similarity phi(i, j) between two adapters",
        description="Compare the subspaces of two LoRA adapters (lorac/loralib files or PEFT folders) layer by "
                    "layer with phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j), U from the right singular "
                    "vectors of lora_A (--kind A, default) or the left singular vectors of lora_B (--kind B).")
    parser.add_argument("adapter1", metavar="ADAPTER1", help="adapter file or PEFT adapter folder")
    parser.add_argument("adapter2", metavar="ADAPTER2", help="adapter file or PEFT adapter folder")
    parser.add_argument("--layer", metavar="KEY",
                        help="only this layer (module path, or a <path>.lora_A / .lora_B key)")
    parser.add_argument("--kind", choices=("A", "B"), default="A",
                        help="compare lora_A's row spaces (A, default) or lora_B's column spaces (B)")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="write the phi matrices (safetensors; .npz by suffix), one per layer path")
    parser.set_defaults(func=run)


def _adapter_layers(path):
    """{module path: LayerAdapter} of an adapter file or PEFT folder (no scaling needed)."""
    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file or folder")
    options = argparse.Namespace(alpha=None, rslora=None, fan_in_fan_out=None, embedding=[], adapter_name=None)
    adapter, _ = read_adapter(path, options)
    return adapter.layers


def _layer_name(key):
    path, _, param = key.rpartition(".")
    if param in ("lora_A", "lora_B"):
        return path
    return "" if key == "(root)" else key


def run(args):
    first, second = _adapter_layers(args.adapter1), _adapter_layers(args.adapter2)
    common = sorted((path for path in first if path in second), key=natural_key)
    if args.layer is not None:
        wanted = _layer_name(args.layer)
        if wanted not in common:
            where = args.adapter1 if wanted not in first else args.adapter2
            raise CommandError(f"--layer {args.layer!r}: {where} has no LoRA layer {wanted!r} (layers in both: "
                               f"{', '.join(repr(p) for p in common[:8]) or 'none'})")
        common = [wanted]
    if not common:
        raise CommandError(f"{args.adapter1} and {args.adapter2} have no LoRA layer in common")

    rows, matrices = [], {}
    for path in common:
        one, two = first[path], second[path]
        m1, m2 = (one.lora_A, two.lora_A) if args.kind == "A" else (one.lora_B, two.lora_B)
        phi = subspace_similarity(m1, m2, kind=args.kind)
        k = min(phi.shape)
        corner = float(phi[:k, :k].mean()) if k else float("nan")
        first_entry = float(phi[0, 0]) if phi.size else float("nan")
        distance = projection_distance(m1, m2, kind=args.kind)
        matrices[path or "phi"] = phi
        rows.append((path or "(root)", one.r, two.r, f"{first_entry:.4f}", f"{corner:.4f}", f"{distance:.4f}"))
    print(f"subspace similarity of lora_{args.kind}: phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j); "
          "mean corner = mean of phi(i, j) over i, j <= min(r1, r2)")
    print(_table(("layer", "r1", "r2", "phi(1,1)", "mean corner", "projection distance"), rows))
    if args.output:
        checkpoint.save({key: np.ascontiguousarray(value) for key, value in matrices.items()}, args.output)
        print(f"wrote {args.output}: {len(matrices)} phi matrices (r1 x r2)")
    return 0

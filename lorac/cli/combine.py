"""lorac combine A1 A2 ... -o OUT: one adapter from weighted adapters, without a model.

The files' adapters (lorac/loralib files or PEFT folders) are combined
layer by layer as ``lorac.add_weighted_adapter`` combines named adapters on
a model -- the same code (lorac/adapters.py: combination_plan,
combined_factors): "cat", "svd", "linear" and PEFT's task-vector merges
"ties", "dare_ties", "dare_linear", "magnitude_prune" and their "_svd"
forms, with --density, --majority-sign-method, --seed for DARE's masks and
--svd-clamp.
A layer that some inputs lack counts as zero there.  The result has
scaling 1 (lora_alpha = its rank, no rsLoRA) and is written as a lorac file
(safetensors, .npz by suffix) or, with --to peft or OUT a folder, a PEFT
adapter folder.  DoRA adapters, adapters with PEFT's lora_bias and loralib
MergedLinear layers are refused.
"""

import os

import numpy as np

from ..adapters import COMBINATIONS, clamp_option, combination_plan, combined_factors
from .. import checkpoint
from ..peft import Adapter, LayerAdapter, write_peft_folder
from ._adapters import add_output_options, add_source_options, output_kind, read_adapter, require_alpha, \
    require_plain
from . import CommandError


def register(subparsers):
    parser = subparsers.add_parser(
        "combine", help="combine weighted adapters into one (cat, svd, linear, TIES, DARE, ...)",
        description="Combine adapters layer by layer as lorac.add_weighted_adapter does, into one adapter "
                    "(scaling 1) written as a lorac file or a PEFT adapter folder.")
    parser.add_argument("inputs", metavar="ADAPTER", nargs="+",
                        help="adapter files (lorac/loralib) or PEFT folders")
    parser.add_argument("-o", "--output", metavar="OUT", required=True,
                        help="output file, or folder with --to peft")
    parser.add_argument("--weights", type=float, nargs="+", metavar="W",
                        help="one weight per adapter (default: 1)")
    parser.add_argument("--combination", choices=COMBINATIONS, default="cat",
                        help="how to combine (default: cat)")
    parser.add_argument("--svd-rank", type=int, metavar="K",
                        help="rank of the svd combinations (default: the largest input rank)")
    parser.add_argument("--density", type=float, metavar="D", help="fraction of entries each pruning keeps")
    parser.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total",
                        help="how TIES elects each entry's sign (default: total)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of DARE's random masks")
    parser.add_argument("--svd-clamp", type=float, metavar="Q",
                        help="svd combinations: clamp the factors' entries to their Q-quantile (PEFT's svd_clamp)")
    add_output_options(parser)
    add_source_options(parser)
    parser.set_defaults(func=run)


class _FileLayer:
    """One layer path of the input files, read as combined_factors reads a model's layer."""

    def __init__(self, layers):
        self.layers = layers   # {input index as str: LayerAdapter}

    def _adapter_geometry(self):
        first = next(iter(self.layers.values()))
        return 1, first.lora_A.shape[1], first.lora_B.shape[0], first.kind or "linear"

    def adapter_parameters(self, name):
        layer = self.layers[name]
        return _Data(layer.lora_A), _Data(layer.lora_B)

    def _scaling_of(self, name):
        return self.layers[name].scaling


class _Data:
    def __init__(self, data):
        self.data = data


def run(args):
    weights = args.weights if args.weights is not None else [1.0] * len(args.inputs)
    if len(weights) != len(args.inputs):
        raise CommandError(f"{len(args.inputs)} adapters but {len(weights)} weights")
    for path in args.inputs:
        if not os.path.exists(path):
            raise CommandError(f"{path}: no such file or folder")
        if os.path.abspath(path) == os.path.abspath(args.output):
            raise CommandError("OUT must differ from every ADAPTER")
    if args.svd_rank is not None and args.svd_rank < 1:
        raise CommandError(f"--svd-rank must be >= 1, got {args.svd_rank}")
    clamp = clamp_option(args.svd_clamp, args.combination, "lorac combine")
    combination, merge = combination_plan(args.combination, len(args.inputs), args.density,
                                          args.majority_sign_method, args.seed, "lorac combine")
    paths = {}   # layer path -> {input index: LayerAdapter}, in first-seen order
    for i, source in enumerate(args.inputs):
        adapter, _ = read_adapter(source, args)
        require_plain(adapter, source, "lorac combine")
        require_alpha(adapter, source)
        for lpath, layer in adapter.layers.items():
            if layer.magnitude is not None:
                raise CommandError(f"{source}: layer {lpath!r} is a DoRA layer (lora_magnitude_vector); "
                                   "lorac combine adds B A linearly")
            if layer.lora_bias is not None:
                raise CommandError(f"{source}: layer {lpath!r} has a lora_bias; lorac combine takes lora_A / "
                                   "lora_B only and would drop it")
            paths.setdefault(lpath, {})[str(i)] = layer
    if not paths:
        raise CommandError("the adapters hold no LoRA layer")
    out = Adapter()
    for lpath, layers in paths.items():
        shapes = {(layer.kind or "linear", layer.lora_A.shape[1], layer.lora_B.shape[0])
                  for layer in layers.values()}
        if len(shapes) > 1:
            raise CommandError(f"layer {lpath!r} differs between the adapters (kind, in, out): {sorted(shapes)}")
        names = list(layers)
        a, b = combined_factors(_FileLayer(layers), names, [weights[int(n)] for n in names], combination,
                                args.svd_rank, lpath, merge, clamp)
        first = layers[names[0]]
        dtype = np.result_type(first.lora_A.dtype, np.float32)
        out.layers[lpath] = LayerAdapter(a.astype(dtype), b.astype(dtype), kind=first.kind,
                                         lora_alpha=float(a.shape[0]), use_rslora=False,
                                         fan_in_fan_out=first.fan_in_fan_out)
    if output_kind(args) == "peft":
        if os.path.isfile(args.output):
            raise CommandError(f"{args.output}: is a file; a PEFT adapter is written as a folder")
        write_peft_folder(out, args.output, args.base_model)
    else:
        npz = args.output.lower().endswith(".npz")
        checkpoint.save(out.lorac_state_dict(), args.output, metadata=None if npz else out.metadata())
    print(f"wrote {args.output}: {len(out.layers)} layers, {combination} of {len(args.inputs)} adapters")
    return 0


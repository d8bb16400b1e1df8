"""What lorac.Linear's Python adds to one small call, with hot and cold caches.

A one-row batch (token-by-token inference, or the N=1 rows of
bench_linear.py) costs the matrix product plus the layer's Python: argument
checks, the lock, the forward cache.  This benchmark makes the product tiny
(--size 64) so that the rest shows, and times each call on its own:

  hot   the same call again and again: the interpreter's data stays in L1/L2
  cold  --evict-mb of memory copied before every call, as a product over a
        large weight does: what the call touches comes from L3 or further

Rows: NumPy's `x @ W.T + b` (what bench_linear.py's `bare` pays in Python),
the binding's kernel calls made directly (lorac._C, no layer), and the layer
(unmerged forward in train(), merged forward in eval(), a training step).
'layer - C' is the layer's own Python.  Medians of single calls, the
candidates in blocks that rotate, so a slow phase of the machine hits all.

    python benchmarks/bench_overhead.py [--size 64] [--r 8] [--rounds 10] [--block 400] [--json out.json]
"""

import argparse
import json
import statistics
import time

from _timing import print_table, set_threads_from_argv

set_threads_from_argv(default=1)

import numpy as np  # noqa: E402

import lorac  # noqa: E402
from lorac import _C  # noqa: E402
from _kernel_calls import kernel_train_step  # noqa: E402  (imports lorac: after the thread setting)


def time_single_calls(candidates, rounds, block, evict=None):
    """Median seconds of one call of each candidate; `evict` (an array pair)
    is copied before every call when given."""
    samples = {name: [] for name in candidates}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for name, fn in candidates.items():
            fn()
            for _ in range(block):
                if evict is not None:
                    np.copyto(*evict)
                start = clock()
                fn()
                samples[name].append(clock() - start)
    return {name: statistics.median(values) * 1e-9 for name, values in samples.items()}


def candidates_for(size, r):
    rng = np.random.default_rng(0)
    layer = lorac.Linear(size, size, r=r, lora_alpha=2 * r, rng=0)
    layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape).astype(np.float32)
    merged = lorac.Linear(size, size, r=r, lora_alpha=2 * r, rng=0)
    merged.load_state_dict(layer.state_dict())
    merged.eval()
    x = rng.standard_normal((1, size)).astype(np.float32)
    g = rng.standard_normal((1, size)).astype(np.float32)
    w, b, a, bb, s = (layer.weight.data, layer.bias.data, layer.lora_A.data, layer.lora_B.data, layer.scaling)
    kernel_step = kernel_train_step(layer, x, g)
    w_merged = merged.weight.data

    def layer_step():
        layer(x)
        layer.backward(g)

    return {
        "numpy x @ W.T + b": lambda: x @ w_merged.T + b,
        "C forward": lambda: _C.linear_forward(x, w, b, a, bb, s, False, None, 1.0),
        "layer forward": lambda: layer(x),
        "C merged forward": lambda: _C.linear_forward(x, w_merged, b, None, None, s, False, None, 1.0),
        "layer eval forward": lambda: merged(x),
        "C train step": kernel_step,
        "layer train step": layer_step,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="OpenBLAS threads (default 1)")
    parser.add_argument("--size", type=int, default=64, help="in = out features (small: the product is not the point)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=400, help="calls per candidate per round")
    parser.add_argument("--evict-mb", type=int, default=8, help="memory copied before each 'cold' call")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    lorac.set_num_threads(args.threads)
    candidates = candidates_for(args.size, args.r)
    source = np.ones(args.evict_mb * (1 << 20) // 4, dtype=np.float32)
    evict = (np.empty_like(source), source)
    hot = time_single_calls(candidates, args.rounds, args.block)
    cold = time_single_calls(candidates, args.rounds, args.block, evict)
    print(f"lorac {lorac.__version__}, numpy {np.__version__}, threads={lorac.get_num_threads()}, "
          f"in=out={args.size}, r={args.r}, one row; medians of {args.rounds * args.block} single calls, "
          f"cold = {args.evict_mb} MB copied before each call")
    pairs = {"layer forward": "C forward", "layer eval forward": "C merged forward",
             "layer train step": "C train step"}
    rows = []
    for name in candidates:
        kernel = pairs.get(name)
        rows.append([name, f"{hot[name] * 1e6:.2f}", f"{cold[name] * 1e6:.2f}",
                     f"{(hot[name] - hot[kernel]) * 1e6:.2f}" if kernel else "",
                     f"{(cold[name] - cold[kernel]) * 1e6:.2f}" if kernel else ""])
    print_table(["call", "hot us", "cold us", "layer - C hot", "layer - C cold"], rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"size": args.size, "r": args.r, "hot_s": hot, "cold_s": cold}, fh, indent=1)


if __name__ == "__main__":
    main()

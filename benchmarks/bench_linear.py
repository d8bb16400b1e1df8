"""lorac.Linear vs a bare GEMM and vs the same LoRA in plain NumPy (issue: core).

For in = out in {1024, 4096}, N in {1, 16, 256, 2048}, r in {8, 16}, float32,
one thread count for everyone, medians of interleaved repeats:

  bare      x @ W.T + b                        (NumPy; the floor for any layer)
  bare step x @ W.T + b, then g @ W              (NumPy; the floor for any training step:
                                                  the forward and input-gradient products)
  noise     bare again on a copy of W, over bare (identical work: how far apart
            two medians of this row can land on this machine)
  lorac     unmerged forward, merged forward (eval), training step (fwd + bwd);
            merged/bare is over bare on the merged layer's own weight array,
            so both time the same array (the noise column shows how far a
            second array can move bare: up to 1.23x at 1024, N = 1)
  C step    the training step's binding calls made directly (lorac._C, no
            layer Python): the part of the step the kernels are answerable for
  numpy     the same LoRA forward / training step written in plain NumPy

Targets: unmerged forward <= 1.05x bare for N >= 16 at 4096 (floor
1 + r (in + out) / (in out)); merged forward <= 1.02x bare; training step
<= 2.2x bare; lorac faster than NumPy in every row.

With --processes P each row is measured in P fresh processes and every
figure is the median over them, the spread of train/bare shown: where the
arrays of a row land in memory moves its one-row ratios by several percent
from process to process, a bias that more repeats in one process cannot
average away.

    python benchmarks/bench_linear.py [--threads T] [--quick] [--processes P] [--json out.json]
"""

import argparse
import json
import statistics
import subprocess
import sys

from _timing import print_table, set_threads_from_argv, time_interleaved

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402  (after the thread setting)

import lorac  # noqa: E402
from _kernel_calls import kernel_train_step  # noqa: E402  (imports lorac: after the thread setting)


def numpy_lora_forward(x, w, b, a, bb, s):
    y = x @ w.T + b
    y += s * ((x @ a.T) @ bb.T)
    return y


def numpy_lora_train_step(x, g, w, b, a, bb, s, grads):
    u = x @ a.T
    y = x @ w.T + b
    y += s * (u @ bb.T)
    gb = g @ bb
    dx = g @ w + s * (gb @ a)
    grads["a"] += s * (gb.T @ x)
    grads["b"] += s * (g.T @ u)
    grads["bias"] += g.sum(axis=0)
    return y, dx


def bench_row(size, n, r, rng, repeats):
    layer = lorac.Linear(size, size, r=r, lora_alpha=2 * r, rng=0)
    layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape).astype(np.float32) * 0.01
    w, b, a, bb, s = (layer.weight.data, layer.bias.data, layer.lora_A.data, layer.lora_B.data,
                      layer.scaling)
    x = rng.standard_normal((n, size)).astype(np.float32)
    g = rng.standard_normal((n, size)).astype(np.float32)
    merged = lorac.Linear(size, size, r=r, lora_alpha=2 * r, rng=0)
    merged.load_state_dict(layer.state_dict())
    merged.eval()
    merged_w = merged.weight.data  # W0 + s B A, merged in place
    np_grads = {"a": np.zeros_like(a), "b": np.zeros_like(bb), "bias": np.zeros_like(b)}
    w_copy = w.copy()  # the same product on another array: this row's measurement noise

    def lorac_train_step():
        layer(x)
        layer.backward(g)

    times = time_interleaved({
        "bare": lambda: x @ w.T + b,
        "bare_copy": lambda: x @ w_copy.T + b,
        "bare_merged": lambda: x @ merged_w.T + b,
        "bare_step": lambda: (x @ w.T + b, g @ w),
        "lorac_fwd": lambda: layer(x),
        "lorac_merged": lambda: merged(x),
        "lorac_train": lorac_train_step,
        "kernel_train": kernel_train_step(layer, x, g),
        "numpy_fwd": lambda: numpy_lora_forward(x, w, b, a, bb, s),
        "numpy_train": lambda: numpy_lora_train_step(x, g, w, b, a, bb, s, np_grads),
    }, repeats=repeats)
    floor = 1 + r * (2 * size) / (size * size)
    return {"in": size, "out": size, "N": n, "r": r, "floor": floor,
            **{k + "_ms": v * 1e3 for k, v in times.items()},
            "fwd_vs_bare": times["lorac_fwd"] / times["bare"],
            "merged_vs_bare": times["lorac_merged"] / times["bare_merged"],
            "train_vs_bare": times["lorac_train"] / times["bare"],
            "kernel_train_vs_bare": times["kernel_train"] / times["bare"],
            "step_floor_vs_bare": times["bare_step"] / times["bare"],
            "bare_copy_vs_bare": times["bare_copy"] / times["bare"],
            "numpy_fwd_over_lorac": times["numpy_fwd"] / times["lorac_fwd"],
            "numpy_train_over_lorac": times["numpy_train"] / times["lorac_train"]}


def bench_row_in_processes(size, n, r, repeats, processes, threads):
    """bench_row run once in each of `processes` fresh interpreters; every
    figure is the median over them, and "runs" keeps each process's row."""
    runs = []
    for seed in range(processes):
        command = [sys.executable, __file__, "--threads", str(threads), "--one-row", f"{size},{n},{r}",
                   "--seed", str(seed), "--repeats", str(repeats)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench_linear: the worker for in=out={size} N={n} r={r} failed:\n{done.stderr}")
        runs.append(json.loads(done.stdout))
    row = {key: runs[0][key] for key in ("in", "out", "N", "r", "floor")}
    for key in runs[0].keys() - row.keys():  # the timings and ratios
        row[key] = statistics.median(run[key] for run in runs)
    row["runs"] = runs
    return row


def check_targets(rows):
    failures = []
    for row in rows:
        tag = f"in=out={row['in']} N={row['N']} r={row['r']}"
        if row["in"] == 4096 and row["N"] >= 16 and row["fwd_vs_bare"] > 1.05:
            failures.append(f"{tag}: unmerged forward {row['fwd_vs_bare']:.3f}x bare > 1.05x")
        if row["merged_vs_bare"] > 1.02:
            failures.append(f"{tag}: merged forward {row['merged_vs_bare']:.3f}x bare > 1.02x")
        if row["train_vs_bare"] > 2.2:
            failures.append(f"{tag}: training step {row['train_vs_bare']:.3f}x bare > 2.2x")
        if row["numpy_fwd_over_lorac"] < 1 or row["numpy_train_over_lorac"] < 1:
            failures.append(f"{tag}: NumPy faster than lorac (fwd {row['numpy_fwd_over_lorac']:.2f}x, "
                            f"train {row['numpy_train_over_lorac']:.2f}x)")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--quick", action="store_true", help="in = out = 1024 and N <= 256 only")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--small-repeats", type=int, default=21,
                        help="repeats for rows of at most 2^28 multiply-adds (N <= 256 at 1024, "
                             "N <= 16 at 4096): on a shared machine a median of 7 timings of "
                             "0.05-10 ms calls moved by up to 10%% between identical rows")
    parser.add_argument("--processes", type=int, default=1,
                        help="measure each row in this many fresh processes (the repeats are per "
                             "process) and report medians over them")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--one-row", metavar="SIZE,N,R", help=argparse.SUPPRESS)  # a --processes worker
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    lorac.set_num_threads(args.threads)
    if args.one_row:
        size, n, r = (int(v) for v in args.one_row.split(","))
        print(json.dumps(bench_row(size, n, r, np.random.default_rng(args.seed), args.repeats)))
        return
    sizes = [1024] if args.quick else [1024, 4096]
    batches = [1, 16, 256] if args.quick else [1, 16, 256, 2048]
    rng = np.random.default_rng(0)
    blas = lorac.blas_info()
    print(f"lorac {lorac.__version__}, {blas['name']} ({blas['corename']} kernels), "
          f"threads={lorac.get_num_threads()}, numpy {np.__version__}; "
          f"times are medians of {args.repeats} interleaved repeats "
          f"({args.small_repeats} for rows of <= 2^28 multiply-adds)"
          + (f" in each of {args.processes} processes, then medians over the processes"
             if args.processes > 1 else ""))
    rows = []
    for size in sizes:
        for n in batches:
            for r in (8, 16):
                repeats = args.small_repeats if n * size * size <= 1 << 28 else args.repeats
                if args.processes > 1:
                    rows.append(bench_row_in_processes(size, n, r, repeats, args.processes, args.threads))
                else:
                    rows.append(bench_row(size, n, r, rng, repeats))
                print(f"  done in=out={size} N={n} r={r}", file=sys.stderr)
    headers = ["in=out", "N", "r", "bare ms", "fwd ms", "fwd/bare", "floor", "merged/bare", "train ms",
               "train/bare", "C step/bare", "step floor", "np fwd/lorac", "np train/lorac", "noise"]
    table = [[row["in"], row["N"], row["r"], f"{row['bare_ms']:.3f}", f"{row['lorac_fwd_ms']:.3f}",
              f"{row['fwd_vs_bare']:.3f}", f"{row['floor']:.4f}", f"{row['merged_vs_bare']:.3f}",
              f"{row['lorac_train_ms']:.3f}", f"{row['train_vs_bare']:.3f}", f"{row['kernel_train_vs_bare']:.3f}",
              f"{row['step_floor_vs_bare']:.3f}",
              f"{row['numpy_fwd_over_lorac']:.2f}", f"{row['numpy_train_over_lorac']:.2f}",
              f"{row['bare_copy_vs_bare']:.3f}"] for row in rows]
    if args.processes > 1:  # how far apart the processes' train/bare landed
        headers.append("train/bare over processes")
        for cells, row in zip(table, rows):
            each = [run["train_vs_bare"] for run in row["runs"]]
            cells.append(f"{min(each):.3f}-{max(each):.3f}")
    print_table(headers, table)
    failures = check_targets(rows)
    print("\ntargets: " + ("all met" if not failures else f"{len(failures)} missed"))
    for failure in failures:
        print("  MISSED " + failure)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "rows": rows, "missed": failures}, fh, indent=1)


if __name__ == "__main__":
    main()

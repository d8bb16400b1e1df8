"""Are csrc/gemm_impl.h's route constants right for this machine and OpenBLAS?

gemm_rm sends a short batch (m rows) through one of three routes: a GEMV per
row (m <= LORAC_GEMV_MAX_ROWS), panels of C^T (A B^T with m <=
LORAC_PANEL_MAX_ROWS) or plain GEMM.  The constants were set from
measurements with one OpenBLAS on one machine; OpenBLAS picks its kernels by
CPU at run time (see lorac.show_config()), and on another CPU the best route
can differ.  This benchmark builds benchmarks/gemm_routes.c -- which
includes the real gemm_impl.h -- once per route with the constants forced,
plus once as lorac builds it, and times the two products a batch makes with
a square float32 weight:

  nt  x W0^T  (the forward; all three routes apply)
  nn  g W0    (the backward's input gradient; GEMV or plain GEMM)

A second table times the k = 1 product of a one-row batch's dB += g^T u,
(out, r), with and without gemm_rm's transposed-row route for it
(LORAC_K1_TRANSPOSED_ROW), for out = each size and r = --ranks.

Each figure is a median over --rounds runs of each binary in rotation (each
run's figure a median of --repeats).  'lorac/best' above 1 marks a size where
the built-in choice loses to another route: the constant to revisit.  Each
route is a separate process, and identical code has measured up to 1.3x
apart at the sub-millisecond sizes (where its arrays land in memory): trust
a consistent margin across rows and runs, not one cell; add --rounds.

With --alias it times instead the backward's g W0 for one row with its
output placed at offsets after W0's rows modulo 4 KiB: a bare sgemv against
gemm_rm, which moves an output in the 4K-aliasing window elsewhere
(gemm_impl.h, gemv_rm); 'lorac/bare' below 1 is time saved.

Needs gcc (or $CC) and the scipy-openblas32 wheel (lorac's build
requirement: `pip install scipy-openblas32`).

    python benchmarks/bench_gemm_routes.py [--threads 1] [--sizes 1024 4096] [--rows 1 2 3 4 8 16 32 64 128]
        [--ranks 4 8 12 16 24 32 64] [--json out.json]
    python benchmarks/bench_gemm_routes.py --alias [--sizes 1024 4096] [--offsets 0 64 ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import print_table, set_threads_from_argv

set_threads_from_argv(default=1)

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "csrc"
FORCE = 1 << 30  # a row limit no batch reaches

# route name -> the -D flags that force it (lorac: gemm_impl.h's own constants)
ROUTES = {
    "plain": {"LORAC_GEMV_MAX_ROWS": 0, "LORAC_PANEL_MAX_ROWS": 0},
    "gemv": {"LORAC_GEMV_MAX_ROWS": FORCE, "LORAC_PANEL_MAX_ROWS": 0},
    "panel": {"LORAC_GEMV_MAX_ROWS": 0, "LORAC_PANEL_MAX_ROWS": FORCE},
    "lorac": {},
}
K1_PLAIN = {"LORAC_K1_TRANSPOSED_ROW": 0}  # dB's k = 1 product always as (T, N)


def build(route_flags, out_dir, name):
    try:
        import scipy_openblas32 as sob
    except ImportError:
        sys.exit("bench_gemm_routes needs the scipy-openblas32 wheel: pip install scipy-openblas32")
    binary = Path(out_dir) / name
    lib_dir = sob.get_lib_dir()
    command = [os.environ.get("CC", "gcc"), "-O2", "-Wall", "-Wextra", f"-I{CSRC}", f"-I{sob.get_include_dir()}",
               "-DLORAC_BLAS_SCIPY_PREFIX=1", *(f"-D{k}={v}" for k, v in route_flags.items()),
               str(HERE / "gemm_routes.c"), "-o", str(binary), f"-L{lib_dir}", f"-l{sob.get_library()}",
               f"-Wl,-rpath,{lib_dir}"]
    subprocess.run(command, check=True)
    return binary


def output_rows(binary, *args):
    """The whitespace-split lines a run of `binary` with `args` prints."""
    result = subprocess.run([str(binary), *map(str, args)], check=True, capture_output=True, text=True)
    return [line.split() for line in result.stdout.split("\n") if line.strip()]


def run(binary, size, repeats, rows):
    """{m: (nt seconds, nn seconds)} from one run of a route's binary."""
    return {int(m): (float(nt), float(nn)) for m, nt, nn in output_rows(binary, size, repeats, *rows)}


def run_k1(binary, size, repeats, ranks):
    """{r: seconds of dB (size, r) += g^T u} from one run of a binary."""
    return {int(r): float(t) for r, t in output_rows(binary, "k1", size, repeats, *ranks)}


def measure_k1(binaries, sizes, ranks, repeats, rounds):
    """Table rows and JSON records for dB's k = 1 product, lorac's route vs plain (T, N)."""
    table, records = [], []
    for size in sizes:
        samples = {name: {r: [] for r in ranks} for name in binaries}
        for _ in range(rounds):
            for name, binary in binaries.items():
                for r, seconds in run_k1(binary, size, repeats, ranks).items():
                    samples[name][r].append(seconds)
        for r in ranks:
            t = {name: statistics.median(samples[name][r]) for name in binaries}
            records.append({"size": size, "r": r, "seconds": t})
            table.append([size, r, f"{t['plain'] * 1e6:.2f}", f"{t['lorac'] * 1e6:.2f}",
                          f"{t['lorac'] / t['plain']:.2f}"])
    return table, records


def measure_alias(binary, sizes, offsets, repeats, rounds):
    """Table rows and JSON records for g W0 with the output at each offset:
    a bare sgemv vs gemm_rm."""
    table, records = [], []
    for size in sizes:
        samples = {offset: ([], []) for offset in offsets}
        for _ in range(rounds):
            for offset, bare, lorac in output_rows(binary, "alias", size, repeats, *offsets):
                samples[int(offset)][0].append(float(bare))
                samples[int(offset)][1].append(float(lorac))
        for offset in offsets:
            bare, lorac = (statistics.median(column) for column in samples[offset])
            records.append({"size": size, "offset": offset, "bare_seconds": bare, "lorac_seconds": lorac})
            table.append([size, offset, f"{bare * 1e6:.1f}", f"{lorac * 1e6:.1f}", f"{lorac / bare:.2f}"])
    return table, records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32, 64])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the medians (seconds) as JSON")
    parser.add_argument("--alias", action="store_true", help="time g W0's output placement instead (above)")
    parser.add_argument("--offsets", type=int, nargs="+",
                        default=[0, 64, 128, 256, 384, 512, 1024, 2048, 3072, 3840, 3968, 4032])
    args = parser.parse_args()
    if args.alias:
        with tempfile.TemporaryDirectory() as tmp:
            table, records = measure_alias(build(ROUTES["lorac"], tmp, "lorac"), args.sizes, args.offsets,
                                           args.repeats, args.rounds)
        print(f"float32, threads={args.threads}; g (1, size) W0 (size, size), its output the given bytes after "
              f"W0's rows modulo 4 KiB; medians over {args.rounds} rounds of {args.repeats} repeats")
        print_table(["size", "offset", "bare sgemv us", "lorac us", "lorac/bare"], table)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"threads": args.threads, "alias_rows": records}, f, indent=1)
        return

    with tempfile.TemporaryDirectory() as tmp:
        binaries = {name: build(flags, tmp, name) for name, flags in ROUTES.items()}
        table, records = [], []
        for size in args.sizes:
            samples = {name: {m: ([], []) for m in args.rows} for name in ROUTES}
            for _ in range(args.rounds):
                for name, binary in binaries.items():
                    for m, (nt, nn) in run(binary, size, args.repeats, args.rows).items():
                        samples[name][m][0].append(nt)
                        samples[name][m][1].append(nn)
            for m in args.rows:
                nt = {name: statistics.median(samples[name][m][0]) for name in ROUTES}
                nn = {name: statistics.median(samples[name][m][1]) for name in ROUTES}
                records.append({"size": size, "m": m, "nt_seconds": nt, "nn_seconds": nn})
                table.append([
                    size, m,
                    f"{nt['plain'] * 1e3:.3f}", f"{nt['gemv'] / nt['plain']:.2f}",
                    f"{nt['panel'] / nt['plain']:.2f}", f"{nt['lorac'] / min(nt.values()):.2f}",
                    f"{nn['plain'] * 1e3:.3f}", f"{nn['gemv'] / nn['plain']:.2f}",
                    f"{nn['lorac'] / min(nn.values()):.2f}",
                ])
        k1_binaries = {"plain": build(K1_PLAIN, tmp, "k1_plain"), "lorac": binaries["lorac"]}
        k1_table, k1_records = measure_k1(k1_binaries, args.sizes, args.ranks, args.repeats, args.rounds)
    print(f"float32, threads={args.threads}; medians over {args.rounds} rounds of {args.repeats} repeats")
    print_table(["size", "m", "nt plain ms", "nt gemv/plain", "nt panel/plain", "nt lorac/best",
                 "nn plain ms", "nn gemv/plain", "nn lorac/best"], table)
    print()
    print("dB (out, r) += g^T u for one row (k = 1): (T, N) as given vs lorac's route")
    print_table(["out", "r", "(T, N) us", "lorac us", "lorac/(T, N)"], k1_table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": records, "k1_rows": k1_records}, f, indent=1)


if __name__ == "__main__":
    main()

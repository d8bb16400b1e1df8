"""Timing helpers shared by the benchmarks: thread setup and interleaved medians."""

import os
import statistics
import time


def set_threads_from_argv(default=None):
    """Fix the BLAS thread count for every library *before* numpy/torch load.

    Reads --threads N from sys.argv (default: all cores) and exports it as
    OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS, so NumPy's,
    lorac's and torch's BLAS all run with the same number of threads."""
    import sys

    threads = default or os.cpu_count() or 1
    if "--threads" in sys.argv:
        threads = int(sys.argv[sys.argv.index("--threads") + 1])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


def time_interleaved(candidates, repeats=7, min_seconds=0.02, gap=0.1):
    """Median seconds per call of each zero-argument callable in `candidates`.

    Each callable is warmed up, given an inner loop long enough to last
    min_seconds, then the candidates are timed in turn, `repeats` rounds, so
    that a slow phase of a shared machine hits them all alike.  Before each
    timed stretch the process sleeps `gap` seconds and makes one untimed call:
    the previous candidate's BLAS (NumPy's and lorac's are separate OpenBLAS
    copies) keeps its threads spinning for a while after a call, and would
    otherwise steal the cores of the next one."""
    loops = {}
    for name, fn in candidates.items():
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        loops[name] = max(1, int(min_seconds / once))
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            n = loops[name]
            time.sleep(gap)
            fn()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(headers, rows):
    """Plain-text table with right-aligned columns."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))

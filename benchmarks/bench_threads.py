"""Two Python threads, each running big forwards on its own layer, vs the same
work done serially (OpenBLAS at 1 thread, so the only parallelism is the two
Python threads: it shows the kernels release the GIL).

Target (issue: hardening): threaded time < 0.7x serial time.

    python benchmarks/bench_threads.py [--size 2048] [--batch 512] [--calls 8] [--json out.json]
"""

import argparse
import json
import statistics
import threading
import time

from _timing import set_threads_from_argv

set_threads_from_argv(default=1)

import numpy as np  # noqa: E402

import lorac  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="OpenBLAS threads (default 1)")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    lorac.set_num_threads(args.threads)
    layers = [lorac.Linear(args.size, args.size, r=16, rng=i) for i in range(2)]
    x = np.random.default_rng(0).standard_normal((args.batch, args.size)).astype(np.float32)

    def work(layer):
        for _ in range(args.calls):
            layer(x)

    for layer in layers:
        work(layer)  # warm up
    serial, threaded = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for layer in layers:
            work(layer)
        serial.append(time.perf_counter() - start)
        time.sleep(0.2)
        threads = [threading.Thread(target=work, args=(layer,)) for layer in layers]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        threaded.append(time.perf_counter() - start)
        time.sleep(0.2)
    s, t = statistics.median(serial), statistics.median(threaded)
    print(f"OpenBLAS threads={lorac.get_num_threads()}, 2 layers {args.size}x{args.size} r=16, "
          f"N={args.batch}, {args.calls} forwards each; medians of {args.repeats}")
    print(f"serial   {s * 1e3:9.1f} ms")
    print(f"threaded {t * 1e3:9.1f} ms   ratio {t / s:.3f}  (target < 0.7: {'met' if t / s < 0.7 else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"serial_s": s, "threaded_s": t, "ratio": t / s}, fh, indent=1)


if __name__ == "__main__":
    main()

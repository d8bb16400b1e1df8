"""The low-rank toolkit (issue 8): exact vs randomized rank-r approximation, and the
QR-based rank report vs a dense SVD of s B A.

Part 1, low_rank_approx(M, r) on float32 matrices, two spectra: "decay"
(sigma_i = 0.9^i times a random orthogonal pair) and "flat" (Gaussian noise,
the randomized method's worst case).  Columns: medians of lorac exact
(LAPACK gesdd), lorac randomized (niter=2, oversample=10), and the same
randomized algorithm in scikit-learn (randomized_svd) and PyTorch
(torch.svd_lowrank); speed-up of lorac randomized over exact; and each
randomized method's error / the optimal error (1.000 = Eckart--Young).

Part 2, rank_report on one layer with lora_B (out, r), lora_A (r, in):
lorac's QR + r x r SVD vs NumPy's dense svd(s * B @ A, compute_uv=False).

One thread count for every library; medians of interleaved repeats.

    python benchmarks/bench_lowrank.py [--threads T] [--quick] [--json out.json]
"""

import argparse
import importlib
import json
import math

from _timing import print_table, set_threads_from_argv, time_interleaved

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402  (after the thread setting)

import lorac  # noqa: E402
from lorac.lowrank import low_rank_approx, product_singular_values  # noqa: E402


def test_matrix(m, n, spectrum, rng):
    if spectrum == "flat":
        return rng.standard_normal((m, n)).astype(np.float32)
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return ((u * 0.9 ** np.arange(k)) @ v.T).astype(np.float32)


def _optional(name):
    """The module, or None when it is not installed (the columns then show nan)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def approx_row(m, n, r, spectrum, repeats):
    rng = np.random.default_rng(0)
    M = test_matrix(m, n, spectrum, rng)
    s = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    optimal = math.sqrt(float(np.sum(s[r:] ** 2)))
    candidates = {
        "exact": lambda: low_rank_approx(M, r),
        "randomized": lambda: low_rank_approx(M, r, randomized=True, niter=2, oversample=10, rng=0),
    }
    errors = {"randomized": lambda: low_rank_approx(M, r, randomized=True, rng=0).error}
    extmath = _optional("sklearn.utils.extmath")
    if extmath is not None:
        def sk():
            return extmath.randomized_svd(M, r, n_oversamples=10, n_iter=2, random_state=0)
        candidates["sklearn"] = sk
        errors["sklearn"] = lambda: _error(M, *sk())
    torch = _optional("torch")
    if torch is not None:
        torch.set_num_threads(THREADS)
        tm = torch.from_numpy(M)

        def tr():
            return torch.svd_lowrank(tm, q=r + 10, niter=2)
        candidates["torch"] = tr

        def torch_error():
            u, sv, v = tr()
            return _error(M, u[:, :r].numpy(), sv[:r].numpy(), v[:, :r].numpy().T)
        errors["torch"] = torch_error
    times = time_interleaved(candidates, repeats=repeats, min_seconds=0.0)
    quality = {name: fn() / optimal for name, fn in errors.items()}
    return times, quality


def _error(M, u, sv, vt):
    M = M.astype(np.float64)
    return float(np.linalg.norm(M - (u * sv) @ vt))


def rank_row(out, inp, r, repeats):
    rng = np.random.default_rng(1)
    b = rng.standard_normal((out, r)).astype(np.float32)
    a = rng.standard_normal((r, inp)).astype(np.float32)
    times = time_interleaved({
        "qr": lambda: product_singular_values(b, a, 2.0),
        "dense": lambda: np.linalg.svd(2.0 * (b @ a), compute_uv=False),
    }, repeats=repeats, min_seconds=0.02)
    dense = np.linalg.svd(2.0 * (b.astype(np.float64) @ a), compute_uv=False)[:r]
    diff = float(np.max(np.abs(product_singular_values(b, a, 2.0) - dense) / dense[0]))
    return times, diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    lorac.set_num_threads(THREADS)
    sizes = [(512, 512, 8)] if args.quick else [(512, 512, 8), (1024, 1024, 16), (2048, 1024, 16)]
    results = {"threads": THREADS, "approx": [], "rank": []}

    print(f"low_rank_approx, float32, {THREADS} thread(s): medians in ms; error = error / optimal error")
    rows = []
    for m, n, r in sizes:
        for spectrum in ("decay", "flat"):
            times, quality = approx_row(m, n, r, spectrum, repeats)
            ms = {k: 1e3 * v for k, v in times.items()}
            rows.append((f"{m}x{n}", r, spectrum, f"{ms['exact']:.1f}", f"{ms['randomized']:.1f}",
                         f"{ms.get('sklearn', float('nan')):.1f}", f"{ms.get('torch', float('nan')):.1f}",
                         f"{times['exact'] / times['randomized']:.1f}x",
                         f"{quality['randomized']:.4f}", f"{quality.get('sklearn', float('nan')):.4f}",
                         f"{quality.get('torch', float('nan')):.4f}"))
            results["approx"].append({"m": m, "n": n, "r": r, "spectrum": spectrum, "seconds": times,
                                      "error_over_optimal": quality})
    print_table(("shape", "r", "spectrum", "exact", "lorac rand", "sklearn", "torch", "exact/rand",
                 "err lorac", "err sklearn", "err torch"), rows)

    print(f"\nrank_report singular values of s B A, float32, {THREADS} thread(s): medians in ms")
    rows = []
    shapes = [(1024, 1024, 16)] if args.quick else [(1024, 1024, 16), (2048, 2048, 16), (4096, 1024, 64)]
    for out, inp, r in shapes:
        times, diff = rank_row(out, inp, r, repeats)
        rows.append((f"{out}x{inp}", r, f"{1e3 * times['qr']:.3f}", f"{1e3 * times['dense']:.1f}",
                     f"{times['dense'] / times['qr']:.0f}x", f"{diff:.1e}"))
        results["rank"].append({"out": out, "in": inp, "r": r, "seconds": times, "max_rel_diff": diff})
    print_table(("out x in", "r", "QR + r x r SVD", "dense SVD", "dense/QR", "max |diff| / sigma_1"), rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()

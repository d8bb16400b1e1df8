"""One batch across many adapters (issue 6): lorac's mixed batch vs the alternatives.

in = out = 4096, r = 16, float32, N in {16, 64, 256} rows, K in {1, 8, 32}
adapters, rows assigned to adapters at random; one thread count for everyone,
medians of interleaved repeats:

  bare      x @ W.T + b in NumPy (the floor of any layer: the base GEMM)
  single    lorac, one adapter for all rows (layer(x), the fused kernel)    (a)
  mixed     lorac, layer(x, adapter_ids=ids): base GEMM once, rows grouped
            per adapter in C (gather / scatter blocks)
  np loop   NumPy, PEFT's method: base GEMM, then per adapter gather its
            rows, x_g A^T B^T * s, scatter-add                              (b)
  peft      torch + PEFT, model(x, adapter_names=names) (a Python loop over
            the adapters), torch.set_num_threads equal                      (c)

The base GEMM (2 N in out flops) is the same for every method and dominates
the layer, so a second table times the adapters' part alone, the only work
that differs: lorac's kernel with with_base=False, the NumPy loop without
the base GEMM, and PEFT's own mixed-batch code with its base layer replaced
by one returning zeros.  With K = 32 the script also times sorted ids (rows
already grouped by adapter, as a serving system would batch them): the
kernel's in-place "segment" path vs forcing its gather path.

Targets (medians): mixed <= 1.15x single at N = 256, K = 32; mixed >= 3x
faster than np loop and than peft at N = 64, K = 32 (whole layer, and
reported for the adapters' part too).

    python benchmarks/bench_multi_adapter.py [--threads T] [--repeats R] [--no-torch] [--json out.json]
"""

import argparse
import json
import sys

from _timing import print_table, set_threads_from_argv, time_interleaved

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402  (after the thread setting)

import lorac  # noqa: E402
from lorac import _C  # noqa: E402

SIZE, RANK = 4096, 16


def make_layer(k, rng):
    """A lorac.Linear with K adapters ("default" + K - 1 named), random non-zero B."""
    layer = lorac.Linear(SIZE, SIZE, r=RANK, lora_alpha=2 * RANK, merge_weights=False, rng=0)
    for j in range(1, k):
        layer.add_adapter(f"a{j}", r=RANK, lora_alpha=2 * RANK, rng=j)
    for name in layer.adapter_names:
        _, B = layer.adapter_parameters(name)
        B.data[...] = rng.standard_normal(B.shape).astype(np.float32) * 0.01
    return layer.eval()


def numpy_loop(x, w, b, As, Bs, scalings, ids):
    """PEFT's mixed batch in NumPy: base GEMM, then a gather/scatter per adapter."""
    y = x @ w.T + b
    for k in np.unique(ids):
        if k < 0:
            continue
        rows = np.nonzero(ids == k)[0]
        y[rows] += scalings[k] * ((x[rows] @ As[k].T) @ Bs[k].T)
    return y


def numpy_delta_loop(x, As, Bs, scalings, ids):
    """The adapters' part of numpy_loop."""
    y = np.zeros((x.shape[0], Bs[0].shape[0]), dtype=x.dtype)
    for k in np.unique(ids):
        if k < 0:
            continue
        rows = np.nonzero(ids == k)[0]
        y[rows] += scalings[k] * ((x[rows] @ As[k].T) @ Bs[k].T)
    return y


def make_peft(layer, torch, peft, zero_base=False):
    """torch + PEFT model with the same weights and adapters as `layer`
    (zero_base: its base layer replaced by one returning zeros)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(SIZE, SIZE)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    with torch.no_grad():
        net.lin.weight.copy_(torch.from_numpy(layer.weight.data))
        net.lin.bias.copy_(torch.from_numpy(layer.bias.data))
    config = dict(r=RANK, lora_alpha=2 * RANK, target_modules=["lin"])
    model = peft.get_peft_model(net, peft.LoraConfig(**config))
    names = list(layer.adapter_names)
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**config))
    lin = model.base_model.model.lin
    with torch.no_grad():
        for name in names:
            A, B = layer.adapter_parameters(name)
            lin.lora_A[name].weight.copy_(torch.from_numpy(A.data))
            lin.lora_B[name].weight.copy_(torch.from_numpy(B.data))
    if zero_base:
        class Zeros(torch.nn.Module):
            def forward(self, x):
                return x.new_zeros(x.shape[:-1] + (SIZE,))

        lin.base_layer = Zeros()
    return model.eval(), names


def bench_row(n, k, rng, repeats, torch_mods):
    layer = make_layer(k, rng)
    x = rng.standard_normal((n, SIZE)).astype(np.float32)
    ids = rng.integers(0, k, n)
    w, b = layer.weight.data, layer.bias.data
    As, Bs, scalings = layer._mixed_operands()
    candidates = {
        "bare": lambda: x @ w.T + b,
        "single": lambda: layer(x),
        "mixed": lambda: layer(x, adapter_ids=ids),
        "np_loop": lambda: numpy_loop(x, w, b, As, Bs, scalings, ids),
        "lorac_part": lambda: _C.multi_linear_forward(x, w, b, As, Bs, scalings, ids, False, with_base=False),
        "np_part": lambda: numpy_delta_loop(x, As, Bs, scalings, ids),
    }
    if k == 32:
        sorted_ids = np.sort(ids)
        candidates["sorted_segment"] = lambda: _C.multi_linear_forward(x, w, b, As, Bs, scalings, sorted_ids, False)
        candidates["sorted_gather"] = lambda: _C.multi_linear_forward(x, w, b, As, Bs, scalings, sorted_ids, False,
                                                                      contiguous_runs=False)
    if torch_mods:
        torch, peft = torch_mods
        model, names = make_peft(layer, torch, peft)
        part_model, _ = make_peft(layer, torch, peft, zero_base=True)
        tx = torch.from_numpy(x)
        row_names = [names[i] for i in ids]

        def peft_mixed(m=model):
            with torch.no_grad():
                return m(tx, adapter_names=row_names)

        candidates["peft"] = peft_mixed
        candidates["peft_part"] = lambda: peft_mixed(part_model)
        # same results, or the comparison means nothing
        np.testing.assert_allclose(peft_mixed().numpy(), layer(x, adapter_ids=ids), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(peft_mixed(part_model).numpy(), candidates["lorac_part"](), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(numpy_loop(x, w, b, As, Bs, scalings, ids), layer(x, adapter_ids=ids),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(candidates["np_part"](), candidates["lorac_part"](), rtol=1e-3, atol=1e-4)
    times = time_interleaved(candidates, repeats=repeats)
    row = {"N": n, "K": k, **{name + "_ms": t * 1e3 for name, t in times.items()}}
    row["mixed_over_single"] = times["mixed"] / times["single"]
    row["np_loop_over_mixed"] = times["np_loop"] / times["mixed"]
    row["np_part_over_lorac_part"] = times["np_part"] / times["lorac_part"]
    if torch_mods:
        row["peft_over_mixed"] = times["peft"] / times["mixed"]
        row["peft_part_over_lorac_part"] = times["peft_part"] / times["lorac_part"]
    return row


def check_targets(rows):
    results = []
    for row in rows:
        if row["N"] == 256 and row["K"] == 32:
            results.append((row["mixed_over_single"] <= 1.15,
                            f"N=256 K=32: mixed / single = {row['mixed_over_single']:.3f} (target <= 1.15)"))
        if row["N"] == 64 and row["K"] == 32:
            results.append((row["np_loop_over_mixed"] >= 3,
                            f"N=64 K=32: np loop / mixed = {row['np_loop_over_mixed']:.2f} (target >= 3, whole layer)"))
            if "peft_over_mixed" in row:
                results.append((row["peft_over_mixed"] >= 3,
                                f"N=64 K=32: peft / mixed = {row['peft_over_mixed']:.2f} (target >= 3, whole layer)"))
            results.append((row["np_part_over_lorac_part"] >= 3,
                            f"N=64 K=32: np loop / lorac = {row['np_part_over_lorac_part']:.2f} "
                            "(adapters' part alone, >= 3)"))
            if "peft_part_over_lorac_part" in row:
                results.append((row["peft_part_over_lorac_part"] >= 3,
                                f"N=64 K=32: peft / lorac = {row['peft_part_over_lorac_part']:.2f} "
                                "(adapters' part alone, >= 3)"))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-torch", action="store_true", help="skip torch + PEFT")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    lorac.set_num_threads(args.threads)
    torch_mods = None
    if not args.no_torch:
        try:
            import peft
            import torch
            torch.set_num_threads(args.threads)
            torch_mods = (torch, peft)
        except ImportError:
            print("torch / peft not installed: column (c) skipped", file=sys.stderr)
    rng = np.random.default_rng(0)
    print(f"lorac {lorac.__version__}, {lorac.blas_info()['name']}, threads={lorac.get_num_threads()}, "
          f"numpy {np.__version__}" + (f", torch {torch_mods[0].__version__} (threads "
                                        f"{torch_mods[0].get_num_threads()}), peft {torch_mods[1].__version__}"
                                        if torch_mods else "")
          + f"; in=out={SIZE}, r={RANK}, float32; medians of {args.repeats} interleaved repeats")
    rows = []
    for n in (16, 64, 256):
        for k in (1, 8, 32):
            rows.append(bench_row(n, k, rng, args.repeats, torch_mods))
            print(f"  done N={n} K={k}", file=sys.stderr)
    print("\nwhole layer (ms)")
    headers = ["N", "K", "bare", "single", "mixed", "mixed/single", "np loop", "np/mixed"]
    if torch_mods:
        headers += ["peft", "peft/mixed"]
    table = []
    for row in rows:
        line = [row["N"], row["K"], f"{row['bare_ms']:.2f}", f"{row['single_ms']:.2f}", f"{row['mixed_ms']:.2f}",
                f"{row['mixed_over_single']:.3f}", f"{row['np_loop_ms']:.2f}", f"{row['np_loop_over_mixed']:.2f}"]
        if torch_mods:
            line += [f"{row['peft_ms']:.2f}", f"{row['peft_over_mixed']:.2f}"]
        table.append(line)
    print_table(headers, table)
    print("\nthe adapters' part alone (ms): what differs between the methods")
    headers = ["N", "K", "lorac", "np loop", "np/lorac"] + (["peft", "peft/lorac"] if torch_mods else [])
    table = []
    for row in rows:
        line = [row["N"], row["K"], f"{row['lorac_part_ms']:.3f}", f"{row['np_part_ms']:.3f}",
                f"{row['np_part_over_lorac_part']:.2f}"]
        if torch_mods:
            line += [f"{row['peft_part_ms']:.3f}", f"{row['peft_part_over_lorac_part']:.2f}"]
        table.append(line)
    print_table(headers, table)
    sorted_rows = [r for r in rows if "sorted_segment_ms" in r]
    if sorted_rows:
        print("\nK=32, ids sorted by adapter: in-place segments vs forced gather (ms)")
        print_table(["N", "segment", "gather", "gather/segment"],
                    [[r["N"], f"{r['sorted_segment_ms']:.2f}", f"{r['sorted_gather_ms']:.2f}",
                      f"{r['sorted_gather_ms'] / r['sorted_segment_ms']:.3f}"] for r in sorted_rows])
    results = check_targets(rows)
    missed = [text for ok, text in results if not ok]
    print("\ntargets: " + ("all met" if not missed else f"{len(missed)} of {len(results)} missed"))
    for ok, text in results:
        print(("  met    " if ok else "  MISSED ") + text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "rows": rows,
                       "targets": [{"met": ok, "what": text} for ok, text in results]}, fh, indent=1)


if __name__ == "__main__":
    main()

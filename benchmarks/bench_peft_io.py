"""PEFT adapter I/O and `lorac merge` vs PEFT (torch) and plain NumPy (issue 4).

A base model of L square Linear layers (d x d, float32) with a rank-r LoRA
adapter on every layer, written as a PEFT folder by lorac.save_peft_adapter.
One thread count for everyone, medians of interleaved repeats:

  load      lorac.load_peft_adapter onto a lorac model (rebuilds every layer)
            vs peft.PeftModel.from_pretrained onto a deep copy of the torch
            model (the copy is timed alone too: PEFT mutates its model)
  merge     `lorac merge base.safetensors folder -o out.safetensors` (in process)
            vs the same in NumPy (safetensors.numpy load, W += s B A, save)
            vs PEFT (from_pretrained, merge_and_unload, safetensors.torch save)

No targets: this records where the time goes (file I/O dominates the merge).

    python benchmarks/bench_peft_io.py [--threads T] [--quick] [--json out.json]
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings

from _timing import print_table, set_threads_from_argv, time_interleaved

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402  (after the thread setting)

import lorac  # noqa: E402
from lorac.cli import main as lorac_main  # noqa: E402


def lorac_base(d, layers):
    return lorac.Sequential(*[lorac.Linear(d, d, rng=i) for i in range(layers)])


def setup(folder, d, layers, r):
    import torch

    model = lorac_base(d, layers)
    base = {k: v.copy() for k, v in model.state_dict().items()}
    lorac.save(base, os.path.join(folder, "base.safetensors"))
    lorac.inject_lora(model, [str(i) for i in range(layers)], r=r, lora_alpha=2 * r, rng=0)
    rng = np.random.default_rng(0)
    for layer in model:
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape).astype(np.float32) * 0.01
    lorac.save_peft_adapter(model, os.path.join(folder, "adapter"))
    tmodel = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(layers)])
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    return base, tmodel


def bench_row(d, layers, r, repeats):
    import torch
    import peft
    from safetensors.numpy import load_file, save_file
    from safetensors.torch import save_file as torch_save_file

    with tempfile.TemporaryDirectory() as folder:
        base, tmodel = setup(folder, d, layers, r)
        adapter = os.path.join(folder, "adapter")
        base_file = os.path.join(folder, "base.safetensors")
        lmodel = lorac_base(d, layers)
        lmodel.load_state_dict(base)
        scaling = 2.0

        def peft_model():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return peft.PeftModel.from_pretrained(copy.deepcopy(tmodel), adapter)

        def numpy_merge():
            state = load_file(base_file)
            lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
            for i in range(layers):
                a = lora[f"base_model.model.{i}.lora_A.weight"]
                b = lora[f"base_model.model.{i}.lora_B.weight"]
                state[f"{i}.weight"] += scaling * (b @ a)
            save_file(state, os.path.join(folder, "np.safetensors"))

        def peft_merge():
            merged = peft_model().merge_and_unload()
            torch_save_file(merged.state_dict(), os.path.join(folder, "pt.safetensors"))

        def lorac_merge():
            code = lorac_main(["merge", base_file, adapter, "-o", os.path.join(folder, "lc.safetensors"),
                               "--no-progress"])
            assert code == 0

        with torch.no_grad():
            load = time_interleaved({
                "lorac": lambda: lorac.load_peft_adapter(lmodel, adapter),
                "peft": peft_model,
                "deepcopy": lambda: copy.deepcopy(tmodel),
            }, repeats=repeats, min_seconds=0.0)
            stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
            try:
                merge = time_interleaved({"lorac": lorac_merge, "numpy": numpy_merge, "peft": peft_merge},
                                         repeats=repeats, min_seconds=0.0)
            finally:
                sys.stdout.close()
                sys.stdout = stdout
        check = lorac.load(os.path.join(folder, "lc.safetensors"))
        want = load_file(os.path.join(folder, "np.safetensors"))
        err = max(float(np.abs(check[k] - want[k]).max()) for k in want)
    return load, merge, err


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    lorac.set_num_threads(args.threads)
    shapes = [(512, 4, 8)] if args.quick else [(1024, 8, 16), (2048, 4, 16)]
    repeats = 3 if args.quick else 7
    rows, table = [], []
    for d, layers, r in shapes:
        load, merge, err = bench_row(d, layers, r, repeats)
        mb = layers * d * d * 4 / 2**20
        rows.append({"d": d, "layers": layers, "r": r, "base_MiB": mb, "load_s": load, "merge_s": merge,
                     "max_abs_diff_lorac_vs_numpy": err})
        table.append((f"{d}x{d} x{layers}", r, f"{mb:.0f}",
                      f"{load['lorac'] * 1e3:.1f}", f"{load['peft'] * 1e3:.1f}", f"{load['deepcopy'] * 1e3:.1f}",
                      f"{load['lorac'] / load['peft']:.2f}",
                      f"{merge['lorac'] * 1e3:.0f}", f"{merge['numpy'] * 1e3:.0f}", f"{merge['peft'] * 1e3:.0f}",
                      f"{merge['lorac'] / merge['numpy']:.2f}", f"{merge['lorac'] / merge['peft']:.2f}"))
    print(f"threads: {args.threads} (OpenBLAS, torch); medians of {repeats} interleaved runs, milliseconds")
    print_table(["layers", "r", "MiB", "load lorac", "load peft", "(deepcopy)", "lorac/peft",
                 "merge lorac", "merge numpy", "merge peft", "lorac/numpy", "lorac/peft"], table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

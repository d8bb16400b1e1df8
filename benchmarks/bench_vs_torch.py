"""lorac vs PyTorch + loralib, side by side in one run (issue 3).

Layers, float32, the same weights in both libraries (loaded through
load_state_dict), the same thread count (torch.set_num_threads equal to
lorac.get_num_threads()), medians of interleaved repeats:

  Linear         in = out = d, r = 16
  Embedding      num_embeddings = 32000 (a LLaMA-sized vocabulary),
                 embedding_dim = d, r = 16, N token indices
  MergedLinear   the fused q/k/v projection: in = d, out = 3 d,
                 enable_lora = [True, False, True], r = 16
  DoRA           lorac.DoRALinear against PEFT's LoraConfig(use_dora=True)
                 on a torch Linear, in = out = d, r = 16 (bias frozen in
                 both, as PEFT freezes it; eval merges in both); no target,
                 reported for the record
  DoRAEmbedding  lorac.DoRAEmbedding against PEFT's use_dora on a torch
                 Embedding, Embedding's sizes; no target, reported

at small (N = 1, d = 256) and large (N = 256, d = 4096) sizes, in three modes:

  fwd    forward in train mode (adapter unmerged; torch records its graph)
  eval   forward after eval() (adapter merged; torch under inference_mode)
  train  training step: zero_grad, forward, backward of a given grad_output,
         SGD update of the trainable parameters (torch.optim.SGD; lorac: the
         same update written in NumPy).  The input requires a gradient in
         torch for Linear and MergedLinear, because lorac always returns one:
         both libraries then do the same work (a layer inside a network).

Each library runs with its default threading.  Idle BLAS / OpenMP worker
threads busy-wait for a while after each call (OpenBLAS's ~0.1 s, libgomp's
less), which on few cores steals the CPU from the other library's next call
(10x slowdowns were seen on 2 cores), so the candidates alternate with a
pause (--gap, 0.2 s) and one untimed warm-up call before each timed stretch.

Ratios are lorac / torch (below 1: lorac faster).  Targets: training step
<= 0.5x at the small size and <= 0.9x at the large size; MergedLinear forward
(train mode) at least 2x faster than loralib's, i.e. fwd ratio <= 0.5.

    python benchmarks/bench_vs_torch.py [--threads T] [--quick | --sizes small large]
        [--layers Linear Embedding MergedLinear DoRA DoRAEmbedding] [--repeats R] [--gap S] [--json out.json]
"""

import argparse
import json
import statistics
import sys
import time

from _timing import print_table, set_threads_from_argv

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402  (after the thread setting)
import torch  # noqa: E402
import loralib  # noqa: E402

import lorac  # noqa: E402

R, ALPHA, VOCAB, LR = 16, 32, 32000, 1e-4
SIZES = {"small": (1, 256), "large": (256, 4096)}  # name -> (N, d)


def time_alternating(candidates, repeats, gap, min_seconds=0.05):
    """Median seconds per call of each zero-argument callable in `candidates`.

    Rounds of: for each candidate, sleep `gap` seconds (the previous one's
    spinning worker threads go idle), one untimed call (this one's threads
    wake up), then a timed stretch of calls lasting about min_seconds.  The
    rounds interleave the candidates, so a slow phase of a shared machine
    hits them all alike."""
    loops = {}
    for name, fn in candidates.items():
        fn()
        start = time.perf_counter()
        fn()
        loops[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            time.sleep(gap)
            fn()
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: statistics.median(values) for name, values in samples.items()}


# -- the twin layers -----------------------------------------------------------------
def make_linear(n, d):
    theirs = loralib.Linear(d, d, r=R, lora_alpha=ALPHA)
    ours = lorac.Linear(d, d, r=R, lora_alpha=ALPHA, rng=0)
    return theirs, ours, dict(in_=d, out=d), np.random.default_rng(0).standard_normal((n, d)), (n, d)


def make_embedding(n, d):
    theirs = loralib.Embedding(VOCAB, d, r=R, lora_alpha=ALPHA)
    ours = lorac.Embedding(VOCAB, d, r=R, lora_alpha=ALPHA, rng=0)
    idx = np.random.default_rng(0).integers(0, VOCAB, size=n)
    return theirs, ours, dict(in_=VOCAB, out=d), idx, (n, d)


def make_merged_linear(n, d):
    enable = [True, False, True]
    theirs = loralib.MergedLinear(d, 3 * d, r=R, lora_alpha=ALPHA, enable_lora=enable)
    ours = lorac.MergedLinear(d, 3 * d, r=R, lora_alpha=ALPHA, enable_lora=enable, rng=0)
    return theirs, ours, dict(in_=d, out=3 * d), np.random.default_rng(0).standard_normal((n, d)), (n, 3 * d)


def peft_dora(base):
    """PEFT's DoRA layer (LoraConfig(use_dora=True)) over the torch module ``base``."""
    import warnings

    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch.nn.Sequential(base), peft.LoraConfig(
            target_modules=["0"], r=R, lora_alpha=ALPHA, use_dora=True))
    return wrapped.base_model.model[0]


def make_dora(n, d):
    ours = lorac.DoRALinear(d, d, r=R, lora_alpha=ALPHA, rng=0)
    ours.bias.requires_grad = False
    return peft_dora(torch.nn.Linear(d, d)), ours, dict(in_=d, out=d), \
        np.random.default_rng(0).standard_normal((n, d)), (n, d)


def make_dora_embedding(n, d):
    ours = lorac.DoRAEmbedding(VOCAB, d, r=R, lora_alpha=ALPHA, rng=0)
    idx = np.random.default_rng(0).integers(0, VOCAB, size=n)
    return peft_dora(torch.nn.Embedding(VOCAB, d)), ours, dict(in_=VOCAB, out=d), idx, (n, d)


LAYERS = {"Linear": make_linear, "Embedding": make_embedding, "MergedLinear": make_merged_linear, "DoRA": make_dora,
          "DoRAEmbedding": make_dora_embedding}
INDEX_INPUTS = ("Embedding", "DoRAEmbedding")
PEFT_NAMES = ((".default.weight", ""), (".default", ""), ("base_layer.", ""),   # PEFT key -> lorac key
              ("lora_embedding_A", "lora_A"), ("lora_embedding_B", "lora_B"))


def lorac_key(torch_key):
    for theirs, ours in PEFT_NAMES:
        torch_key = torch_key.replace(theirs, ours)
    return torch_key


def twin(name, n, d):
    """The loralib layer, its lorac twin with the same weights, inputs and grad_output for both."""
    theirs, ours, dims, x, out_shape = LAYERS[name](n, d)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial adapter (loralib starts B, or Embedding's A, at zero)
        for pname, p in theirs.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    ours.load_state_dict({lorac_key(k): v.numpy() for k, v in theirs.state_dict().items()})
    g = np.random.default_rng(1).standard_normal(out_shape).astype(np.float32)
    if name in INDEX_INPUTS:
        x_ours, x_theirs = x.astype(np.int64), torch.from_numpy(x.astype(np.int64))
    else:
        x_ours = x.astype(np.float32)
        x_theirs = torch.from_numpy(x_ours.copy()).requires_grad_(True)
    return theirs, ours, dims, x_ours, x_theirs, g, torch.from_numpy(g.copy())


def bench_row(name, size, repeats, gap):
    n, d = SIZES[size]
    theirs, ours, dims, x, x_t, g, g_t = twin(name, n, d)
    opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=LR)
    trainable = [p for p in ours.parameters() if p.requires_grad]

    def torch_train_step():
        opt.zero_grad()
        theirs(x_t).backward(g_t)
        opt.step()

    def lorac_train_step():
        ours.zero_grad()
        ours(x)
        ours.backward(g)
        for p in trainable:
            p.data -= LR * p.grad

    times = time_alternating({"torch_fwd": lambda: theirs(x_t), "lorac_fwd": lambda: ours(x),
                              "torch_train": torch_train_step, "lorac_train": lorac_train_step},
                             repeats, gap)
    theirs.eval()
    ours.eval()
    if name.startswith("DoRA"):
        theirs.merge()   # PEFT merges on request, not on eval()
    x_eval = x_t.detach()

    def torch_eval():
        with torch.inference_mode():
            return theirs(x_eval)

    times.update(time_alternating({"torch_eval": torch_eval, "lorac_eval": lambda: ours(x)}, repeats, gap))
    row = {"layer": name, "size": size, "N": n, "in": dims["in_"], "out": dims["out"], "r": R,
           **{k + "_ms": v * 1e3 for k, v in times.items()}}
    for mode in ("fwd", "eval", "train"):
        row[mode + "_ratio"] = times["lorac_" + mode] / times["torch_" + mode]
    return row


def check_targets(rows):
    failures = []
    for row in rows:
        if row["layer"].startswith("DoRA"):
            continue
        tag = f"{row['layer']} {row['size']} (N={row['N']}, in={row['in']}, out={row['out']})"
        limit = 0.5 if row["size"] == "small" else 0.9
        if row["train_ratio"] > limit:
            failures.append(f"{tag}: training step {row['train_ratio']:.3f}x torch+loralib > {limit}x")
        if row["layer"] == "MergedLinear" and row["fwd_ratio"] > 0.5:
            failures.append(f"{tag}: forward only {1 / row['fwd_ratio']:.2f}x faster than loralib's (< 2x)")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--quick", action="store_true", help="the small size only")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    parser.add_argument("--gap", type=float, default=0.2, help="seconds of pause before each timed stretch")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    lorac.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    assert torch.get_num_threads() == lorac.get_num_threads(), "thread counts differ"
    torch.manual_seed(0)
    print(f"lorac {lorac.__version__} ({lorac.blas_info()['name']}) vs torch {torch.__version__} + loralib, "
          f"threads={lorac.get_num_threads()} each; float32; r={R}; medians of {args.repeats} interleaved "
          f"repeats ({args.gap} s pauses); ratio = lorac / torch")
    rows = []
    for size in (["small"] if args.quick else args.sizes):
        for name in args.layers:
            rows.append(bench_row(name, size, args.repeats, args.gap))
            print(f"  done {name} {size}", file=sys.stderr)
    print_table(
        ["layer", "size", "N", "in", "out", "torch fwd", "lorac fwd", "ratio", "torch eval", "lorac eval",
         "ratio", "torch train", "lorac train", "ratio"],
        [[row["layer"], row["size"], row["N"], row["in"], row["out"],
          *(f"{row[f'{lib}_{mode}_ms']:.3f}" if lib else f"{row[f'{mode}_ratio']:.3f}"
            for mode in ("fwd", "eval", "train") for lib in ("torch", "lorac", None))] for row in rows])
    print("(times in ms)")
    failures = check_targets(rows)
    print("\ntargets: " + ("all met" if not failures else f"{len(failures)} missed"))
    for failure in failures:
        print("  MISSED " + failure)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows, "missed": failures},
                      fh, indent=1)


if __name__ == "__main__":
    main()

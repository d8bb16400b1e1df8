"""The training toolkit (issue 5) vs plain NumPy and PyTorch, float32, medians of interleaved repeats.

  optimizer step   lorac.optim.AdamW / SGD(momentum) -- one fused C pass per parameter --
                   vs the same update rule as NumPy array operations (torch's formula,
                   about ten passes over memory) and vs torch.optim (default single-tensor
                   path; AdamW also with fused=True, torch's own fused CPU kernel)
  loss / ops       cross-entropy, GELU (tanh form) and LayerNorm, forward + backward,
                   vs NumPy and torch (autograd)

Targets: lorac faster than NumPy in every row (the point of fusing).  Versus
torch nothing is promised: the C loops are single-threaded while torch spreads
big elementwise work over its threads -- compare at --threads 1 too.

    python benchmarks/bench_train_ops.py [--threads T] [--quick] [--json out.json]
"""

import argparse
import json
import sys

from _timing import print_table, set_threads_from_argv, time_interleaved

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402  (after the thread setting)

import lorac  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(THREADS)
except ImportError:  # pragma: no cover
    torch = None


# -- NumPy references -------------------------------------------------------------------------------

def numpy_adamw_step(p, g, m, v, step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    p *= 1 - lr * wd
    m += (1 - b1) * (g - m)
    v *= b2
    v += (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2 ** step) + eps
    p -= (lr / (1 - b1 ** step)) * m / denom


def numpy_sgd_step(p, g, buf, lr=1e-2, momentum=0.9):
    buf *= momentum
    buf += g
    p -= lr * buf


def numpy_cross_entropy(x, t):
    shifted = x - x.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) - shifted[np.arange(len(t)), t]))
    grad = e / s
    grad[np.arange(len(t)), t] -= 1
    grad /= len(t)
    return loss, grad


def numpy_gelu_tanh(x, g):
    c = np.float32(np.sqrt(2 / np.pi))
    inner = c * (x + np.float32(0.044715) * x ** 3)
    t = np.tanh(inner)
    y = 0.5 * x * (1 + t)
    dx = g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * np.float32(0.044715) * x * x))
    return y, dx


def numpy_layernorm(x, w, b, g, eps=1e-5):
    mean = x.mean(axis=1, keepdims=True)
    xc = x - mean
    rstd = 1 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps)
    xhat = xc * rstd
    y = xhat * w + b
    gw = g * w
    dx = rstd * (gw - gw.mean(axis=1, keepdims=True) - xhat * (gw * xhat).mean(axis=1, keepdims=True))
    return y, dx, (g * xhat).sum(axis=0), g.sum(axis=0)


# -- rows ----------------------------------------------------------------------------------------------

def optimizer_rows(n, rng, repeats):
    rows = []
    init = rng.standard_normal(n).astype(np.float32)
    grad = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    for name in ("AdamW", "SGD momentum"):
        param = lorac.Parameter(init.copy())
        param.grad = grad.copy()
        opt = lorac.optim.AdamW([param]) if name == "AdamW" else lorac.optim.SGD([param], lr=1e-2, momentum=0.9)
        np_p, np_m, np_v = init.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
        step = [0]

        def numpy_step():
            step[0] += 1
            if name == "AdamW":
                numpy_adamw_step(np_p, grad, np_m, np_v, step[0])
            else:
                numpy_sgd_step(np_p, grad, np_m)

        candidates = {"lorac": opt.step, "numpy": numpy_step}
        if torch is not None:
            tp = torch.nn.Parameter(torch.tensor(init))
            tp.grad = torch.tensor(grad)
            if name == "AdamW":
                candidates["torch"] = torch.optim.AdamW([tp]).step
                tpf = torch.nn.Parameter(torch.tensor(init))
                tpf.grad = torch.tensor(grad)
                candidates["torch fused"] = torch.optim.AdamW([tpf], fused=True).step
            else:
                candidates["torch"] = torch.optim.SGD([tp], lr=1e-2, momentum=0.9).step
        rows.append(_row(f"{name} step", f"n={n:,}", time_interleaved(candidates, repeats)))
    return rows


def op_rows(n, d, rng, repeats):
    rows = []
    x = rng.standard_normal((n, d)).astype(np.float32)
    g = rng.standard_normal((n, d)).astype(np.float32)
    t = rng.integers(0, d, n)
    crit = lorac.CrossEntropyLoss()

    def lorac_ce():
        crit(x, t)
        return crit.backward()

    gelu = lorac.GELU("tanh")

    def lorac_gelu():
        gelu(x)
        return gelu.backward(g)

    ln = lorac.LayerNorm(d)

    def lorac_ln():
        ln(x)
        return ln.backward(g)

    w, b = np.ones(d, np.float32), np.zeros(d, np.float32)
    cases = {
        "cross-entropy f+b": {"lorac": lorac_ce, "numpy": lambda: numpy_cross_entropy(x, t)},
        "GELU(tanh) f+b": {"lorac": lorac_gelu, "numpy": lambda: numpy_gelu_tanh(x, g)},
        "LayerNorm f+b": {"lorac": lorac_ln, "numpy": lambda: numpy_layernorm(x, w, b, g)},
    }
    if torch is not None:
        tx = torch.tensor(x, requires_grad=True)
        tg, tt = torch.tensor(g), torch.tensor(t)
        tgelu, tln = torch.nn.GELU(approximate="tanh"), torch.nn.LayerNorm(d)

        def torch_ce():
            tx.grad = None
            torch.nn.functional.cross_entropy(tx, tt).backward()

        def torch_gelu():
            tx.grad = None
            tgelu(tx).backward(tg)

        def torch_ln():
            tx.grad = None
            tln.zero_grad()
            tln(tx).backward(tg)

        cases["cross-entropy f+b"]["torch"] = torch_ce
        cases["GELU(tanh) f+b"]["torch"] = torch_gelu
        cases["LayerNorm f+b"]["torch"] = torch_ln
    for name, candidates in cases.items():
        rows.append(_row(name, f"{n}x{d}", time_interleaved(candidates, repeats)))
    return rows


def _row(op, size, times):
    row = {"op": op, "size": size, **{f"{k} us": 1e6 * v for k, v in times.items()}}
    row["numpy/lorac"] = times["numpy"] / times["lorac"]
    if "torch" in times:
        row["torch/lorac"] = times["torch"] / times["lorac"]
    if "torch fused" in times:
        row["torch fused/lorac"] = times["torch fused"] / times["lorac"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    repeats = 5 if args.quick else 11
    sizes = [10_000, 1_000_000] if args.quick else [10_000, 300_000, 4_000_000]
    shapes = [(256, 1024)] if args.quick else [(64, 10), (256, 1024), (2048, 1024)]
    rows = []
    for n in sizes:
        rows += optimizer_rows(n, rng, repeats)
    for n, d in shapes:
        rows += op_rows(n, d, rng, repeats)
    print(f"lorac {lorac.__version__}, {args.threads} thread(s) for every library; medians of {repeats} "
          "interleaved rounds; ratios > 1: lorac faster")
    keys = ["op", "size", "lorac us", "numpy us", "torch us", "torch fused us", "numpy/lorac", "torch/lorac",
            "torch fused/lorac"]
    table = [[_fmt(row.get(k)) for k in keys] for row in rows]
    print_table(keys, table)
    slower = [f"{row['op']} {row['size']}" for row in rows if row["numpy/lorac"] < 1]
    print("target (faster than NumPy everywhere):", "met" if not slower else f"MISSED for {', '.join(slower)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "rows": rows, "slower_than_numpy": slower}, fh, indent=1)
    return 0


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())

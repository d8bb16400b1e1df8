"""`lorac demo --similarity`: the LoRA paper's subspace-similarity figure, in small.

The LoRA paper (Hu et al. 2021, section 7.2) trains adapters of rank 8 and
rank 64 on the same task and compares what their ``lora_A`` matrices learned
with

    phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j)          (lorac.subspace_similarity)

where U1_i holds the top-i right singular vectors of the first A and U2_j
the top-j of the second.  The paper finds that the top direction is shared
(phi(1, 1) > 0.5), that two seeds at r = 64 share their top directions too,
and that random Gaussian matrices share nothing (phi ~ 0).

This module reproduces that experiment on the demo's task.  It pretrains the
demo MLP (64-512-512-10) on the digits, then trains, on the shifted digits,
three LoRA adapters per repetition from that pretrained model: r = 8,
r = 64 and r = 64 again.  Each adapter has its own seeds (initialisation
and minibatch order), so no two start from shared random directions.  For
every LoRA layer it computes phi(i, j), i <= 8 and j <= 64, for three
pairs:

- r = 8 vs r = 64;
- r = 64 vs r = 64 with another seed (top 8 of the first vs 64 of the second);
- two random Gaussian matrices of the same shapes: the baseline.  For random
  subspaces E phi(i, j) = max(i, j) / d, with d the layer's input size.

It prints phi(1, 1), phi(2, 2) and the mean over the 8 x 8 corner: the
median over the repetitions, with the range when there are several.
phi(1, 1) is fragile: when the top two singular values of an A are close,
its top two directions can swap places between runs.  phi(2, 2) does not
change under that swap.  It also prints how far
each trained A moved from its initialisation, ||A - A0||_F / ||A0||_F.
It writes heatmaps for ``config.similarity_layers`` (similarity.png, and
similarity_corner.png for the 8 x 8 corner), similarity.json and
similarity.txt, plus the first repetition's adapters
(similarity_adapter_*.safetensors) for ``lorac similarity`` to re-check.
"""

import os
import statistics
from dataclasses import asdict

import numpy as np

from ..checkpoint import load, save
from ..config import get_num_threads
from ..layers import Linear
from ..lowrank import subspace_similarity
from ..utils import lora_state_dict
from .data import load_tasks
from .model import build_mlp, lora_from_pretrained
from .train import accuracy, fit

# The three comparisons, in the order they are printed and drawn.
COMPARISONS = ("small_vs_large", "large_vs_large", "random")


def comparison_label(key, small, large):
    """Human name of a comparison for ranks (small, large)."""
    return {"small_vs_large": f"r={small} vs r={large}",
            "large_vs_large": f"r={large} vs r={large} (other seed)",
            "random": "random Gaussian"}[key]


def run(config, out_dir, log=print):
    """Run the similarity experiment; writes its files to out_dir.  Returns (results dict, summary text)."""
    from . import run_and_report

    def plots(results):
        from .plots import similarity_heatmaps

        return similarity_heatmaps(results, out_dir)

    return run_and_report(config, out_dir, "similarity", run_experiment, summary_text, plots, log)


def _lora_layers(model):
    """[(path, Linear with an adapter)] in model order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, Linear) and m.r > 0]


def _train(pretrained_state, down, config, r, seed, desc):
    """A rank-r adapter trained from the pretrained model: (model, {path: A at init}, History)."""
    model = lora_from_pretrained(pretrained_state, config.hidden, r, config.lora_alpha, seed)
    initial = {path: layer.lora_A.data.copy() for path, layer in _lora_layers(model)}
    history = fit(model, down, config.finetune_epochs, config.lora_lr, config, seed + 1, desc)
    return model, initial, history


def _summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def random_expectation(d, small):
    """E phi(1, 1) and E mean of phi over the small x small corner for random subspaces of R^d
    (E ||U_i^T U_j||_F^2 = i j / d, so E phi(i, j) = max(i, j) / d, at most 1)."""
    k = np.arange(1, min(small, d) + 1)
    return {"phi11": min(1.0 / d, 1.0), "phi22": min(2.0 / d, 1.0),
            "corner_mean": float(np.minimum(np.maximum.outer(k, k) / d, 1.0).mean())}


def run_experiment(config, out_dir, log=print):
    """Pretrain, train the adapters, compare their subspaces; returns the results dict."""
    os.makedirs(out_dir, exist_ok=True)
    small, large = config.similarity_ranks
    tasks = load_tasks(config)
    down = tasks.downstream
    repeats = config.similarity_repeats

    log(f"[1/3] pretraining a 64-{config.hidden}-{config.hidden}-10 MLP on the digits")
    pretrained = build_mlp(config.hidden, seed=config.seed)
    shapes = {path: (layer.in_features, layer.out_features) for path, layer in _lora_layers(
        build_mlp(config.hidden, r=1))}
    unknown = [path for path in config.similarity_layers if path not in shapes]
    if unknown:
        raise ValueError(f"similarity_layers: {unknown} are not LoRA layers of the demo MLP; expected some of "
                         f"{list(shapes)}")
    fit(pretrained, tasks.pretrain, config.pretrain_epochs, config.pretrain_lr, config, config.seed, "pretrain")
    save(pretrained.state_dict(), os.path.join(out_dir, "similarity_pretrained.safetensors"))
    pretrained_state = load(os.path.join(out_dir, "similarity_pretrained.safetensors"))

    log(f"[2/3] training LoRA adapters r={small}, r={large} and r={large} (second seed) on the shifted digits, "
        f"{repeats} repetition(s)")
    runs, phis = [], []
    for k in range(repeats):
        base = config.seed + 100 * (k + 1)
        trained = {}
        for name, r, seed in (("small", small, base + 2), ("large", large, base + 4), ("large2", large, base + 6)):
            label = f"r={r}" + (" (second seed)" if name == "large2" else "")
            model, initial, history = _train(pretrained_state, down, config, r, seed, f"{label} #{k + 1}")
            layers = dict(_lora_layers(model))
            trained[name] = {path: layer.lora_A.data for path, layer in layers.items()}
            moved = {path: float(np.linalg.norm(trained[name][path] - initial[path]) / np.linalg.norm(initial[path]))
                     for path in layers}
            runs.append({"repeat": k, "name": label, "r": r, "seed": seed,
                         "test_accuracy": history.test_accuracy[-1], "relative_change_of_A": moved})
            if k == 0:
                tag = {"small": f"r{r}", "large": f"r{r}", "large2": f"r{r}_seed2"}[name]
                save(lora_state_dict(model), os.path.join(out_dir, f"similarity_adapter_{tag}.safetensors"))
        gauss = np.random.default_rng(base + 8)
        phi = {}
        for path, a_small in trained["small"].items():
            d = a_small.shape[1]
            a_large, a_large2 = trained["large"][path], trained["large2"][path]
            phi[path] = {
                "small_vs_large": subspace_similarity(a_small, a_large),
                "large_vs_large": subspace_similarity(a_large, a_large2)[:small],
                "random": subspace_similarity(gauss.standard_normal((small, d)), gauss.standard_normal((large, d))),
            }
        phis.append(phi)
        log(f"      repetition {k + 1}/{repeats}: test accuracy " + ", ".join(
            f"{run['name']} {100 * run['test_accuracy']:.1f}%" for run in runs[-3:]))

    log("[3/3] subspace similarity phi(i, j) of lora_A (right singular vectors)")
    first = phis[0]
    layers = {}
    for path, (fan_in, fan_out) in shapes.items():
        corner = {}
        for key in COMPARISONS:
            m = [phi[path][key] for phi in phis]
            c = min(small, m[0].shape[0], m[0].shape[1])
            corner[key] = {"phi11": _summary([float(x[0, 0]) for x in m]),
                           "phi22": _summary([float(x[min(1, c - 1), min(1, c - 1)]) for x in m]),
                           "corner_mean": _summary([float(x[:c, :c].mean()) for x in m])}
        layers[path] = {
            "in_features": fan_in, "out_features": fan_out,
            "comparisons": corner,
            "random_expectation": random_expectation(fan_in, small),
            "phi": {key: first[path][key].tolist() for key in COMPARISONS},
        }
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "threads": get_num_threads(),
        "pretrained_accuracy_downstream": accuracy(pretrained, down.x_test, down.y_test),
        "ranks": [small, large],
        "runs": runs,
        "layers": layers,
    }


def _stat(summary, repeats):
    if repeats == 1:
        return f"{summary['median']:.3f}"
    return f"{summary['median']:.3f} [{summary['min']:.2f}, {summary['max']:.2f}]"


def observation(layer, threshold=0.5, random_ceiling=0.1):
    """The seed's observation on one layer (medians over the repetitions), as a dict:

    - top_shared: phi(1, 1) of r=small vs r=large > threshold;
    - random_near_zero: the random baseline's phi(1, 1) and corner mean < random_ceiling;
    - holds: both;
    - times_random: phi(1, 1) of small vs large / its random expectation 1 / d."""
    comp = layer["comparisons"]
    phi11 = comp["small_vs_large"]["phi11"]["median"]
    top_shared = phi11 > threshold
    random_near_zero = (comp["random"]["phi11"]["median"] < random_ceiling
                        and comp["random"]["corner_mean"]["median"] < random_ceiling)
    return {"top_shared": top_shared, "random_near_zero": random_near_zero,
            "holds": top_shared and random_near_zero,
            "times_random": phi11 / layer["random_expectation"]["phi11"]}


def summary_text(results):
    """The table and the verdict printed at the end of `lorac demo --similarity`."""
    from .report import _table

    cfg = results["config"]
    small, large = results["ranks"]
    repeats = cfg["similarity_repeats"]
    spread = "" if repeats == 1 else f"; median [min, max] over {repeats} repetitions"
    acc = {}
    for run in results["runs"]:
        acc.setdefault(run["name"], []).append(100 * run["test_accuracy"])
    lines = [
        f"lorac demo --similarity: MLP 64-{cfg['hidden']}-{cfg['hidden']}-10 pretrained on the digits, LoRA "
        f"r={small} / r={large} / r={large} (second seed) trained on the shifted digits "
        f"({cfg['finetune_epochs']} epochs, lora_alpha={cfg['lora_alpha']:g}, seed {cfg['seed']}, "
        f"{results['threads']} BLAS thread(s))",
        "test accuracy: " + ", ".join(f"{name} {statistics.median(v):.1f}%" for name, v in acc.items())
        + f" (pretrained, no fine-tuning: {100 * results['pretrained_accuracy_downstream']:.1f}%)",
        f"phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j), U: right singular vectors of lora_A; "
        f"corner = mean of phi over i, j <= {small}{spread}",
        "",
    ]
    header = ["layer", "in->out", "comparison", "phi(1,1)", "phi(2,2)", f"mean {small}x{small} corner",
              "|A-A0|/|A0|"]
    rows = []
    for path, layer in results["layers"].items():
        change = {}
        for run in results["runs"]:
            change.setdefault(run["name"], []).append(run["relative_change_of_A"][path])
        moved = " / ".join(f"{statistics.median(v):.2f}" for v in change.values())
        for i, key in enumerate(COMPARISONS):
            comp = layer["comparisons"][key]
            rows.append([path if i == 0 else "", f"{layer['in_features']}->{layer['out_features']}" if i == 0 else "",
                         comparison_label(key, small, large), _stat(comp["phi11"], repeats),
                         _stat(comp["phi22"], repeats), _stat(comp["corner_mean"], repeats),
                         moved if i == 0 else ""])
        expect = layer["random_expectation"]
        rows.append(["", "", "  (random expectation)", f"{expect['phi11']:.3f}", f"{expect['phi22']:.3f}",
                     f"{expect['corner_mean']:.3f}", ""])
    lines.append(_table(header, rows))
    lines.append(f"|A-A0|/|A0|: how far training moved each lora_A from its initialisation "
                 f"(r={small} / r={large} / r={large} second seed).  phi(2,2) compares the top-2 subspaces: "
                 "unlike phi(1,1) it does not drop when two nearly equal singular values swap places")
    lines.append("")
    held = []
    for path, layer in results["layers"].items():
        comp = layer["comparisons"]
        seen = observation(layer)
        if seen["holds"]:
            held.append(path)
        lines.append(
            f"layer {path} ({layer['in_features']}->{layer['out_features']}): top direction shared "
            f"(phi(1,1) > 0.5, r={small} vs r={large})? {'yes' if seen['top_shared'] else 'NO'}: "
            f"{comp['small_vs_large']['phi11']['median']:.3f}, {seen['times_random']:.0f}x the random expectation "
            f"{layer['random_expectation']['phi11']:.3f} (two seeds at r={large}: "
            f"{comp['large_vs_large']['phi11']['median']:.3f}).  Random baseline ~ 0? "
            f"{'yes' if seen['random_near_zero'] else 'NO'}: phi(1,1) {comp['random']['phi11']['median']:.3f}, "
            f"corner {comp['random']['corner_mean']['median']:.3f}.")
        if layer["in_features"] <= large:
            lines.append(f"    (input size {layer['in_features']} <= r={large}: a rank-{large} lora_A spans the whole "
                         f"input space, so phi(i, {layer['in_features']}) = 1 trivially)")
    lines.append(f"the seed's observation (top direction shared with phi(1,1) > 0.5, random baseline ~ 0) holds on "
                 f"{len(held)} of {len(results['layers'])} layers" + (f": {', '.join(held)}" if held else ""))
    return "\n".join(lines)

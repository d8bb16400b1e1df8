"""The demo's figures (PNG, matplotlib's Agg canvas; no global pyplot state)."""

import os

from ._deps import require


def _figure(width, height):
    figure_mod = require("matplotlib.figure", "matplotlib")
    agg = require("matplotlib.backends.backend_agg", "matplotlib")
    fig = figure_mod.Figure(figsize=(width, height), dpi=110)
    agg.FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path)
    return path


def loss_curves(results, path):
    """Training loss and test accuracy per epoch, full FT vs each LoRA rank."""
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for run in results["runs"]:
        style = dict(color="black", linewidth=2.2) if run["r"] is None else dict(linewidth=1.2)
        epochs = range(1, len(run["history"]["losses"]) + 1)
        ax_loss.plot(epochs, run["history"]["losses"], label=run["name"], **style)
        ax_acc.plot(epochs, [100 * a for a in run["history"]["test_accuracy"]], label=run["name"], **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log",
                title="fine-tuning on the shifted digits")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_acc.legend(fontsize=8)
    return _save(fig, path)


def accuracy_vs_rank(results, path):
    """LoRA test accuracy against r, with full fine-tuning and the pretrained model as lines."""
    fig = _figure(6, 4)
    ax = fig.subplots()
    lora = sorted((run for run in results["runs"] if run["r"] is not None), key=lambda run: run["r"])
    full = next(run for run in results["runs"] if run["r"] is None)
    ranks = [run["r"] for run in lora]
    ax.plot(ranks, [100 * run["test_accuracy"] for run in lora], "o-", label="LoRA (base frozen)")
    for run in lora:
        ax.annotate(f"{run['trainable_percent']:.1f}%", (run["r"], 100 * run["test_accuracy"]),
                    textcoords="offset points", xytext=(0, -14), ha="center", fontsize=7)
    ax.axhline(100 * full["test_accuracy"], color="black", label="full fine-tuning")
    fraction = results["config"]["d90_fraction"]
    ax.axhline(100 * fraction * full["test_accuracy"], color="black", linestyle=":",
               label=f"{100 * fraction:.0f}% of full FT (d90)")
    ax.axhline(100 * results["pretrained"]["accuracy_downstream_task"], color="gray", linestyle="--",
               label="pretrained, no fine-tuning")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="LoRA rank r (labels: % of parameters trained)", ylabel="test accuracy (%)",
           ylim=(0, 100), title="accuracy vs rank")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def memory_bars(results, path):
    """Peak training memory above the weights, full FT + AdamW vs LoRA + AdamW."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    runs = results["runs"]
    mib = [run["peak_train_bytes"] / 2**20 for run in runs]
    colors = ["black" if run["r"] is None else "tab:blue" for run in runs]
    ax.bar([run["name"] for run in runs], mib, color=colors)
    ax.axhline(results["pretrained"]["weights_bytes"] / 2**20, color="gray", linestyle="--",
               label="the weights themselves")
    ax.set(ylabel="MiB above the weights", title="peak training memory (tracemalloc, AdamW)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=8)
    return _save(fig, path)


def make_plots(results, out_dir):
    """Write the three PNGs; returns their paths."""
    return [
        loss_curves(results, os.path.join(out_dir, "loss_curves.png")),
        accuracy_vs_rank(results, os.path.join(out_dir, "accuracy_vs_rank.png")),
        memory_bars(results, os.path.join(out_dir, "memory.png")),
    ]


# -- lorac demo --similarity -------------------------------------------------------
def similarity_heatmaps(results, out_dir):
    """Heatmaps of phi(i, j) (first repetition) for config.similarity_layers x the three
    comparisons: similarity.png (i <= small, j <= large) and similarity_corner.png
    (the small x small corner).  Returns their paths."""
    return [_similarity_figure(results, os.path.join(out_dir, "similarity.png"), corner=False),
            _similarity_figure(results, os.path.join(out_dir, "similarity_corner.png"), corner=True)]


def _similarity_figure(results, path, corner):
    import numpy as np

    from .similarity import COMPARISONS, comparison_label

    small, large = results["ranks"]
    paths = [p for p in results["config"]["similarity_layers"] if p in results["layers"]]
    width = 3.3 * len(COMPARISONS) if corner else 4.4 * len(COMPARISONS)
    fig = _figure(width, 2.9 * len(paths) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(paths), len(COMPARISONS), squeeze=False))
    image = None
    for row, layer_path in enumerate(paths):
        layer = results["layers"][layer_path]
        for col, key in enumerate(COMPARISONS):
            phi = np.asarray(layer["phi"][key])
            c = min(small, *phi.shape)
            shown = phi[:c, :c] if corner else phi
            ax = axes[row, col]
            rows_, cols_ = shown.shape
            image = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                              extent=(0.5, cols_ + 0.5, rows_ + 0.5, 0.5))
            ax.set_yticks(range(1, rows_ + 1))
            xt = range(1, cols_ + 1) if cols_ <= 16 else [1] + list(range(8, cols_ + 1, 8))
            ax.set_xticks(list(xt))
            ax.tick_params(labelsize=7)
            ax.set_title(f"layer {layer_path} ({layer['in_features']}->{layer['out_features']}): "
                         f"{comparison_label(key, small, large)}\nphi(1,1) = {phi[0, 0]:.2f}, "
                         f"{c}x{c} mean = {phi[:c, :c].mean():.2f}", fontsize=8)
            ax.set_xlabel("j", fontsize=8)
            ax.set_ylabel("i", fontsize=8)
    fig.suptitle(f"subspace similarity phi(i, j) of lora_A{' (corner)' if corner else ''}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    bar = fig.add_axes((0.945, 0.12, 0.015, 0.72))
    fig.colorbar(image, cax=bar)
    fig.savefig(path)
    return path

"""lorac.demo: pretrain an MLP on the 8x8 digits, then fine-tune it on shifted
digits fully and with LoRA adapters at several ranks, and report accuracy,
trainable parameters, checkpoint sizes, time and training memory.

Run it as ``lorac demo [--quick] [--out DIR]`` (or ``python -m lorac demo``).
Needs the ``demo`` extra (scikit-learn for the bundled data set, tqdm,
matplotlib).  Files: data.py (data set and shift), model.py (the MLP),
train.py (loop and measurements), experiment.py (the steps), report.py
(summary table), plots.py (figures).  ``lorac demo --similarity`` runs
similarity.py instead: the LoRA paper's subspace-similarity figure (phi(i, j)
between r = 8 and r = 64 adapters, two seeds and a random baseline).
"""

import json
import os

from .config import DemoConfig, default_config, quick_config

__all__ = ["DemoConfig", "default_config", "quick_config", "run"]


def run(config, out_dir, log=print):
    """Run the demo; writes checkpoints, summary.json, summary.txt and PNGs to out_dir.

    Returns (results dict, summary text)."""
    from ..config import get_num_threads, set_num_threads
    from .experiment import run_experiment
    from .report import summary_text

    previous_threads = get_num_threads()
    set_num_threads(config.threads)
    try:
        results = run_experiment(config, out_dir, log=log)
    finally:
        set_num_threads(previous_threads)
    text = summary_text(results)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    if config.plots:
        from .plots import make_plots

        results["plots"] = [os.path.basename(p) for p in make_plots(results, out_dir)]
    return results, text

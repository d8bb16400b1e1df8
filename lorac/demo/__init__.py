"""lorac.demo: pretrain an MLP on the 8x8 digits, then fine-tune it on shifted
digits fully and with LoRA adapters at several ranks, and report accuracy,
trainable parameters, checkpoint sizes, time and training memory.

Run it as ``lorac demo [--quick] [--out DIR]`` (or ``python -m lorac demo``).
Needs the ``demo`` extra (scikit-learn for the bundled data set, tqdm,
matplotlib).  Files: data.py (data set and shift), model.py (the MLP),
train.py (loop and measurements), experiment.py (the steps), report.py
(summary table), plots.py (figures).  ``lorac demo --similarity`` runs
similarity.py instead: the LoRA paper's subspace-similarity figure (phi(i, j)
between r = 8 and r = 64 adapters, two seeds and a random baseline), and
``lorac demo --inits`` inits.py: the LoRA initialisations side by side.
"""

import json
import os

from .config import DemoConfig, default_config, quick_config

__all__ = ["DemoConfig", "default_config", "quick_config", "run"]


def run(config, out_dir, log=print):
    """Run the demo; writes checkpoints, summary.json, summary.txt and PNGs to out_dir.
    Returns (results dict, summary text)."""
    from .experiment import run_experiment
    from .report import summary_text

    def plots(results):
        from .plots import make_plots

        return make_plots(results, out_dir)

    return run_and_report(config, out_dir, "summary", run_experiment, summary_text, plots, log)


def run_and_report(config, out_dir, name, experiment, summarise, plots, log=print):
    """experiment(config, out_dir, log=) at config.threads BLAS threads (restored
    afterwards), then <name>.json, <name>.txt and, if config.plots, plots(results)
    -> PNG paths.  Returns (results dict, summary text)."""
    from ..config import get_num_threads, set_num_threads

    previous_threads = get_num_threads()
    set_num_threads(config.threads)
    try:
        results = experiment(config, out_dir, log=log)
    finally:
        set_num_threads(previous_threads)
    text = summarise(results)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write(text + "\n")
    if config.plots:
        results["plots"] = [os.path.basename(p) for p in plots(results)]
    return results, text

"""The demo's experiment: pretrain, full fine-tuning vs LoRA at several ranks,
adapter round trip through a checkpoint, merge check and inference latency.

``run_experiment(config, out_dir)`` returns a plain dict (also written as
summary.json) that report.py and plots.py turn into a table and figures.
"""

import os
import statistics
from dataclasses import asdict

import numpy as np

from ..checkpoint import load, save
from ..config import get_num_threads
from ..utils import count_parameters, lora_state_dict
from .data import load_tasks
from .model import build_mlp, lora_from_pretrained
from .train import accuracy, fit, median_latencies, peak_training_memory


def _run_record(name, r, model, history, peak_bytes, checkpoint_path, full_trainable):
    trainable = count_parameters(model, trainable_only=True)
    return {
        "name": name, "r": r,
        "trainable_params": trainable,
        "trainable_percent": 100.0 * trainable / full_trainable,
        "test_accuracy": history.test_accuracy[-1],
        "history": asdict(history),
        "seconds_per_epoch": statistics.median(history.epoch_seconds),
        "peak_train_bytes": peak_bytes,
        "checkpoint": os.path.basename(checkpoint_path),
        "checkpoint_bytes": os.path.getsize(checkpoint_path),
    }


def run_experiment(config, out_dir, log=print):
    """Run the whole demo, writing checkpoints to out_dir; returns the results dict."""
    os.makedirs(out_dir, exist_ok=True)
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    tasks = load_tasks(config)
    down = tasks.downstream
    seed = config.seed

    # 1. Pretrain every weight on the original digits.
    log(f"[1/4] pretraining a 64-{config.hidden}-{config.hidden}-10 MLP on the digits "
        f"({len(tasks.pretrain.x_train)} train / {len(tasks.pretrain.x_test)} test images)")
    pretrained = build_mlp(config.hidden, seed=seed)
    pre_history = fit(pretrained, tasks.pretrain, config.pretrain_epochs, config.pretrain_lr, config,
                      seed, "pretrain")
    save(pretrained.state_dict(), path("pretrained.safetensors"))
    pretrained_state = load(path("pretrained.safetensors"))
    full_trainable = count_parameters(pretrained)
    weights_bytes = sum(p.nbytes for p in pretrained.parameters())
    pretrained_info = {
        "accuracy_original_task": pre_history.test_accuracy[-1],
        "accuracy_downstream_task": accuracy(pretrained, down.x_test, down.y_test),
        "history": asdict(pre_history),
        "params": full_trainable,
        "weights_bytes": weights_bytes,
    }
    log(f"      pretrained: {100 * pretrained_info['accuracy_original_task']:.1f}% on the original test "
        f"images, {100 * pretrained_info['accuracy_downstream_task']:.1f}% on the shifted ones")

    # 2. Full fine-tuning on the shifted task: every weight trains.
    log(f"[2/4] full fine-tuning on images shifted by {config.shift} pixels")
    full = build_mlp(config.hidden, seed=seed)
    full.load_state_dict(pretrained_state)
    full_history = fit(full, down, config.finetune_epochs, config.full_ft_lr, config, seed + 1, "full FT")
    save(full.state_dict(), path("full_finetuned.safetensors"))
    probe = build_mlp(config.hidden, seed=seed)
    probe.load_state_dict(pretrained_state)
    full_peak = peak_training_memory(probe, down, config.full_ft_lr, config, seed + 1)
    runs = [_run_record("full FT", None, full, full_history, full_peak, path("full_finetuned.safetensors"),
                        full_trainable)]

    # 3. LoRA: the pretrained weights frozen, only rank-r adapters train.
    log(f"[3/4] LoRA fine-tuning at r in {list(config.ranks)} (base frozen, lora_alpha={config.lora_alpha:g})")
    best = None
    for r in config.ranks:
        model = lora_from_pretrained(pretrained_state, config.hidden, r, config.lora_alpha, seed + 2)
        history = fit(model, down, config.finetune_epochs, config.lora_lr, config, seed + 1, f"LoRA r={r}")
        adapter_path = path(f"adapter_r{r}.safetensors")
        save(lora_state_dict(model), adapter_path)
        probe = lora_from_pretrained(pretrained_state, config.hidden, r, config.lora_alpha, seed + 2)
        peak = peak_training_memory(probe, down, config.lora_lr, config, seed + 1)
        record = _run_record(f"LoRA r={r}", r, model, history, peak, adapter_path, full_trainable)
        runs.append(record)
        log(f"      r={r:<3d} test accuracy {100 * record['test_accuracy']:.1f}%  "
            f"({record['trainable_params']:,} trainable parameters)")
        if best is None or record["test_accuracy"] > best[0]["test_accuracy"]:
            best = (record, model)

    # 4. The best adapter through a checkpoint into a fresh model; merge; latency.
    log("[4/4] reloading the best adapter into a fresh model, merging, timing inference")
    reload_info = _reload_and_merge(best[0], best[1], pretrained_state, config, down, path)
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "threads": get_num_threads(),
        "pretrained": pretrained_info,
        "runs": runs,
        "reload": reload_info,
    }


def _reload_and_merge(record, trained, pretrained_state, config, down, path):
    """Save the best adapter, load pretrained + adapter into fresh models, compare, merge, time."""
    r = record["r"]
    adapter_path = path("best_adapter.safetensors")
    save(lora_state_dict(trained), adapter_path)

    def fresh_model():
        # A different seed: the loaded checkpoints, not the initialisation, make it equal.
        model = build_mlp(config.hidden, r=r, lora_alpha=config.lora_alpha, seed=config.seed + 99)
        model.load_state_dict(load(path("pretrained.safetensors")), strict=False)
        model.load_state_dict(load(adapter_path), strict=False)
        return model

    x = down.x_test
    trained.train()
    reference = trained(x)
    unmerged = fresh_model().train()
    logits_unmerged = unmerged(x)
    merged = fresh_model().eval()  # eval() merges B A into the base weights
    logits_merged = merged(x)
    one = x[:1]
    latency = median_latencies({
        "unmerged_batch": lambda: unmerged(x), "merged_batch": lambda: merged(x),
        "unmerged_one": lambda: unmerged(one), "merged_one": lambda: merged(one),
    }, config.latency_repeats)
    return {
        "r": r,
        "adapter_file": os.path.basename(adapter_path),
        "adapter_bytes": os.path.getsize(adapter_path),
        "identical_unmerged": bool(np.array_equal(reference, logits_unmerged)),
        "same_predictions_merged": bool(np.array_equal(reference.argmax(-1), logits_merged.argmax(-1))),
        "max_abs_logit_diff_merged": float(np.max(np.abs(reference.astype(np.float64) - logits_merged))),
        "merged_accuracy": accuracy(merged, x, down.y_test),
        "batch_rows": int(len(x)),
        "latency_seconds": latency,
    }

"""The demo's summary: a text table of the runs plus the headline comparisons."""


def human_bytes(n):
    """1536 -> '1.5 KiB' (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def d90(results):
    """The LoRA run with the smallest r reaching d90_fraction of full fine-tuning's accuracy, or None."""
    fraction = results["config"]["d90_fraction"]
    full = _full(results)
    for run in sorted(_lora(results), key=lambda run: run["r"]):
        if run["test_accuracy"] >= fraction * full["test_accuracy"]:
            return run
    return None


def _full(results):
    return next(run for run in results["runs"] if run["r"] is None)


def _lora(results):
    return [run for run in results["runs"] if run["r"] is not None]


def _table(header, rows):
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def summary_table(results):
    """The runs as an aligned text table."""
    full = _full(results)
    pre = results["pretrained"]
    header = ["method", "trainable", "% params", "test acc", "% of full FT", "checkpoint", "s/epoch",
              "train mem*"]
    rows = [["pretrained, no FT", "0", "0.00%", f"{100 * pre['accuracy_downstream_task']:.1f}%",
             f"{100 * pre['accuracy_downstream_task'] / full['test_accuracy']:.1f}%", "-", "-", "-"]]
    for run in results["runs"]:
        rows.append([
            run["name"], f"{run['trainable_params']:,}", f"{run['trainable_percent']:.2f}%",
            f"{100 * run['test_accuracy']:.1f}%", f"{100 * run['test_accuracy'] / full['test_accuracy']:.1f}%",
            human_bytes(run["checkpoint_bytes"]), f"{run['seconds_per_epoch']:.3f}",
            human_bytes(run["peak_train_bytes"]),
        ])
    return _table(header, rows)


def summary_text(results):
    """The table and the headline findings, as printed at the end of `lorac demo`."""
    cfg = results["config"]
    pre = results["pretrained"]
    full = _full(results)
    lora = _lora(results)
    reload = results["reload"]
    lines = [
        f"lorac demo: digits 8x8, MLP 64-{cfg['hidden']}-{cfg['hidden']}-10, downstream = images shifted "
        f"{tuple(cfg['shift'])} px; AdamW; {cfg['finetune_epochs']} fine-tuning epochs; "
        f"lora_alpha={cfg['lora_alpha']:g}; seed {cfg['seed']}; {results['threads']} BLAS thread(s)",
        f"pretrained: {100 * pre['accuracy_original_task']:.1f}% on the original task, "
        f"{100 * pre['accuracy_downstream_task']:.1f}% on the shifted one",
        "",
        summary_table(results),
        f"* train mem: peak bytes allocated during training above the model's weights (tracemalloc, "
        f"{cfg['memory_steps']} steps); the weights themselves take {human_bytes(pre['weights_bytes'])}.",
        "",
    ]
    best = d90(results)
    pct = 100 * cfg["d90_fraction"]
    if best is None:
        lines.append(f"d90: no rank reached {pct:.0f}% of full fine-tuning's accuracy")
    else:
        lines.append(f"d90 (smallest r reaching {pct:.0f}% of full FT accuracy): r={best['r']} with "
                     f"{best['trainable_percent']:.2f}% of the trainable parameters "
                     f"({100 * best['test_accuracy'] / full['test_accuracy']:.1f}% of full FT accuracy)")
    smallest = min(lora, key=lambda run: run["r"])
    lines.append(f"checkpoints: adapter r={smallest['r']} {human_bytes(smallest['checkpoint_bytes'])} vs full "
                 f"model {human_bytes(full['checkpoint_bytes'])} "
                 f"({100 * smallest['checkpoint_bytes'] / full['checkpoint_bytes']:.1f}%)")
    ref = best or smallest
    saving = 1 - ref["peak_train_bytes"] / full["peak_train_bytes"]
    lines.append(f"training memory above the weights (AdamW): full FT {human_bytes(full['peak_train_bytes'])}, "
                 f"LoRA r={ref['r']} {human_bytes(ref['peak_train_bytes'])} ({100 * saving:.0f}% less)")
    lat = reload["latency_seconds"]
    lines.append(f"best adapter (r={reload['r']}) saved to {reload['adapter_file']} and loaded into a fresh model "
                 f"(pretrained, then adapter, strict=False): predictions "
                 f"{'identical' if reload['identical_unmerged'] else 'DIFFERENT'}; after eval() merges: "
                 f"{'same' if reload['same_predictions_merged'] else 'DIFFERENT'} predictions, "
                 f"max |logit diff| {reload['max_abs_logit_diff_merged']:.1e}")
    lines.append(f"inference, merged vs unmerged (median of {cfg['latency_repeats']}): "
                 f"{reload['batch_rows']} rows {1e3 * lat['merged_batch']:.2f} ms vs "
                 f"{1e3 * lat['unmerged_batch']:.2f} ms ({lat['merged_batch'] / lat['unmerged_batch']:.2f}x); "
                 f"1 row {1e6 * lat['merged_one']:.0f} us vs {1e6 * lat['unmerged_one']:.0f} us "
                 f"({lat['merged_one'] / lat['unmerged_one']:.2f}x)")
    return "\n".join(lines)

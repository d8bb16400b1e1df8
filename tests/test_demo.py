"""`lorac demo`: runs end to end (shortened), writes its files, and is reproducible."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lorac.cli import main  # noqa: E402
from lorac.demo import DemoConfig, run  # noqa: E402
from lorac.demo.data import shift_images  # noqa: E402

RANKS = (1, 2, 4, 8, 16, 64)


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--epochs", "3", "--pretrain-epochs", "5", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    for row in ["pretrained, no FT", "full FT"] + [f"LoRA r={r} " for r in RANKS]:
        assert row in text, row
    for line in ["d90 (smallest r reaching 90% of full FT accuracy)", "checkpoints: adapter r=1",
                 "training memory above the weights (AdamW)", "predictions identical",
                 "same predictions", "inference, merged vs unmerged"]:
        assert line in text, line
    files = ["summary.txt", "summary.json", "loss_curves.png", "accuracy_vs_rank.png", "memory.png",
             "pretrained.safetensors", "full_finetuned.safetensors", "best_adapter.safetensors"]
    files += [f"adapter_r{r}.safetensors" for r in RANKS]
    for name in files:
        assert (out / name).stat().st_size > 0, name
    with open(out / "loss_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "summary.json").read_text())
    runs = {run["name"]: run for run in results["runs"]}
    full = runs["full FT"]
    # The claims the demo is about, with margins that hold after only a few epochs:
    assert results["pretrained"]["accuracy_original_task"] > 0.85
    assert results["pretrained"]["accuracy_downstream_task"] < 0.3      # the shift hurts ...
    assert full["test_accuracy"] > results["pretrained"]["accuracy_downstream_task"] + 0.4  # ... FT fixes it
    assert full["trainable_params"] == 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    for r in RANKS:
        run_r = runs[f"LoRA r={r}"]
        assert run_r["trainable_params"] == r * (64 + 512 + 512 + 512 + 512 + 10)
        assert run_r["checkpoint_bytes"] < full["checkpoint_bytes"]
        assert run_r["peak_train_bytes"] < full["peak_train_bytes"]
    assert runs["LoRA r=1"]["peak_train_bytes"] < 0.5 * full["peak_train_bytes"]
    assert runs["LoRA r=1"]["checkpoint_bytes"] < 0.02 * full["checkpoint_bytes"]
    assert results["reload"]["identical_unmerged"] and results["reload"]["same_predictions_merged"]
    assert results["reload"]["max_abs_logit_diff_merged"] < 1e-3
    assert (out / "summary.txt").read_text().strip() in text


def test_demo_is_reproducible(tmp_path):
    config = DemoConfig(hidden=24, ranks=(1, 3), pretrain_epochs=2, finetune_epochs=2, memory_steps=1,
                        latency_repeats=1, progress=False, plots=False)
    first, _ = run(config, str(tmp_path / "a"), log=lambda *_: None)
    second, _ = run(config, str(tmp_path / "b"), log=lambda *_: None)
    for a, b in zip(first["runs"], second["runs"]):
        assert a["history"]["losses"] == b["history"]["losses"]
        assert a["history"]["test_accuracy"] == b["history"]["test_accuracy"]
        assert a["peak_train_bytes"] > 0
    other, _ = run(config.with_(seed=1), str(tmp_path / "c"), log=lambda *_: None)
    assert other["runs"][0]["history"]["losses"] != first["runs"][0]["history"]["losses"]


def test_shift_images_moves_pixels_and_zero_fills():
    x = np.arange(64, dtype=np.float32).reshape(1, 64)
    y = shift_images(x, 2, 1).reshape(8, 8)
    np.testing.assert_array_equal(y[:2], 0)
    np.testing.assert_array_equal(y[:, :1], 0)
    np.testing.assert_array_equal(y[2:, 1:], x.reshape(8, 8)[:6, :7])


def test_missing_dependency_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails like a missing package
    code = main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lorac demo: error: lorac demo needs the package 'scikit-learn'" in err
    assert "pip install 'lorac[demo]'" in err


@pytest.mark.parametrize("args,message", [(["--epochs", "0"], "expected a positive integer, got 0"),
                                          (["--ranks", "4,x"], "expected comma-separated positive integers")])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["demo", *args])
    assert message in capsys.readouterr().err


def test_python_dash_m_lorac_demo_help(tmp_path, child_env):
    proc = subprocess.run([sys.executable, "-m", "lorac", "demo", "--help"], capture_output=True, text=True,
                          env=child_env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--out DIR" in proc.stdout

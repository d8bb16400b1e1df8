"""The seeds' workflow end to end: examples/quickstart.py must run and reload exactly."""

import importlib.util
import os

import numpy as np

import lorac

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "quickstart.py")


def load_example():
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs(tmp_path, capsys):
    assert load_example().main(["--out", str(tmp_path), "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "reloaded model matches the trained one: True" in out
    adapter = lorac.load(tmp_path / "lora.safetensors")
    assert sorted(adapter) == ["0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"]


def test_seeds_workflow_with_npz(tmp_path, rng):
    """lorac.Linear(r=16); save lora_state_dict; load pretrained then LoRA with strict=False."""
    def model():
        return lorac.Sequential(lorac.Linear(12, 20, r=16, rng=1), lorac.Linear(20, 4, r=16, rng=2))

    trained = model()
    for p in trained.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    lorac.save({k: v for k, v in trained.state_dict().items() if "lora_" not in k}, tmp_path / "base.npz")
    lorac.save(lorac.lora_state_dict(trained), tmp_path / "lora.npz")
    fresh = model()
    missing = fresh.load_state_dict(lorac.load(tmp_path / "base.npz"), strict=False).missing_keys
    assert missing == ["0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"]
    assert fresh.load_state_dict(lorac.load(tmp_path / "lora.npz"), strict=False).unexpected_keys == []
    x = rng.standard_normal((3, 12)).astype(np.float32)
    np.testing.assert_array_equal(fresh(x), trained(x))

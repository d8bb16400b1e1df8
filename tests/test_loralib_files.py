"""Real files written by torch.save from loralib models, loaded into the equivalent lorac
models (through lorac.load, which never imports torch for reading): same outputs."""

import numpy as np
import pytest

import lorac
from lorac.cli import main

pytestmark = pytest.mark.torch
IDX = np.array([[0, 3, 9, 4], [7, 7, 1, 2]])


def loralib_model():
    torch = pytest.importorskip("torch")
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        loralib.Embedding(10, 6, r=2, lora_alpha=4),
        loralib.Linear(6, 8, r=3, lora_alpha=6),
        torch.nn.ReLU(),
        loralib.MergedLinear(8, 9, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        torch.nn.Tanh(),
        loralib.Linear(9, 4, r=2, lora_alpha=2, fan_in_fan_out=True),
    )
    with torch.no_grad():   # loralib starts every adapter at zero effect: make them count
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    return model


def lorac_model():
    return lorac.Sequential(
        lorac.Embedding(10, 6, r=2, lora_alpha=4),
        lorac.Linear(6, 8, r=3, lora_alpha=6),
        lorac.ReLU(),
        lorac.MergedLinear(8, 9, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        lorac.Tanh(),
        lorac.Linear(9, 4, r=2, lora_alpha=2, fan_in_fan_out=True),
    )


def torch_outputs(model):
    torch = pytest.importorskip("torch")
    model.train()   # loralib merges in eval(), and its state_dict would then hold merged weights
    with torch.no_grad():
        return model(torch.from_numpy(IDX)).numpy()


def assert_same(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(expected).max())))


def test_full_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    model = loralib_model()
    expected = torch_outputs(model)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    ours = lorac_model()
    assert ours.load_state_dict(lorac.load(tmp_path / "full.pt")) == lorac.IncompatibleKeys([], [])
    assert_same(ours(IDX), expected)
    assert_same(ours.eval()(IDX), expected)


def test_pretrained_then_lora_state_dict(tmp_path):
    """The seeds' workflow: the base checkpoint and loralib.lora_state_dict, both strict=False."""
    torch = pytest.importorskip("torch")
    loralib = pytest.importorskip("loralib")
    model = loralib_model()
    expected = torch_outputs(model)
    base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    torch.save(base, tmp_path / "pretrained.pth")
    torch.save(loralib.lora_state_dict(model), tmp_path / "lora.bin")
    ours = lorac_model()
    plain = ours(IDX)
    missing, unexpected = ours.load_state_dict(lorac.load(tmp_path / "pretrained.pth"), strict=False)
    assert unexpected == [] and all("lora_" in k for k in missing)
    missing, unexpected = ours.load_state_dict(lorac.load(tmp_path / "lora.bin"), strict=False)
    assert unexpected == [] and all("lora_" not in k for k in missing)
    assert not np.allclose(plain, expected)
    assert_same(ours(IDX), expected)


def test_cli_convert_then_load(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    model = loralib_model()
    expected = torch_outputs(model)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    assert main(["convert", str(tmp_path / "full.pt"), str(tmp_path / "full.safetensors")]) == 0
    assert main(["info", str(tmp_path / "full.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "3      -     2  8   6    44" in out and "MergedLinear, 2 enabled groups" in out
    ours = lorac_model()
    ours.load_state_dict(lorac.load(tmp_path / "full.safetensors"))
    assert_same(ours(IDX), expected)
    # PEFT and merging have no MergedLinear: refused with the layer named
    for argv in (["convert", str(tmp_path / "full.pt"), str(tmp_path / "peft"), "--to", "peft", "--alpha", "4"],
                 ["merge", str(tmp_path / "full.pt"), str(tmp_path / "full.pt"), "-o", str(tmp_path / "m")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "layer '3' is a MergedLinear adapter" in err and err.count("\n") == 1

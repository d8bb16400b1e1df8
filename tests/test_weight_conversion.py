"""save_peft_adapter(..., path_initial_model_for_weight_conversion=init_folder):
an adapter whose init changed the base weights (PiSSA, OLoRA, CorDA) saved as
the plain LoRA adapter of the same fine-tuning on the original weights.  PEFT
loading the converted folder is tested in
tests/vs_torch/test_fidelity_weight_conversion.py."""

import copy
import json
import os

import numpy as np
import pytest

import lorac

IN, HID, OUT = 9, 7, 4


def pretrained():
    net = lorac.Sequential(lorac.Linear(IN, HID, dtype=np.float64), lorac.ReLU(),
                           lorac.Linear(HID, OUT, dtype=np.float64, fan_in_fan_out=True))
    rng = np.random.default_rng(0)
    for p in net.parameters():
        p.data[...] = rng.standard_normal(p.data.shape)
    return net


def data():
    return np.random.default_rng(1).standard_normal((5, IN))


def adapted(init, **config):
    net = pretrained()
    cfg = lorac.LoraConfig(**{**dict(r=3, lora_alpha=5, target_modules=["0", "2"], init_lora_weights=init),
                              **config})
    if init == "corda":
        cfg.corda_config = lorac.CordaConfig()
        lorac.preprocess_corda(net, cfg, run_model=lambda: net(data()))
    if init == "lora_ga":
        cfg.lora_ga_config = lorac.LoraGAConfig()
        cfg.r = 2     # 2r <= min(in, out) of the 7 -> 4 layer
        loss_fn = lorac.MSELoss()

        def train_step():
            loss_fn(net(data()), np.ones((5, OUT)))
            net.backward(loss_fn.backward())
        lorac.preprocess_loraga(net, cfg, train_step)
    return lorac.get_peft_model(net, cfg, rng=0)


def train(net, seed=2):
    """Stand-in for training: every adapter factor moves."""
    rng = np.random.default_rng(seed)
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.data += 0.1 * rng.standard_normal(p.data.shape)


@pytest.mark.filterwarnings("ignore:inject_lora. fan_in_fan_out")
@pytest.mark.parametrize("init, config", [
    ("pissa", {}), ("olora", {}), ("corda", {}), ("lora_ga", {}),
    ("pissa", dict(use_rslora=True, rank_pattern={"2": 2}, alpha_pattern={"0": 3.0})),   # PEFT refuses this one
])
def test_the_converted_adapter_on_the_original_weights_is_the_trained_model(init, config, tmp_path):
    net = adapted(init, **config)
    assert not np.allclose(net[0].weight.data, pretrained()[0].weight.data)      # the init changed the base
    lorac.save_peft_adapter(net, tmp_path / "init")
    train(net)
    written = lorac.save_peft_adapter(net, tmp_path / "out",
                                      path_initial_model_for_weight_conversion=tmp_path / "init")
    assert written["init_lora_weights"] is True
    original = pretrained()
    lorac.load_peft_adapter(original, tmp_path / "out")
    for path in ("0", "2"):
        ours, theirs = original.get_submodule(path), net.get_submodule(path)
        assert ours.r == 2 * theirs.r and ours.scaling == pytest.approx(theirs.scaling, rel=1e-12)
    np.testing.assert_allclose(original(data()), net(data()), rtol=1e-10, atol=1e-10)
    plain = lorac.save_peft_adapter(net, tmp_path / "unconverted")
    assert plain["r"] == written["r"] // 2


@pytest.mark.filterwarnings("ignore:inject_lora. fan_in_fan_out")
def test_bad_initial_folders_are_refused(tmp_path):
    net = adapted("pissa")
    lorac.save_peft_adapter(net, tmp_path / "init")
    other = copy.deepcopy(net)
    lorac.unload(other)
    lorac.inject_lora(other, ["0"], r=3, lora_alpha=5)
    lorac.save_peft_adapter(other, tmp_path / "one_layer")
    with pytest.raises(ValueError, match=r"adapts \['0'\], the model \['0', '2'\]"):
        lorac.save_peft_adapter(net, tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "one_layer")
    config_path = tmp_path / "init" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = 7
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the initial adapter's scaling .* is not the model's"):
        lorac.save_peft_adapter(net, tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "init")
    with pytest.raises(ValueError, match="expected a PEFT adapter folder"):
        lorac.save_peft_adapter(net, tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "missing")
    dora = adapted(True, use_dora=True)
    lorac.save_peft_adapter(dora, tmp_path / "dora_init")
    with pytest.raises(ValueError, match="layer '0' is a DoRA adapter; only plain LoRA converts"):
        lorac.save_peft_adapter(dora, tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "dora_init")
    assert not os.path.exists(tmp_path / "x")

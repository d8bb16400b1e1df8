"""A PiSSA / OLoRA / CorDA adapter lorac saved with
path_initial_model_for_weight_conversion, loaded by PEFT onto the original
torch model, computes what the trained lorac model (residual base + adapter)
computes; its config has the fields PEFT's own conversion writes."""

import json
import warnings

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_fidelity_eva import TARGETS, as_torch, token_batches, twins  # noqa: E402

pytestmark = pytest.mark.torch

LINEAR = [t for t in TARGETS if t != "token_proj"]


def train(net):
    rng = np.random.default_rng(5)
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.data += 0.05 * rng.standard_normal(p.data.shape)


@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_peft_loads_the_converted_adapter_onto_the_original_model(init, tmp_path):
    torch_net, ours = twins()
    config = lorac.LoraConfig(r=3, lora_alpha=6, target_modules=LINEAR, init_lora_weights=init,
                              corda_config=lorac.CordaConfig() if init == "corda" else None)
    batches = token_batches(3, batch=1)
    if init == "corda":
        lorac.preprocess_corda(ours, config, run_model=lambda: [ours(**b) for b in batches])
    lorac.get_peft_model(ours, config, rng=0)
    lorac.save_peft_adapter(ours, tmp_path / "init")
    train(ours)
    lorac.save_peft_adapter(ours, tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_net, tmp_path / "out")
    batch = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = loaded(**as_torch(batch)).numpy()
    np.testing.assert_allclose(ours(**batch), expected, rtol=1e-10, atol=1e-10)


def test_the_converted_config_has_peft_s_fields(tmp_path):
    torch_net, _ = twins(dtype=np.float32)      # PEFT's PiSSA takes float32 weights only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch_net, peft.LoraConfig(r=3, lora_alpha=6, target_modules=LINEAR,
                                                                 init_lora_weights="pissa"))
        wrapped.peft_config["default"].init_lora_weights = True    # PEFT's documented way to save the start
        wrapped.save_pretrained(tmp_path / "init")
        wrapped.peft_config["default"].init_lora_weights = "pissa"
        wrapped.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    theirs = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    _, ours = twins()
    lorac.get_peft_model(ours, lorac.LoraConfig(r=3, lora_alpha=6, target_modules=LINEAR, init_lora_weights="pissa"))
    lorac.save_peft_adapter(ours, tmp_path / "ours_init")
    mine = lorac.save_peft_adapter(ours, tmp_path / "ours",
                                   path_initial_model_for_weight_conversion=tmp_path / "ours_init")
    assert (mine["r"], mine["lora_alpha"], mine["init_lora_weights"]) == (theirs["r"], theirs["lora_alpha"],
                                                                         theirs["init_lora_weights"]) == (6, 12, True)

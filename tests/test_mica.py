"""MiCA (init='mica'): lora_B from the minor left singular vectors of the base
weight, lora_A zero, lora_B frozen for good -- against a NumPy float64
reference, through every path that sets requires_grad, and in PEFT folders.
PEFT itself is compared in tests/vs_torch/test_fidelity_mica.py."""

import numpy as np
import pytest

import lorac
from lorac.peft import AdapterError

IN, OUT = 7, 5


def minor_directions(weight_out_in, r):
    u = np.linalg.svd(weight_out_in.astype(np.float64), full_matrices=False)[0]
    return u[:, -r:]


def assert_same_up_to_sign(actual, expected):
    signs = np.sign(np.sum(actual * expected, axis=0))
    np.testing.assert_allclose(actual * signs, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_starts_from_the_minor_directions_and_trains_lora_A_only(dtype, fan_in_fan_out):
    layer = lorac.Linear(IN, OUT, r=2, init="mica", fan_in_fan_out=fan_in_fan_out, dtype=dtype, rng=0)
    view = layer.weight.data.T if fan_in_fan_out else layer.weight.data
    np.testing.assert_array_equal(layer.lora_A.data, 0)
    assert_same_up_to_sign(layer.lora_B.data, minor_directions(view, 2))
    base = lorac.Linear(IN, OUT, fan_in_fan_out=fan_in_fan_out, dtype=dtype, rng=0)
    np.testing.assert_array_equal(layer.weight.data, base.weight.data)          # the base is untouched
    x = np.random.default_rng(1).standard_normal((4, IN)).astype(dtype)
    np.testing.assert_array_equal(layer(x), base(x))
    layer.backward(np.ones((4, OUT), dtype))
    assert layer.lora_A.grad is not None and layer.lora_B.grad is None and not layer.lora_B.requires_grad


def test_embedding_and_merged_linear_take_each_block_s_minor_directions():
    emb = lorac.Embedding(10, 6, r=2, init="mica", dtype=np.float64, rng=0)
    np.testing.assert_array_equal(emb.lora_A.data, 0)
    assert_same_up_to_sign(emb.lora_B.data, minor_directions(emb.weight.data.T, 2))      # (dim, num) view
    fused = lorac.MergedLinear(IN, 6, r=1, enable_lora=[True, False, True], init="mica", dtype=np.float64, rng=0)
    for group, start in enumerate((0, 4)):
        assert_same_up_to_sign(fused.lora_B.data[group * 2:(group + 1) * 2],
                               minor_directions(fused.weight.data[start:start + 2], 1))
    assert not emb.lora_B.requires_grad and not fused.lora_B.requires_grad


def test_lora_B_stays_frozen_through_every_rule_that_trains_adapters():
    model = lorac.Sequential(lorac.Linear(IN, OUT, rng=0), lorac.Linear(OUT, 3, rng=1))
    lorac.get_peft_model(model, lorac.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights="mica"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "1.lora_A"]
    lorac.mark_only_lora_as_trainable(model)
    lorac.set_adapter(model, "default")
    with lorac.disable_adapters(model):
        assert not model[0].lora_A.requires_grad
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    lorac.add_adapter(model, "other", r=1, init="mica")
    lorac.add_adapter(model, "plain", r=1)
    lorac.set_adapter(model, ["other", "plain"])
    assert sorted(n for n, p in model[0].named_parameters() if p.requires_grad) == ["lora_A_other", "lora_A_plain",
                                                                                     "lora_B_plain"]
    model[0].reset_adapter("other", init="kaiming")          # another init lifts the rule
    assert model[0].lora_B_other.requires_grad
    model[0].reset_adapter("default", init="mica")
    lorac.set_adapter(model, "default")
    assert not model[0].lora_B.requires_grad and model[0].lora_A.requires_grad
    lorac.delete_adapter(model, "other")
    assert "other" not in model[0]._frozen_lora_b


def test_refusals():
    with pytest.raises(ValueError, match=r"init='mica' needs r <= min\(out, in\) of each adapted block = 5"):
        lorac.Linear(IN, OUT, r=6, init="mica")
    with pytest.raises(ValueError, match="does not combine with DoRA"):
        lorac.DoRALinear(IN, OUT, r=2, init="mica")
    with pytest.raises(ValueError, match="does not combine with DoRA"):
        lorac.DoRALinear(IN, OUT, r=2).reset_adapter(init="mica")
    model = lorac.Sequential(lorac.Linear(IN, OUT))
    with pytest.raises(ValueError, match="does not combine with use_dora=True"):
        lorac.inject_lora(model, ["0"], r=2, init="mica", use_dora=True)
    assert model[0].r == 0


def test_folders_record_mica_and_loading_freezes_lora_B(tmp_path):
    model = lorac.Sequential(lorac.Linear(IN, OUT, rng=0), lorac.Linear(OUT, 3, rng=1))
    lorac.get_peft_model(model, lorac.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights="mica"))
    model[0].lora_A.data[...] = 0.5       # trained
    written = lorac.save_peft_adapter(model, tmp_path / "mica")
    assert written["init_lora_weights"] == "mica"
    fresh = lorac.Sequential(lorac.Linear(IN, OUT, rng=0), lorac.Linear(OUT, 3, rng=1))
    lorac.load_peft_adapter(fresh, tmp_path / "mica")
    assert not fresh[0].lora_B.requires_grad and fresh[0].lora_A.requires_grad
    x = np.random.default_rng(2).standard_normal((3, IN)).astype(np.float32)
    np.testing.assert_allclose(fresh(x), model(x), rtol=1e-6)
    lorac.add_adapter(fresh, "again", r=2)
    lorac.load_adapter(fresh, tmp_path / "mica", "again")
    lorac.set_adapter(fresh, "again")
    assert not fresh[0].lora_B_again.requires_grad and fresh[0].lora_A_again.requires_grad
    model[1].reset_adapter(init="kaiming")      # one MiCA layer, one plain: one config cannot say both
    with pytest.raises(AdapterError, match="cannot share one PEFT adapter: its adapter_config.json has one "
                                           "init_lora_weights"):
        lorac.save_peft_adapter(model, tmp_path / "mixed")

"""lorac.get_peft_model(model, lorac.LoraConfig(...)) against PEFT's
get_peft_model(model, peft.LoraConfig(...)) on the twin decoder: the same
parameters trainable, the same print_trainable_parameters line, PEFT's
initialisations, and a save that carries the config's modules_to_save and
bias into a folder PEFT loads."""

import re
import warnings

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_fidelity_inject_peft import VOCAB, lorac_model, torch_model  # noqa: E402

pytestmark = pytest.mark.torch


def both(**config):
    ours, twin = lorac_model(), torch_model()
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    lorac.get_peft_model(ours, lorac.LoraConfig(**config), rng=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(twin, peft.LoraConfig(**config))
    return ours, wrapped


def lorac_name(peft_name):
    """PEFT's parameter name -> lorac's: no wrapper prefix, adapter name or base_layer / copy levels."""
    name = peft_name.removeprefix("base_model.model.")
    name = re.sub(r"\.modules_to_save\.default\.", ".", name)
    name = name.replace(".base_layer.", ".").replace("lora_embedding_", "lora_")
    name = re.sub(r"\.lora_B\.default\.bias$", ".lora_bias", name)   # PEFT's lora_bias
    return re.sub(r"\.default(\.weight)?$", "", name)


def trainable(ours, wrapped):
    return (sorted(n for n, p in ours.named_parameters() if p.requires_grad),
            sorted(lorac_name(n) for n, p in wrapped.named_parameters() if p.requires_grad))


CONFIGS = {
    "linear and embedding": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=16),
    "lora_only biases and patterns": dict(target_modules=["k_proj", "up_proj"], bias="lora_only",
                                          rank_pattern={"up_proj": 2}, alpha_pattern={"k_proj": 3}),
    "all biases, rslora, all-linear": dict(target_modules="all-linear", bias="all", use_rslora=True,
                                           exclude_modules=["lm_head"]),
    "inference mode": dict(target_modules=["q_proj", "embed_tokens"], inference_mode=True),
    "inference mode keeps the bias rule": dict(target_modules=["v_proj"], inference_mode=True, bias="lora_only"),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_same_parameters_train_and_the_counts_match(config, capsys):
    ours, wrapped = both(**config)
    mine, theirs = trainable(ours, wrapped)
    assert mine == theirs
    wrapped.print_trainable_parameters()
    expected = capsys.readouterr().out
    lorac.print_trainable_parameters(ours)
    assert capsys.readouterr().out == expected
    assert ours.peft_config["default"].r == config.get("r", 8)


def test_inference_mode_freezes_modules_to_save_too():
    """(PEFT counts a module to save twice, its trained copy and the original, so only the names compare.)"""
    ours, wrapped = both(target_modules=["q_proj"], modules_to_save=["norm"], inference_mode=True)
    mine, theirs = trainable(ours, wrapped)
    assert mine == theirs == []


def test_modules_to_save_train_and_are_saved_from_the_config(tmp_path):
    config = dict(target_modules=["q_proj"], modules_to_save=["norm"], r=2, lora_alpha=4)
    ours, wrapped = both(**config)
    mine, theirs = trainable(ours, wrapped)
    assert mine == theirs and "model.norm.weight" in mine
    ours.model.norm.weight.data[...] = np.linspace(0.5, 1.5, ours.model.norm.weight.data.size)
    ours.model.layers[0].self_attn.q_proj.lora_B.data[...] = 0.25
    written = lorac.save_peft_adapter(ours, tmp_path / "a")   # modules_to_save from ours.peft_config
    assert written["modules_to_save"] == ["model.norm"]
    fresh = torch_model()
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in lorac_model().state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "a"))
    norm = loaded.base_model.model.model.norm
    np.testing.assert_allclose(norm.modules_to_save["default"].weight.detach().numpy(),
                               ours.model.norm.weight.data)
    q = loaded.base_model.model.model.layers[0].self_attn.q_proj
    np.testing.assert_allclose(q.lora_B["default"].weight.detach().numpy(), 0.25)


def test_peft_initialisations():
    model = lorac.Sequential(lorac.Embedding(50, 32, rng=0), lorac.Linear(32, 64, rng=1), lorac.Linear(64, 64, rng=2))
    lorac.get_peft_model(model, lorac.LoraConfig(target_modules=["0", "1", "2"], r=4, rank_pattern={"2": 16},
                                                 init_lora_weights="gaussian"), rng=3)
    for layer, r in ((model[1], 4), (model[2], 16)):   # PEFT's gaussian: A ~ N(0, (1 / r)^2), B = 0
        assert layer.lora_A.data.std() == pytest.approx(1 / r, rel=0.15) and not layer.lora_B.data.any()
    emb = model[0]   # PEFT leaves an Embedding at its default init: A = 0, B ~ N(0, 1)
    assert not emb.lora_A.data.any() and emb.lora_B.data.std() == pytest.approx(1.0, rel=0.2)
    earlier = lorac.Sequential(lorac.Linear(8, 8, r=2, rng=4), lorac.Linear(8, 8, rng=5))
    kept = earlier[0].lora_A.data.copy()
    lorac.get_peft_model(earlier, lorac.LoraConfig(target_modules=["1"], init_lora_weights="gaussian"))
    np.testing.assert_array_equal(earlier[0].lora_A.data, kept)   # a layer adapted before is left alone
    w = lorac.Sequential(lorac.Embedding(20, 8, rng=0), lorac.Linear(8, 8, rng=1))
    w0 = {k: v.copy() for k, v in w.state_dict().items()}
    lorac.get_peft_model(w, lorac.LoraConfig(target_modules=["0", "1"], init_lora_weights="olora"))
    np.testing.assert_array_equal(w[0].weight.data, w0["0.weight"])   # the embedding's base is untouched
    assert not np.array_equal(w[1].weight.data, w0["1.weight"])       # the Linear's is OLoRA's residual


def test_bad_configs_leave_the_model_unchanged():
    for config, error, match in [
        (dict(), ValueError, "target_modules is required"),
        (dict(target_modules=["q_proj"], bias="some"), ValueError, "bias must be one of"),
        (dict(target_modules=["q_proj"], modules_to_save=["q_proj"]), ValueError, "is a target of the adapter"),
        (dict(target_modules=["q_proj"], modules_to_save=["self_attn"]), ValueError, "holds a target"),
        (dict(target_modules=["q_proj"], modules_to_save=["nothing"]), ValueError, "matches no module"),
        (dict(target_modules=["nothing"]), ValueError, "matched no module"),
        (dict(target_modules=["embed_tokens"], trainable_token_indices=[1]), TypeError,
         "'model.embed_tokens' is a target of the LoRA config"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"q_proj": [1]}), TypeError,
         "trainable tokens go on a plain lorac.Embedding"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"nothing": [1]}), ValueError, "matches no module"),
        (dict(target_modules=["q_proj"], trainable_token_indices=[1, VOCAB]), ValueError, "outside"),
        (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[1]), ValueError,
         "is in modules_to_save"),
    ]:
        model = lorac_model()
        before = {k: v.copy() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=match):
            lorac.get_peft_model(model, lorac.LoraConfig(**config))
        assert model.state_dict().keys() == before.keys() and "peft_config" not in model.__dict__
        assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="adapter_name must be 'default'"):
        lorac.get_peft_model(lorac_model(), lorac.LoraConfig(target_modules=["q_proj"]), adapter_name="x")
    with pytest.raises(TypeError, match="peft_config must be a lorac.LoraConfig"):
        lorac.get_peft_model(lorac_model(), dict(target_modules=["q_proj"]))

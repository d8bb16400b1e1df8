"""PEFT's lora_bias (a bias on lora_B) in lorac against PEFT on the twin
decoder: get_peft_model's trainable parameters and counts, each adapted
layer's forward and every gradient (lora_B.bias included) once lorac holds
PEFT's values, merging (eval() and merge_and_unload) against PEFT's
merge_and_unload, folders both ways, and lorac merge on a PEFT folder."""

import warnings

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from fidelity import assert_matches  # noqa: E402
from test_fidelity_get_peft_model import trainable  # noqa: E402
from test_fidelity_inject_peft import HIDDEN, lorac_model, torch_model  # noqa: E402

pytestmark = pytest.mark.torch

TARGETS = ["q_proj", "v_proj", "up_proj"]   # Linear layers with a bias (lorac's lora_bias needs one)


def twins(**extra):
    """(lorac model, PEFT model) with the same base weights and the same random adapters,
    lora_B.bias included (PEFT's init_lora_weights=False draws them)."""
    config = dict(target_modules=TARGETS, r=3, lora_alpha=5, lora_bias=True, **extra)
    ours, twin = lorac_model(), torch_model()
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(twin, peft.LoraConfig(init_lora_weights=False, **config))
    lorac.get_peft_model(ours, lorac.LoraConfig(**config), rng=0)
    for path, layer in adapted(ours).items():
        player = peft_layer(wrapped, path)
        layer.lora_A.data[...] = player.lora_A["default"].weight.detach().numpy()
        layer.lora_B.data[...] = player.lora_B["default"].weight.detach().numpy()
        layer.lora_bias.data[...] = player.lora_B["default"].bias.detach().numpy()
    return ours, wrapped


def adapted(model):
    return {p: m for p, m in model.named_modules() if getattr(m, "r", 0) > 0}


def peft_layer(wrapped, path):
    return wrapped.base_model.model.get_submodule(path)


def save_pretrained(wrapped, path):
    with warnings.catch_warnings():   # PEFT 0.21 takes a 1-D lora_B.bias for an unsharded ZeRO-3 shard
        warnings.simplefilter("ignore")
        wrapped.save_pretrained(str(path))


def test_get_peft_model_trains_the_same_parameters_and_counts_them_alike(capsys):
    ours, wrapped = twins()
    mine, theirs = trainable(ours, wrapped)
    assert mine == theirs and "model.layers.0.self_attn.q_proj.lora_bias" in mine
    wrapped.print_trainable_parameters()
    expected = capsys.readouterr().out
    lorac.print_trainable_parameters(ours)
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_every_gradient_match_pefts(use_rslora):
    ours, wrapped = twins(use_rslora=use_rslora)
    gen = torch.Generator().manual_seed(3)
    for path, layer in adapted(ours).items():
        player = peft_layer(wrapped, path)
        x = torch.randn(2, 3, layer.in_features, generator=gen, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, 3, layer.out_features, generator=gen, dtype=torch.float64)
        expected = player(x)
        expected.backward(g)
        assert_matches(layer(x.detach().numpy()), expected, np.float64, f"{path} forward")
        dx = layer.backward(g.numpy())
        assert_matches(dx, x.grad, np.float64, f"{path} dx")
        assert_matches(layer.lora_A.grad, player.lora_A["default"].weight.grad, np.float64, f"{path} dA")
        assert_matches(layer.lora_B.grad, player.lora_B["default"].weight.grad, np.float64, f"{path} dB")
        assert_matches(layer.lora_bias.grad, player.lora_B["default"].bias.grad, np.float64, f"{path} dbias")
        assert layer.weight.grad is None and layer.bias.grad is None   # frozen, as PEFT's


def test_merging_matches_pefts_merge_and_unload():
    ours, wrapped = twins()
    x = np.random.default_rng(1).standard_normal((4, HIDDEN))
    unmerged = {p: layer(x) for p, layer in adapted(ours).items()}
    ours.eval()   # merge_weights: merges, the base bias taking s * lora_bias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = wrapped.merge_and_unload()
    for path, layer in adapted(ours).items():
        base = plain.get_submodule(path)
        assert_matches(layer.weight.data, base.weight, np.float64, f"{path} merged weight")
        assert_matches(layer.bias.data, base.bias, np.float64, f"{path} merged bias")
        np.testing.assert_allclose(layer(x), unmerged[path], rtol=1e-12, atol=1e-12)
    unloaded = lorac.merge_and_unload(ours)
    for path, layer in adapted(unloaded).items():
        raise AssertionError(f"{path} still has an adapter")
    for path in unmerged:
        assert_matches(unloaded.get_submodule(path).bias.data, plain.get_submodule(path).bias, np.float64, path)


def test_folders_load_both_ways(tmp_path):
    ours, wrapped = twins()
    save_pretrained(wrapped, tmp_path / "peft")
    loaded = lorac_model()
    lorac.load_peft_adapter(loaded, tmp_path / "peft")
    lorac.save_peft_adapter(ours, tmp_path / "lorac")
    fresh = torch_model()
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in lorac_model().state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "lorac"))
    x = np.random.default_rng(2).standard_normal((3, HIDDEN))
    for path, layer in adapted(ours).items():
        with torch.no_grad():
            expected = peft_layer(wrapped, path)(torch.from_numpy(x))
            again = peft_layer(reloaded, path)(torch.from_numpy(x))
        assert np.abs(loaded.get_submodule(path).lora_bias.data).max() > 0
        assert_matches(loaded.get_submodule(path)(x), expected, np.float64, f"{path} PEFT -> lorac")
        assert_matches(again.numpy(), torch.from_numpy(layer(x)), np.float64, f"{path} lorac -> PEFT")


def test_lorac_merge_on_a_peft_folder_equals_pefts_merge_and_unload(tmp_path, capsys):
    from lorac.cli import main
    ours, wrapped = twins()
    save_pretrained(wrapped, tmp_path / "peft")
    lorac.save(lorac_model().state_dict(), tmp_path / "base.safetensors")
    assert main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "peft"),
                 "-o", str(tmp_path / "merged.safetensors")]) == 0
    merged = lorac.load(tmp_path / "merged.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = wrapped.merge_and_unload()
    for path in adapted(ours):
        assert_matches(merged[f"{path}.weight"], plain.get_submodule(path).weight, np.float64, path)
        assert_matches(merged[f"{path}.bias"], plain.get_submodule(path).bias, np.float64, path)


def test_named_adapters_with_lora_bias_move_between_peft_and_lorac(tmp_path):
    """PEFT's second adapter with lora_bias -> lorac.load_adapter(folder, name), and
    lorac.save_peft_adapter(adapter_name=...) -> PEFT's load_adapter: the same outputs."""
    ours, wrapped = twins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped.add_adapter("other", peft.LoraConfig(target_modules=TARGETS, r=2, lora_alpha=3, lora_bias=True,
                                                     init_lora_weights=False))
    save_pretrained(wrapped, tmp_path / "peft")   # "other" goes to peft/other
    lorac.load_adapter(ours, tmp_path / "peft" / "other", "other")
    lorac.set_adapter(ours, ["default", "other"])
    wrapped.base_model.set_adapter(["default", "other"])
    lorac.save_peft_adapter(ours, tmp_path / "back", adapter_name="other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped.load_adapter(str(tmp_path / "back"), adapter_name="again")
    x = np.random.default_rng(4).standard_normal((3, HIDDEN))
    for path, layer in adapted(ours).items():
        player = peft_layer(wrapped, path)
        assert np.abs(layer.lora_bias_other.data).max() > 0
        with torch.no_grad():
            expected = player(torch.from_numpy(x))
        assert_matches(layer(x), expected, np.float64, f"{path} default + other")
        for name in ("other", "again"):
            np.testing.assert_array_equal(player.lora_B[name].bias.detach().numpy(), layer.lora_bias_other.data)

"""PEFT's lora_bias on lorac.Linear (a trainable (out,) bias the adapter adds
as scaling * lora_bias): forward against a float64 NumPy reference, gradients
against central finite differences, merging and the unmerged state dict,
several adapters and mixed batches, the loralib helpers, files, and every
refusal.  Against PEFT itself: tests/vs_torch/test_fidelity_lora_bias.py."""

import numpy as np
import pytest

import lorac
from lorac.cli import main

IN, OUT, R, ALPHA = 5, 4, 2, 6.0
S = ALPHA / R


def layer(dtype=np.float64, fan_in_fan_out=False, dropout=0.0, **kwargs):
    made = lorac.Linear(IN, OUT, r=R, lora_alpha=ALPHA, lora_dropout=dropout, fan_in_fan_out=fan_in_fan_out,
                        dtype=dtype, rng=0, lora_bias=True, init=False, **kwargs)
    assert np.abs(made.lora_bias.data).max() > 0   # init False: PEFT's random draw
    return made


def reference(made, x, mask=None):
    """y = x W0^T + b + s (drop(x) A^T B^T + lora_bias), in float64."""
    w = made.weight.data.astype(np.float64)
    w = w.T if made.fan_in_fan_out else w
    a, b = made.lora_A.data.astype(np.float64), made.lora_B.data.astype(np.float64)
    dropped = x if mask is None else x * mask / (1.0 - made.lora_dropout)
    return x @ w.T + made.bias.data + S * (dropped @ a.T @ b.T + made.lora_bias.data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("lead", [(0,), (1,), (3,), (2, 3)])
def test_forward_matches_the_reference(dtype, fan_in_fan_out, lead):
    made = layer(dtype, fan_in_fan_out)
    x = np.random.default_rng(1).standard_normal(lead + (IN,)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    expected = reference(made, x.astype(np.float64))
    np.testing.assert_allclose(made(x), expected, rtol=tol, atol=tol)
    made.eval()   # merged: the base bias holds s * lora_bias
    np.testing.assert_allclose(made(x), expected, rtol=tol, atol=tol)


def test_gradients_match_finite_differences_with_dropout():
    made = layer(dropout=0.4)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, IN))
    g = rng.standard_normal((3, OUT))
    state = made.rng.bit_generator.state
    made(x)
    dx = made.backward(g)
    made.rng.bit_generator.state = state
    mask = (made.rng.random(x.shape, dtype=np.float32) >= 0.4).astype(np.float64)   # the same draw

    def loss():
        return float(np.sum(reference(made, x, mask) * g))

    for name in ("lora_A", "lora_B", "lora_bias"):
        param = getattr(made, name)
        numeric = np.zeros_like(param.data)
        for i in np.ndindex(param.shape):
            keep = param.data[i]
            param.data[i] = keep + 1e-6
            up = loss()
            param.data[i] = keep - 1e-6
            numeric[i] = (up - loss()) / 2e-6
            param.data[i] = keep
        np.testing.assert_allclose(param.grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(made.lora_bias.grad, S * g.sum(axis=0), rtol=1e-12)
    w = made.weight.data
    a, b = made.lora_A.data, made.lora_B.data
    np.testing.assert_allclose(dx, g @ w + S * (g @ b @ a) * mask / 0.6, rtol=1e-10, atol=1e-12)
    assert made.weight.grad is None   # frozen; the base bias trains, as in loralib
    np.testing.assert_allclose(made.bias.grad, g.sum(axis=0), rtol=1e-12)


def test_gradient_accumulates_and_frozen_lora_bias_gets_none():
    made = layer()
    x, g = np.ones((2, IN)), np.ones((2, OUT))
    for _ in range(2):
        made(x)
        made.backward(g)
    np.testing.assert_allclose(made.lora_bias.grad, 2 * S * g.sum(axis=0))
    made.zero_grad()
    made.lora_bias.requires_grad = False
    made(x)
    made.backward(g)
    assert made.lora_bias.grad is None and made.lora_A.grad is not None


def test_merge_keeps_outputs_and_the_state_dict_holds_the_unmerged_bias():
    made = layer()
    base_bias = made.bias.data.copy()
    x = np.random.default_rng(3).standard_normal((4, IN))
    before = made(x)
    made.eval()
    assert made.merged and made._plain   # merged: back on the fast path
    np.testing.assert_allclose(made.bias.data, base_bias + S * made.lora_bias.data, rtol=1e-15)
    np.testing.assert_allclose(made(x), before, rtol=1e-12)
    np.testing.assert_allclose(made.state_dict()["bias"], base_bias, rtol=1e-15, atol=1e-15)
    made.train()
    assert not made._plain
    np.testing.assert_allclose(made.bias.data, base_bias, rtol=1e-15, atol=1e-15)
    with made.disable_adapters():
        np.testing.assert_allclose(made(x), x @ made.weight.data.T + base_bias, rtol=1e-12)


@pytest.mark.parametrize("assign", [False, True])
def test_loading_into_a_merged_layer_equals_loading_then_merging(assign):
    source = layer()
    source.lora_bias.data[...] = np.arange(OUT)
    source.bias.data[...] = -1.0
    state = {k: v.copy() for k, v in source.state_dict().items()}
    kept = {k: v.copy() for k, v in state.items()}
    merged_first = layer()
    merged_first.eval()
    merged_first.load_state_dict(state, assign=assign)
    loaded_first = layer()
    loaded_first.load_state_dict({k: v.copy() for k, v in kept.items()})
    loaded_first.eval()
    np.testing.assert_allclose(merged_first.bias.data, loaded_first.bias.data, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(merged_first.weight.data, loaded_first.weight.data, rtol=1e-15, atol=1e-15)
    for key in state:   # the caller's arrays are not written into
        np.testing.assert_array_equal(state[key], kept[key])
    np.testing.assert_array_equal(merged_first.state_dict()["bias"], kept["bias"])


def test_reset_adapter_zeroes_lora_bias_merged_or_not():
    made = layer()
    base_bias = made.bias.data.copy()
    made.eval()
    made.reset_adapter()
    assert not made.lora_bias.data.any()
    np.testing.assert_allclose(made.bias.data, base_bias, rtol=1e-15, atol=1e-15)
    made.train()
    np.testing.assert_allclose(made.bias.data, base_bias, rtol=1e-15, atol=1e-15)


def test_several_active_adapters_and_a_mixed_batch():
    net = lorac.Sequential(layer())
    lorac.add_adapter(net, "x", r=1, lora_alpha=2, init=False, rng=4)
    made = net[0]
    xs = np.random.default_rng(5).standard_normal((3, IN))
    alone = made(xs)
    lorac.set_adapter(net, "x")
    other = made(xs)
    lorac.set_adapter(net, ["default", "x"])
    base = xs @ made.weight.data.T + made.bias.data
    both = made(xs)
    np.testing.assert_allclose(both, alone + other - base, rtol=1e-12, atol=1e-12)
    g = np.ones_like(both)
    made.backward(g)
    np.testing.assert_allclose(made.lora_bias.grad, S * g.sum(axis=0))
    net.eval()
    merged = made(xs)
    np.testing.assert_allclose(merged, both, rtol=1e-12, atol=1e-12)
    net.train()
    lorac.set_adapter(net, "default")
    net.eval()
    lorac.unmerge_adapter(net)
    mixed = net(xs, adapter_names=["x", "default", "__base__"])
    np.testing.assert_allclose(mixed, np.stack([other[0], alone[1], base[2]]), rtol=1e-12, atol=1e-12)


def test_loralib_helpers_and_merge_and_unload():
    net = lorac.Sequential(layer(), lorac.Linear(OUT, 3, rng=1, dtype=np.float64))
    lorac.mark_only_lora_as_trainable(net)
    assert net[0].lora_bias.requires_grad and not net[0].bias.requires_grad
    assert "0.lora_bias" in lorac.lora_state_dict(net)
    assert "0.lora_bias" in lorac.lora_state_dict(net, adapter="default")
    assert set(lorac.lora_state_dict(net, bias="lora_only")) == {"0.lora_A", "0.lora_B", "0.lora_bias", "0.bias"}
    x = np.random.default_rng(6).standard_normal((2, IN))
    expected = net(x)
    plain = lorac.merge_and_unload(net)
    assert "lora_bias" not in plain[0].state_dict() and plain[0].r == 0
    np.testing.assert_allclose(plain(x), expected, rtol=1e-12)


def test_safe_merge_refuses_a_non_finite_lora_bias():
    net = lorac.Sequential(layer())
    net[0].lora_bias.data[1] = np.inf
    before = {k: v.copy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        lorac.merge_and_unload(net, safe_merge=True)
    assert all(np.array_equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_peft_folder_round_trip_keeps_lora_bias(tmp_path):
    net = lorac.Sequential(layer(), lorac.Linear(OUT, 3, rng=1, dtype=np.float64))
    config = lorac.save_peft_adapter(net, tmp_path / "a")
    assert config["lora_bias"] is True
    other = lorac.Sequential(lorac.Linear(IN, OUT, rng=0, dtype=np.float64),
                             lorac.Linear(OUT, 3, rng=1, dtype=np.float64))
    lorac.load_peft_adapter(other, tmp_path / "a")
    np.testing.assert_array_equal(other[0].lora_bias.data, net[0].lora_bias.data)
    x = np.ones((2, IN))
    np.testing.assert_allclose(other(x), net(x), rtol=1e-12)


def test_a_peft_folder_gives_zeros_to_layers_without_one(tmp_path):
    net = lorac.Sequential(layer(), lorac.Linear(OUT, 3, rng=1, dtype=np.float64))
    lorac.inject_lora(net, ["1"], r=1, rng=2)
    net[1].lora_B.data[...] = 0.5
    lorac.save_peft_adapter(net, tmp_path / "a")
    other = lorac.Sequential(lorac.Linear(IN, OUT, rng=0, dtype=np.float64),
                             lorac.Linear(OUT, 3, rng=1, dtype=np.float64))
    lorac.load_peft_adapter(other, tmp_path / "a")
    assert not other[1].lora_bias.data.any()
    x = np.ones((2, IN))
    np.testing.assert_allclose(other(x), net(x), rtol=1e-12)


def test_save_adapter_and_load_adapter_carry_it(tmp_path):
    net = lorac.Sequential(layer())
    lorac.save_adapter(net, tmp_path / "a.safetensors")
    assert "0.lora_bias" in lorac.load(tmp_path / "a.safetensors")
    lorac.load_adapter(net, tmp_path / "a.safetensors", "x")
    np.testing.assert_array_equal(net[0].lora_bias_x.data, net[0].lora_bias.data)
    x = np.random.default_rng(7).standard_normal((2, IN))
    expected = net(x)
    lorac.set_adapter(net, "x")
    np.testing.assert_allclose(net(x), expected, rtol=1e-12)
    lorac.save_peft_adapter(net, tmp_path / "folder", adapter_name="x")
    lorac.load_adapter(net, tmp_path / "folder", "y")
    np.testing.assert_array_equal(net[0].lora_bias_y.data, net[0].lora_bias.data)
    fresh = lorac.Sequential(layer())
    fresh.load_state_dict(lorac.load(tmp_path / "a.safetensors"), strict=False)
    np.testing.assert_array_equal(fresh[0].lora_bias.data, net[0].lora_bias.data)


def test_hot_swapping_a_file_without_one_removes_it_merged_or_not(tmp_path):
    net = lorac.Sequential(layer())
    base_bias = net[0].bias.data.copy()
    plain = lorac.Sequential(lorac.Linear(IN, OUT, r=R, lora_alpha=ALPHA, dtype=np.float64, rng=3, init=False))
    lorac.save_adapter(plain, tmp_path / "plain.safetensors")
    net.eval()   # merged: the swap takes s * lora_bias out of the base bias
    lorac.load_adapter(net, tmp_path / "plain.safetensors", "default")
    assert net[0].lora_bias_parameter() is None and net[0]._plain
    net.train()
    np.testing.assert_allclose(net[0].bias.data, base_bias, rtol=1e-14, atol=1e-14)


def test_load_adapter_refuses_a_lora_bias_it_cannot_take(tmp_path):
    net = lorac.Sequential(layer())
    lorac.save_adapter(net, tmp_path / "a.safetensors")
    state = lorac.load(tmp_path / "a.safetensors")
    no_bias = lorac.Sequential(lorac.Linear(IN, OUT, r=R, bias=False, dtype=np.float64, rng=0))
    with pytest.raises(ValueError, match="needs the layer's bias"):
        lorac.load_adapter(no_bias, tmp_path / "a.safetensors", "x", lora_alpha=1)
    for bad, match in ((dict(state, **{"0.lora_bias": np.ones(OUT + 1)}), "1-D float array of the layer's 4"),
                       ({"0.lora_bias": state["0.lora_bias"]}, "has no lora_A / lora_B of its layer")):
        lorac.save(bad, tmp_path / "bad.safetensors")
        with pytest.raises(ValueError, match=match):
            lorac.load_adapter(net, tmp_path / "bad.safetensors", "x", lora_alpha=1)
    assert net[0].adapter_names == ("default",) and no_bias[0].adapter_names == ("default",)


def test_named_adapters_with_lora_bias_forward_train_merge_and_mix():
    net = lorac.Sequential(layer())
    lorac.add_adapter(net, "x", r=1, lora_alpha=3, init=False, rng=4, lora_bias=True)
    made = net[0]
    assert not made.lora_bias_x.requires_grad and np.abs(made.lora_bias_x.data).max() > 0
    xs = np.random.default_rng(8).standard_normal((3, IN))
    w, b = made.weight.data, made.bias.data.copy()

    def term(name):
        a, bb = (p.data for p in made.adapter_parameters(name))
        return made._scaling_of(name) * (xs @ a.T @ bb.T + made.lora_bias_parameter(name).data)

    lorac.set_adapter(net, ["default", "x"])
    assert made.lora_bias_x.requires_grad
    expected = xs @ w.T + b + term("default") + term("x")
    np.testing.assert_allclose(made(xs), expected, rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(9).standard_normal(expected.shape)
    made.backward(g)
    np.testing.assert_allclose(made.lora_bias_x.grad, 3.0 * g.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(made.lora_bias.grad, S * g.sum(axis=0), rtol=1e-12)
    net.eval()
    np.testing.assert_allclose(made(xs), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(made.state_dict()["bias"], b, rtol=1e-14, atol=1e-14)
    lorac.unmerge_adapter(net)
    mixed = net(xs, adapter_names=["x", "default", "__base__"])
    base = xs @ w.T + b
    np.testing.assert_allclose(mixed, np.stack([(base + term("x"))[0], (base + term("default"))[1], base[2]]),
                               rtol=1e-12, atol=1e-12)
    net.train()
    lorac.set_adapter(net, "default")
    lorac.delete_adapter(net, "x")
    assert "lora_bias_x" not in made.state_dict()
    for other in (lorac.Embedding(5, 3, r=1), lorac.MergedLinear(3, 4, r=1, enable_lora=[True, False])):
        with pytest.raises(ValueError, match="is for Linear layers"):
            lorac.add_adapter(lorac.Sequential(other), "x", r=1, lora_bias=True)
    with pytest.raises(ValueError, match="needs the layer's bias"):
        lorac.add_adapter(lorac.Sequential(lorac.Linear(3, 2, r=1, bias=False)), "x", r=1, lora_bias=True)


def test_lorac_merge_info_and_convert(tmp_path, capsys):
    net = lorac.Sequential(layer())
    base = {k: v.copy() for k, v in net.state_dict().items() if "lora_" not in k}
    lorac.save(base, tmp_path / "base.safetensors")
    lorac.save_adapter(net, tmp_path / "a.safetensors")
    assert main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "a.safetensors"),
                 "-o", str(tmp_path / "m.safetensors")]) == 0
    merged = lorac.load(tmp_path / "m.safetensors")
    net.eval()
    np.testing.assert_allclose(merged["0.bias"], net[0].bias.data, rtol=1e-12)
    np.testing.assert_allclose(merged["0.weight"], net[0].weight.data, rtol=1e-12)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "lora_bias" in out and f"{R * IN + OUT * R + OUT}" in out
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "peft")]) == 0   # PEFT's lora_B.bias counts in its layer too
    out = capsys.readouterr().out
    assert "lora_bias" in out and f"{R * IN + OUT * R + OUT}" in out
    lorac.save({"0.weight": base["0.weight"]}, tmp_path / "nobias.safetensors")
    assert main(["merge", str(tmp_path / "nobias.safetensors"), str(tmp_path / "peft"),
                 "-o", str(tmp_path / "m2.safetensors")]) == 2
    assert "has a lora_bias, which merges into '0.bias'" in capsys.readouterr().err
    assert main(["combine", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"),
                 "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "has a lora_bias" in capsys.readouterr().err


def test_refusals():
    for kwargs, error, match in [
        (dict(r=0), ValueError, "needs an adapter"),
        (dict(bias=False), ValueError, "needs the layer's bias"),
        (dict(init="gaussian"), ValueError, "takes init 'kaiming'"),
        (dict(lora_bias=1), TypeError, "lora_bias must be a bool"),
    ]:
        with pytest.raises(error, match=match):
            lorac.Linear(IN, OUT, **{"r": 2, "lora_bias": True, **kwargs})
    with pytest.raises(TypeError):
        lorac.DoRALinear(IN, OUT, r=2, lora_bias=True)
    net = lorac.Sequential(layer())
    lorac.add_adapter(net, "x", r=R)
    with pytest.raises(ValueError, match="has a lora_bias; the combinations take lora_A / lora_B only"):
        lorac.add_weighted_adapter(net, ["default", "x"], [1, 1], "mix")
    lorac.add_weighted_adapter(net, ["x"], [1], "fine")   # an adapter without lora_bias combines


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["emb", "fc"]), "is for Linear layers"),
    (dict(target_modules=["head"]), "'head': lora_bias=True needs the layer's bias"),
    (dict(target_modules=["fc"], use_dora=True), "not supported with use_dora"),
    (dict(target_modules=["fc"], init="pissa"), "takes init 'kaiming'"),
])
def test_inject_lora_refusals_leave_the_model_alone(kwargs, match):
    model = lorac.Module()
    model.emb = lorac.Embedding(7, IN, rng=0)
    model.fc = lorac.Linear(IN, OUT, rng=1)
    model.head = lorac.Linear(OUT, 2, bias=False, rng=2)
    before = model.state_dict().keys()
    with pytest.raises(ValueError, match=match):
        lorac.inject_lora(model, r=2, lora_bias=True, **kwargs)
    assert model.state_dict().keys() == before
    lorac.inject_lora(model, ["fc"], r=2, lora_bias=True)
    assert not model.fc.lora_bias.data.any() and model.fc.r == 2

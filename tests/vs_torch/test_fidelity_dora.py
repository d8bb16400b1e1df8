"""lorac.DoRALinear (and, for what both layers share, DoRAEmbedding) against
PEFT's LoraConfig(use_dora=True) on the same weights (forward, every
gradient, merging), and against a NumPy float64
reference of PEFT's formula with finite differences where PEFT's random
dropout mask cannot be shared."""

import copy
import warnings

import numpy as np
import pytest

import lorac
from fidelity import assert_matches, torch
from reference import central_difference

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch


def peft_dora_model(make_base, r, lora_alpha, use_rslora, seed):
    """(PEFT model, its DoRA layer) over Sequential(make_base()) in float64, with random
    factors (init_lora_weights=False) and a magnitude away from the norms (so that c != 1)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(target_modules=["0"], r=r, lora_alpha=lora_alpha, use_dora=True, use_rslora=use_rslora,
                             init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(torch.nn.Sequential(make_base()).double(), config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.mul_(torch.rand(magnitude.shape, dtype=magnitude.dtype) + 0.5)
    return model, layer


def peft_dora(in_features, out_features, r, lora_alpha, use_rslora, seed):
    """A PEFT DoRA layer over a torch Linear (peft_dora_model), its bias trained too."""
    model, layer = peft_dora_model(lambda: torch.nn.Linear(in_features, out_features), r, lora_alpha, use_rslora,
                                   seed)
    layer.base_layer.bias.requires_grad_(True)
    return model, layer


def lorac_twin(layer, r, lora_alpha, use_rslora):
    base = layer.base_layer
    ours = lorac.DoRALinear(base.in_features, base.out_features, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                            dtype=np.float64, rng=0)
    ours.load_state_dict({
        "weight": base.weight.detach().numpy(), "bias": base.bias.detach().numpy(),
        "lora_A": layer.lora_A["default"].weight.detach().numpy(),
        "lora_B": layer.lora_B["default"].weight.detach().numpy(),
        "lora_magnitude_vector": layer.lora_magnitude_vector["default"].weight.detach().numpy()})
    return ours


CASES = [(7, 5, 2, 4, False, (3,)), (6, 9, 3, 2, True, (2, 4)), (4, 4, 1, 1, False, (1,))]


@pytest.mark.parametrize("in_features, out_features, r, lora_alpha, use_rslora, lead", CASES)
def test_forward_and_gradients_match_peft(in_features, out_features, r, lora_alpha, use_rslora, lead):
    model, layer = peft_dora(in_features, out_features, r, lora_alpha, use_rslora, seed=r)
    ours = lorac_twin(layer, r, lora_alpha, use_rslora)
    rng = np.random.default_rng(r)
    x = rng.standard_normal(lead + (in_features,))
    g = rng.standard_normal(lead + (out_features,))
    x_torch = torch.from_numpy(x).requires_grad_(True)
    y_torch = layer(x_torch)
    y_torch.backward(torch.from_numpy(g))
    y = ours(x)
    assert_matches(y, y_torch, np.float64, "y")
    assert_matches(ours.backward(g), x_torch.grad, np.float64, "dx")
    for name, theirs in (("lora_A", layer.lora_A["default"].weight), ("lora_B", layer.lora_B["default"].weight),
                         ("lora_magnitude_vector", layer.lora_magnitude_vector["default"].weight),
                         ("bias", layer.base_layer.bias)):
        assert_matches(getattr(ours, name).grad, theirs.grad, np.float64, f"d{name}")
    assert ours.weight.grad is None  # frozen, as PEFT's base weight


@pytest.mark.parametrize("in_features, out_features, r, lora_alpha, use_rslora, lead", CASES[:2])
def test_merging_matches_peft_and_round_trips(in_features, out_features, r, lora_alpha, use_rslora, lead):
    model, layer = peft_dora(in_features, out_features, r, lora_alpha, use_rslora, seed=10 + r)
    ours = lorac_twin(layer, r, lora_alpha, use_rslora)
    assert_merge_matches_peft_and_round_trips(ours, model, np.random.default_rng(0).standard_normal(
        lead + (in_features,)))


def assert_merge_matches_peft_and_round_trips(ours, peft_model, x):
    """eval() merges what PEFT's merge_and_unload gives, computes the same, keeps the unmerged
    weight in state_dict(); train() restores W0."""
    w0 = ours.weight.data.copy()
    y_train = ours(x)
    ours.eval()
    assert ours.merged
    merged_torch = peft_model.merge_and_unload()[0].weight.detach().numpy()
    np.testing.assert_allclose(ours.weight.data, merged_torch, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours(x), y_train, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.state_dict()["weight"], w0, rtol=0, atol=1e-14)
    ours.train()
    np.testing.assert_allclose(ours.weight.data, w0, rtol=0, atol=1e-14)


def dora_reference(x, w, bias, a, b, m, s, keep, norms):
    """PEFT's DoRA output in float64: x (N, in), w (out, in), keep = mask * keep_scale (N, in) or None;
    ``norms`` held fixed (the detached ||W0 + s B A||)."""
    c = m / norms
    dropped = x if keep is None else x * keep
    return bias + x @ w.T + (c - 1) * (dropped @ w.T) + c * (s * (dropped @ a.T) @ b.T)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_dropout_and_layout_against_a_reference_and_finite_differences(fan_in_fan_out, dropout, monkeypatch):
    rng = np.random.default_rng(7)
    layer = lorac.DoRALinear(5, 4, r=2, lora_alpha=3, lora_dropout=dropout, fan_in_fan_out=fan_in_fan_out,
                             dtype=np.float64, rng=1, init=False)
    layer.lora_magnitude_vector.data *= rng.uniform(0.5, 1.5, 4)
    x, g = rng.standard_normal((3, 5)), rng.standard_normal((3, 4))
    mask = (rng.random((3, 5)) >= dropout).view(np.uint8) if dropout else None
    monkeypatch.setattr(layer, "_dropout_mask", lambda shape, p: mask)
    keep = None if mask is None else mask / (1 - dropout)
    w = layer.weight.data.T if fan_in_fan_out else layer.weight.data
    params = {n: getattr(layer, n).data.copy() for n in ("bias", "lora_A", "lora_B", "lora_magnitude_vector")}
    norms = np.linalg.norm(w + layer.scaling * params["lora_B"] @ params["lora_A"], axis=1)

    def loss():
        return np.sum(g * dora_reference(x, w, params["bias"], params["lora_A"], params["lora_B"],
                                         params["lora_magnitude_vector"], layer.scaling, keep, norms))

    y = layer(x)
    np.testing.assert_allclose(y, dora_reference(x, w, params["bias"], params["lora_A"], params["lora_B"],
                                                 params["lora_magnitude_vector"], layer.scaling, keep, norms),
                               rtol=1e-12, atol=1e-12)
    dx = layer.backward(g)
    np.testing.assert_allclose(dx, central_difference(loss, x), rtol=1e-6, atol=1e-7)
    for name, value in params.items():
        np.testing.assert_allclose(getattr(layer, name).grad, central_difference(loss, value), rtol=1e-6,
                                   atol=1e-7, err_msg=name)


def merged_layer(rng):
    layer = lorac.DoRALinear(6, 5, r=2, lora_alpha=4, dtype=np.float64, rng=3, init=False)
    layer.lora_magnitude_vector.data *= rng.uniform(0.5, 1.5, 5)
    return layer.eval()


def merged_embedding(rng):
    layer = lorac.DoRAEmbedding(9, 4, r=2, lora_alpha=4, dtype=np.float64, rng=3, init=False)
    layer.lora_magnitude_vector.data *= rng.uniform(0.5, 1.5, 4)
    return layer.eval()


@pytest.mark.parametrize("make", [merged_layer, merged_embedding], ids=["DoRALinear", "DoRAEmbedding"])
@pytest.mark.parametrize("keys", [("lora_magnitude_vector",), ("weight", "lora_B"), ("weight", "lora_A"), "all"])
def test_loading_into_a_merged_layer_equals_loading_then_merging(make, keys):
    rng = np.random.default_rng(5)
    merged = make(rng)
    fresh = copy.deepcopy(merged).train()
    incoming = {k: rng.standard_normal(v.shape) + (5 if k == "lora_magnitude_vector" else 0)
                for k, v in merged.state_dict().items() if keys == "all" or k in keys}
    merged.load_state_dict(incoming, strict=False)
    fresh.load_state_dict(incoming, strict=False)
    fresh.eval()
    np.testing.assert_allclose(merged.weight.data, fresh.weight.data, rtol=1e-12, atol=1e-12)
    for key, value in merged.state_dict().items():
        np.testing.assert_allclose(value, fresh.state_dict()[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_a_zero_row_and_a_zero_magnitude_stay_finite_and_round_trip():
    layer = lorac.DoRALinear(4, 3, r=1, dtype=np.float64, rng=0)  # B = 0: ||V|| = ||W0||
    layer.weight.data[1] = 0.0
    layer.lora_magnitude_vector.data[:] = lorac.DoRALinear.dora_row_norms(layer)
    layer.lora_magnitude_vector.data[2] = 0.0
    w0 = layer.weight.data.copy()
    x = np.ones((2, 4))
    y = layer(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[:, 1], layer.bias.data[1])   # ||V|| = 0: c = 0
    np.testing.assert_allclose(y[:, 2], layer.bias.data[2])   # magnitude 0
    layer.backward(np.ones_like(y))
    assert np.all(np.isfinite(layer.lora_magnitude_vector.grad))
    layer.eval()
    np.testing.assert_allclose(layer(x), y, atol=1e-14)
    layer.train()
    np.testing.assert_array_equal(layer.weight.data[1:], w0[1:])
    np.testing.assert_allclose(layer.weight.data, w0, atol=1e-15)


def test_unload_merge_and_unload_and_the_adapter_helpers():
    rng = np.random.default_rng(2)
    model = lorac.Sequential(merged_layer(rng).train(), lorac.ReLU())
    x = rng.standard_normal((3, 6))
    y = model(x)
    assert set(lorac.lora_state_dict(model)) == {"0.lora_A", "0.lora_B", "0.lora_magnitude_vector"}
    lorac.mark_only_lora_as_trainable(model)
    assert model[0].lora_magnitude_vector.requires_grad and not model[0].weight.requires_grad
    w0 = model[0].weight.data.copy()
    twin = copy.deepcopy(model)
    plain = lorac.merge_and_unload(model)
    assert type(plain[0]) is lorac.Linear and plain[0].r == 0 and "_dora_merge" not in plain[0].__dict__
    np.testing.assert_allclose(plain(x), y, rtol=1e-12, atol=1e-12)
    unloaded = lorac.unload(twin)
    assert type(unloaded[0]) is lorac.Linear
    np.testing.assert_array_equal(unloaded[0].weight.data, w0)


def test_what_a_dora_layer_refuses():
    rng = np.random.default_rng(0)
    layer = merged_layer(rng).train()
    model = lorac.Sequential(layer)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    for call, match in [
        (lambda: lorac.DoRALinear(3, 3, r=0), "r must be >= 1"),
        (lambda: layer.add_adapter("x", 2), "holds one adapter"),
        (lambda: lorac.add_adapter(model, "x", r=2), "'0' is a DoRALinear"),
        (lambda: lorac.add_weighted_adapter(model, ["default"], [1.0], "w"), "'0' is a DoRALinear"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    model.eval()
    lorac.unmerge_adapter(model)
    with pytest.raises(RuntimeError, match="mixed batch"):
        model(np.ones((2, 6)), adapter_names=["default", "default"])
    lorac.set_adapter(model, [])   # no active adapter: the mixed batch still names "default"
    with pytest.raises(RuntimeError, match="mixed batch"):
        model(np.ones((2, 6)), adapter_names=["default", "__base__"])
    lorac.set_adapter(model, "default")
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, before[key], atol=1e-14)
    assert layer.adapter_names == ("default",)


@pytest.mark.parametrize("kind", ["DoRALinear", "DoRAEmbedding"])
def test_disabled_and_cast_and_reset(kind):
    rng = np.random.default_rng(4)
    if kind == "DoRALinear":
        layer = merged_layer(rng).train()
        x = rng.standard_normal((2, 6))
        base, x32 = x @ layer.weight.data.T + layer.bias.data, x.astype(np.float32)
    else:
        layer = merged_embedding(rng).train()
        x = x32 = np.array([[2, 5], [8, 2]])
        base = layer.weight.data[x]
    with layer.disable_adapters():
        np.testing.assert_allclose(layer(x), base, rtol=1e-12)
    layer.reset_adapter(init="kaiming")
    np.testing.assert_allclose(layer(x), base, rtol=1e-12, atol=1e-12)  # magnitude restarts at the norms
    layer.to(np.float32)
    assert layer.lora_magnitude_vector.dtype == np.float32
    y = layer(x32)
    np.testing.assert_allclose(y, base, rtol=1e-5, atol=1e-5)
    layer.backward(np.ones_like(y))
    assert layer.lora_magnitude_vector.grad.dtype == np.float32


# -- PEFT folders and inject_lora(use_dora=True) ---------------------------------------
def decoder_twins():
    from test_fidelity_inject_peft import lorac_model, torch_model
    return lorac_model(), torch_model()


def randomize_dora(model, seed):
    rng = np.random.default_rng(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, lorac.DoRALinear):
            layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
            layer.lora_magnitude_vector.data *= rng.uniform(0.5, 1.5, layer.out_features)


def adapted_paths(model):
    return [p for p, m in model.named_modules() if isinstance(m, lorac.DoRALinear)]


def assert_layers_match(ours, peft_model, x_rng):
    theirs = dict(peft_model.base_model.model.named_modules())
    for path in adapted_paths(ours):
        layer = ours.get_submodule(path)
        x = x_rng.standard_normal((2, layer.in_features))
        with torch.no_grad():
            expected = theirs[path](torch.from_numpy(x))
        assert_matches(layer(x), expected, np.float64, path)


def test_inject_with_use_dora_matches_get_peft_model():
    ours, twin = decoder_twins()
    base = {k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()}
    twin.load_state_dict(base)
    config = dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4)
    lorac.inject_lora(ours, use_dora=True, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(twin, peft.LoraConfig(use_dora=True, **config))
    theirs = dict(wrapped.base_model.model.named_modules())
    assert len(adapted_paths(ours)) == 6
    for path in adapted_paths(ours):
        np.testing.assert_allclose(ours.get_submodule(path).lora_magnitude_vector.data,
                                   theirs[path].lora_magnitude_vector["default"].weight.detach().numpy(),
                                   rtol=1e-13, err_msg=path)


def test_dora_folders_load_and_save_both_ways(tmp_path):
    ours, twin = decoder_twins()
    base = {k: v.copy() for k, v in ours.state_dict().items()}
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(twin, peft.LoraConfig(target_modules=["k_proj", "up_proj"], r=3, lora_alpha=5,
                                                            use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand(param.shape, dtype=param.dtype) + 0.5)
    wrapped.save_pretrained(str(tmp_path / "from_peft"))
    assert lorac.load_peft_adapter(ours, tmp_path / "from_peft") == ([], [])
    assert len(adapted_paths(ours)) == 6
    assert_layers_match(ours, wrapped, np.random.default_rng(0))

    randomize_dora(ours, 1)
    config = lorac.save_peft_adapter(ours, tmp_path / "from_lorac")
    assert config["use_dora"] is True
    fresh = decoder_twins()[1]
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "from_lorac"))
    assert_layers_match(ours, loaded, np.random.default_rng(2))


def test_dora_adapters_that_cannot_be_expressed_are_refused(tmp_path):
    from lorac.peft.adapter import AdapterError

    ours = decoder_twins()[0]
    lorac.inject_lora(ours, ["q_proj"], r=2, use_dora=True)
    lorac.inject_lora(ours, ["v_proj"], r=2)
    with pytest.raises(AdapterError, match="cannot share one PEFT adapter"):
        lorac.save_peft_adapter(ours, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        lorac.inject_lora(decoder_twins()[0], ["q_proj"], r=2, use_dora=1)


@pytest.mark.parametrize("bad", [np.ones(4, np.float32), np.ones((8, 1), np.float32), np.ones(8, np.int64)],
                         ids=["length", "2-D", "int"])
def test_a_bad_magnitude_vector_is_refused_in_folders_and_files(tmp_path, bad):
    from lorac.peft.adapter import AdapterError, from_lorac_state
    from lorac.peft.folder import PeftFolderError

    model = lorac.inject_lora(lorac.Sequential(lorac.Linear(6, 8, rng=0)), ["0"], r=2, use_dora=True)
    lorac.save_peft_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = lorac.load(weights)
    tensors["base_model.model.0.lora_magnitude_vector"] = bad
    lorac.save(tensors, weights)
    fresh = lorac.Sequential(lorac.Linear(6, 8, rng=0))
    with pytest.raises(PeftFolderError, match=r"'base_model.model.0.lora_magnitude_vector' must be a 1-D float "
                                              r"tensor of the layer's 8 outputs"):
        lorac.load_peft_adapter(fresh, tmp_path / "a")
    assert fresh[0].r == 0
    state = {k: v for k, v in lorac.lora_state_dict(model).items()}
    state["0.lora_magnitude_vector"] = bad
    with pytest.raises(AdapterError, match=r"'0.lora_magnitude_vector' must be a 1-D float tensor"):
        from_lorac_state(state, lora_alpha=1)


@pytest.mark.parametrize("make, make_plain", [(merged_layer, lambda: lorac.Linear(6, 5, r=2)),
                                              (merged_embedding, lambda: lorac.Embedding(9, 4, r=2))],
                         ids=["DoRALinear", "DoRAEmbedding"])
def test_save_adapter_keeps_the_magnitude_and_load_adapter_refuses_it(tmp_path, make, make_plain):
    rng = np.random.default_rng(6)
    model = lorac.Sequential(make(rng).train())
    path = tmp_path / "dora.safetensors"
    lorac.save_adapter(model, path)
    saved = lorac.load(path)
    assert set(saved) == {"0.lora_A", "0.lora_B", "0.lora_magnitude_vector"}
    fresh = lorac.Sequential(make(np.random.default_rng(7)).train())
    fresh.load_state_dict(saved, strict=False)
    for key, value in lorac.lora_state_dict(model).items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value, err_msg=key)
    plain = lorac.Sequential(make_plain())
    before = {k: v.copy() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="'0.lora_magnitude_vector' is a DoRA magnitude"):
        lorac.load_adapter(plain, path, "other", strict=False)
    assert plain[0].adapter_names == ("default",)
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(value, before[key])

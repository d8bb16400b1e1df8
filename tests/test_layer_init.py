"""init= on the LoRA layers, add_adapter and reset_adapter (issue 8; the arrays: layers/_lora_init.py)."""

import numpy as np
import pytest

import lorac

LAYERS = ["linear", "linear_t", "embedding", "merged"]


def make(kind, r=3, seed=0, dtype=np.float64, lora_alpha=6, **kwargs):
    if kind in ("linear", "linear_t"):
        return lorac.Linear(12, 7, r=r, lora_alpha=lora_alpha, fan_in_fan_out=kind == "linear_t", rng=seed,
                            dtype=dtype, **kwargs)
    if kind == "embedding":
        return lorac.Embedding(11, 6, r=r, lora_alpha=lora_alpha, rng=seed, dtype=dtype, **kwargs)
    return lorac.MergedLinear(12, 9, r=r, lora_alpha=lora_alpha, enable_lora=[True, False, True], rng=seed,
                              dtype=dtype, **kwargs)


def inputs(kind, rng):
    if kind == "embedding":
        return rng.integers(0, 11, (3, 4))
    return rng.standard_normal((3, 4, 12))


@pytest.mark.parametrize("kind", LAYERS)
def test_default_init_is_unchanged_and_named_kaiming(kind):
    plain, named = make(kind, seed=5), make(kind, seed=5, init="kaiming")
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(named.state_dict()[key], value)


@pytest.mark.parametrize("kind", LAYERS)
def test_gaussian_and_zeros_A_on_every_layer(kind):
    layer = make(kind, r=40, init="gaussian", init_std=0.25)
    assert layer.lora_A.data.std() == pytest.approx(0.25, rel=0.1) and not layer.lora_B.data.any()
    layer = make(kind, r=40, init="zeros_A", init_std=0.5)
    assert not layer.lora_A.data.any() and layer.lora_B.data.std() == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", LAYERS)
def test_pissa_at_construction_keeps_the_base_layers_output(kind, dtype, rng):
    """The same seed draws the same weight (and bias) with r = 0: the PiSSA layer computes
    that plain layer's function, with a non-zero adapter and a residual base weight."""
    plain = make(kind, r=0, seed=3, dtype=dtype)
    pissa = make(kind, r=3, seed=3, dtype=dtype, init="pissa")
    x = inputs(kind, rng)
    if kind != "embedding":
        x = x.astype(dtype)
    atol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(pissa(x), plain(x), atol=atol)
    assert np.abs(pissa.lora_B.data).max() > 0.1
    assert not np.allclose(pissa.weight.data, plain.weight.data)
    pissa.eval()                                                    # merged: W0 again, up to rounding
    np.testing.assert_allclose(pissa.weight.data, plain.weight.data, atol=atol)
    np.testing.assert_allclose(pissa(x), plain(x), atol=atol)


@pytest.mark.parametrize("kind", LAYERS)
def test_reset_adapter_pissa_after_loading_pretrained_weights(kind, rng):
    pretrained = make(kind, r=0, seed=1)
    layer = make(kind, r=3, seed=2)
    layer.load_state_dict(pretrained.state_dict(), strict=False)
    x = inputs(kind, rng)
    before = layer(x)
    layer.reset_adapter(init="pissa")
    np.testing.assert_allclose(layer(x), before, atol=1e-11)
    np.testing.assert_allclose(layer(x), pretrained(x), atol=1e-11)
    saved = layer.state_dict()["weight"]                             # the residual, not W0
    assert not np.allclose(saved, pretrained.weight.data)
    layer.reset_adapter(init="zeros_A")                              # back to a no-op adapter, residual base
    np.testing.assert_array_equal(layer.weight.data, saved)
    assert not layer.lora_A.data.any()


def test_pissa_refusals_leave_the_layer_unchanged(rng):
    layer = make("linear", r=2)
    weight = layer.weight.data.copy()
    with pytest.raises(ValueError, match="would change what the layer's other adapters"):
        layer.add_adapter("p", r=2, init="pissa")
    assert layer.adapter_names == ("default",)
    np.testing.assert_array_equal(layer.weight.data, weight)
    layer.add_adapter("x", r=2)
    with pytest.raises(ValueError, match=r"other adapters \['x'\]"):
        layer.reset_adapter(init="pissa")
    layer.delete_adapter("x")
    layer.eval()                                                     # merged
    with pytest.raises(ValueError, match="unmerge first"):
        layer.reset_adapter(init="pissa")
    layer.train()
    np.testing.assert_array_equal(layer.weight.data, weight)


def test_add_adapter_pissa_on_a_plain_layer(rng):
    layer = make("linear", r=0)
    x = inputs("linear", rng)
    before = layer(x)
    layer.add_adapter("p", r=3, lora_alpha=3, init="pissa")
    layer.set_adapter("p")
    np.testing.assert_allclose(layer(x), before, atol=1e-11)
    a, b = layer.adapter_parameters("p")
    assert np.abs(b.data).max() > 0.1 and not layer.weight.requires_grad


def test_model_add_adapter_pissa_is_all_or_nothing():
    model = lorac.Sequential(lorac.Linear(5, 4, r=0, rng=0), lorac.ReLU(), lorac.Linear(4, 3, r=2, rng=1))
    state = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="add_adapter: layer '2'"):
        lorac.add_adapter(model, "p", r=2, init="pissa", target_modules=["0", "2"])
    assert model[0].adapter_names == () and model[2].adapter_names == ("default",)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


@pytest.mark.parametrize("kind", LAYERS)
def test_bad_init_names_the_layer(kind):
    name = {"linear": "Linear", "linear_t": "Linear", "embedding": "Embedding", "merged": "MergedLinear"}[kind]
    with pytest.raises(ValueError, match=f"{name}: init must be one of"):
        make(kind, init="xavier")
    with pytest.raises(ValueError, match=f"{name}: std applies to"):
        make(kind, init="kaiming", init_std=0.1)
    with pytest.raises(ValueError, match="needs scaling = lora_alpha / r > 0"):
        make(kind, init="pissa", lora_alpha=0)

"""lorac.Linear: loralib's conventions, forward/backward vs the float64 reference, merging."""

import math

import numpy as np
import pytest

import lorac
from reference import assert_close, central_difference, linear_backward, linear_forward

DTYPES = [np.float32, np.float64]


def randomize(layer, rng):
    """Give every parameter (lora_B included) non-trivial values."""
    for p in layer.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    return layer


def reference_forward(layer, x, mask=None):
    return linear_forward(x.reshape(-1, layer.in_features), layer.weight.data,
                          None if layer.bias is None else layer.bias.data,
                          layer.lora_A.data if layer.r else None, layer.lora_B.data if layer.r else None,
                          layer.scaling, layer.fan_in_fan_out, mask,
                          1 / (1 - layer.lora_dropout)).reshape(x.shape[:-1] + (layer.out_features,))


def test_loralib_parameters_and_init():
    layer = lorac.Linear(64, 32, r=8, lora_alpha=16, rng=0)
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.weight.shape == (32, 64) and layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (32, 8)
    assert layer.scaling == 2.0 and not layer.weight.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and layer.bias.requires_grad
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in = 64
    assert np.abs(layer.lora_A.data).max() <= bound and np.abs(layer.lora_A.data).max() > 0.8 * bound
    assert np.abs(layer.weight.data).max() <= bound
    assert np.all(layer.lora_B.data == 0)
    assert layer.weight.dtype == np.float32 and not layer.merged
    transposed = lorac.Linear(64, 32, r=8, fan_in_fan_out=True, rng=0)
    assert transposed.weight.shape == (64, 32)
    plain = lorac.Linear(5, 3)
    assert [n for n, _ in plain.named_parameters()] == ["weight", "bias"] and plain.weight.requires_grad
    assert lorac.Linear(5, 3, r=4, use_rslora=True, lora_alpha=8).scaling == pytest.approx(4.0)


def test_same_seed_same_layer():
    a, b = lorac.Linear(7, 5, r=2, rng=3), lorac.Linear(7, 5, r=2, rng=3)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(), (1,), (6,), (2, 3), (0,)])
def test_forward_backward_match_reference(rng, dtype, fan_in_fan_out, bias, lead):
    layer = randomize(lorac.Linear(9, 7, r=3, lora_alpha=6, fan_in_fan_out=fan_in_fan_out, bias=bias,
                                   dtype=dtype, rng=1), rng)
    x = rng.standard_normal(lead + (9,)).astype(dtype)
    y = layer(x)
    assert y.shape == lead + (7,) and y.dtype == dtype
    assert_close(y, reference_forward(layer, x), dtype)
    g = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(g)
    ref = linear_backward(g.reshape(-1, 7), x.reshape(-1, 9), layer.weight.data, layer.lora_A.data,
                          layer.lora_B.data, layer.scaling, fan_in_fan_out)
    assert dx.shape == x.shape
    assert_close(dx, ref["dx"].reshape(x.shape), dtype)
    assert_close(layer.lora_A.grad, ref["da"], dtype)
    assert_close(layer.lora_B.grad, ref["db"], dtype)
    assert layer.weight.grad is None  # frozen: never allocated
    if bias:
        assert_close(layer.bias.grad, ref["dbias"], dtype)


def test_gradients_accumulate_over_backward_calls(rng):
    layer = randomize(lorac.Linear(4, 3, r=2, dtype=np.float64), rng)
    x = rng.standard_normal((5, 4))
    g = rng.standard_normal((5, 3))
    layer(x)
    layer.backward(g)
    first = layer.lora_A.grad.copy()
    layer(x)
    layer.backward(g)
    np.testing.assert_allclose(layer.lora_A.grad, 2 * first)
    layer.zero_grad()
    assert layer.lora_A.grad is None


def test_layer_gradients_match_finite_differences(rng):
    layer = randomize(lorac.Linear(5, 4, r=2, lora_alpha=3, dtype=np.float64, rng=0), rng)
    layer.weight.requires_grad = True  # exercise dW0 too
    x = rng.standard_normal((2, 3, 5))
    g = rng.standard_normal((2, 3, 4))

    def loss():
        return float(np.sum(layer(x) * g))

    layer(x)
    dx = layer.backward(g)
    np.testing.assert_allclose(dx, central_difference(loss, x), rtol=1e-6, atol=1e-8)
    for _, p in layer.named_parameters():
        np.testing.assert_allclose(p.grad, central_difference(loss, p.data), rtol=1e-6, atol=1e-8)


def test_r0_is_a_plain_linear_layer(rng):
    layer = lorac.Linear(6, 4, dtype=np.float64, rng=0)
    x = rng.standard_normal((3, 6))
    np.testing.assert_allclose(layer(x), x @ layer.weight.data.T + layer.bias.data)
    g = rng.standard_normal((3, 4))
    np.testing.assert_allclose(layer.backward(g), g @ layer.weight.data)
    np.testing.assert_allclose(layer.weight.grad, g.T @ x)
    layer.eval()
    assert layer.merged  # loralib sets the flag even without an adapter
    np.testing.assert_allclose(layer(x), x @ layer.weight.data.T + layer.bias.data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_eval_merges_and_train_unmerges(rng, dtype, fan_in_fan_out):
    layer = randomize(lorac.Linear(16, 12, r=4, fan_in_fan_out=fan_in_fan_out, dtype=dtype), rng)
    w0 = layer.weight.data.copy()
    x = rng.standard_normal((5, 16)).astype(dtype)
    y_train = layer(x)
    layer.eval()
    assert layer.merged and not layer.training
    assert not np.array_equal(layer.weight.data, w0)
    assert_close(layer(x), y_train, dtype)
    layer.train()
    assert not layer.merged and layer.training
    eps = np.finfo(dtype).eps
    assert np.max(np.abs(layer.weight.data - w0)) <= 8 * eps * np.max(np.abs(w0) + 1)
    assert_close(layer(x), y_train, dtype)


def test_merge_weights_false_stays_unmerged(rng):
    layer = randomize(lorac.Linear(6, 5, r=2, merge_weights=False), rng)
    w0 = layer.weight.data.copy()
    layer.eval()
    assert not layer.merged
    np.testing.assert_array_equal(layer.weight.data, w0)


def test_dropout_is_reproducible_and_backward_uses_the_same_mask(rng):
    def run(seed):
        layer = lorac.Linear(40, 8, r=4, lora_dropout=0.5, dtype=np.float64, rng=seed)
        layer.lora_B.data[...] = np.random.default_rng(1).standard_normal(layer.lora_B.shape)
        x = np.random.default_rng(2).standard_normal((30, 40))
        y = layer(x)
        return layer, x, y

    layer, x, y = run(7)
    _, _, y_again = run(7)
    _, _, y_other = run(8)
    np.testing.assert_array_equal(y, y_again)
    assert not np.allclose(y, y_other)
    _, _, mask, *_ = layer._cache  # (x2, u, mask, keep_scale, ...): layers/linear.py
    assert mask is not None and 0.35 < mask.mean() < 0.65
    np.testing.assert_allclose(y, reference_forward(layer, x, mask), rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(3).standard_normal(y.shape)
    dx = layer.backward(g)
    ref = linear_backward(g, x, layer.weight.data, layer.lora_A.data, layer.lora_B.data, layer.scaling,
                          False, mask, 2.0)
    np.testing.assert_allclose(dx, ref["dx"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.lora_A.grad, ref["da"], rtol=1e-12, atol=1e-12)
    no_dropout = reference_forward(layer, x)
    layer.eval()  # merged, and no dropout in eval
    np.testing.assert_allclose(layer(x), no_dropout, rtol=1e-12, atol=1e-12)
    layer.merge_weights = False
    layer.train()
    layer.unmerge()
    layer.eval()  # unmerged eval: the adapter branch runs, still without dropout
    assert not layer.merged
    np.testing.assert_allclose(layer(x), no_dropout, rtol=1e-12, atol=1e-12)
    _, _, mask, *_ = layer._cache
    assert mask is None


def test_dropout_rate_and_scaling():
    layer = lorac.Linear(200, 1, r=1, lora_dropout=0.25, bias=False, dtype=np.float64, rng=0)
    layer.weight.data[...] = 0
    layer.lora_A.data[...] = 0
    layer.lora_A.data[0, 0] = 1.0
    layer.lora_B.data[...] = 1.0
    x = np.ones((20000, 200))
    y = layer(x)  # = keep_mask[:, 0] / (1 - p)
    assert set(np.unique(y)) <= {0.0, 1 / 0.75}
    assert abs((y > 0).mean() - 0.75) < 0.015


def test_load_state_dict_into_merged_layer_is_consistent(rng):
    """loralib #190: loading into an eval() (merged) layer must equal load-then-merge."""
    source = randomize(lorac.Linear(8, 6, r=2, dtype=np.float64), rng)
    state = {k: v.copy() for k, v in source.state_dict().items()}
    merged_then_loaded = randomize(lorac.Linear(8, 6, r=2, dtype=np.float64), rng).eval()
    merged_then_loaded.load_state_dict(state)
    loaded_then_merged = lorac.Linear(8, 6, r=2, dtype=np.float64)
    loaded_then_merged.load_state_dict(state)
    loaded_then_merged.eval()
    np.testing.assert_allclose(merged_then_loaded.weight.data, loaded_then_merged.weight.data, atol=1e-12)
    merged_then_loaded.train()
    np.testing.assert_allclose(merged_then_loaded.weight.data, state["weight"], atol=1e-12)
    # loading only the adapter into a merged layer
    partial = lorac.Linear(8, 6, r=2, dtype=np.float64)
    partial.load_state_dict({"weight": state["weight"], "bias": state["bias"]}, strict=False)
    partial.eval()
    partial.load_state_dict({"lora_A": state["lora_A"], "lora_B": state["lora_B"]}, strict=False)
    np.testing.assert_allclose(partial.weight.data, loaded_then_merged.weight.data, atol=1e-12)


def test_state_dict_of_merged_layer_holds_the_base_weight(rng):
    layer = randomize(lorac.Linear(8, 6, r=2, dtype=np.float64), rng)
    w0 = layer.weight.data.copy()
    layer.eval()
    np.testing.assert_allclose(layer.state_dict()["weight"], w0, atol=1e-12)
    assert layer.merged  # taking the state dict does not change the layer


def test_load_state_dict_casts_and_validates(rng):
    layer = lorac.Linear(4, 3, r=2)
    sd = {k: v.astype(np.float64) for k, v in randomize(lorac.Linear(4, 3, r=2), rng).state_dict().items()}
    layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_allclose(v, sd[k], rtol=1e-6)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    bad = dict(sd, lora_B=np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"lora_B.*expected shape \(3, 2\).*found shape \(3, 5\)"):
        layer.load_state_dict(bad)
    with pytest.raises(TypeError, match="numeric"):
        layer.load_state_dict(dict(sd, bias=np.array(["a", "b", "c"])))
    for k, v in layer.state_dict().items():  # all-or-nothing: nothing was written
        np.testing.assert_array_equal(v, before[k])

"""LoRA-GA (lorac.preprocess_loraga, then get_peft_model with init_lora_weights='lora_ga')
against a NumPy float64 reference: the gradient of a squared loss worked by hand, its
SVD split between A and B as each direction / scale says, the residual base weight;
and the refusals.  PEFT itself is compared in tests/vs_torch/test_fidelity_loraga.py."""

import numpy as np
import pytest

import lorac

IN, OUT = 8, 6


def net(fan_in_fan_out=False):
    model = lorac.Sequential(lorac.Linear(IN, OUT, dtype=np.float64, fan_in_fan_out=fan_in_fan_out))
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.data.shape)
    return model


def data():
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((5, IN)), rng.standard_normal((5, OUT))) for _ in range(3)]


def config(r=2, fan_in_fan_out=False, **ga):
    return lorac.LoraConfig(r=r, lora_alpha=3, target_modules=["0"], init_lora_weights="lora_ga",
                            lora_ga_config=lorac.LoraGAConfig(**ga), fan_in_fan_out=fan_in_fan_out)


def train_step_of(model, batches):
    loss_fn = lorac.MSELoss()

    def train_step():
        for x, y in batches:
            loss_fn(model(x), y)
            model.backward(loss_fn.backward())
    return train_step


def reference_gradient(weight, bias, batches):
    """Mean over batches of d mean((x W^T + b - y)^2) / dW, (out, in)."""
    grads = [2 * (x @ weight.T + bias - y).T @ x / y.size for x, y in batches]
    return sum(grads) / len(grads)


def reference_factors(grad, weight, r, scaling, direction, scale, gamma=16):
    u, s, vt = np.linalg.svd(grad, full_matrices=False)
    a_rows, b_cols = {"ArB2r": (range(r), range(r, 2 * r)), "A2rBr": (range(r, 2 * r), range(r)),
                      "ArBr": (range(1, 2 * r, 2), range(0, 2 * r, 2))}[direction]
    a, b, s_b = vt[list(a_rows)], u[:, list(b_cols)] * s[list(b_cols)], s[list(b_cols)]
    if scale == "stable":
        b = b * OUT ** 0.25 / np.sqrt(gamma)
    elif scale == "weight_svd":
        b = b * np.linalg.svd(weight, compute_uv=False)[0] / s_b[0]
    elif scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a, b


@pytest.mark.parametrize("direction, scale", [("ArB2r", "stable"), ("A2rBr", "weight_svd"), ("ArBr", "gd_scale"),
                                              ("ArB2r", "unit")])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_factors_and_residual_match_the_float64_reference(direction, scale, fan_in_fan_out):
    model, batches = net(fan_in_fan_out), data()
    weight = model[0].weight.data.copy()
    view = weight.T if fan_in_fan_out else weight
    grad = reference_gradient(view, model[0].bias.data, batches)
    before = model(batches[0][0])
    cfg = config(fan_in_fan_out=fan_in_fan_out, direction=direction, scale=scale, stable_gamma=9 if
                 scale == "stable" else 16)
    lorac.preprocess_loraga(model, cfg, train_step_of(model, batches))
    assert model[0].weight.requires_grad and model[0].weight.grad is None and model.training   # put back
    lorac.get_peft_model(model, cfg)
    layer = model[0]
    a, b = reference_factors(grad, view, 2, layer.scaling, direction, scale, gamma=9)
    sign_a = np.sign(np.sum(layer.lora_A.data * a, axis=1))
    sign_b = np.sign(np.sum(layer.lora_B.data * b, axis=0))
    np.testing.assert_allclose(layer.lora_A.data * sign_a[:, None], a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.lora_B.data * sign_b, b, rtol=1e-9, atol=1e-12)
    residual = view - layer.scaling * layer.lora_B.data @ layer.lora_A.data
    np.testing.assert_allclose(layer.weight.data.T if fan_in_fan_out else layer.weight.data, residual, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(model(batches[0][0]), before, rtol=1e-12, atol=1e-12)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad


def test_random_direction_takes_the_same_directions_for_a_and_b_reproducibly():
    starts = []
    for _ in range(2):
        model, batches = net(), data()
        cfg = config(direction="random")
        lorac.preprocess_loraga(model, cfg, train_step_of(model, batches))
        lorac.get_peft_model(model, cfg, rng=3)
        starts.append((model[0].lora_A.data.copy(), model[0].lora_B.data.copy()))
    np.testing.assert_array_equal(starts[0][0], starts[1][0])
    grad = reference_gradient(net()[0].weight.data, net()[0].bias.data, data())
    _, s, vt = np.linalg.svd(grad, full_matrices=False)
    a, b = starts[0]
    picked = [int(np.argmax(np.abs(vt[:4] @ row))) for row in a]          # which of the 2r directions
    assert len(set(picked)) == 2
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), s[picked] * OUT ** 0.25 / 4, rtol=1e-9)


def test_the_cache_is_written_and_reused(tmp_path):
    cache = str(tmp_path / "grads")
    model, batches = net(), data()
    lorac.preprocess_loraga(model, config(), train_step_of(model, batches), cache_file=cache)
    assert list(lorac.load(cache)) == ["0._peft_loraga_grad"]
    again = net()
    lorac.preprocess_loraga(again, config(), None, cache_file=cache)
    lorac.get_peft_model(model, config())
    lorac.get_peft_model(again, config())
    np.testing.assert_array_equal(again[0].lora_A.data, model[0].lora_A.data)
    lorac.save({"0._peft_loraga_grad": np.ones((IN, OUT))}, cache)
    with pytest.raises(ValueError, match=r"has no finite \(6, 8\) entry 0._peft_loraga_grad"):
        lorac.preprocess_loraga(net(), config(), None, cache_file=cache)


def test_refusals_leave_the_model_as_it_was():
    model, batches = net(), data()
    state = {k: v.copy() for k, v in model.state_dict().items()}
    model[0].weight.grad = np.full((OUT, IN), 7.0)
    with pytest.raises(ValueError, match="needs LoraConfig.*lora_ga_config=lorac.LoraGAConfig"):
        lorac.preprocess_loraga(model, lorac.LoraConfig(r=2, target_modules=["0"], init_lora_weights="lora_ga"),
                                train_step_of(model, batches))
    with pytest.raises(ValueError, match="init_lora_weights='lora_ga' needs lora_ga_config"):
        lorac.get_peft_model(model, lorac.LoraConfig(r=2, target_modules=["0"], init_lora_weights="lora_ga"))
    with pytest.raises(ValueError, match="train_step .* is required"):
        lorac.preprocess_loraga(model, config(), None)
    with pytest.raises(ValueError, match=r"2r = 8 singular directions of its gradient, more than min\(in, out\)"):
        lorac.preprocess_loraga(model, config(r=4), train_step_of(model, batches))
    with pytest.raises(ValueError, match=r"layers \['0'\] had no backward pass"):
        lorac.preprocess_loraga(model, config(), lambda: model(batches[0][0]))
    with pytest.raises(ValueError, match="gradient of layer '0' holds NaN"):
        lorac.preprocess_loraga(model, config(), train_step_of(model, [(np.full((2, IN), np.nan), np.ones((2, OUT)))]))

    def failing():
        train_step_of(model, batches)()
        raise KeyboardInterrupt

    model.eval()
    with pytest.raises(KeyboardInterrupt):
        lorac.preprocess_loraga(model, config(), failing)
    assert not model.training and model[0].weight.requires_grad and np.all(model[0].weight.grad == 7.0)
    assert "backward" not in model[0].__dict__
    with pytest.raises(ValueError, match="layer '0' has no LoRA-GA gradients; call lorac.preprocess_loraga"):
        lorac.get_peft_model(model, config())
    with pytest.raises(ValueError, match="direction must be one of"):
        lorac.LoraGAConfig(direction="up")
    with pytest.raises(ValueError, match="stable_gamma must be a number > 0"):
        lorac.LoraGAConfig(stable_gamma=0)
    assert model[0].r == 0
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name])

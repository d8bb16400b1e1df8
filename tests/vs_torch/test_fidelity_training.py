"""Model-level fidelity against loralib: a short SGD run, lora_state_dict,
mark_only_lora_as_trainable, and the dropout of the LoRA branch."""

import numpy as np
import pytest

from fidelity import assert_matches, loralib, numpy_state_dict, randomize_torch, torch

import lorac

pytestmark = pytest.mark.torch

VOCAB, D = 23, 8


def torch_model(r=4, dropout=0.0):
    """Embedding -> Linear -> MergedLinear (q, v adapted) -> plain Linear, as loralib users write it."""
    return torch.nn.Sequential(
        loralib.Embedding(VOCAB, D, r=r, lora_alpha=8, padding_idx=0),
        loralib.Linear(D, D, r=r, lora_alpha=8, lora_dropout=dropout),
        loralib.MergedLinear(D, 3 * D, r=r, lora_alpha=8, lora_dropout=dropout, enable_lora=[True, False, True],
                             fan_in_fan_out=True),
        torch.nn.Linear(3 * D, 5),
    )


def lorac_model(dtype, r=4, dropout=0.0):
    return lorac.Sequential(
        lorac.Embedding(VOCAB, D, r=r, lora_alpha=8, padding_idx=0, dtype=dtype),
        lorac.Linear(D, D, r=r, lora_alpha=8, lora_dropout=dropout, dtype=dtype),
        lorac.MergedLinear(D, 3 * D, r=r, lora_alpha=8, lora_dropout=dropout, enable_lora=[True, False, True],
                           fan_in_fan_out=True, dtype=dtype),
        lorac.Linear(3 * D, 5, dtype=dtype),  # r = 0: a plain layer, like the nn.Linear above
    )


def twin_models(dtype=np.float32, seed=0):
    theirs = randomize_torch(torch_model(), seed, std=0.3)
    if dtype == np.float64:
        theirs.double()
    ours = lorac_model(dtype)
    ours.load_state_dict(numpy_state_dict(theirs))
    return theirs, ours


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_run_ends_with_the_same_adapter(dtype):
    theirs, ours = twin_models(dtype)
    loralib.mark_only_lora_as_trainable(theirs, bias="lora_only")
    lorac.mark_only_lora_as_trainable(ours, bias="lora_only")
    lr = 0.2
    opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=lr)
    initial = {k: v.copy() for k, v in lorac.lora_state_dict(ours, bias="lora_only").items()}
    rng = np.random.default_rng(1)
    for _ in range(6):
        idx = rng.integers(0, VOCAB, size=(4, 6))
        target = rng.standard_normal((4, 6, 5)).astype(dtype)
        # torch: mean squared error, autograd, optimizer
        opt.zero_grad()
        loss_t = 0.5 * ((theirs(torch.from_numpy(idx)) - torch.from_numpy(target)) ** 2).mean()
        loss_t.backward()
        opt.step()
        # lorac: the same loss's gradient by hand, backward, p -= lr * grad
        ours.zero_grad()
        y = ours(idx)
        ours.backward(((y - target) / y.size).astype(dtype))
        for p in ours.parameters():
            if p.requires_grad:
                p.data -= lr * p.grad
    trained = lorac.lora_state_dict(ours, bias="lora_only")
    reference = loralib.lora_state_dict(theirs, bias="lora_only")
    assert list(trained) == list(reference) and len(trained) == 8
    for key, value in reference.items():
        assert_matches(trained[key], value, dtype, key)
        change = value.detach().numpy() - initial[key]
        assert np.abs(change).max() > 1e-2 * np.abs(initial[key]).max(), f"{key} barely trained"
        if dtype == np.float64:  # the updates themselves agree, not only the weights
            assert_matches(trained[key] - initial[key], change, dtype, f"update of {key}")
    ours.eval()
    theirs.eval()
    idx = rng.integers(0, VOCAB, size=(3, 5))
    assert_matches(ours(idx), theirs(torch.from_numpy(idx)), dtype, "eval output after training")


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_keys_and_shapes_match(bias):
    theirs, ours = twin_models()
    expected = loralib.lora_state_dict(theirs, bias=bias)
    got = lorac.lora_state_dict(ours, bias=bias)
    assert list(got) == list(expected)
    assert {k: v.shape for k, v in got.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    for key, value in expected.items():  # train mode: the same (unmerged) values too
        assert_matches(got[key], value, np.float32, key)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_matches(bias):
    theirs, ours = twin_models()
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    lorac.mark_only_lora_as_trainable(ours, bias=bias)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]


def test_documented_differences_of_mark_only_lora_as_trainable():
    # 1. lorac (re)enables "lora_" parameters; loralib only leaves them as they were.
    theirs, ours = twin_models()
    theirs[1].lora_A.requires_grad = False
    ours[1].lora_A.requires_grad = False
    loralib.mark_only_lora_as_trainable(theirs)
    lorac.mark_only_lora_as_trainable(ours)
    assert not theirs[1].lora_A.requires_grad and ours[1].lora_A.requires_grad
    # 2. bias="lora_only": a LoRA layer without adapter (r = 0) keeps its bias
    # frozen in lorac; loralib trains it (its r = 0 layer is still a LoRALayer).
    theirs_plain, ours_plain = loralib.Linear(4, 3, r=0), lorac.Linear(4, 3, r=0)
    loralib.mark_only_lora_as_trainable(theirs_plain, bias="lora_only")
    lorac.mark_only_lora_as_trainable(ours_plain, bias="lora_only")
    assert theirs_plain.bias.requires_grad and not ours_plain.bias.requires_grad


# -- dropout of the LoRA branch ------------------------------------------------------
P, K, ROWS = 0.3, 16, 400


def identity_adapter(layer, groups=1):
    """W0 = 0, A = B = identity blocks, scaling 1: the branch output is drop(x) itself."""
    def fill(param, value):
        if isinstance(param, torch.nn.Parameter):
            with torch.no_grad():
                param.copy_(torch.as_tensor(value, dtype=param.dtype))
        else:
            param.data[...] = value
    fill(layer.weight, np.zeros(tuple(layer.weight.shape)))
    fill(layer.lora_A, np.vstack([np.eye(K)] * groups))
    fill(layer.lora_B, np.vstack([np.eye(K)] * groups))
    return layer


def check_dropout_output(y, p):
    """Entries are 0 or 1 / (1 - p), zeros at rate p (within 5 standard errors)."""
    y = np.asarray(y, dtype=np.float64)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - p), rtol=1e-6)
    rate, se = 1.0 - kept.mean(), np.sqrt(p * (1 - p) / y.size)
    assert abs(rate - p) < 5 * se, (rate, p)
    return kept


@pytest.mark.parametrize("library", ["lorac", "loralib"])
def test_linear_dropout_mask_rate_and_scaling(library):
    make = lorac.Linear if library == "lorac" else loralib.Linear
    extra = {"rng": 3} if library == "lorac" else {}
    torch.manual_seed(3)
    layer = identity_adapter(make(K, K, r=K, lora_alpha=K, lora_dropout=P, bias=False, **extra))
    x = np.ones((ROWS, K), np.float32)
    y = layer(x) if library == "lorac" else layer(torch.from_numpy(x)).detach().numpy()
    check_dropout_output(y, P)
    layer.eval()  # no dropout in eval: the merged identity
    y_eval = layer(x) if library == "lorac" else layer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y_eval, x, rtol=1e-6)


@pytest.mark.parametrize("library", ["lorac", "loralib"])
def test_merged_linear_dropout_mask_is_shared_by_the_groups(library):
    make = lorac.MergedLinear if library == "lorac" else loralib.MergedLinear
    extra = {"rng": 4} if library == "lorac" else {}
    torch.manual_seed(4)
    layer = identity_adapter(make(K, 3 * K, r=K, lora_alpha=K, lora_dropout=P, enable_lora=[True, False, True],
                                  bias=False, **extra), groups=2)
    x = np.ones((ROWS, K), np.float32)
    y = layer(x) if library == "lorac" else layer(torch.from_numpy(x)).detach().numpy()
    check_dropout_output(y[:, :K], P)
    np.testing.assert_array_equal(y[:, :K], y[:, 2 * K:])  # one mask on x, as loralib
    assert np.all(y[:, K:2 * K] == 0)


def test_lorac_backward_reuses_the_forward_mask():
    layer = identity_adapter(lorac.Linear(K, K, r=K, lora_alpha=K, lora_dropout=P, bias=False,
                                          dtype=np.float64, rng=5))
    y = layer(np.ones((ROWS, K)))
    dx = layer.backward(np.ones((ROWS, K)))  # dx = drop'(1 B A) = the same mask, scaled
    np.testing.assert_array_equal(dx, y)

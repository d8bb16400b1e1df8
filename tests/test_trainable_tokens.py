"""Trainable tokens (PEFT's trainable_token_indices; lorac/layers/tokens.py, lorac/peft/tokens.py)
against a NumPy float64 reference: the forward with the rows replaced, gradients (against central
finite differences too), disabling, merging and unloading, state dicts, PEFT folders, the CLI, and the
refusals.  PEFT itself is compared in tests/vs_torch/test_fidelity_trainable_tokens.py."""

import contextlib
import io

import numpy as np
import pytest

import lorac
from lorac.cli import main
from reference import central_difference

NUM, DIM = 12, 5
TOKENS = [7, 2, 10]


class Net(lorac.Module):
    def __init__(self, dtype=np.float64):
        super().__init__()
        self.embed_tokens = lorac.Embedding(NUM, DIM, rng=0, dtype=dtype)
        self.head = lorac.Linear(DIM, 3, rng=1, dtype=dtype)

    def forward(self, ids):
        return self.head(self.embed_tokens(ids))

    def backward(self, g):
        return self.embed_tokens.backward(self.head.backward(g))


def with_tokens(dtype=np.float64, **config):
    net = Net(dtype)
    lorac.get_peft_model(net, lorac.LoraConfig(**{**dict(r=2, target_modules=["head"], trainable_token_indices=TOKENS),
                                                  **config}), rng=0)
    rows = np.random.default_rng(3).standard_normal((len(TOKENS), DIM)).astype(dtype)
    net.embed_tokens.trainable_tokens_delta.data[...] = rows
    return net, rows


def ids(shape=(4, 6), seed=5):
    out = np.random.default_rng(seed).integers(0, NUM, shape)
    if out.size >= len(TOKENS):
        out.reshape(-1)[:len(TOKENS)] = TOKENS
    return out


def reference_table(net, rows):
    table = net.embed_tokens.weight.data.astype(np.float64).copy()
    table[TOKENS] = rows
    return table


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (4, 6), (2, 3, 4), (0,)])
def test_forward_and_gradients_match_the_reference(dtype, shape):
    net, rows = with_tokens(dtype)
    layer = net.embed_tokens
    x = ids(shape)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer(x), reference_table(net, rows)[x], **tol)
    g = np.random.default_rng(6).standard_normal(x.shape + (DIM,)).astype(dtype)
    layer.backward(g)
    expected = np.zeros((len(TOKENS), DIM))
    flat = x.reshape(-1)
    for p, token in enumerate(TOKENS):
        expected[p] = g.reshape(-1, DIM)[flat == token].sum(axis=0)
    np.testing.assert_allclose(layer.trainable_tokens_delta.grad, expected, **tol)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_gradients_against_central_finite_differences():
    net, _ = with_tokens()
    x = ids((3, 5))
    target = np.random.default_rng(7).standard_normal((3, 5, 3))

    def loss():
        return 0.5 * np.sum((net(x) - target) ** 2)

    net.zero_grad()
    net.backward(net(x) - target)
    delta = net.embed_tokens.trainable_tokens_delta
    np.testing.assert_allclose(delta.grad, central_difference(loss, delta.data), rtol=1e-6, atol=1e-8)


def test_a_trainable_base_weight_gets_no_gradient_for_the_replaced_rows():
    net, rows = with_tokens()
    layer = net.embed_tokens
    layer.weight.requires_grad = True
    x = ids((9,))
    g = np.ones((9, DIM))
    layer(x)
    layer.backward(g)
    expected = np.zeros((NUM, DIM))
    np.add.at(expected, x, g)
    expected[TOKENS] = 0
    np.testing.assert_allclose(layer.weight.grad, expected)


def test_disabling_merging_and_unloading():
    net, rows = with_tokens()
    x = ids()
    base_table = net.embed_tokens.weight.data.copy()
    with lorac.disable_adapters(net):
        np.testing.assert_array_equal(net.embed_tokens(x), base_table[x])
    np.testing.assert_array_equal(net.embed_tokens(x), reference_table(net, rows)[x])
    unloaded = lorac.unload(copy_of(net))
    assert type(unloaded.embed_tokens) is lorac.Embedding
    np.testing.assert_array_equal(unloaded.embed_tokens.weight.data, base_table)
    expected = net(x)
    merged = lorac.merge_and_unload(net, safe_merge=True)
    assert type(merged.embed_tokens) is lorac.Embedding and "trainable_tokens_delta" not in merged.state_dict()
    np.testing.assert_allclose(merged.embed_tokens.weight.data[TOKENS], rows)
    np.testing.assert_allclose(merged(x), expected, rtol=1e-12, atol=1e-12)


def copy_of(net):
    import copy
    return copy.deepcopy(net)


def test_training_rules_and_state_dicts():
    net, rows = with_tokens()
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    assert trainable == ["embed_tokens.trainable_tokens_delta", "head.lora_A", "head.lora_B"]
    lorac.mark_only_lora_as_trainable(net)
    assert sorted(n for n, p in net.named_parameters() if p.requires_grad) == trainable
    saved = lorac.lora_state_dict(net)
    assert "embed_tokens.trainable_tokens_delta" in saved
    other, _ = with_tokens()
    other.load_state_dict(saved, strict=False)
    np.testing.assert_array_equal(other.embed_tokens.trainable_tokens_delta.data, rows)
    frozen, _ = with_tokens(inference_mode=True)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_peft_folders_round_trip_and_the_cli(tmp_path):
    net, rows = with_tokens()
    written = lorac.save_peft_adapter(net, tmp_path / "adapter")
    assert written["trainable_token_indices"] == {"embed_tokens": TOKENS}
    fresh = Net()
    lorac.load_peft_adapter(fresh, tmp_path / "adapter")
    assert type(fresh.embed_tokens) is lorac.TrainableTokensEmbedding
    np.testing.assert_array_equal(fresh.embed_tokens.token_indices, TOKENS)
    x = ids()
    np.testing.assert_allclose(fresh(x), net(x), rtol=1e-12)
    lorac.load_peft_adapter(fresh, tmp_path / "adapter")                  # again: onto the token layer itself
    np.testing.assert_allclose(fresh(x), net(x), rtol=1e-12)
    plain = lorac.get_peft_model(Net(), lorac.LoraConfig(r=2, target_modules=["head"]))
    lorac.save_peft_adapter(plain, tmp_path / "plain")
    with pytest.raises(lorac.StateDictKeyError, match="embed_tokens.trainable_tokens_delta"):
        lorac.load_peft_adapter(fresh, tmp_path / "plain")                # strict: the token layer is not covered
    base = tmp_path / "base.safetensors"
    lorac.save(Net().state_dict(), base)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "merged.safetensors")]) == 0
    merged = Net()
    merged.load_state_dict(lorac.load(tmp_path / "merged.safetensors"))
    np.testing.assert_allclose(merged(x), net(x), rtol=1e-12, atol=1e-12)
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "x.safetensors")]) != 0
    with contextlib.redirect_stdout(io.StringIO()) as info:
        assert main(["info", str(tmp_path / "adapter")]) == 0
    assert "trainable_token_indices" in info.getvalue()
    with pytest.raises(ValueError, match="a named adapter cannot hold"):
        lorac.add_adapter(fresh, "other", r=2, target_modules=["head"])
        lorac.load_adapter(fresh, tmp_path / "adapter", "other")


def test_refusals_leave_the_layer_as_it_was():
    net = Net()
    for spec, error, match in (([1, 1], ValueError, "must be distinct"), ([NUM], ValueError, "outside"),
                               ([], TypeError, "non-empty list of ints"), ([True], TypeError, "list of ints"),
                               ({"head": [1]}, TypeError, "plain lorac.Embedding; 'head' is a Linear"),
                               ("embed", TypeError, "list of token ids or a dict")):
        with pytest.raises(error, match=match):
            lorac.add_trainable_tokens(net, spec)
        assert type(net.embed_tokens) is lorac.Embedding
    lora = lorac.Sequential(lorac.Embedding(NUM, DIM, r=2))
    with pytest.raises(TypeError, match="is a Embedding with r = 2"):
        lorac.add_trainable_tokens(lora, {"0": [1]})
    lorac.add_trainable_tokens(net, TOKENS)
    layer = net.embed_tokens
    with pytest.raises(RuntimeError, match="backward"):
        layer.backward(np.ones((2, DIM)))
    layer(np.array([7, 1]))
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(np.ones((3, DIM)))
    assert layer.trainable_tokens_delta.grad is None

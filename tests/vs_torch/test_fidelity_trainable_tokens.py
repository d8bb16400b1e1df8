"""Trainable tokens against PEFT's LoraConfig(trainable_token_indices=...) on the twin
token models of test_fidelity_eva: the same trainable parameters, forward and gradients
(token rows, LoRA factors), merge_and_unload, and folders loading on the other side."""

import warnings

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_fidelity_eva import as_torch, token_batches, twins  # noqa: E402
from test_fidelity_get_peft_model import lorac_name  # noqa: E402

pytestmark = pytest.mark.torch

TOKENS = [3, 17, 8, 30]


def peft_name(name):
    name = lorac_name(name).replace(".token_adapter.trainable_tokens_delta.default", ".trainable_tokens_delta")
    return name.replace(".token_adapter.trainable_tokens_delta", ".trainable_tokens_delta")


@pytest.fixture(params=["list", "dict"])
def both(request):
    spec = TOKENS if request.param == "list" else {"embed_tokens": TOKENS}
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], trainable_token_indices=spec)
    torch_net, ours = twins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch_net, peft.LoraConfig(**config))
    lorac.get_peft_model(ours, lorac.LoraConfig(**config), rng=0)
    rng = np.random.default_rng(4)
    for name, param in ours.named_parameters():       # a trained state on both sides
        if param.requires_grad:
            param.data[...] = rng.standard_normal(param.data.shape)
    state = dict(wrapped.named_parameters())
    with torch.no_grad():
        for name, param in state.items():
            if param.requires_grad:
                param.copy_(torch.from_numpy(ours.get_parameter(peft_name(name)).data))
    return wrapped, ours


def batch_with_tokens():
    batch = token_batches(1, seed=8)[0]
    batch["input_ids"][:, :len(TOKENS)] = TOKENS
    return batch


def test_the_trainable_parameters_forward_and_token_gradients_are_peft_s(both):
    wrapped, ours = both
    assert (sorted(n for n, p in ours.named_parameters() if p.requires_grad)
            == sorted(peft_name(n) for n, p in wrapped.named_parameters() if p.requires_grad))
    batch = batch_with_tokens()
    ids = batch["input_ids"]
    y = ours.embed_tokens(ids)
    twin_y = wrapped.base_model.model.embed_tokens(torch.from_numpy(ids))
    np.testing.assert_allclose(y, twin_y.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(2).standard_normal(y.shape)
    ours.embed_tokens.backward(g)
    twin_y.backward(torch.from_numpy(g))
    twin_delta = wrapped.base_model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    np.testing.assert_allclose(ours.embed_tokens.trainable_tokens_delta.grad, twin_delta.grad.numpy(), rtol=1e-12,
                               atol=1e-12)
    with torch.no_grad():
        expected = wrapped(**as_torch(batch)).numpy()
    np.testing.assert_allclose(ours(**batch), expected, rtol=1e-10, atol=1e-10)


def test_merge_and_unload_and_disabling_are_peft_s(both):
    wrapped, ours = both
    batch = batch_with_tokens()
    with torch.no_grad(), wrapped.disable_adapter():
        expected_off = wrapped(**as_torch(batch)).numpy()
    with lorac.disable_adapters(ours):
        np.testing.assert_allclose(ours(**batch), expected_off, rtol=1e-10, atol=1e-10)
    merged_twin = wrapped.merge_and_unload()
    merged = lorac.merge_and_unload(ours)
    np.testing.assert_allclose(merged.embed_tokens.weight.data, merged_twin.embed_tokens.weight.detach().numpy(),
                               rtol=1e-12, atol=1e-12)


def test_folders_load_on_the_other_side(both, tmp_path):
    wrapped, ours = both
    batch = batch_with_tokens()
    lorac.save_peft_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(twins()[0], tmp_path / "ours")
        with torch.no_grad():
            expected = loaded(**as_torch(batch)).numpy()
        wrapped.save_pretrained(tmp_path / "theirs")
    np.testing.assert_allclose(ours(**batch), expected, rtol=1e-10, atol=1e-10)
    _, fresh = twins()
    lorac.load_peft_adapter(fresh, tmp_path / "theirs")
    assert type(fresh.embed_tokens) is lorac.TrainableTokensEmbedding
    np.testing.assert_allclose(fresh(**batch), ours(**batch), rtol=1e-10, atol=1e-10)

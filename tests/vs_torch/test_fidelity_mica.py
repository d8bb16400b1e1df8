"""MiCA against PEFT's init_lora_weights="mica" on the float32 twin token models
of test_fidelity_eva: the same starting lora_B (up to the SVD's sign per
direction) and zero lora_A, the same trainable parameters (lora_B frozen),
the same layer status, and folders that load on the other side with lora_B
frozen and the same outputs."""

import warnings

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_fidelity_eva import TARGETS, as_torch, token_batches, twins  # noqa: E402
from test_fidelity_get_peft_model import lorac_name  # noqa: E402

pytestmark = pytest.mark.torch

MICA_TARGETS = TARGETS + ["embed_tokens"]


def both():
    torch_net, ours = twins(dtype=np.float32)
    config = dict(r=3, lora_alpha=6, target_modules=MICA_TARGETS, init_lora_weights="mica")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch_net, peft.LoraConfig(**config))
    lorac.get_peft_model(ours, lorac.LoraConfig(**config))
    return wrapped, ours


def peft_factors(twin):
    if "default" in twin.lora_embedding_A:
        return (twin.lora_embedding_A["default"].detach().numpy(), twin.lora_embedding_B["default"].detach().numpy())
    return twin.lora_A["default"].weight.detach().numpy(), twin.lora_B["default"].weight.detach().numpy()


def test_the_start_and_the_trainable_parameters_are_peft_s():
    wrapped, ours = both()
    for path in MICA_TARGETS:
        layer, twin = ours.get_submodule(path), wrapped.base_model.model.get_submodule(path)
        a, b = peft_factors(twin)
        np.testing.assert_array_equal(layer.lora_A.data, a)
        signs = np.sign(np.sum(layer.lora_B.data * b, axis=0))
        np.testing.assert_allclose(layer.lora_B.data * signs, b, atol=1e-5, err_msg=path)
    assert (sorted(n for n, p in ours.named_parameters() if p.requires_grad)
            == sorted(lorac_name(n) for n, p in wrapped.named_parameters() if p.requires_grad))
    assert not any(n.endswith("lora_B") for n, p in ours.named_parameters() if p.requires_grad)
    for ours_status, theirs in zip(lorac.get_layer_status(ours), peft.get_layer_status(wrapped)):
        assert ours_status.requires_grad == theirs.requires_grad, ours_status.name


def test_folders_load_on_the_other_side_with_lora_B_frozen(tmp_path):
    wrapped, ours = both()
    rng = np.random.default_rng(3)
    for path in MICA_TARGETS:                # a trained lora_A on both sides
        value = rng.standard_normal(ours.get_submodule(path).lora_A.shape).astype(np.float32)
        ours.get_submodule(path).lora_A.data[...] = value
    lorac.save_peft_adapter(ours, tmp_path / "ours")
    torch_net, _ = twins(dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_net, tmp_path / "ours", is_trainable=True)
    frozen = [n for n, p in loaded.named_parameters() if "lora_B" in n or "lora_embedding_B" in n]
    assert frozen and not any(p.requires_grad for n, p in loaded.named_parameters() if n in frozen)
    batch = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = loaded(**as_torch(batch)).numpy()
    np.testing.assert_allclose(ours(**batch), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.save_pretrained(tmp_path / "theirs")
    _, fresh = twins(dtype=np.float32)
    lorac.load_peft_adapter(fresh, tmp_path / "theirs")
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if n.endswith("lora_B"))
    np.testing.assert_allclose(fresh(**batch), ours(**batch), rtol=1e-6, atol=1e-6)

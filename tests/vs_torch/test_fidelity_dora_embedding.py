"""lorac.DoRAEmbedding against PEFT's LoraConfig(use_dora=True) on an
nn.Embedding with the same weights (forward, every gradient, merging), against
a NumPy float64 reference with finite differences, and through inject_lora and
PEFT folders on the twin decoder's embed_tokens."""

import copy
import warnings

import numpy as np
import pytest

import lorac
from fidelity import assert_matches, torch
from reference import central_difference
from test_fidelity_dora import assert_merge_matches_peft_and_round_trips, peft_dora_model
from test_fidelity_dora import merged_embedding   # also used there: loading into a merged layer, cast, reset

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch


def peft_dora_embedding(num, dim, r, lora_alpha, use_rslora, padding_idx, seed):
    """A PEFT DoRA layer over a torch Embedding (A and B both N(0, 1) under init_lora_weights=False)."""
    return peft_dora_model(lambda: torch.nn.Embedding(num, dim, padding_idx=padding_idx), r, lora_alpha, use_rslora,
                           seed)


def lorac_twin(layer, r, lora_alpha, use_rslora, padding_idx):
    base = layer.base_layer
    ours = lorac.DoRAEmbedding(base.num_embeddings, base.embedding_dim, r=r, lora_alpha=lora_alpha,
                               use_rslora=use_rslora, padding_idx=padding_idx, dtype=np.float64, rng=0)
    ours.load_state_dict({
        "weight": base.weight.detach().numpy(),
        "lora_A": layer.lora_embedding_A["default"].detach().numpy(),
        "lora_B": layer.lora_embedding_B["default"].detach().numpy(),
        "lora_magnitude_vector": layer.lora_magnitude_vector["default"].weight.detach().numpy()})
    return ours


# (num_embeddings, embedding_dim, r, lora_alpha, use_rslora, padding_idx, indices' shape)
CASES = [(11, 6, 2, 4, False, None, (9,)), (7, 9, 3, 2, True, 2, (3, 5)), (5, 4, 1, 1, False, 0, (2, 1, 4))]


@pytest.mark.parametrize("num, dim, r, lora_alpha, use_rslora, padding_idx, shape", CASES)
def test_forward_and_gradients_match_peft(num, dim, r, lora_alpha, use_rslora, padding_idx, shape):
    model, layer = peft_dora_embedding(num, dim, r, lora_alpha, use_rslora, padding_idx, seed=r)
    ours = lorac_twin(layer, r, lora_alpha, use_rslora, padding_idx)
    rng = np.random.default_rng(r)
    idx = rng.integers(0, num, shape)
    idx.flat[0] = idx.flat[-1]   # a repeated index: its gradients add up
    if padding_idx is not None:
        idx.flat[1] = padding_idx
    g = rng.standard_normal(shape + (dim,))
    y_torch = layer(torch.from_numpy(idx))
    y_torch.backward(torch.from_numpy(g))
    y = ours(idx)
    assert_matches(y, y_torch, np.float64, "y")
    assert ours.backward(g) is None
    for name, theirs in (("lora_A", layer.lora_embedding_A["default"]),
                         ("lora_B", layer.lora_embedding_B["default"]),
                         ("lora_magnitude_vector", layer.lora_magnitude_vector["default"].weight)):
        assert_matches(getattr(ours, name).grad, theirs.grad, np.float64, f"d{name}")
    assert ours.weight.grad is None   # frozen, as PEFT's base weight


@pytest.mark.parametrize("num, dim, r, lora_alpha, use_rslora, padding_idx, shape", CASES[:2])
def test_merging_matches_peft_and_round_trips(num, dim, r, lora_alpha, use_rslora, padding_idx, shape):
    model, layer = peft_dora_embedding(num, dim, r, lora_alpha, use_rslora, padding_idx, seed=10 + r)
    ours = lorac_twin(layer, r, lora_alpha, use_rslora, padding_idx)
    assert_merge_matches_peft_and_round_trips(ours, model, np.random.default_rng(0).integers(0, num, shape))


def test_against_a_reference_and_finite_differences():
    rng = np.random.default_rng(3)
    layer = lorac.DoRAEmbedding(8, 5, r=2, lora_alpha=3, padding_idx=4, dtype=np.float64, rng=1, init=False)
    layer.lora_magnitude_vector.data *= rng.uniform(0.5, 1.5, 5)
    idx = np.array([[1, 4, 7], [7, 0, 1]])
    g = rng.standard_normal((2, 3, 5))
    params = {n: getattr(layer, n).data.copy() for n in ("lora_A", "lora_B", "lora_magnitude_vector")}
    w0 = layer.weight.data.copy()
    norms = np.linalg.norm(w0.T + layer.scaling * params["lora_B"] @ params["lora_A"], axis=1)   # (dim,)

    def reference():
        a, b, m = params["lora_A"], params["lora_B"], params["lora_magnitude_vector"]
        return m / norms * (w0[idx] + layer.scaling * a.T[idx] @ b.T)

    def loss():
        return np.sum(g * reference())

    np.testing.assert_allclose(layer(idx), reference(), rtol=1e-12, atol=1e-12)
    layer.backward(g)
    for name, value in params.items():
        expected = central_difference(loss, value)
        if name == "lora_A":
            expected[:, 4] = 0.0   # padding_idx's column gets no gradient, as torch's padding row
        np.testing.assert_allclose(getattr(layer, name).grad, expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_unload_refusals_and_a_failed_backward():
    rng = np.random.default_rng(2)
    model = lorac.Sequential(merged_embedding(rng).train())
    idx = np.array([0, 3, 3, 8])
    y = model(idx)
    assert set(lorac.lora_state_dict(model)) == {"0.lora_A", "0.lora_B", "0.lora_magnitude_vector"}
    layer = model[0]
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"grad_output must have shape \(4, 4\)"):
        layer.backward(np.ones((4, 5)))
    assert layer.lora_magnitude_vector.grad is None and layer.lora_A.grad is None
    layer.backward(np.ones_like(y))   # the forward's cache survived the failed call
    for call, match in [(lambda: lorac.DoRAEmbedding(3, 3, r=0), "r must be >= 1"),
                        (lambda: layer.add_adapter("x", 2), "DoRAEmbedding holds one adapter"),
                        (lambda: lorac.add_adapter(model, "x", r=2), "'0' is a DoRAEmbedding")]:
        with pytest.raises(ValueError, match=match):
            call()
    model.eval()
    lorac.unmerge_adapter(model)
    with pytest.raises(RuntimeError, match="mixed batch"):
        model(idx, adapter_names=["default"] * 4)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, before[key], atol=1e-14)
    twin = copy.deepcopy(model).train()
    plain = lorac.merge_and_unload(model)
    assert type(plain[0]) is lorac.Embedding and plain[0].r == 0
    np.testing.assert_allclose(plain(idx), y, rtol=1e-12, atol=1e-12)
    unloaded = lorac.unload(twin)
    assert type(unloaded[0]) is lorac.Embedding
    np.testing.assert_array_equal(unloaded[0].weight.data, before["0.weight"])


# -- inject_lora(use_dora=True) and PEFT folders with embed_tokens ------------------------
def decoder_twins():
    from test_fidelity_inject_peft import lorac_model, torch_model
    return lorac_model(), torch_model()


TARGETS = dict(target_modules=["embed_tokens", "q_proj"], r=2, lora_alpha=4)


def test_inject_with_use_dora_matches_get_peft_model_on_the_embedding():
    ours, twin = decoder_twins()
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    lorac.inject_lora(ours, use_dora=True, **TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(twin, peft.LoraConfig(use_dora=True, **TARGETS))
    embed = ours.model.embed_tokens
    assert type(embed) is lorac.DoRAEmbedding and type(ours.model.layers[0].self_attn.q_proj) is lorac.DoRALinear
    theirs = wrapped.base_model.model.model.embed_tokens
    np.testing.assert_allclose(embed.lora_magnitude_vector.data,
                               theirs.lora_magnitude_vector["default"].weight.detach().numpy(), rtol=1e-13)


def test_embedding_dora_folders_load_and_save_both_ways(tmp_path):
    ours, twin = decoder_twins()
    base = {k: v.copy() for k, v in ours.state_dict().items()}
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(twin, peft.LoraConfig(use_dora=True, init_lora_weights=False, **TARGETS))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, dtype=param.dtype) * 0.5 + (1 if "magnitude" in name else 0))
    with warnings.catch_warnings():   # PEFT: "Setting save_embedding_layers", "not a transformers model"
        warnings.simplefilter("ignore")
        wrapped.save_pretrained(str(tmp_path / "from_peft"))
    assert lorac.load_peft_adapter(ours, tmp_path / "from_peft") == ([], [])
    idx = np.array([[0, 3, 10], [5, 5, 1]])
    theirs = wrapped.base_model.model.model.embed_tokens
    with torch.no_grad():
        expected = theirs(torch.from_numpy(idx))
    assert type(ours.model.embed_tokens) is lorac.DoRAEmbedding
    assert_matches(ours.model.embed_tokens(idx), expected, np.float64, "embed_tokens")

    ours.model.embed_tokens.lora_magnitude_vector.data *= 1.5
    lorac.save_peft_adapter(ours, tmp_path / "from_lorac")
    fresh = decoder_twins()[1]
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "from_lorac"))
    with torch.no_grad():
        expected = loaded.base_model.model.model.embed_tokens(torch.from_numpy(idx))
    assert_matches(ours.model.embed_tokens(idx), expected, np.float64, "embed_tokens after save")

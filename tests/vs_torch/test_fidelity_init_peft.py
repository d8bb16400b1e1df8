"""init='olora' and init='orthogonal' against PEFT's init_lora_weights of the
same names: OLoRA's factors and residual base weight on the same float32
weights, through a layer and through inject_lora / get_peft_model; for
'orthogonal' (PEFT draws from torch's generator, so the arrays cannot be
shared) the properties and the scale of PEFT's draw."""

import warnings

import numpy as np
import pytest

import lorac
from fidelity import torch

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch


def peft_linear(in_features, out_features, r, lora_alpha, init, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
    original = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"], r=r, lora_alpha=lora_alpha,
                                                          init_lora_weights=init))
    return model.base_model.model[0], original


def numpy_of(layer):
    return (layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy(),
            layer.base_layer.weight.detach().numpy())


@pytest.mark.parametrize("in_features, out_features, r, lora_alpha", [(12, 8, 3, 6), (6, 10, 4, 1), (9, 9, 2, 4)])
def test_olora_matches_peft(in_features, out_features, r, lora_alpha):
    theirs, original = peft_linear(in_features, out_features, r, lora_alpha, "olora")
    lora_a, lora_b, residual = numpy_of(theirs)
    ours = lorac.Linear(in_features, out_features, r=r, lora_alpha=lora_alpha, rng=0)
    ours.load_state_dict({"weight": original["0.weight"], "bias": original["0.bias"]}, strict=False)
    ours.reset_adapter(init="olora")
    scale = float(np.abs(original["0.weight"]).max())
    np.testing.assert_allclose(ours.lora_A.data, lora_a, atol=2e-6 * scale)
    np.testing.assert_allclose(ours.lora_B.data, lora_b, atol=2e-6)
    np.testing.assert_allclose(ours.weight.data, residual, atol=4e-6 * scale)
    x = np.random.default_rng(r).standard_normal((5, in_features)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(x), expected, atol=1e-5 * float(np.abs(expected).max()))


def test_inject_lora_with_olora_matches_get_peft_model():
    from test_fidelity_inject_peft import lorac_model, torch_model

    ours, twin = lorac_model().to(np.float32), torch_model().float()
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    config = dict(target_modules=["q_proj", "up_proj", "lm_head"], r=3, lora_alpha=5, rank_pattern={"up_proj": 2})
    lorac.inject_lora(ours, init="olora", **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(twin, peft.LoraConfig(init_lora_weights="olora", **config))
    theirs = dict(wrapped.base_model.model.named_modules())
    adapted = [p for p, m in ours.named_modules() if getattr(m, "r", 0) > 0]
    assert len(adapted) == 7
    for path in adapted:
        layer = ours.get_submodule(path)
        lora_a, lora_b, residual = numpy_of(theirs[path])
        np.testing.assert_allclose(layer.lora_A.data, lora_a, atol=1e-5, err_msg=path)
        np.testing.assert_allclose(layer.lora_B.data, lora_b, atol=1e-5, err_msg=path)
        np.testing.assert_allclose(layer.weight.data, residual, atol=1e-5, err_msg=path)


def test_orthogonal_has_peft_properties_and_scale():
    theirs = numpy_of(peft_linear(64, 48, 8, 16, "orthogonal")[0])
    ours = lorac.Linear(64, 48, r=8, lora_alpha=16, init="orthogonal", rng=0)
    for name, (a, b) in (("peft", theirs[:2]), ("lorac", (ours.lora_A.data, ours.lora_B.data))):
        assert a.shape == (8, 64) and b.shape == (48, 8), name
        assert np.abs(b.astype(np.float64) @ a.astype(np.float64)).max() < 1e-7, name   # a no-op start
        assert np.linalg.matrix_rank(a, tol=1e-5) == 4 == np.linalg.matrix_rank(b, tol=1e-5), name
    for ours_factor, theirs_factor in ((ours.lora_A.data, theirs[0]), (ours.lora_B.data, theirs[1])):
        assert 0.8 < ours_factor.std() / theirs_factor.std() < 1.25
    with pytest.raises(ValueError, match="even"):
        peft_linear(8, 8, 3, 1, "orthogonal")
    with pytest.raises(ValueError, match="init='orthogonal' needs an even r"):
        lorac.Linear(8, 8, r=3, init="orthogonal")

"""CorDA against PEFT's: lorac.preprocess_corda + get_peft_model and peft's
preprocess_corda + get_peft_model on the twin token models of
test_fidelity_eva (float32: PEFT's CorDA takes float32 weights only), fed the
same calibration batches: the same residual base weights, adapter products,
lora_A rows (up to the SVD's sign), scalings and outputs.  PEFT's cache and
covariance files (torch.save) serve lorac's preprocess_corda."""

import warnings

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("attr")     # peft.tuners.lora.corda imports attrs
peft_corda = pytest.importorskip("peft.tuners.lora.corda")

from test_fidelity_eva import TARGETS, as_torch, token_batches, twins  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 5e-5      # PEFT runs CorDA in float32, lorac in float64


def configs(method="ipm", corda=None, **extra):
    kw = dict(dict(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights="corda"), **extra)
    corda = dict(corda or {}, corda_method=method)
    with warnings.catch_warnings():   # PEFT's note on converting rsLoRA / pattern adapters back
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig(**kw, corda_config=peft.tuners.lora.config.CordaConfig(**corda))
    return theirs, lorac.LoraConfig(**kw, corda_config=lorac.CordaConfig(**corda))


def peft_corda_model(torch_net, config, batches):
    with torch.no_grad():
        peft_corda.preprocess_corda(torch_net, config, run_model=lambda: [torch_net(**as_torch(b)) for b in batches])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(torch_net, config)


def assert_layers_match(ours, wrapped):
    for path in TARGETS:
        twin, layer = wrapped.base_model.model.get_submodule(path), ours.get_submodule(path)
        weight = twin.base_layer.weight.detach().numpy()
        a, b = (twin.lora_A["default"].weight.detach().numpy(), twin.lora_B["default"].weight.detach().numpy())
        assert (layer.r, layer.scaling) == pytest.approx((twin.r["default"], twin.scaling["default"])), path
        scale = np.abs(weight).max()
        np.testing.assert_allclose(layer.weight.data, weight, atol=TOL * scale, err_msg=f"{path} residual")
        np.testing.assert_allclose(layer.lora_B.data @ layer.lora_A.data, b @ a, atol=TOL * np.abs(b @ a).max(),
                                   err_msg=f"{path} B A")
        signs = np.sign(np.sum(layer.lora_A.data * a, axis=1))
        np.testing.assert_allclose(layer.lora_A.data * signs[:, None], a, atol=TOL * np.abs(a).max(),
                                   err_msg=f"{path} lora_A")


CASES = {
    "ipm": dict(method="ipm"),
    "kpm": dict(method="kpm"),
    "kpm, rank pattern and rslora": dict(method="kpm", rank_pattern={"up_proj": 5, "o_proj": 1}, use_rslora=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_adapters_and_residuals_are_peft_s(case):
    torch_net, ours = twins(dtype=np.float32)
    theirs, mine = configs(**case)
    batches = token_batches(6, batch=1)       # PEFT's hook takes one sequence per call
    before = ours(**batches[0])
    wrapped = peft_corda_model(torch_net, theirs, batches)
    lorac.preprocess_corda(ours, mine, run_model=lambda: [ours(**b) for b in batches])
    lorac.get_peft_model(ours, mine)
    assert_layers_match(ours, wrapped)
    with torch.no_grad():
        expected = wrapped(**as_torch(batches[0])).numpy()
    np.testing.assert_allclose(ours(**batches[0]), expected, atol=TOL * np.abs(expected).max())
    np.testing.assert_allclose(ours(**batches[0]), before, atol=TOL * np.abs(before).max())


def test_peft_s_cache_and_covariance_files_serve_lorac(tmp_path):
    files = dict(cache_file=str(tmp_path / "cache.pt"), covariance_file=str(tmp_path / "cov.pt"))
    torch_net, _ = twins(dtype=np.float32)
    theirs, _ = configs("kpm", corda=files)
    batches = token_batches(6, batch=1)
    wrapped = peft_corda_model(torch_net, theirs, batches)
    for file_kind in ("cache_file", "covariance_file"):
        _, ours = twins(dtype=np.float32)
        _, mine = configs("kpm", corda={file_kind: files[file_kind]})
        lorac.preprocess_corda(ours, mine)        # no run_model: PEFT's file holds what it needs
        lorac.get_peft_model(ours, mine)
        assert_layers_match(ours, wrapped)

"""LoRA-GA against PEFT's: lorac.preprocess_loraga + get_peft_model and peft's
preprocess_loraga + get_peft_model on twin MLPs (float32: PEFT's LoRA-GA
takes float32 weights) trained one step on the same batches.  PEFT's
torch.svd_lowrank is switched to the exact SVD here (its q covers every
direction of these small layers anyway).  A singular direction's sign is
the SVD's choice, so lora_A rows and lora_B columns are compared up to sign;
on both sides the residual base weight plus s B A is the original weight."""

import warnings
from unittest import mock

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
peft_loraga = pytest.importorskip("peft.tuners.lora.loraga")

pytestmark = pytest.mark.torch

SIZES = (12, 16, 10, 6)
TARGETS = ["0", "2", "4"]


def twins():
    torch.manual_seed(0)
    nn = torch.nn
    torch_net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 6))
    ours = lorac.Sequential(lorac.Linear(12, 16), lorac.Tanh(), lorac.Linear(16, 10), lorac.Tanh(),
                            lorac.Linear(10, 6))
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in torch_net.state_dict().items()})
    return torch_net, ours


def batches():
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((8, 12)).astype(np.float32), rng.standard_normal((8, 6)).astype(np.float32))
            for _ in range(3)]


def exact_svd_lowrank(matrix, q=6, niter=2, M=None):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :q].to(matrix.dtype), s[:q].to(matrix.dtype), vh[:q].T.to(matrix.dtype)


def run_peft(torch_net, config, data):
    loss_fn = torch.nn.MSELoss()

    def train_step():
        for x, y in data:
            loss_fn(torch_net(torch.from_numpy(x)), torch.from_numpy(y)).backward()

    with mock.patch.object(torch, "svd_lowrank", exact_svd_lowrank), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loraga.preprocess_loraga(torch_net, config, train_step)
        return peft.get_peft_model(torch_net, config)


def run_lorac(ours, config, data):
    loss_fn = lorac.MSELoss()

    def train_step():
        for x, y in data:
            loss_fn(ours(x), y)
            ours.backward(loss_fn.backward())

    lorac.preprocess_loraga(ours, config, train_step)
    return lorac.get_peft_model(ours, config)


CASES = {
    "ArB2r stable": dict(direction="ArB2r", scale="stable"),
    "A2rBr weight_svd": dict(direction="A2rBr", scale="weight_svd"),
    "ArBr gd_scale": dict(direction="ArBr", scale="gd_scale", stable_gamma=4),
    "ArB2r unit, rank pattern": dict(direction="ArB2r", scale="unit", rank_pattern={"4": 2}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_factors_are_peft_s(case):
    case = dict(case)
    common = dict(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights="lora_ga",
                  rank_pattern=case.pop("rank_pattern", {}))
    torch_net, ours = twins()
    originals = {p: ours.get_submodule(p).weight.data.copy() for p in TARGETS}
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig(**common, lora_ga_config=peft.LoraGAConfig(**case))
    wrapped = run_peft(torch_net, theirs, data)
    run_lorac(ours, lorac.LoraConfig(**common, lora_ga_config=lorac.LoraGAConfig(**case)), data)
    for path in TARGETS:
        twin, layer = wrapped.base_model.model.get_submodule(path), ours.get_submodule(path)
        a, b = twin.lora_A["default"].weight.detach().numpy(), twin.lora_B["default"].weight.detach().numpy()
        assert (layer.r, layer.scaling) == pytest.approx((twin.r["default"], twin.scaling["default"]))
        sign_a = np.sign(np.sum(layer.lora_A.data * a, axis=1))
        sign_b = np.sign(np.sum(layer.lora_B.data * b, axis=0))
        np.testing.assert_allclose(layer.lora_A.data * sign_a[:, None], a, atol=1e-4 * np.abs(a).max())
        np.testing.assert_allclose(layer.lora_B.data * sign_b, b, atol=1e-4 * np.abs(b).max())
        for weight, lora_a, lora_b, scaling in ((layer.weight.data, layer.lora_A.data, layer.lora_B.data,
                                                 layer.scaling),
                                                (twin.base_layer.weight.detach().numpy(), a, b,
                                                 twin.scaling["default"])):
            np.testing.assert_allclose(weight + scaling * lora_b @ lora_a, originals[path], atol=1e-5)


def test_peft_s_gradient_cache_serves_lorac(tmp_path):
    cache = str(tmp_path / "grads.pt")
    common = dict(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights="lora_ga")
    torch_net, _ = twins()
    theirs = peft.LoraConfig(**common, lora_ga_config=peft.LoraGAConfig())
    loss_fn = torch.nn.MSELoss()
    data = batches()

    def train_step():
        for x, y in data:
            loss_fn(torch_net(torch.from_numpy(x)), torch.from_numpy(y)).backward()

    with warnings.catch_warnings():   # torch's note on full backward hooks without input gradients
        warnings.simplefilter("ignore")
        peft_loraga.preprocess_loraga(torch_net, theirs, train_step, cache_file=cache)
    from_cache, fresh = twins()[1], twins()[1]
    mine = lorac.LoraConfig(**common, lora_ga_config=lorac.LoraGAConfig())
    lorac.preprocess_loraga(from_cache, mine, None, cache_file=cache)
    lorac.get_peft_model(from_cache, mine)
    run_lorac(fresh, mine, data)
    for path in TARGETS:
        np.testing.assert_allclose(from_cache.get_submodule(path).lora_A.data, fresh.get_submodule(path).lora_A.data,
                                   atol=1e-4)

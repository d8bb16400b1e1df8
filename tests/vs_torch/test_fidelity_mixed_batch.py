"""lorac's mixed batch and named adapters vs PEFT's (``adapter_names=`` and
``set_adapter``) on the same weights: Embedding and Linear layers, adapters of
different ranks, alphas and rsLoRA, a layer lacking one adapter."""

import numpy as np
import pytest

from fidelity import torch

import lorac

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch


class TNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, idx):
        return self.head(torch.relu(self.proj(self.emb(idx))))


class LNet(lorac.Module):
    def __init__(self):
        super().__init__()
        self.emb = lorac.Embedding(11, 6, r=2, lora_alpha=4, dtype=np.float64, merge_weights=False)
        self.proj = lorac.Linear(6, 8, r=2, lora_alpha=4, dtype=np.float64, merge_weights=False)
        self.act = lorac.ReLU()
        self.head = lorac.Linear(8, 5, r=2, lora_alpha=4, dtype=np.float64, merge_weights=False)

    def forward(self, idx):
        return self.head(self.act(self.proj(self.emb(idx))))


ADAPTERS = {  # name: (r, lora_alpha, use_rslora, targets)
    "t1": (3, 6, False, ["emb", "proj", "head"]),
    "t2": (1, 2, True, ["proj", "head"]),
}


def twins():
    torch.manual_seed(0)
    tnet = TNet().double()
    pmodel = peft.get_peft_model(tnet, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "proj", "head"],
                                                       init_lora_weights=False))
    ours = LNet()
    for name, (r, alpha, rslora, targets) in ADAPTERS.items():
        pmodel.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                                                 init_lora_weights=False))
        lorac.add_adapter(ours, name, r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets)
    pmodel.double()
    for path in ("emb", "proj", "head"):
        player, layer = pmodel.base_model.model.get_submodule(path), getattr(ours, path)
        layer.weight.data[...] = player.base_layer.weight.detach().numpy()
        if path != "emb":
            layer.bias.data[...] = player.base_layer.bias.detach().numpy()
        for name in layer.adapter_names:
            A, B = layer.adapter_parameters(name)
            if path == "emb":
                A.data[...] = player.lora_embedding_A[name].detach().numpy()
                B.data[...] = player.lora_embedding_B[name].detach().numpy()
            else:
                A.data[...] = player.lora_A[name].weight.detach().numpy()
                B.data[...] = player.lora_B[name].weight.detach().numpy()
            assert layer._scaling_of(name) == pytest.approx(player.scaling[name])
    return pmodel.eval(), ours.eval()


@pytest.mark.parametrize("lead", [(6,), (6, 3)])
def test_mixed_batch_matches_peft(lead):
    pmodel, ours = twins()
    idx = np.random.default_rng(0).integers(0, 11, lead)
    names = ["t1", "t2", "__base__", "default", "t2", "t1"]
    with torch.no_grad():
        expected = pmodel(torch.from_numpy(idx), adapter_names=names).numpy()
    np.testing.assert_allclose(ours(idx, adapter_names=names), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("active", ["t1", "t2", "default"])
def test_set_adapter_matches_peft(active):
    pmodel, ours = twins()
    idx = np.random.default_rng(1).integers(0, 11, (4, 2))
    pmodel.set_adapter(active)
    lorac.set_adapter(ours, active)
    with torch.no_grad():
        expected = pmodel(torch.from_numpy(idx)).numpy()
        with pmodel.disable_adapter():
            base = pmodel(torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(ours(idx), expected, rtol=1e-10, atol=1e-10)
    with lorac.disable_adapters(ours):
        np.testing.assert_allclose(ours(idx), base, rtol=1e-10, atol=1e-10)


def test_weighted_cat_matches_peft_for_positive_weights():
    """PEFT's 'cat' (sqrt(w s) on both factors) equals ours for positive weights:
    both are the exact weighted sum of the deltas."""
    pmodel, ours = twins()
    pmodel.add_weighted_adapter(["t1", "t2"], [0.7, 1.3], "mix", combination_type="cat")
    lorac.add_weighted_adapter(ours, ["t1", "t2"], [0.7, 1.3], "mix", combination="cat")
    pmodel.set_adapter("mix")
    lorac.set_adapter(ours, "mix")
    idx = np.random.default_rng(2).integers(0, 11, (5,))
    with torch.no_grad():
        expected = pmodel(torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(ours(idx), expected, rtol=1e-10, atol=1e-10)


def test_named_adapters_move_between_peft_and_lorac_as_folders(tmp_path):
    """PEFT's save_pretrained of several adapters -> lorac.load_adapter(folder, name) for each, and
    lorac.save_peft_adapter(adapter_name=...) -> PEFT's load_adapter(folder, adapter_name): the same
    mixed batch and the same per-adapter outputs."""
    import warnings

    pmodel, ours = twins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(str(tmp_path / "peft"))   # default in peft/, the others in peft/<name>/
    fresh = LNet().eval()
    fresh.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith(("_t1", "_t2"))})
    for name in ADAPTERS:
        lorac.load_adapter(fresh, tmp_path / "peft" / name, name)
    idx = np.random.default_rng(3).integers(0, 11, (6,))
    names = ["t1", "t2", "__base__", "default", "t2", "t1"]
    with torch.no_grad():
        expected = pmodel(torch.from_numpy(idx), adapter_names=names).numpy()
    np.testing.assert_allclose(fresh(idx, adapter_names=names), expected, rtol=1e-10, atol=1e-10)

    for name in ADAPTERS:
        lorac.save_peft_adapter(ours, tmp_path / f"ours_{name}", adapter_name=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pmodel.load_adapter(str(tmp_path / f"ours_{name}"), adapter_name=f"back_{name}")
        pmodel.set_adapter(f"back_{name}")
        lorac.set_adapter(ours, name)
        with torch.no_grad():
            expected = pmodel(torch.from_numpy(idx)).numpy()
        np.testing.assert_allclose(ours(idx), expected, rtol=1e-10, atol=1e-10, err_msg=name)

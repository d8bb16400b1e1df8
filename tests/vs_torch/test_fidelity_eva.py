"""EVA against PEFT's: lorac.get_eva_state_dict / initialize_lora_eva_weights and
peft's functions of those names on twin token models, fed the same batches.

PEFT's PCA is the randomized torch.svd_lowrank; its IncrementalPCA has an
exact mode (lowrank=False), the algorithm lorac runs (scikit-learn's), and
these tests switch PEFT to it.  What must agree: which layers share a PCA,
the redistributed ranks, every lora_A (up to PEFT's float32), the alphas,
the layers that lose their adapter, the config's patterns, the trainable
parameters and the outputs -- and a folder saved by either side loads on
the other with the same outputs."""

import warnings
from unittest import mock

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("sklearn")
peft_eva = pytest.importorskip("peft.tuners.lora.eva")

pytestmark = pytest.mark.torch

VOCAB, HIDDEN = 40, 12
TARGETS = ["token_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


class TorchTokenNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.token_proj = nn.Linear(VOCAB, HIDDEN)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(HIDDEN, HIDDEN))
        self.up_proj = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down_proj = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, input_ids, attention_mask=None, labels=None):
        one_hot = torch.nn.functional.one_hot(input_ids, VOCAB).to(self.token_proj.weight.dtype)
        h = self.embed_tokens(input_ids) + self.token_proj(one_hot)
        h = h + self.o_proj(torch.tanh(self.q_proj(h)) * self.k_proj(h) + self.v_proj(h))
        return h + self.down_proj(torch.relu(self.up_proj(h)))


class TokenNet(lorac.Module):
    """TorchTokenNet in lorac: q / k / v share their input, the others see their own;
    token_proj's (one-hot tokens) has a flat spectrum, which loses the redistribution."""

    def __init__(self, dtype=np.float64):
        super().__init__()
        self.dtype = np.dtype(dtype)
        self.embed_tokens = lorac.Embedding(VOCAB, HIDDEN, dtype=dtype)
        self.token_proj = lorac.Linear(VOCAB, HIDDEN, dtype=dtype)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, lorac.Linear(HIDDEN, HIDDEN, dtype=dtype))
        self.up_proj = lorac.Linear(HIDDEN, 2 * HIDDEN, dtype=dtype)
        self.down_proj = lorac.Linear(2 * HIDDEN, HIDDEN, dtype=dtype)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed_tokens(input_ids) + self.token_proj(np.eye(VOCAB, dtype=self.dtype)[input_ids])
        h = h + self.o_proj(np.tanh(self.q_proj(h)) * self.k_proj(h) + self.v_proj(h))
        return h + self.down_proj(np.maximum(self.up_proj(h), 0.0))


class ExactPCA(peft_eva.IncrementalPCA):
    """PEFT's IncrementalPCA in its exact mode."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "lowrank": False})


def twins(seed=0, dtype=np.float64):
    """(torch model, lorac model) with the same weights; the embedding has a decaying spectrum,
    so that the layers' principal directions are well separated."""
    torch_net = TorchTokenNet().double()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((VOCAB, HIDDEN)))[0]
    v = np.linalg.qr(rng.standard_normal((HIDDEN, HIDDEN)))[0]
    with torch.no_grad():
        for p in torch_net.parameters():
            p.normal_(0.0, 0.4)
        torch_net.embed_tokens.weight.copy_(torch.from_numpy((u * np.geomspace(8, 0.05, HIDDEN)) @ v.T))
    torch_net.to(torch.float32 if dtype == np.float32 else torch.float64)
    ours = TokenNet(dtype)
    ours.load_state_dict({k: t.numpy().copy() for k, t in torch_net.state_dict().items()})
    return torch_net, ours


def token_batches(n, seed=1, batch=4, seq=16):
    """Dict batches with padding (attention_mask) and ignored labels (-100)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, VOCAB, (batch, seq))
        mask = (np.arange(seq) < rng.integers(seq // 2, seq + 1, (batch, 1))).astype(np.int64)
        labels = np.where(rng.random((batch, seq)) < 0.2, -100, ids)
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return out


def as_torch(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()} if isinstance(batch, dict) else torch.from_numpy(batch)


def both(seed=0, **config):
    torch_net, ours = twins(seed)
    config = dict(dict(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights="eva"), **config)
    eva = config.pop("eva", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch_net, peft.LoraConfig(**config, eva_config=peft.EvaConfig(**eva)))
    lorac.get_peft_model(ours, lorac.LoraConfig(**config, eva_config=lorac.EvaConfig(**eva)), rng=0)
    return wrapped, ours


def peft_state_dict(wrapped, batches, **kwargs):
    with mock.patch.object(peft_eva, "IncrementalPCA", ExactPCA), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = peft_eva.get_eva_state_dict(wrapped, [as_torch(b) for b in batches], show_progress_bar=False,
                                            **kwargs)
    return {k.removeprefix("base_model.model."): v.numpy() for k, v in state.items()}


SHARED = ("q_proj", "k_proj", "v_proj")


def assert_lora_a_matches(ours, theirs, whiten=False):
    """lorac's float64 against PEFT's float32 PCA: the same ranks, the same signed directions.

    whiten: PEFT 0.21 divides the components of a shared PCA in place, once for each layer
    sharing it (q, k, v: three times); lorac divides each layer's copy once, as the
    method says.  For those layers only the directions (rows scaled to unit norm) are compared."""
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for path, value in theirs.items():
        mine = ours[path]
        if whiten and path in SHARED:
            mine = mine / np.linalg.norm(mine, axis=1, keepdims=True)
            value = value / np.linalg.norm(value, axis=1, keepdims=True)
        np.testing.assert_allclose(mine, value, atol=2e-5 * np.abs(value).max(initial=1.0), err_msg=path)


CASES = {
    "default": {},
    # token_proj's flat spectrum has no well-defined directions to compare once it keeps its rank
    "rho 1": dict(eva=dict(rho=1.0), target_modules=TARGETS[1:]),
    "rho 4 drops layers": dict(eva=dict(rho=4.0)),
    "whiten": dict(eva=dict(whiten=True)),
    "no label mask, tau 0.9": dict(eva=dict(use_label_mask=False, tau=0.9)),
    "fixed alphas, rank pattern, rslora": dict(eva=dict(adjust_scaling_factors=False), rank_pattern={"up_proj": 2},
                                              use_rslora=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_eva_state_dict_is_peft_s(case):
    wrapped, ours = both(**case)
    batches = token_batches(30)
    assert_lora_a_matches(lorac.get_eva_state_dict(ours, batches, show_progress_bar=False),
                          peft_state_dict(wrapped, batches), whiten=case.get("eva", {}).get("whiten", False))


def test_some_case_redistributes_and_drops_a_layer():
    """The cases above are not vacuous: rho 4 gives some layer rank 0 and others more than r."""
    wrapped, ours = both(**CASES["rho 4 drops layers"])
    ranks = {k: v.shape[0] for k, v in lorac.get_eva_state_dict(ours, token_batches(30),
                                                                 show_progress_bar=False).items()}
    assert min(ranks.values()) == 0 and max(ranks.values()) > 3


def test_array_batches_without_masks_are_peft_s_with_its_plain_functions():
    wrapped, ours = both()
    batches = [b["input_ids"] for b in token_batches(30)]
    theirs = peft_state_dict(wrapped, batches, forward_fn=lambda model, x: model(x), prepare_model_inputs_fn=None,
                             prepare_layer_inputs_fn=None)
    assert_lora_a_matches(lorac.get_eva_state_dict(ours, batches, show_progress_bar=False), theirs)


def lorac_name(peft_name):
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace(".default.weight", "").replace("lora_embedding_", "lora_")


@pytest.mark.parametrize("case", ["default", "rho 4 drops layers", "fixed alphas, rank pattern, rslora"])
def test_initialisation_gives_peft_s_layers_config_and_outputs(case):
    wrapped, ours = both(**CASES[case])
    batches = token_batches(30)
    theirs = peft_state_dict(wrapped, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_eva.initialize_lora_eva_weights(wrapped, eva_state_dict={f"base_model.model.{k}": torch.from_numpy(v)
                                                                      for k, v in theirs.items()})
    lorac.initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    peft_layers = {p: m for p, m in wrapped.base_model.model.named_modules() if hasattr(m, "lora_A")}
    for path in TARGETS:
        layer = ours.get_submodule(path)
        if path not in peft_layers:      # PEFT put the base layer back: rank 0
            assert layer.r == 0 and not layer.weight.requires_grad, path
            continue
        twin = peft_layers[path]
        assert (layer.r, layer.lora_alpha, layer.scaling) == pytest.approx(
            (twin.r["default"], twin.lora_alpha["default"], twin.scaling["default"])), path
        np.testing.assert_allclose(layer.lora_A.data, twin.lora_A["default"].weight.detach().numpy(), atol=2e-5,
                                   err_msg=path)
        np.testing.assert_array_equal(layer.lora_B.data, 0)
    config, twin_config = ours.peft_config["default"], wrapped.peft_config["default"]
    assert config.rank_pattern == twin_config.rank_pattern
    assert config.alpha_pattern == pytest.approx(twin_config.alpha_pattern)
    assert sorted(config.target_modules) == sorted(twin_config.target_modules)
    assert (sorted(n for n, p in ours.named_parameters() if p.requires_grad)
            == sorted(lorac_name(n) for n, p in wrapped.named_parameters() if p.requires_grad))
    batch = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = wrapped(**as_torch(batch)).numpy()
    np.testing.assert_allclose(ours(**batch), expected, rtol=1e-10, atol=1e-10)


def test_folders_after_eva_load_on_the_other_side(tmp_path):
    wrapped, ours = both(eva=dict(rho=4.0))
    batches = token_batches(30)
    lorac.initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    rng = np.random.default_rng(3)
    for layer in ours.modules():
        if isinstance(layer, lorac.Linear) and layer.r:
            layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)   # a trained adapter
    lorac.save_peft_adapter(ours, tmp_path / "ours")
    torch_net, _ = twins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_net, tmp_path / "ours")
    batch = token_batches(1, seed=9)[0]
    with torch.no_grad():
        np.testing.assert_allclose(ours(**batch), loaded(**as_torch(batch)).numpy(), rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.save_pretrained(tmp_path / "theirs")
    _, fresh = twins()
    lorac.load_peft_adapter(fresh, tmp_path / "theirs")
    np.testing.assert_allclose(fresh(**batch), ours(**batch), rtol=1e-10, atol=1e-10)

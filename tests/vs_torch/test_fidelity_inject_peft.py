"""lorac.inject_lora against PEFT's get_peft_model: the same LoraConfig fields
(target_modules, exclude_modules, layers_to_transform, layers_pattern,
rank_pattern, alpha_pattern, use_rslora) select the same layers with the same
r and lora_alpha on twin models, and each adapted layer computes what PEFT's
does once it holds PEFT's adapter weights."""

import warnings

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from fidelity import assert_matches  # noqa: E402

pytestmark = pytest.mark.torch

N_LAYERS, HIDDEN, VOCAB = 3, 8, 11


def torch_model():
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, name, nn.Linear(HIDDEN, HIDDEN))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = nn.Linear(HIDDEN, 2 * HIDDEN)
            self.down_proj = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()
            self.mlp = Mlp()

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
            self.layers = nn.ModuleList(Block() for _ in range(N_LAYERS))

    class CausalLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Decoder()
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

        def forward(self, x):  # PEFT wants a forward to exist; these tests call layers directly
            return self.lm_head(x)

    torch.manual_seed(0)
    return CausalLM().double()


def lorac_model():
    def attention():
        attn = lorac.Module()
        for i, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
            setattr(attn, name, lorac.Linear(HIDDEN, HIDDEN, rng=i, dtype=np.float64))
        return attn

    def block():
        blk = lorac.Module()
        blk.self_attn = attention()
        blk.mlp = lorac.Module()
        blk.mlp.up_proj = lorac.Linear(HIDDEN, 2 * HIDDEN, rng=5, dtype=np.float64)
        blk.mlp.down_proj = lorac.Linear(2 * HIDDEN, HIDDEN, bias=False, rng=6, dtype=np.float64)
        return blk

    root = lorac.Module()
    root.model = lorac.Module()
    root.model.embed_tokens = lorac.Embedding(VOCAB, HIDDEN, rng=7, dtype=np.float64)
    root.model.layers = lorac.ModuleList(block() for _ in range(N_LAYERS))
    root.lm_head = lorac.Linear(HIDDEN, VOCAB, bias=False, rng=8, dtype=np.float64)
    return root


def peft_layers(config):
    """{path: (r, lora_alpha, LoraLayer)} of PEFT's adapted layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch_model(), peft.LoraConfig(**config))
    return {path: (layer.r["default"], layer.lora_alpha["default"], layer)
            for path, layer in wrapped.base_model.model.named_modules()
            if isinstance(layer, peft.tuners.lora.LoraLayer)}


def lorac_layers(config):
    model = lorac_model()
    lorac.inject_lora(model, **config)
    return {path: (layer.r, layer.lora_alpha, layer) for path, layer in model.named_modules()
            if getattr(layer, "r", 0) > 0}


CONFIGS = {
    "names": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r"model\.layers\.\d+\.self_attn\.(q|k)_proj"),
    "embedding and head": dict(target_modules=["embed_tokens", "lm_head", "o_proj"]),
    "exclude names": dict(target_modules=["q_proj", "v_proj", "up_proj"],
                          exclude_modules=["layers.1.self_attn.q_proj", "up_proj"]),
    "exclude regex": dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.2\..*"),
    "layers list": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
    "layer int and pattern": dict(target_modules=["k_proj", "lm_head"], layers_to_transform=1,
                                  layers_pattern="layers"),
    "layer patterns list": dict(target_modules=["v_proj"], layers_to_transform=[2],
                                layers_pattern=["blocks", "layers"]),
    "exact name ignores layers": dict(target_modules=["model.layers.1.self_attn.q_proj", "o_proj"],
                                      layers_to_transform=[0]),
    "rank and alpha patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                    rank_pattern={"q_proj": 4, r"layers\.2\.self_attn\.v_proj": 2},
                                    alpha_pattern={"v_proj": 32, "down_proj": 3}),
    "first pattern wins": dict(target_modules=["q_proj", "k_proj"], rank_pattern={".*_proj": 2, "q_proj": 5}),
    "rslora": dict(target_modules=["q_proj", "up_proj"], use_rslora=True, rank_pattern={"up_proj": 6}),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_selects_the_layers_ranks_and_alphas_peft_does(config):
    config = dict(config, r=3, lora_alpha=6)
    theirs, ours = peft_layers(config), lorac_layers(config)
    assert sorted(ours) == sorted(theirs)
    for path, (r, alpha, layer) in ours.items():
        assert (r, alpha) == theirs[path][:2], path
        assert layer.use_rslora == config.get("use_rslora", False)
        assert layer.scaling == pytest.approx(theirs[path][2].scaling["default"], rel=1e-15), path


@pytest.mark.parametrize("config", [CONFIGS["rank and alpha patterns"], CONFIGS["rslora"],
                                    CONFIGS["embedding and head"]], ids=["patterns", "rslora", "embedding"])
def test_adapted_layers_compute_what_pefts_do(config):
    config = dict(config, r=3, lora_alpha=6)
    theirs, ours = peft_layers(config), lorac_layers(config)
    gen = torch.Generator().manual_seed(1)
    for path, (_, _, layer) in ours.items():
        peft_layer = theirs[path][2]
        base = peft_layer.get_base_layer()
        if isinstance(base, torch.nn.Embedding):
            a, b = peft_layer.lora_embedding_A["default"], peft_layer.lora_embedding_B["default"]
            x_torch = torch.tensor([[1, 4, 10], [0, 0, 3]])
        else:
            a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
            x_torch = torch.randn(2, 3, base.in_features, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))  # a non-trivial adapter
            expected = peft_layer(x_torch)
        layer.load_state_dict({"weight": base.weight.detach().numpy(), "lora_A": a.detach().numpy(),
                               "lora_B": b.detach().numpy(),
                               **({} if getattr(base, "bias", None) is None else {"bias": base.bias.detach().numpy()})})
        assert_matches(layer(x_torch.numpy()), expected, np.float64, path)


def test_pattern_keys_that_match_nothing_warn_as_in_peft():
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys \['nowhere'\] match no adapted layer"):
        lorac.inject_lora(lorac_model(), ["q_proj"], r=2, rank_pattern={"q_proj": 3, "nowhere": 5})
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern keys \['k_proj'\]"):
        lorac.inject_lora(lorac_model(), ["q_proj"], r=2, alpha_pattern={"k_proj": 3})
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match any targeted module.*'nowhere'"):
        peft.get_peft_model(torch_model(), peft.LoraConfig(target_modules=["q_proj"], r=2,
                                                           rank_pattern={"q_proj": 3, "nowhere": 5}))


def test_an_adapter_injected_with_patterns_saves_and_loads_in_peft(tmp_path):
    """The PEFT user's round trip: inject with rank/alpha patterns in lorac,
    train (here: random B), save_peft_adapter, PeftModel.from_pretrained on
    the torch twin: every adapted layer computes the same."""
    config = CONFIGS["rank and alpha patterns"]
    model = lorac_model()
    lorac.inject_lora(model, r=3, lora_alpha=6, rng=0, **config)
    rng = np.random.default_rng(2)
    for _, module in model.named_modules():
        if getattr(module, "r", 0) > 0:
            module.lora_B.data[...] = rng.standard_normal(module.lora_B.shape)
    lorac.save_peft_adapter(model, tmp_path / "adapter")
    twin = torch_model()
    base = {k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items() if "lora_" not in k}
    assert twin.load_state_dict(base, strict=True) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(twin, str(tmp_path / "adapter"))
    theirs = dict(loaded.base_model.model.named_modules())
    x = rng.standard_normal((2, 2 * HIDDEN))
    adapted = [p for p, m in model.named_modules() if getattr(m, "r", 0) > 0]
    assert len(adapted) == 3 * N_LAYERS
    for path in adapted:
        layer = model.get_submodule(path)
        with torch.no_grad():
            expected = theirs[path](torch.from_numpy(x[:, :layer.in_features]))
        assert_matches(layer(x[:, :layer.in_features]), expected, np.float64, path)


@pytest.mark.parametrize("config", [CONFIGS["names"], CONFIGS["embedding and head"],
                                    CONFIGS["rank and alpha patterns"]], ids=["names", "embedding", "patterns"])
def test_trainable_parameter_counts_and_line_match_pefts(config, capsys):
    """inject_lora + mark_only_lora_as_trainable (the loralib step PEFT does
    inside get_peft_model) leaves what PEFT leaves trainable."""
    config = dict(config, r=3, lora_alpha=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch_model(), peft.LoraConfig(**config))
    model = lorac.inject_lora(lorac_model(), **config)
    lorac.mark_only_lora_as_trainable(model)
    assert lorac.get_nb_trainable_parameters(model) == wrapped.get_nb_trainable_parameters()
    wrapped.print_trainable_parameters()
    theirs = capsys.readouterr().out
    lorac.print_trainable_parameters(model)
    assert capsys.readouterr().out == theirs

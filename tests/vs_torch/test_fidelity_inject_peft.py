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
            self.norm = nn.LayerNorm(HIDDEN)

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
    root.model.norm = lorac.LayerNorm(HIDDEN, dtype=np.float64)
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
    "all-linear": dict(target_modules="all-linear"),
    "all-linear with exclusions and patterns": dict(target_modules="ALL-LINEAR", exclude_modules=["lm_head", "o_proj"],
                                                   rank_pattern={r"layers\.1\..*": 5}),
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


def peft_name(name):
    """A PEFT model's parameter name as the same parameter's name in the lorac twin."""
    name = name.removeprefix("base_model.model.")
    for peft_part, lorac_part in ((".modules_to_save.default.", "."), (".base_layer.", "."),
                                  (".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B"),
                                  (".lora_embedding_A.default", ".lora_A"), (".lora_embedding_B.default", ".lora_B")):
        name = name.replace(peft_part, lorac_part)
    return name


@pytest.mark.parametrize("extra", [{}, {"loraplus_weight_decay": 0.1, "loraplus_lr_embedding": 3e-4}])
def test_loraplus_groups_match_pefts(extra):
    """create_loraplus_optimizer puts the same parameters in the same groups,
    with the same learning rates and weight decays, as PEFT's, on twins
    with LoRA Linear and Embedding layers, a trainable LayerNorm and a bias."""
    from peft.optimizers import create_loraplus_optimizer

    config = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=2, lora_alpha=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch_model(), peft.LoraConfig(modules_to_save=["norm"], **config))
    wrapped.base_model.model.model.layers[1].self_attn.q_proj.base_layer.bias.requires_grad_(True)
    model = lorac.inject_lora(lorac_model(), **config)
    lorac.mark_only_lora_as_trainable(model)
    model.model.norm.requires_grad_(True)
    model.model.layers[1].self_attn.q_proj.bias.requires_grad_(True)

    theirs = create_loraplus_optimizer(wrapped, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16, **extra)
    ours = lorac.optim.create_loraplus_optimizer(model, lorac.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16, **extra)
    names = {id(p): n for n, p in model.named_parameters()}
    torch_names = {id(p): peft_name(n) for n, p in wrapped.named_parameters()}
    assert len(ours.param_groups) == len(theirs.param_groups) == 4
    for mine, their in zip(ours.param_groups, theirs.param_groups):
        assert (mine["lr"], mine["weight_decay"]) == pytest.approx((their["lr"], their["weight_decay"]), rel=1e-15)
        assert sorted(names[id(p)] for p in mine["params"]) == sorted(torch_names[id(p)] for p in their["params"])
    assert all(group["params"] for group in ours.param_groups)  # every group is exercised
    assert sum(len(g["params"]) for g in ours.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_loraplus_steps_lora_b_ratio_times_as_far_and_checks_its_arguments():
    model = lorac.inject_lora(lorac_model(), ["q_proj"], r=2, init=False, rng=0)
    lorac.mark_only_lora_as_trainable(model)
    optimizer = lorac.optim.create_loraplus_optimizer(model, lorac.optim.SGD, lr=0.01, loraplus_lr_ratio=8)
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.lora_A.data.copy(), layer.lora_B.data.copy()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = np.ones_like(p.data)
    optimizer.step()
    np.testing.assert_allclose(before[0] - layer.lora_A.data, 0.01, rtol=1e-12)
    np.testing.assert_allclose(before[1] - layer.lora_B.data, 0.08, rtol=1e-12)
    for kwargs, error, match in [
        (dict(optimizer_cls=torch.optim.SGD), TypeError, "optimizer_cls must be a lorac.optim optimizer class"),
        (dict(loraplus_lr_ratio=0), ValueError, "loraplus_lr_ratio must be > 0"),
        (dict(lr=float("nan")), ValueError, "lr must be a finite number >= 0"),
        (dict(loraplus_lr_embedding=-1), ValueError, "loraplus_lr_embedding must be a finite number >= 0"),
        (dict(momentun=0.9), TypeError, "momentun"),
    ]:
        with pytest.raises(error, match=match):
            lorac.optim.create_loraplus_optimizer(model, **{"optimizer_cls": lorac.optim.SGD, "lr": 0.01,
                                                            "loraplus_lr_ratio": 8, **kwargs})


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_biases_and_modules_to_save_round_trip_through_peft_and_lorac(tmp_path, bias):
    """Train LoRA plus a bias or two and whole modules (a head, a norm) in
    lorac; save_peft_adapter(bias=..., modules_to_save=...) holds them so
    that PeftModel.from_pretrained and load_peft_adapter, each on the
    untouched base, compute what the trained lorac model computes."""
    model = lorac_model()
    base = {k: v.copy() for k, v in model.state_dict().items()}
    lorac.inject_lora(model, ["q_proj", "v_proj"], r=2, lora_alpha=4, init=False, rng=0)
    rng = np.random.default_rng(4)
    q, k = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj
    for changed in (q.bias, k.bias, model.model.norm.weight, model.model.norm.bias, model.lm_head.weight):
        changed.data += rng.standard_normal(changed.shape)
    config = lorac.save_peft_adapter(model, tmp_path / "a", bias=bias, modules_to_save=["norm", "lm_head"])
    assert config["bias"] == bias and config["modules_to_save"] == ["model.norm", "lm_head"]

    twin = torch_model()
    twin.load_state_dict({key: torch.from_numpy(value) for key, value in base.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(twin, str(tmp_path / "a"))
    theirs = dict(loaded.base_model.model.named_modules())
    restored = lorac_model()
    restored.load_state_dict(base)
    lorac.load_peft_adapter(restored, tmp_path / "a")

    x = rng.standard_normal((3, HIDDEN))
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.norm", "lm_head"):
        trained = model.get_submodule(path)(x)
        with torch.no_grad():
            peft_out = theirs[path](torch.from_numpy(x)).numpy()
        if path.endswith("k_proj") and bias == "lora_only":  # not a LoRA layer: its bias was not saved
            untouched = x @ base[f"{path}.weight"].T + base[f"{path}.bias"]
            np.testing.assert_allclose(peft_out, untouched, rtol=1e-12)
            np.testing.assert_allclose(restored.get_submodule(path)(x), untouched, rtol=1e-12)
            continue
        assert_matches(peft_out, torch.from_numpy(trained), np.float64, f"PEFT {path}")
        assert_matches(restored.get_submodule(path)(x), torch.from_numpy(trained), np.float64, f"lorac {path}")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bias="some"), ValueError, "bias must be one of"),
    (dict(modules_to_save="lm_head"), TypeError, "modules_to_save must be a list of module names"),
    (dict(modules_to_save=["nothing"]), ValueError, "'nothing' matches no module"),
    (dict(modules_to_save=["q_proj"]), ValueError, "which is a LoRA layer"),
    (dict(modules_to_save=["self_attn"]), ValueError, "which holds a LoRA layer"),
])
def test_save_peft_adapter_refuses_bad_extras(tmp_path, kwargs, error, match):
    model = lorac.inject_lora(lorac_model(), ["q_proj"], r=2)
    with pytest.raises(error, match=match):
        lorac.save_peft_adapter(model, tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()

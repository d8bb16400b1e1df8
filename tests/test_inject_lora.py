"""lorac.inject_lora: LoRA on chosen layers of an existing model, pretrained weights kept."""

import numpy as np
import pytest

import lorac
from layer_state import state_attributes
from reference import central_difference

X = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)


class Block(lorac.Module):
    def __init__(self, rng):
        super().__init__()
        self.q = lorac.Linear(6, 6, rng=rng)
        self.v = lorac.Linear(6, 6, rng=rng + 1)

    def forward(self, x):
        return self.v(self.q(x))


class Net(lorac.Module):
    """Paths: emb, layers, layers.0, layers.0.q, layers.0.v, layers.1, ..., head."""

    def __init__(self, dtype=np.float32):
        super().__init__()
        self.emb = lorac.Embedding(10, 6, rng=0, dtype=dtype)
        self.layers = lorac.Sequential(Block(1), Block(3))
        self.head = lorac.Linear(6, 2, rng=5, dtype=dtype)

    def forward(self, idx):
        return self.head(self.layers(self.emb(idx)))


IDX = np.array([1, 4, 9, 4])


def adapted(model):
    return sorted(p for p, m in model.named_modules() if getattr(m, "r", 0) > 0)


@pytest.mark.parametrize("targets,expected", [
    (["q"], ["layers.0.q", "layers.1.q"]),
    (["layers.1.q", "head"], ["head", "layers.1.q"]),
    (["0.q"], ["layers.0.q"]),
    (r"layers\.\d\.(q|v)", ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"]),
    (r"emb|head", ["emb", "head"]),
    (("v",), ["layers.0.v", "layers.1.v"]),
    ("all-linear", ["head", "layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"]),   # PEFT's shorthand
    ("All-Linear", ["head", "layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"]),
])
def test_matching_rules(targets, expected):
    net = Net()
    assert lorac.inject_lora(net, targets, r=2, rng=0) is net
    assert adapted(net) == expected


def test_outputs_weights_and_trainability_are_kept():
    net = Net()
    before = net(IDX)
    weights = {p: (m.weight, getattr(m, "bias", None)) for p, m in net.named_modules() if hasattr(m, "weight")}
    saved = {p: w.data.copy() for p, (w, _) in weights.items()}
    lorac.inject_lora(net, ["emb", "q", "head"], r=3, lora_alpha=6, rng=0)
    np.testing.assert_array_equal(net(IDX), before)   # B = 0 (Linear), A = 0 (Embedding): a no-op
    for path, (weight, bias) in weights.items():
        module = dict(net.named_modules())[path]
        assert module.weight is weight and getattr(module, "bias", None) is bias
        np.testing.assert_array_equal(weight.data, saved[path])
    assert isinstance(net.emb, lorac.Embedding) and net.emb.r == 3
    assert not np.any(net.emb.lora_A.data) and np.any(net.emb.lora_B.data)
    assert not np.any(net.head.lora_B.data) and np.any(net.head.lora_A.data)
    assert not net.head.weight.requires_grad and net.head.lora_A.requires_grad
    assert net.layers[0].v.weight.requires_grad     # not targeted
    assert net.head.scaling == 2.0


def test_injected_layers_train():
    """The rebuilt layer's gradients match central differences (float64)."""
    model = lorac.Sequential(lorac.Linear(5, 4, rng=0, dtype=np.float64), lorac.Tanh(),
                             lorac.Linear(4, 3, rng=1, dtype=np.float64))
    lorac.inject_lora(model, ["0"], r=2, lora_alpha=3, rng=2)
    model[0].lora_B.data[...] = np.random.default_rng(3).standard_normal((4, 2))
    x = np.random.default_rng(4).standard_normal((6, 5))
    g = np.random.default_rng(5).standard_normal((6, 3))
    model.zero_grad()
    model(x)
    model.backward(g)
    loss = lambda: float(np.sum(model(x) * g))  # noqa: E731
    for param in (model[0].lora_A, model[0].lora_B):
        np.testing.assert_allclose(param.grad, central_difference(loss, param.data), rtol=1e-6, atol=1e-8)
    assert model[0].weight.grad is None


def test_train_eval_mode_dtype_and_layout_are_kept():
    net = Net(dtype=np.float64).eval()
    lorac.inject_lora(net, ["head", "emb"], r=2, rng=0)
    assert not net.head.training and net.head.merged and net.emb.merged
    assert net.head.dtype == np.float64 and net.head.lora_A.dtype == np.float64
    model = lorac.Sequential(lorac.Linear(4, 3, fan_in_fan_out=True, bias=False, rng=0))
    lorac.inject_lora(model, ["0"], r=1, fan_in_fan_out=True)
    assert model[0].fan_in_fan_out and model[0].weight.shape == (4, 3) and model[0].bias is None


def test_fan_in_fan_out_mismatch_warns_and_keeps_the_layer_layout():
    model = lorac.Sequential(lorac.Linear(4, 3, fan_in_fan_out=True, rng=0))
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=False but '0' stores its weight \(in, out\)"):
        lorac.inject_lora(model, ["0"], r=1)
    assert model[0].fan_in_fan_out


def test_same_seed_same_adapter():
    a, b = lorac.inject_lora(Net(), ["q"], r=2, rng=11), lorac.inject_lora(Net(), ["q"], r=2, rng=11)
    np.testing.assert_array_equal(a.layers[0].q.lora_A.data, b.layers[0].q.lora_A.data)


@pytest.mark.parametrize("targets,kwargs,error,match", [
    (["nothing"], {}, ValueError, r"matched no module; the model's Linear/Embedding layers are \['emb'"),
    (["layers"], {}, ValueError, r"matched 'layers', a Sequential; only lorac.Linear and lorac.Embedding"),
    (r"layers\.0", {}, ValueError, "a Block"),
    ("(", {}, ValueError, "not a valid regular expression"),
    ([], {}, ValueError, "non-empty list"),
    ([3], {}, ValueError, "non-empty list of module names"),
    (5, {}, TypeError, "regex str or a list"),
    (["q"], {"r": 0}, ValueError, "r must be >= 1"),
    (["q"], {"r": 2.5}, TypeError, "r must be an int"),
    (["q"], {"lora_alpha": "x"}, TypeError, "lora_alpha must be a real number"),
    (["q"], {"lora_dropout": 1.0}, ValueError, r"lora_dropout must be in \[0, 1\)"),
    (["q"], {"use_rslora": 1}, TypeError, "use_rslora must be a bool"),
    (["q"], {"fan_in_fan_out": "no"}, TypeError, "fan_in_fan_out must be a bool or None"),
    (["q"], {"rng": "seed"}, TypeError, "rng must be"),
    (["q"], {"exclude_modules": 5}, TypeError, "exclude_modules must be a regex str or a list"),
    (["q"], {"exclude_modules": ["q"]}, ValueError, r"matched no module \(after exclude_modules"),
    (r".*\.q", {"layers_to_transform": [0]}, ValueError, "need target_modules as a list"),
    (["q"], {"layers_pattern": "layers"}, ValueError, "layers_pattern needs layers_to_transform"),
    (["q"], {"layers_to_transform": "0"}, TypeError, "layers_to_transform must be an int or a list of ints"),
    (["q"], {"layers_to_transform": [0], "layers_pattern": "("}, ValueError, "layers_pattern '\\(' is not a valid"),
    (["q"], {"rank_pattern": [("q", 2)]}, TypeError, "rank_pattern must be a dict"),
    (["q"], {"rank_pattern": {"q": 0}}, ValueError, r"rank_pattern\['q'\] must be >= 1"),
    (["q"], {"rank_pattern": {"q": 1.5}}, TypeError, r"rank_pattern\['q'\] must be an int"),
    (["q"], {"rank_pattern": {"(": 2}}, ValueError, r"rank_pattern key '\(' is not a valid"),
    (["q"], {"alpha_pattern": {"q": float("nan")}}, ValueError, r"alpha_pattern\['q'\] must be finite"),
    (["q"], {"init": "nope"}, ValueError, "init must be one of"),
    (["q"], {"init_std": 0.1}, ValueError, "std applies to init='gaussian'"),
    (["q", "v"], {"init": "pissa", "alpha_pattern": {"v": 0}}, ValueError, "init='pissa' needs scaling"),
    ("all-linear", {"layers_to_transform": [0]}, ValueError, "cannot be used with target_modules 'all-linear'"),
])
def test_bad_input_leaves_the_model_unchanged(targets, kwargs, error, match):
    net = Net()
    modules = list(net.modules())
    state = {k: v.copy() for k, v in net.state_dict().items()}
    kwargs = {"r": 2, **kwargs}
    with pytest.raises(error, match=match):
        lorac.inject_lora(net, targets, **kwargs)
    assert list(net.modules()) == modules and adapted(net) == []
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_all_linear_needs_a_linear_layer_and_works_in_add_adapter():
    with pytest.raises(ValueError, match="'all-linear': the model has no Linear layer to adapt"):
        lorac.inject_lora(lorac.Sequential(lorac.Embedding(5, 3)), "all-linear", r=2)
    net = lorac.inject_lora(Net(), "all-linear", r=2, exclude_modules=["head"])
    lorac.inject_lora(net, ["emb"], r=2)
    lorac.add_adapter(net, "x", r=3, target_modules="all-linear")
    assert [p for p, m in net.named_modules() if "x" in getattr(m, "adapter_names", ())] == [
        "layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v", "head"]


def test_exclude_layers_and_patterns():
    net = lorac.inject_lora(Net(), ["q", "v", "head"], r=2, exclude_modules=["layers.0.v"],
                            rank_pattern={"q": 4}, alpha_pattern={r"layers\.1\.q": 8})
    assert adapted(net) == ["head", "layers.0.q", "layers.1.q", "layers.1.v"]
    assert [net.get_submodule(p).r for p in adapted(net)] == [2, 4, 4, 2]
    assert [net.get_submodule(p).lora_alpha for p in adapted(net)] == [1, 1, 8, 1]
    net = lorac.inject_lora(Net(), ["q", "head"], r=2, layers_to_transform=[1], layers_pattern="layers")
    assert adapted(net) == ["head", "layers.1.q"]  # a path equal to a target name is kept, as in PEFT


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_keeps_outputs_and_leaves_the_residual_as_base_weight(init):
    def net():
        return lorac.Sequential(lorac.Linear(6, 7, rng=1, dtype=np.float64), lorac.Tanh(),
                                lorac.Linear(7, 5, rng=2, dtype=np.float64))

    model, x = net(), np.random.default_rng(0).standard_normal((4, 6))
    y = net()(x)
    w0 = model[0].weight.data.copy()
    lorac.inject_lora(model, ["0", "2"], r=3, lora_alpha=6, init=init, rng=0)
    np.testing.assert_allclose(model(x), y, rtol=1e-9, atol=1e-9)
    q = model[0]
    assert not np.allclose(q.weight.data, w0)
    np.testing.assert_allclose(q.weight.data + q.scaling * q.lora_B.data @ q.lora_A.data, w0, atol=1e-10)
    s = np.linalg.svd(w0, compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(q.weight.data, compute_uv=False)[:3], s[3:6], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("init, kwargs, check", [
    ("gaussian", {"init_std": 0.5}, lambda a, b: np.all(b == 0) and 0.3 < a.std() < 0.7),
    (False, {}, lambda a, b: np.any(b != 0) and np.any(a != 0)),
    (True, {}, lambda a, b: np.all(b == 0) and np.abs(a).max() <= 1 / np.sqrt(6)),
])
def test_init_choices(init, kwargs, check):
    net = lorac.inject_lora(Net(), ["q"], r=4, init=init, rng=0, **kwargs)
    q = net.layers[1].q
    assert check(q.lora_A.data, q.lora_B.data)


def test_layers_with_adapters_or_other_kinds_are_refused():
    net = lorac.inject_lora(Net(), ["q"], r=2)
    modules = list(net.modules())
    with pytest.raises(ValueError, match=r"'layers.0.q' already has a LoRA adapter \(r=2\)"):
        lorac.inject_lora(net, ["q", "v"], r=2)
    assert list(net.modules()) == modules
    model = lorac.Sequential(lorac.MergedLinear(4, 6, enable_lora=[True, False]))
    with pytest.raises(ValueError, match="a MergedLinear"):
        lorac.inject_lora(model, ["0"], r=2)
    with pytest.raises(TypeError, match="must be a lorac.Module"):
        lorac.inject_lora([], ["0"], r=2)


@pytest.mark.torch
@pytest.mark.parametrize("targets", [["q"], ["0.q", "head"], r".*\.v", ["layers.1.v", "emb"]])
def test_selects_the_modules_peft_selects(targets):
    """Same target_modules, same chosen modules as PEFT on the equivalent torch model."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class TBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    class TNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6)
            self.layers = torch.nn.Sequential(TBlock(), TBlock())
            self.head = torch.nn.Linear(6, 2)

    pmodel = peft.get_peft_model(TNet(), peft.LoraConfig(r=2, target_modules=targets))
    chosen = sorted(name.removeprefix("base_model.model.") for name, m in pmodel.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer))
    assert adapted(lorac.inject_lora(Net(), targets, r=2)) == chosen


CASES = {
    "linear": (lorac.Linear, (5, 4), dict(lora_dropout=0.25)),
    "linear-fifo-f64": (lorac.Linear, (5, 4), dict(fan_in_fan_out=True, bias=False, dtype=np.float64)),
    "linear-nomerge": (lorac.Linear, (3, 3), dict(merge_weights=False)),
    "embedding": (lorac.Embedding, (7, 4), dict(padding_idx=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_rebuilt_layer_is_a_constructed_layer(case, use_rslora):
    """inject_lora clones the layer instead of calling the constructor (which would redraw the
    base weight): the result must be indistinguishable from a layer built with r > 0."""
    cls, sizes, kwargs = CASES[case]
    dropout = kwargs.get("lora_dropout", 0.0)
    built = cls(*sizes, r=3, lora_alpha=5, use_rslora=use_rslora, rng=0, **kwargs)
    plain = cls(*sizes, r=0, rng=1, **kwargs)
    model = lorac.inject_lora(lorac.Sequential(plain), ["0"], r=3, lora_alpha=5, lora_dropout=dropout,
                              use_rslora=use_rslora, rng=2, fan_in_fan_out=None)
    rebuilt = model[0]
    assert type(rebuilt) is type(built)
    assert state_attributes(rebuilt) == state_attributes(built)
    assert [(k, v.shape, v.dtype, v.requires_grad) for k, v in rebuilt.named_parameters()] == \
        [(k, v.shape, v.dtype, v.requires_grad) for k, v in built.named_parameters()]
    built.load_state_dict(rebuilt.state_dict())
    rng = np.random.default_rng(0)
    for name in ("lora_A", "lora_B"):
        value = rng.standard_normal(getattr(built, name).shape)
        getattr(built, name).data[...] = getattr(rebuilt, name).data[...] = value
    x = np.array([[0, 1, 2]]) if cls is lorac.Embedding else rng.standard_normal((2, 3, sizes[0])).astype(built.dtype)
    built.eval(), rebuilt.eval()
    np.testing.assert_array_equal(rebuilt(x), built(x))
    assert repr(rebuilt) == repr(built)

"""Named adapters on Linear, Embedding and MergedLinear (lorac/layers/adapters.py)
and the model-level API (lorac/adapters.py): adding, choosing, summing,
disabling, merging, hot swap through files, merge_and_unload / unload,
weighted combinations, rsLoRA."""

import numpy as np
import pytest

from layer_state import state_attributes
from reference import central_difference

import lorac
from lorac.adapters import adapter_layers

KINDS = ["linear", "embedding", "merged"]


def make_layer(kind, r=2, dtype=np.float64, seed=0, **kwargs):
    if kind == "linear":
        return lorac.Linear(6, 5, r=r, lora_alpha=4, dtype=dtype, rng=seed, **kwargs)
    if kind == "embedding":
        return lorac.Embedding(7, 5, r=r, lora_alpha=4, dtype=dtype, rng=seed, **kwargs)
    return lorac.MergedLinear(6, 6, r=r, lora_alpha=4, enable_lora=(True, False, True), dtype=dtype, rng=seed,
                              **kwargs)


def make_input(kind, rng, lead=(4,)):
    if kind == "embedding":
        return rng.integers(0, 7, lead)
    return rng.standard_normal(lead + (6,))


def randomize(layer, seed=1):
    rng = np.random.default_rng(seed)
    for name, p in layer.named_parameters():
        if "lora_" in name:
            p.data[...] = rng.standard_normal(p.shape)


def delta(layer, name):
    """s B A of adapter `name` as an (out, in) float64 matrix (reference)."""
    A, B = (p.data.astype(np.float64) for p in layer.adapter_parameters(name))
    s = layer._scaling_of(name)
    if isinstance(layer, lorac.MergedLinear):
        og = layer.out_features // len(layer.enable_lora)
        out = np.zeros((layer.out_features, layer.in_features))
        r = A.shape[0] // sum(layer.enable_lora)
        for e, g in enumerate(i for i, on in enumerate(layer.enable_lora) if on):
            out[g * og:(g + 1) * og] = s * B[e * og:(e + 1) * og] @ A[e * r:(e + 1) * r]
        return out
    return s * B @ A


def base_weight(layer):
    """The base weight as (out, in) float64."""
    w = layer.weight.data.astype(np.float64)
    return w if isinstance(layer, (lorac.Linear, lorac.MergedLinear)) and not layer.fan_in_fan_out else w.T


def reference_forward(layer, x, names):
    """base + sum of the named adapters' deltas, in float64."""
    W = base_weight(layer) + sum((delta(layer, n) for n in names), np.zeros_like(base_weight(layer)))
    if isinstance(layer, lorac.Embedding):
        return W.T[x]
    y = np.asarray(x, dtype=np.float64) @ W.T
    return y + layer.bias.data if layer.bias is not None else y


# -- the default adapter and loralib compatibility ------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_default_adapter_keeps_loralib_names(kind):
    layer = make_layer(kind)
    assert layer.adapter_names == ("default",) and layer.active_adapters == ("default",)
    assert layer._plain and layer.merged_adapters == ()
    assert [k for k in layer.state_dict() if "lora" in k] == ["lora_A", "lora_B"]
    config = layer.adapter_config("default")
    assert (config.r, config.lora_alpha, config.scaling) == (2, 4.0, 2.0)
    plain = make_layer(kind, r=0)
    assert plain.adapter_names == () and plain.active_adapters == ()


@pytest.mark.parametrize("kind", KINDS)
def test_add_adapter_registers_parameters(kind):
    layer = make_layer(kind)
    layer.add_adapter("task1", r=3, lora_alpha=6, use_rslora=True)
    A, B = layer.adapter_parameters("task1")
    groups = 2 if kind == "merged" else 1
    assert A is layer.lora_A_task1 and B is layer.lora_B_task1
    assert A.shape[0] == 3 * groups and B.shape[1] == 3
    assert layer.adapter_names == ("default", "task1") and layer.active_adapters == ("default",)
    assert layer.adapter_config("task1").scaling == pytest.approx(6 / np.sqrt(3))
    assert layer._plain  # not active: loralib's fast path still applies
    assert "lora_A_task1" in layer.state_dict() and not layer.weight.requires_grad
    if kind == "embedding":
        assert np.all(A.data == 0)
    else:
        assert np.all(B.data == 0)


def test_add_adapter_to_a_plain_layer_freezes_its_weight():
    layer = lorac.Linear(4, 3, r=0)
    assert layer.weight.requires_grad
    layer.add_adapter("x", r=2)
    assert not layer.weight.requires_grad and layer.r == 0
    layer.set_adapter("x")
    assert not layer._plain


@pytest.mark.parametrize("name,kwargs,error,match", [
    ("__base__", {}, ValueError, "identifier other than '__base__'"),
    ("a.b", {}, ValueError, "identifier"),
    (3, {}, TypeError, "must be a str"),
    ("default", {}, ValueError, "constructor's adapter"),
    ("x", dict(r=0), ValueError, "r must be >= 1"),
    ("x", dict(r=2, lora_dropout=1.5), ValueError, "lora_dropout"),
    ("x", dict(r=2, init="xavier"), ValueError, "init must be one of"),
    ("x", dict(r=2, init="pissa"), ValueError, "init=.pissa. replaces the shared base weight"),
    ("x", dict(r=2, use_rslora=1), TypeError, "use_rslora must be a bool"),
])
def test_add_adapter_errors(name, kwargs, error, match):
    layer = make_layer("linear")
    kwargs.setdefault("r", 2)
    with pytest.raises(error, match=match):
        layer.add_adapter(name, **kwargs)
    assert layer.adapter_names == ("default",)


def test_add_adapter_layer_specific_errors():
    layer = make_layer("linear")
    layer.add_adapter("x", r=2)
    with pytest.raises(ValueError, match="already has an adapter 'x'"):
        layer.add_adapter("x", r=2)
    with pytest.raises(ValueError, match="no dropout"):
        make_layer("embedding").add_adapter("x", r=2, lora_dropout=0.1)
    with pytest.raises(ValueError, match="no group to adapt"):
        lorac.MergedLinear(4, 4, r=2, enable_lora=(False, False)).add_adapter("x", r=2)


# -- forward and backward with named / several active adapters ----------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("active", [["x"], ["default", "x"], ["x", "y", "default"], []])
def test_active_adapters_sum(kind, active):
    layer = make_layer(kind)
    layer.add_adapter("x", r=3, lora_alpha=2, init=False)
    layer.add_adapter("y", r=1, lora_alpha=5, use_rslora=True, init=False)
    randomize(layer)
    layer.set_adapter(active)
    x = make_input(kind, np.random.default_rng(0), (2, 3))
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        np.testing.assert_allclose(layer(x), reference_forward(layer, x, active) if mode == "train"
                                   else reference_forward_merged(layer, x), rtol=1e-10, atol=1e-10)


def reference_forward_merged(layer, x):
    """A merged layer's output: its (merged) weight, no branch."""
    W = base_weight(layer)
    if isinstance(layer, lorac.Embedding):
        return W.T[x]
    return np.asarray(x) @ W.T + (layer.bias.data if layer.bias is not None else 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("active", [["x"], ["default", "x", "y"]])
def test_gradients_of_several_adapters_match_finite_differences(kind, active):
    layer = make_layer(kind)
    layer.add_adapter("x", r=3, lora_alpha=2, init=False)
    layer.add_adapter("y", r=1, lora_alpha=5, use_rslora=True, init=False)
    randomize(layer)
    layer.set_adapter(active)
    if kind != "embedding":
        layer.bias.requires_grad = False
    rng = np.random.default_rng(4)
    x = make_input(kind, rng, (2, 3))
    G = rng.standard_normal((2, 3, 6 if kind == "merged" else 5))
    layer.zero_grad()
    layer(x)
    dx = layer.backward(G)

    def loss():
        return float(np.sum(layer(x) * G))

    for name in ("x", "y", "default"):
        for p in layer.adapter_parameters(name):
            if name in active:
                np.testing.assert_allclose(p.grad, central_difference(loss, p.data), rtol=1e-6, atol=1e-6)
            else:
                assert p.grad is None  # inactive adapters get no gradient array
    if kind != "embedding":
        np.testing.assert_allclose(dx, central_difference(loss, x), rtol=1e-6, atol=1e-6)


def test_frozen_adapter_among_several_gets_no_gradient():
    layer = make_layer("linear")
    layer.add_adapter("x", r=3, init=False)
    layer.set_adapter(["default", "x"])
    layer.lora_A.requires_grad = False
    layer.lora_B_x.requires_grad = False
    layer(np.ones((2, 6)))
    layer.backward(np.ones((2, 5)))
    assert layer.lora_A.grad is None and layer.lora_B_x.grad is None
    assert layer.lora_B.grad is not None and layer.lora_A_x.grad is not None


def test_training_several_adapters_needs_equal_dropout():
    layer = lorac.Linear(4, 3, r=2, lora_dropout=0.1)
    layer.add_adapter("x", r=2, lora_dropout=0.2)
    layer.set_adapter(["default", "x"])
    with pytest.raises(ValueError, match="different lora_dropout"):
        layer(np.ones((1, 4), np.float32))
    layer.eval()
    layer.unmerge()
    layer(np.ones((1, 4), np.float32))  # no dropout in eval


def test_backward_after_set_adapter_raises():
    layer = make_layer("linear")
    layer.add_adapter("x", r=2)
    layer.set_adapter("x")
    layer(np.ones((2, 6)))
    layer.set_adapter("default")
    with pytest.raises(RuntimeError, match="adapters changed"):
        layer.backward(np.ones((2, 5)))


# -- disable, merge, set, delete ------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapters_gives_the_base_output_exactly(kind):
    layer = make_layer(kind, merge_weights=False)
    layer.add_adapter("x", r=3, init=False)
    randomize(layer)
    layer.set_adapter(["default", "x"])
    plain = make_layer(kind, r=0)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "lora" not in k})
    x = make_input(kind, np.random.default_rng(0))
    with layer.disable_adapters():
        np.testing.assert_array_equal(layer(x), plain(x))
        with layer.disable_adapters():  # nested
            np.testing.assert_array_equal(layer(x), plain(x))
        np.testing.assert_array_equal(layer(x), plain(x))
    assert not np.allclose(layer(x), plain(x))
    np.testing.assert_allclose(layer(x), reference_forward(layer, x, ["default", "x"]), rtol=1e-10, atol=1e-10)


def test_disable_adapters_unmerges_and_remerges():
    layer = make_layer("linear")
    randomize(layer)
    layer.eval()
    assert layer.merged_adapters == ("default",)
    x = np.random.default_rng(0).standard_normal((3, 6))
    merged_out = layer(x)
    with layer.disable_adapters():
        assert layer.merged_adapters == ()
        np.testing.assert_allclose(layer(x), reference_forward(layer, x, []), rtol=1e-12, atol=1e-12)
        layer.train()  # deferred: stays unmerged inside
    assert layer.training and layer.merged_adapters == ()
    with layer.disable_adapters():
        layer.eval()
    assert layer.merged_adapters == ("default",)
    np.testing.assert_allclose(layer(x), merged_out, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="disabled"), layer.disable_adapters():
        layer.merge()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_named_adapters_and_state_dict_stays_unmerged(kind):
    layer = make_layer(kind, merge_weights=False)
    layer.add_adapter("x", r=3, init=False)
    randomize(layer)
    layer.set_adapter(["default", "x"])
    x = make_input(kind, np.random.default_rng(0))
    before, w0 = layer(x), layer.weight.data.copy()
    layer.merge(["x"])
    assert layer.merged_adapters == ("x",) and layer.merged
    np.testing.assert_allclose(layer(x), before, rtol=1e-10, atol=1e-10)  # x via the weight, default via the branch
    np.testing.assert_allclose(layer.state_dict()["weight"], w0, rtol=1e-12, atol=1e-12)
    layer.merge()
    assert layer.merged_adapters == ("x", "default")
    np.testing.assert_allclose(layer(x), before, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    assert layer.merged_adapters == () and not layer.merged
    np.testing.assert_allclose(layer.weight.data, w0, rtol=1e-12, atol=1e-12)


def test_set_adapter_keeps_a_merged_layer_merged():
    layer = make_layer("linear")
    layer.add_adapter("x", r=3, init=False)
    randomize(layer)
    layer.eval()
    x = np.random.default_rng(0).standard_normal((2, 6))
    layer.set_adapter("x")
    assert layer.merged_adapters == ("x",)
    np.testing.assert_allclose(layer(x), x @ base_weight(layer).T + layer.bias.data, rtol=1e-12)  # merged: no branch
    layer.unmerge()
    np.testing.assert_allclose(layer(x), reference_forward(layer, x, ["x"]), rtol=1e-10, atol=1e-10)


def test_delete_adapter():
    layer = make_layer("linear")
    layer.add_adapter("x", r=3)
    layer.add_adapter("y", r=1)
    with pytest.raises(ValueError, match="cannot be deleted"):
        layer.delete_adapter("default")
    layer.set_adapter("x")
    with pytest.raises(ValueError, match="is active"):
        layer.delete_adapter("x")
    layer.merge(["y"])
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("y")
    layer.unmerge()
    layer.delete_adapter("y")
    assert layer.adapter_names == ("default", "x") and "lora_A_y" not in layer.state_dict()
    with pytest.raises(ValueError, match="no adapter 'y'"):
        layer.delete_adapter("y")


# -- model level -----------------------------------------------------------------------------
class Net(lorac.Module):
    """Embedding -> Linear -> ReLU -> MergedLinear, every kind of LoRA layer."""

    def __init__(self, r=2, merge_weights=True, seed=0):
        super().__init__()
        self.emb = lorac.Embedding(11, 6, r=r, lora_alpha=4, rng=seed, dtype=np.float64, merge_weights=merge_weights)
        self.proj = lorac.Linear(6, 6, r=r, lora_alpha=4, rng=seed + 1, dtype=np.float64, merge_weights=merge_weights)
        self.act = lorac.ReLU()
        self.qkv = lorac.MergedLinear(6, 9, r=r, lora_alpha=4, enable_lora=(True, False, True), rng=seed + 2,
                                      dtype=np.float64, merge_weights=merge_weights)

    def forward(self, idx):
        return self.qkv(self.act(self.proj(self.emb(idx))))


def net_with_adapters(merge_weights=True):
    net = Net(merge_weights=merge_weights)
    lorac.add_adapter(net, "a", r=3, lora_alpha=6, init=False, rng=5)
    lorac.add_adapter(net, "b", r=1, lora_alpha=2, use_rslora=True, init=False, rng=6, target_modules=["proj", "qkv"])
    randomize(net)
    return net


def test_model_level_add_set_delete():
    net = net_with_adapters()
    assert lorac.adapter_names(net) == ("default", "a", "b")
    assert net.emb.adapter_names == ("default", "a") and net.qkv.adapter_names == ("default", "a", "b")
    lorac.set_adapter(net, ["a", "b"])
    assert net.emb.active_adapters == ("a",) and net.proj.active_adapters == ("a", "b")
    with pytest.raises(ValueError, match="no adapter 'zzz'"):
        lorac.set_adapter(net, "zzz")
    with pytest.raises(ValueError, match="layer 'proj'.*is active"):
        lorac.delete_adapter(net, "b")
    assert net.proj.adapter_names == ("default", "a", "b")  # checked everywhere before deleting anything
    lorac.set_adapter(net, "default")
    lorac.delete_adapter(net, "b")
    assert lorac.adapter_names(net) == ("default", "a")
    with pytest.raises(ValueError, match="already has an adapter 'a'"):
        lorac.add_adapter(net, "a", r=2)
    with pytest.raises(ValueError, match="matched no LoRA layer"):
        lorac.add_adapter(net, "c", r=2, target_modules=["nothing"])
    with pytest.raises(ValueError, match="holds an adapter yet"):
        lorac.add_adapter(lorac.Sequential(lorac.Linear(3, 3)), "c", r=2)


def test_model_level_add_adapter_takes_pefts_selection_fields():
    net = Net()
    lorac.add_adapter(net, "p", r=2, lora_alpha=3, exclude_modules=["emb"], rank_pattern={"qkv": 4},
                      alpha_pattern={"proj": 5})
    assert "p" not in net.emb.adapter_names
    assert (net.proj.adapter_config("p").r, net.proj.adapter_config("p").lora_alpha) == (2, 5)
    assert (net.qkv.adapter_config("p").r, net.qkv.adapter_config("p").lora_alpha) == (4, 3)
    with pytest.warns(RuntimeWarning, match=r"add_adapter: rank_pattern keys \['emb'\] match no adapted layer"):
        lorac.add_adapter(net, "q", r=2, target_modules=r"proj|qkv", rank_pattern={"emb": 3})
    assert lorac.adapter_names(net) == ("default", "p", "q")
    state = {k: v.copy() for k, v in net.state_dict().items()}
    for kwargs, error, match in [
        ({"layers_to_transform": [0]}, ValueError, "need target_modules"),
        ({"exclude_modules": ["emb", "proj", "qkv"]}, ValueError, r"holds an adapter yet \(after exclude_modules\)"),
        ({"rank_pattern": {"qkv": 0}}, ValueError, r"rank_pattern\['qkv'\] must be >= 1"),
        ({"target_modules": ["proj"], "alpha_pattern": {"proj": "x"}}, TypeError, "must be a real number"),
    ]:
        with pytest.raises(error, match=match):
            lorac.add_adapter(net, "z", r=2, **kwargs)
    assert lorac.adapter_names(net) == ("default", "p", "q")
    assert all(np.array_equal(v, state[k]) for k, v in net.state_dict().items())


def test_model_level_disable_and_merge():
    net = net_with_adapters(merge_weights=False)
    idx = np.random.default_rng(0).integers(0, 11, (2, 3))
    lorac.set_adapter(net, ["default", "a"])
    adapted = net(idx)
    with lorac.disable_adapters(net):
        base = net(idx)
    lorac.merge_adapter(net, ["a"])
    assert net.proj.merged_adapters == ("a",)
    np.testing.assert_allclose(net(idx), adapted, rtol=1e-10, atol=1e-10)
    with lorac.disable_adapters(net):
        np.testing.assert_allclose(net(idx), base, rtol=1e-12, atol=1e-12)
    lorac.unmerge_adapter(net)
    assert all(not layer.merged_adapters for _, layer in adapter_layers(net))
    np.testing.assert_allclose(net(idx), adapted, rtol=1e-12, atol=1e-12)


def test_lora_state_dict_of_one_adapter():
    net = net_with_adapters()
    sd = lorac.lora_state_dict(net, adapter="b")
    assert list(sd) == ["proj.lora_A", "proj.lora_B", "qkv.lora_A", "qkv.lora_B"]
    np.testing.assert_array_equal(sd["proj.lora_A"], net.proj.lora_A_b.data)
    assert list(lorac.lora_state_dict(net, bias="lora_only", adapter="b")) == [
        "proj.lora_A", "proj.lora_B", "proj.bias", "qkv.lora_A", "qkv.lora_B", "qkv.bias"]
    assert "qkv.bias" in lorac.lora_state_dict(net, bias="all", adapter="a")
    everything = lorac.lora_state_dict(net)
    assert "proj.lora_A_b" in everything and "emb.lora_B_a" in everything and "proj.lora_A" in everything
    with pytest.raises(ValueError, match="no LoRA layer of the model holds an adapter 'zz'"):
        lorac.lora_state_dict(net, adapter="zz")


# -- files and hot swap ------------------------------------------------------------------------
def test_save_and_load_adapter_round_trip(tmp_path):
    net = net_with_adapters()
    lorac.save_adapter(net, tmp_path / "a.safetensors", "a")
    other = Net(seed=0)
    other.load_state_dict({k: v for k, v in net.state_dict().items() if "lora" not in k}, strict=False)
    result = lorac.load_adapter(other, tmp_path / "a.safetensors", "task")
    assert result == ([], [])
    assert other.proj.adapter_config("task") == net.proj.adapter_config("a")  # alpha from the metadata
    lorac.set_adapter(net, "a")
    lorac.set_adapter(other, "task")
    idx = np.random.default_rng(0).integers(0, 11, (3,))
    np.testing.assert_allclose(other(idx), net(idx), rtol=1e-12, atol=1e-12)


def test_hot_swap_copies_in_place_without_touching_the_base(tmp_path):
    net = net_with_adapters(merge_weights=False)
    lorac.save_adapter(net, tmp_path / "b.safetensors", "b")
    lorac.save_adapter(net, tmp_path / "a.safetensors", "a")
    arrays = {id(p.data): p.data.ctypes.data for p in net.parameters()}
    weights = {k: v.copy() for k, v in net.state_dict().items() if "lora" not in k}
    lorac.load_adapter(net, tmp_path / "b.safetensors", "b")  # same shapes: copied in place
    for p in (net.proj.lora_A_b, net.proj.lora_B_b, net.qkv.lora_A_b):
        assert id(p.data) in arrays and arrays[id(p.data)] == p.data.ctypes.data
    for key, value in weights.items():  # unmerged: the base weights are not re-merged
        np.testing.assert_array_equal(net.state_dict()[key], value)


def test_hot_swap_of_a_merged_adapter(tmp_path):
    src = net_with_adapters(merge_weights=False)
    dst = net_with_adapters(merge_weights=False)
    rng = np.random.default_rng(9)
    for p in src.parameters():
        p.data[...] += rng.standard_normal(p.shape) * 0.1 if p.dtype == np.float64 else 0
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if "lora" not in k}, strict=False)
    lorac.save_adapter(src, tmp_path / "a.safetensors", "a")
    lorac.set_adapter(dst, "a")
    lorac.merge_adapter(dst)
    A = dst.proj.lora_A_a.data
    lorac.load_adapter(dst, tmp_path / "a.safetensors", "a")
    assert dst.proj.lora_A_a.data is A and dst.proj.merged_adapters == ("a",)
    lorac.set_adapter(src, "a")
    idx = np.arange(5)
    np.testing.assert_allclose(dst(idx), src(idx), rtol=1e-10, atol=1e-10)


def test_load_adapter_errors(tmp_path):
    net = net_with_adapters()
    lorac.save(lorac.lora_state_dict(net, adapter="a"), tmp_path / "plain.safetensors")  # no metadata
    with pytest.raises(ValueError, match="does not record lora_alpha .* give lora_alpha="):
        lorac.load_adapter(net, tmp_path / "plain.safetensors", "new")
    assert "new" not in lorac.adapter_names(net)
    lorac.load_adapter(net, tmp_path / "plain.safetensors", "new", lora_alpha=3)
    assert net.emb.adapter_config("new").lora_alpha == 3
    lorac.save_adapter(net, tmp_path / "b.safetensors", "b")
    with pytest.raises(lorac.StateDictKeyError, match="missing keys: 'emb.lora_A'"):
        lorac.load_adapter(net, tmp_path / "b.safetensors", "a")
    result = lorac.load_adapter(net, tmp_path / "b.safetensors", "a", strict=False)
    assert result.missing_keys == ["emb.lora_A", "emb.lora_B"]
    assert net.proj.adapter_config("a").r == 1  # another rank: reallocated
    bad = lorac.lora_state_dict(net, adapter="a")
    bad["proj.lora_A"] = bad["proj.lora_A"][:, :5]
    lorac.save(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="layer 'proj' .* needs lora_A"):
        lorac.load_adapter(net, tmp_path / "bad.safetensors", "a", lora_alpha=1)


# -- merge_and_unload, unload ---------------------------------------------------------------------
def test_merge_and_unload_takes_pefts_keywords(capsys):
    net = net_with_adapters()
    idx = np.random.default_rng(0).integers(0, 11, (2, 4))
    lorac.set_adapter(net, "a")
    expected = net(idx)
    lorac.set_adapter(net, "default")
    with pytest.raises(TypeError, match="not both"):
        lorac.merge_and_unload(net, names=["a"], adapter_names=["a"])
    plain = lorac.merge_and_unload(net, adapter_names=["a"], progressbar=True)
    np.testing.assert_allclose(plain(idx), expected, rtol=1e-10, atol=1e-10)
    assert "Unloading and merging model" in capsys.readouterr().err


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unload(safe_merge):
    net = net_with_adapters()
    lorac.set_adapter(net, ["default", "b"])
    net.eval()
    idx = np.random.default_rng(0).integers(0, 11, (2, 4))
    adapted = net(idx)
    plain = lorac.merge_and_unload(net, safe_merge=safe_merge)
    assert plain is net
    for name, layer in (("emb", net.emb), ("proj", net.proj), ("qkv", net.qkv)):
        fresh = type(layer)(*((11, 6) if name == "emb" else (6, 6) if name == "proj" else (6, 9)), r=0,
                            dtype=np.float64, **({"enable_lora": (True, False, True)} if name == "qkv" else {}))
        fresh.eval()
        assert state_attributes(layer) == state_attributes(fresh), name
        assert [k for k, _ in layer.named_parameters()] == [k for k, _ in fresh.named_parameters()]
        assert layer.weight.requires_grad
    np.testing.assert_allclose(net(idx), adapted, rtol=1e-10, atol=1e-10)


def test_safe_merge_refuses_non_finite_before_touching_weights():
    net = net_with_adapters()
    lorac.set_adapter(net, "a")
    net.qkv.lora_B_a.data[0, 0] = np.inf
    weights = {k: v.copy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'qkv' gives non-finite weights"):
        lorac.merge_and_unload(net, safe_merge=True)
    for key, value in weights.items():
        np.testing.assert_array_equal(net.state_dict()[key], value)
    assert net.emb.merged_adapters == () and net.emb.r == 2


def test_unload_restores_the_base_and_a_root_layer():
    net = net_with_adapters()
    net.eval()  # merged
    base = {k: v.copy() for k, v in net.state_dict().items() if "lora" not in k}
    lorac.unload(net)
    for key, value in base.items():
        np.testing.assert_allclose(net.state_dict()[key], value, rtol=1e-12, atol=1e-12)
    assert not any("lora" in k for k in net.state_dict())
    layer = make_layer("linear")
    plain = lorac.merge_and_unload(layer)
    assert plain is not layer and plain.r == 0 and isinstance(plain, lorac.Linear)


# -- weighted combinations -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_weighted_cat_is_exact(kind):
    net = lorac.Sequential(make_layer(kind))
    lorac.add_adapter(net, "x", r=3, lora_alpha=7, init=False, rng=2)
    lorac.add_adapter(net, "y", r=1, lora_alpha=2, use_rslora=True, init=False, rng=3)
    randomize(net)
    layer = net[0]
    lorac.add_weighted_adapter(net, ["default", "x", "y"], [0.5, -1.25, 2.0], "mix", combination="cat")
    expected = 0.5 * delta(layer, "default") - 1.25 * delta(layer, "x") + 2.0 * delta(layer, "y")
    np.testing.assert_allclose(delta(layer, "mix"), expected, rtol=1e-12, atol=1e-12)
    assert layer.adapter_config("mix").r == 6 and layer.adapter_config("mix").scaling == 1.0
    assert layer.active_adapters == ("default",)


@pytest.mark.parametrize("kind", KINDS)
def test_weighted_svd_applies_scaling_once_and_truncates_optimally(kind):
    net = lorac.Sequential(make_layer(kind, r=2))
    lorac.add_adapter(net, "x", r=2, lora_alpha=9, init=False, rng=2)
    randomize(net)
    layer = net[0]
    expected = 1.5 * delta(layer, "default") + 0.5 * delta(layer, "x")   # scalings 2 and 4.5, once
    lorac.add_weighted_adapter(net, ["default", "x"], [1.5, 0.5], "full", combination="svd", svd_rank=4)
    np.testing.assert_allclose(delta(layer, "full"), expected, rtol=1e-10, atol=1e-10)
    lorac.add_weighted_adapter(net, ["default", "x"], [1.5, 0.5], "top2", combination="svd")  # max rank: 2
    assert layer.adapter_config("top2").r == 2
    if kind == "merged":  # group by group
        blocks = [(0, 2), (4, 6)]
        for lo, hi in blocks:
            got, want = delta(layer, "top2")[lo:hi], expected[lo:hi]
            np.testing.assert_allclose(np.linalg.norm(got - want), _tail(want, 2), rtol=1e-8, atol=1e-10)
    else:
        np.testing.assert_allclose(np.linalg.norm(delta(layer, "top2") - expected), _tail(expected, 2),
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("combination, options", [("svd", {}), ("ties_svd", {"density": 0.6}),
                                                  ("svd", {"svd_rank": 9})])
def test_weighted_svd_clamp_clamps_each_groups_factors(kind, combination, options):
    net = lorac.Sequential(make_layer(kind, r=2))
    lorac.add_adapter(net, "x", r=2, lora_alpha=9, init=False, rng=2)
    randomize(net)
    layer, names = net[0], ["default", "x"]
    lorac.add_weighted_adapter(net, names, [1.5, -0.5], "raw", combination=combination, **options)
    lorac.add_weighted_adapter(net, names, [1.5, -0.5], "clamped", combination=combination, svd_clamp=0.8,
                               **options)
    (A, B), (cA, cB) = ((p.data for p in layer.adapter_parameters(n)) for n in ("raw", "clamped"))
    groups = 2 if kind == "merged" else 1   # make_layer's merged layer adapts two groups
    clamped_some = False
    for a, b, ca, cb in zip(*(np.split(m, groups) for m in (A, B, cA, cB))):   # group by group
        kept = int(np.count_nonzero(np.abs(a).sum(axis=1)))   # svd_rank 9 pads with zero directions
        hi = np.quantile(np.concatenate([b[:, :kept].ravel(), a[:kept].ravel()]), 0.8)
        assert hi > 0
        np.testing.assert_array_equal(ca, np.clip(a, -hi, hi))
        np.testing.assert_array_equal(cb, np.clip(b, -hi, hi))
        clamped_some |= bool(np.any(ca != a) or np.any(cb != b))
    assert clamped_some


def test_svd_clamp_quantile_by_hand():
    b = np.array([[-4.0, 1.0], [0.5, 2.0]])
    a = np.array([[3.0, -0.25], [0.0, 1.5]])
    # 8 entries sorted: -4, -0.25, 0, 0.5, 1, 1.5, 2, 3; the 0.75-quantile lies 0.25 of the way from 1.5 to 2
    cb, ca = lorac.adapters.clamp_factors(b, a, 0.75)
    np.testing.assert_array_equal(cb, [[-1.625, 1.0], [0.5, 1.625]])
    np.testing.assert_array_equal(ca, [[1.625, -0.25], [0.0, 1.5]])
    cb, ca = lorac.adapters.clamp_factors(b, a, 0.0)   # hi = -4 < 0: every entry becomes hi, as torch.clamp
    assert np.all(cb == -4.0) and np.all(ca == -4.0)
    assert lorac.adapters.clamp_factors(b, a, None) == (b, a)


def _tail(matrix, k):
    s = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)))


def test_weighted_linear_equal_ranks_only_and_its_cross_terms():
    net = lorac.Sequential(make_layer("linear", r=2))
    lorac.add_adapter(net, "x", r=2, lora_alpha=2, init=False, rng=2)
    lorac.add_adapter(net, "y", r=3, init=False, rng=3)
    randomize(net)
    layer = net[0]
    with pytest.raises(ValueError, match="'linear' needs equal ranks"):
        lorac.add_weighted_adapter(net, ["default", "y"], [1, 1], "bad", combination="linear")
    lorac.add_weighted_adapter(net, ["x"], [-0.7], "single", combination="linear")  # exact for one adapter
    np.testing.assert_allclose(delta(layer, "single"), -0.7 * delta(layer, "x"), rtol=1e-12, atol=1e-12)
    lorac.add_weighted_adapter(net, ["default", "x"], [1.0, -2.0], "lin", combination="linear")
    A0, B0 = (p.data for p in layer.adapter_parameters("default"))
    Ax, Bx = (p.data for p in layer.adapter_parameters("x"))
    c0, cx = np.sqrt(1.0 * layer._scaling_of("default")), np.sqrt(2.0 * layer._scaling_of("x"))
    # B A = sum_i w_i s_i B_i A_i + the cross terms c0 cx (B0 Ax - Bx A0) (signs from w_x s_x < 0)
    cross = c0 * cx * (B0 @ Ax - Bx @ A0)
    assert np.abs(cross).max() > 0.1
    expected = delta(layer, "default") - 2.0 * delta(layer, "x") + cross
    np.testing.assert_allclose(delta(layer, "lin"), expected, rtol=1e-10, atol=1e-10)


def test_weighted_adapter_where_a_layer_lacks_one():
    net = net_with_adapters()
    lorac.add_weighted_adapter(net, ["a", "b"], [0.5, 2.0], "mix")
    np.testing.assert_allclose(delta(net.emb, "mix"), 0.5 * delta(net.emb, "a"), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(delta(net.qkv, "mix"), 0.5 * delta(net.qkv, "a") + 2.0 * delta(net.qkv, "b"),
                               rtol=1e-12, atol=1e-12)
    assert net.emb.adapter_config("mix").r == 3 and net.qkv.adapter_config("mix").r == 4


def test_weighted_adapter_errors():
    net = net_with_adapters()
    with pytest.raises(ValueError, match="2 names but 1 weights"):
        lorac.add_weighted_adapter(net, ["a", "default"], [1], "mix")
    with pytest.raises(ValueError, match="combination must be one of"):
        lorac.add_weighted_adapter(net, ["a"], [1], "mix", combination="task_arithmetic")
    with pytest.raises(TypeError, match="not both"):
        lorac.add_weighted_adapter(net, ["a"], [1], "mix", combination="svd", combination_type="svd")
    lorac.add_weighted_adapter(net, ["a", "b"], [1, 1], "peft_style", combination_type="svd", svd_rank=2)
    assert net.proj.adapter_config("peft_style").r == 2   # svd's rank, not cat's 4
    lorac.add_weighted_adapter(net, ["a", "b"], [1, 1], "full", combination_type="svd", svd_rank=2,
                               svd_full_matrices=False)     # PEFT's keyword: the same truncated factors
    np.testing.assert_array_equal(net.proj.lora_A_full.data, net.proj.lora_A_peft_style.data)
    with pytest.raises(ValueError, match="svd_driver='gesvdj' selects a cuSOLVER routine"):
        lorac.add_weighted_adapter(net, ["a"], [1], "mix", combination="svd", svd_driver="gesvdj")
    with pytest.raises(TypeError, match="svd_full_matrices must be True or False"):
        lorac.add_weighted_adapter(net, ["a"], [1], "mix", combination="svd", svd_full_matrices="no")
    with pytest.raises(ValueError, match="already has an adapter 'b'"):
        lorac.add_weighted_adapter(net, ["a"], [1], "b")
    with pytest.raises(ValueError, match="weights"):
        lorac.add_weighted_adapter(net, ["a"], [float("nan")], "mix")
    with pytest.raises(ValueError, match="svd_clamp applies to the svd combinations"):
        lorac.add_weighted_adapter(net, ["a", "b"], [1, 1], "mix", combination="cat", svd_clamp=0.9)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="svd_clamp"):
            lorac.add_weighted_adapter(net, ["a", "b"], [1, 1], "mix", combination="svd", svd_clamp=bad)
    with pytest.raises(TypeError, match="svd_clamp"):
        lorac.add_weighted_adapter(net, ["a", "b"], [1, 1], "mix", combination="svd", svd_clamp="0.9")
    assert set(lorac.adapter_names(net)) == {"default", "a", "b", "peft_style", "full"}


# -- rsLoRA everywhere -----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda rs: lorac.Linear(4, 3, r=4, lora_alpha=6, use_rslora=rs),
    lambda rs: lorac.Embedding(5, 3, r=4, lora_alpha=6, use_rslora=rs),
    lambda rs: lorac.MergedLinear(4, 6, r=4, lora_alpha=6, enable_lora=(True, False), use_rslora=rs),
    lambda rs: lorac.MoLoRALinear(4, 3, r=4, num_experts=2, lora_alpha=6, use_rslora=rs),
])
def test_rslora_scaling_on_every_layer(make):
    assert make(True).scaling == pytest.approx(6 / 2) and make(False).scaling == pytest.approx(6 / 4)


def test_rslora_scaling_reaches_the_output():
    layer = lorac.Linear(4, 3, r=4, lora_alpha=6, use_rslora=True, dtype=np.float64, rng=0)
    randomize(layer)
    x = np.random.default_rng(0).standard_normal((2, 4))
    expected = x @ layer.weight.data.T + layer.bias.data + 3.0 * x @ layer.lora_A.data.T @ layer.lora_B.data.T
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12)


def test_peft_rebuild_drops_named_adapters():
    net = lorac.Sequential(lorac.Linear(4, 4, r=0, rng=0))
    lorac.add_adapter(net, "x", r=2, target_modules=["0"])
    lorac.inject_lora(net, ["0"], r=3)
    assert net[0].adapter_names == ("default",) and "lora_A_x" not in net[0].state_dict()


def test_save_adapter_npz_has_no_metadata(tmp_path):
    net = net_with_adapters()
    lorac.save_adapter(net, tmp_path / "b.npz", "b")
    assert sorted(lorac.load(tmp_path / "b.npz")) == ["proj.lora_A", "proj.lora_B", "qkv.lora_A", "qkv.lora_B"]
    with pytest.raises(ValueError, match="give lora_alpha="):
        lorac.load_adapter(net, tmp_path / "b.npz", "c")
    lorac.load_adapter(net, tmp_path / "b.npz", "b")  # an existing adapter keeps its alpha
    assert net.proj.adapter_config("b").lora_alpha == 2


@pytest.mark.parametrize("make", [
    lambda: lorac.Linear(6, 5, r=2, init=False, rng=0, dtype=np.float64),
    lambda: lorac.Embedding(7, 5, r=2, init=False, rng=0, dtype=np.float64),
    lambda: lorac.MergedLinear(6, 6, r=2, enable_lora=(True, False, True), init=False, rng=0, dtype=np.float64),
    lambda: lorac.DoRALinear(6, 5, r=2, init=False, rng=0, dtype=np.float64),
    lambda: lorac.DoRAEmbedding(7, 5, r=2, init=False, rng=0, dtype=np.float64),
    lambda: lorac.Linear(6, 5, r=2, init=False, rng=0, dtype=np.float64, lora_bias=True),
])
def test_reset_adapter_on_a_merged_layer_keeps_the_base_weight(make):
    """A merged adapter is taken out with its old values and merged with the new ones:
    the base weight (and bias) come back unchanged on train()."""
    layer = make()
    base = {k: v.copy() for k, v in layer.state_dict().items() if "lora_" not in k}
    layer.eval()
    layer.reset_adapter()
    assert layer.merged
    x = make_input("embedding" if hasattr(layer, "num_embeddings") else "linear", np.random.default_rng(0))
    merged_out = layer(x)
    layer.train()
    for key, value in base.items():
        np.testing.assert_allclose(getattr(layer, key).data, value, rtol=1e-12, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(layer(x), merged_out, rtol=1e-10, atol=1e-12)


def test_set_adapter_trains_the_active_adapters_and_freezes_the_others_as_peft():
    net = net_with_adapters()
    layer = net.qkv
    trains = {name: [p.requires_grad for p in layer.adapter_owned_parameters(name)] for name in layer.adapter_names}
    assert trains == {"default": [True, True], "a": [False, False], "b": [False, False]}   # added: frozen
    lorac.set_adapter(net, ["a", "b"])
    assert all(p.requires_grad for n in ("a", "b") for p in layer.adapter_owned_parameters(n))
    assert not any(p.requires_grad for p in layer.adapter_owned_parameters("default"))
    lorac.set_adapter(net, "a", inference_mode=True)
    assert not any(p.requires_grad for n in layer.adapter_names for p in layer.adapter_owned_parameters(n))
    with pytest.raises(TypeError, match="inference_mode must be a bool"):
        lorac.set_adapter(net, "a", inference_mode="yes")


def test_disable_adapters_freezes_them_inside_and_restores_each_flag():
    net = net_with_adapters()
    layer = net.qkv
    layer.lora_A.requires_grad = False   # LoRA-FA style: a user's own choice survives
    before = {n: p.requires_grad for n, p in layer.named_parameters()}
    with lorac.disable_adapters(net):
        assert not any(p.requires_grad for n, p in layer.named_parameters() if n.startswith("lora_"))
        status = lorac.get_model_status(net)
        assert status.enabled is False and set(status.requires_grad.values()) == {False}
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == before


def test_model_status_marks_layers_that_disagree():
    net = net_with_adapters()
    status = lorac.get_model_status(net)
    assert status.num_adapter_layers == len(lorac.get_layer_status(net)) >= 2
    assert status.active_adapters == ["default"] and status.merged_adapters == []
    assert status.available_adapters == ["a", "b", "default"] and status.enabled is True
    net.qkv.merge(["a"])
    net.qkv.lora_B.requires_grad = False
    status = lorac.get_model_status(net)
    assert status.merged_adapters == "irregular" and status.requires_grad["default"] == "irregular"
    net.qkv.set_adapter("b")
    assert lorac.get_model_status(net).active_adapters == "irregular"


def test_set_adapter_inside_disable_adapters_applies_on_exit():
    net = net_with_adapters()
    layer = net.qkv
    with lorac.disable_adapters(net):
        lorac.set_adapter(net, "a")
        assert not any(p.requires_grad for n in layer.adapter_names for p in layer.adapter_owned_parameters(n))
    assert [p.requires_grad for p in layer.adapter_owned_parameters("a")] == [True, True]
    assert not any(p.requires_grad for n in ("default", "b") for p in layer.adapter_owned_parameters(n))


def test_reset_adapter_leaves_other_merged_adapters_merged():
    net = net_with_adapters()
    layer = net.proj
    x = make_input("linear", np.random.default_rng(1))
    layer.merge(["a"])
    before = layer.weight.data.copy()
    layer.reset_adapter("b")
    assert layer.merged_adapters == ("a",)
    np.testing.assert_array_equal(layer.weight.data, before)
    layer.unmerge()
    lorac.set_adapter(net, "a")
    expected = layer(x)
    layer.merge()
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_merge_adapter_takes_pefts_keywords_and_safe_merge():
    net = net_with_adapters()
    net.proj.adapter_parameters("a")[1].data[0, 0] = np.nan
    before = {k: v.copy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"merge_adapter\(safe_merge=True\): merging \['a'\] into layer 'proj'"):
        lorac.merge_adapter(net, adapter_names=["a"], safe_merge=True)
    assert all(not layer.merged_adapters for _, layer in lorac.adapters.adapter_layers(net))
    assert all(np.array_equal(v, before[k], equal_nan=True) for k, v in net.state_dict().items())
    lorac.merge_adapter(net, adapter_names=["b"], safe_merge=True)
    assert net.proj.merged_adapters == ("b",) and net.emb.merged_adapters == ()

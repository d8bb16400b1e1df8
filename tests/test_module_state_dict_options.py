"""torch's optional arguments of the module walk and the state dict:
named_modules(memo, prefix, remove_duplicate), named_parameters /
named_buffers(remove_duplicate), state_dict(destination=, prefix=,
keep_vars=) and load_state_dict(assign=) -- names and keys against torch on
models of the same shape (a shared child, a tied parameter)."""

import numpy as np
import pytest

import lorac


class SharedChild(lorac.Module):
    """One LoRA Linear reachable as `a` and as `b`, and a parameter tied
    between `head` and `tail`."""

    def __init__(self):
        super().__init__()
        self.a = lorac.Linear(3, 3, r=2, rng=0, dtype=np.float64)
        self.b = self.a
        self.head = lorac.Linear(3, 2, rng=1, dtype=np.float64)
        self.tail = lorac.Linear(3, 2, rng=2, dtype=np.float64)
        self.tail.weight = self.head.weight


def torch_twin():
    torch = pytest.importorskip("torch")

    class TorchShared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.a.lora_A = torch.nn.Parameter(torch.zeros(2, 3))  # loralib's names, in its order
            self.a.lora_B = torch.nn.Parameter(torch.zeros(3, 2))
            self.b = self.a
            self.head = torch.nn.Linear(3, 2)
            self.tail = torch.nn.Linear(3, 2)
            self.tail.weight = self.head.weight

    return TorchShared()


def names(pairs):
    return [name for name, _ in pairs]


@pytest.mark.torch
@pytest.mark.parametrize("remove_duplicate", [True, False])
def test_walks_list_shared_modules_and_parameters_as_torch(remove_duplicate):
    ours, theirs = SharedChild(), torch_twin()
    assert names(ours.named_modules(remove_duplicate=remove_duplicate)) == \
        names(theirs.named_modules(remove_duplicate=remove_duplicate))
    assert len(list(ours.modules(remove_duplicate=remove_duplicate))) == \
        len(list(theirs.modules(remove_duplicate=remove_duplicate)))
    assert names(ours.named_parameters(prefix="m", remove_duplicate=remove_duplicate)) == \
        names(theirs.named_parameters(prefix="m", remove_duplicate=remove_duplicate))
    assert names(ours.named_modules(None, "root")) == names(theirs.named_modules(None, "root"))  # torch's order
    memo = {ours.a}
    assert "a" not in names(ours.named_modules(memo)) and ours.head in memo


def test_named_buffers_remove_duplicate():
    model = lorac.Sequential(lorac.Module(), lorac.Module())
    shared = np.zeros(2)
    model[0].register_buffer("x", shared)
    model[1].register_buffer("x", shared)
    assert names(model.named_buffers()) == ["0.x"]
    assert names(model.named_buffers(remove_duplicate=False)) == ["0.x", "1.x"]


@pytest.mark.torch
def test_state_dict_lists_a_shared_module_under_both_paths_as_torch_and_loads_torchs():
    torch = pytest.importorskip("torch")
    ours, theirs = SharedChild(), torch_twin()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    incoming = {k: v.double().numpy() for k, v in theirs.state_dict().items()}
    assert ours.load_state_dict(incoming) == ([], [])  # strict: every key of torch's is ours
    for key, value in ours.state_dict().items():
        np.testing.assert_array_equal(value, incoming[key], err_msg=key)
    assert list(lorac.lora_state_dict(ours)) == ["a.lora_A", "a.lora_B", "b.lora_A", "b.lora_B"]


def test_state_dict_destination_prefix_and_keep_vars():
    layer = lorac.Linear(3, 2, r=1, rng=0)
    layer.register_buffer("steps", np.zeros(1, np.int64))
    destination = {"kept": 1}
    out = layer.state_dict(destination=destination, prefix="enc.")
    assert out is destination and list(out) == ["kept", "enc.weight", "enc.bias", "enc.lora_A", "enc.lora_B",
                                                 "enc.steps"]
    kept = layer.state_dict(keep_vars=True)
    assert all(kept[name] is getattr(layer, name) for name in ("weight", "bias", "lora_A", "lora_B"))
    assert kept["steps"] is layer.steps
    other = lorac.Linear(3, 2, r=1, rng=5)
    other.register_buffer("steps", np.ones(1, np.int64))
    assert other.load_state_dict(kept) == ([], [])  # Parameters load as their data
    np.testing.assert_array_equal(other.lora_A.data, layer.lora_A.data)
    assert other.steps[0] == 0


def test_keep_vars_of_a_merged_layer_gives_the_unmerged_weight_as_an_array():
    layer = lorac.Linear(3, 2, r=1, rng=0, dtype=np.float64)
    layer.lora_B.data[...] = 1.0
    unmerged = layer.weight.data.copy()
    layer.eval()
    assert layer.merged
    kept = layer.state_dict(keep_vars=True)
    assert isinstance(kept["weight"], np.ndarray)
    np.testing.assert_allclose(kept["weight"], unmerged, rtol=0, atol=1e-15)
    assert kept["lora_A"] is layer.lora_A


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.state_dict({}), TypeError, "positional"),
    (lambda m: m.state_dict(prefix=3), TypeError, "prefix must be a str, got int"),
    (lambda m: m.load_state_dict(m.state_dict(), assign=1), TypeError, "assign must be a bool, got int"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(lorac.Linear(3, 2, r=1, rng=0))


def fresh_arrays(layer, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in layer.state_dict().items()}


def test_assign_takes_the_arrays_and_keeps_the_parameters():
    layer = lorac.Linear(4, 3, r=2, rng=0)
    params = dict(layer.named_parameters())
    optimizer = lorac.optim.SGD(layer.parameters(), lr=0.1)
    incoming = fresh_arrays(layer, 1)
    assert layer.load_state_dict(incoming, assign=True) == ([], [])
    for name, param in layer.named_parameters():
        assert param is params[name] and param.data is incoming[name]
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad  # kept, as torch's assign keeps it
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    y = layer(x)
    expected = x @ incoming["weight"].T + incoming["bias"] + \
        layer.scaling * (x @ incoming["lora_A"].T) @ incoming["lora_B"].T
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    layer.backward(np.ones_like(y))
    before = incoming["lora_B"].copy()
    optimizer.step()
    assert not np.array_equal(incoming["lora_B"], before)  # the model owns the arrays now, as in torch


@pytest.mark.parametrize("convert", [
    lambda a: a.astype(np.float64),
    lambda a: np.asfortranarray(a),
    lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
    lambda a: np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape),  # read-only
], ids=["other dtype", "fortran", "strided", "read-only"])
def test_assign_converts_arrays_it_cannot_take(convert):
    layer = lorac.Linear(4, 3, r=2, rng=0)
    incoming = {k: convert(v) for k, v in fresh_arrays(layer, 1).items()}
    layer.load_state_dict(incoming, assign=True)
    for name, param in layer.named_parameters():
        given = incoming[name]
        takeable = given.dtype == np.float32 and given.flags.c_contiguous and given.flags.writeable
        assert (param.data is given) == takeable and param.dtype == np.float32
        assert param.data.flags.c_contiguous and param.data.flags.writeable
        np.testing.assert_array_equal(param.data, incoming[name].astype(np.float32))


def test_assign_into_buffers_and_a_failed_assign_changes_nothing():
    model = lorac.Sequential(lorac.Linear(3, 2, rng=0), lorac.Module())
    model[1].register_buffer("count", np.zeros(2, np.int64))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    arrays = [p.data for p in model.parameters()] + [model[1].count]
    bad = {**fresh_arrays(model, 1), "1.count": np.zeros(3, np.int64)}
    with pytest.raises(ValueError, match=r"state_dict\['1.count'\]: size mismatch"):
        model.load_state_dict(bad, assign=True)
    assert [p.data for p in model.parameters()] + [model[1].count] == arrays  # same objects
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    good = {**fresh_arrays(model, 1), "1.count": np.arange(2, dtype=np.int64)}
    model.load_state_dict(good, assign=True)
    assert model[1].count is good["1.count"]


@pytest.mark.parametrize("keys", [("weight",), ("lora_A", "lora_B"), ("weight", "bias", "lora_A", "lora_B")])
def test_assign_into_a_merged_layer_equals_copying(keys):
    """Loading with assign into an eval (merged) layer gives what a copying
    load gives, and merging does not write into the caller's weight."""
    def merged_layer():
        layer = lorac.Linear(4, 3, r=2, rng=0, dtype=np.float64)
        layer.lora_B.data[...] = np.random.default_rng(3).standard_normal((3, 2))
        return layer.eval()

    copied, assigned = merged_layer(), merged_layer()
    incoming = {k: v for k, v in fresh_arrays(copied, 1).items() if k in keys}
    saved = {k: v.copy() for k, v in incoming.items()}
    copied.load_state_dict(incoming, strict=False)
    assigned.load_state_dict(incoming, strict=False, assign=True)
    assert assigned.merged
    np.testing.assert_array_equal(assigned.weight.data, copied.weight.data)
    for key, value in assigned.state_dict().items():
        np.testing.assert_allclose(value, copied.state_dict()[key], rtol=0, atol=1e-14, err_msg=key)
    for key, value in saved.items():
        np.testing.assert_array_equal(incoming[key], value, err_msg=f"{key} changed by the load")
    x = np.random.default_rng(4).standard_normal((2, 4))
    np.testing.assert_array_equal(assigned(x), copied(x))

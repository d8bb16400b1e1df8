"""Module.register_buffer: arrays that are state but not parameters (torch's buffers)."""

import copy

import numpy as np
import pytest

import lorac


class Normalized(lorac.Module):
    """A module with a persistent float buffer, a persistent int buffer, a
    non-persistent one and a LoRA child."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", np.arange(3, dtype=np.float64))
        self.register_buffer("count", np.array([7], dtype=np.int64))
        self.register_buffer("scratch", np.ones(2, np.float64), persistent=False)
        self.lin = lorac.Linear(3, 2, r=1, rng=0, dtype=np.float64)


def test_buffers_are_attributes_listed_and_saved_in_torchs_order():
    model = lorac.Sequential(Normalized(), lorac.ReLU())
    inner = model[0]
    assert inner.mean is inner._buffers["mean"] and inner.mean.tolist() == [0, 1, 2]
    assert [n for n, _ in model.named_buffers()] == ["0.mean", "0.count", "0.scratch"]
    assert [n for n, _ in inner.named_buffers(prefix="m", recurse=False)] == ["m.mean", "m.count", "m.scratch"]
    assert len(list(model.buffers())) == 3
    assert model.get_buffer("0.count") is inner.count
    assert list(model.state_dict()) == ["0.mean", "0.count", "0.lin.weight", "0.lin.bias", "0.lin.lora_A",
                                        "0.lin.lora_B"]
    assert model.state_dict()["0.mean"] is inner.mean  # live, like torch's detached tensors
    assert "mean" in dir(inner)
    assert not any(p is inner.mean for p in model.parameters())


@pytest.mark.torch
def test_state_dict_keys_match_torch():
    torch = pytest.importorskip("torch")

    class TorchNormalized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3, dtype=torch.float64))
            self.register_buffer("count", torch.zeros(1, dtype=torch.int64))
            self.register_buffer("scratch", torch.ones(2), persistent=False)
            self.lin = torch.nn.Linear(3, 2)

    tmodel = torch.nn.Sequential(TorchNormalized(), torch.nn.ReLU())
    ours = lorac.Sequential(Normalized(), lorac.ReLU())
    lorac.mark_only_lora_as_trainable(ours)
    tkeys = list(tmodel.state_dict())
    assert [k for k in ours.state_dict() if "lora_" not in k] == tkeys
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in tmodel.named_buffers()]
    tmodel[0].mean += 5
    tmodel[0].count += 2
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    result = ours.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["0.lin.lora_A", "0.lin.lora_B"]
    np.testing.assert_array_equal(ours[0].mean, [5, 5, 5])
    np.testing.assert_array_equal(ours[0].count, [2])


def test_load_state_dict_copies_into_buffers_in_place_and_checks_them():
    model = Normalized()
    mean, weight = model.mean, model.lin.weight.data.copy()
    sd = {k: np.array(v) for k, v in model.state_dict().items()}
    sd["mean"] = np.array([9.0, 8.0, 7.0])
    model.load_state_dict(sd)
    assert model.mean is mean and mean.tolist() == [9, 8, 7]
    with pytest.raises(KeyError, match=r"missing keys: 'count'"):
        model.load_state_dict({k: v for k, v in sd.items() if k != "count"})
    with pytest.raises(KeyError, match=r"unexpected keys: 'scratch'"):  # not persistent: not loaded
        model.load_state_dict(sd | {"scratch": np.zeros(2)})
    bad = sd | {"lin.weight": np.zeros_like(weight), "mean": np.zeros(4)}
    with pytest.raises(ValueError, match=r"state_dict\['mean'\]: size mismatch, expected shape \(3,\), found "
                                         r"shape \(4,\)"):
        model.load_state_dict(bad)
    np.testing.assert_array_equal(model.lin.weight.data, weight)  # nothing written
    with pytest.raises(TypeError, match=r"state_dict\['count'\]: expected a numeric array, got dtype <U1"):
        model.load_state_dict(sd | {"count": np.array(["x"])})


def test_to_casts_floating_buffers_only():
    model = Normalized()
    model.register_buffer("mask", np.array([True, False]))
    model.register_buffer("empty", None)
    assert model.to(np.float32) is model
    assert model.mean.dtype == np.float32 and model.scratch.dtype == np.float32
    assert model.count.dtype == np.int64 and model.mask.dtype == np.bool_ and model.empty is None
    assert model.state_dict()["mean"].dtype == np.float32
    assert "empty" not in model.state_dict() and [n for n, _ in model.named_buffers()].count("empty") == 0


def test_assigning_reregistering_and_deleting():
    model = Normalized()
    model.mean = np.ones(3, np.float32)
    assert model.mean.tolist() == [1, 1, 1] and "mean" in model._buffers and "mean" not in model.__dict__
    model.mean = None
    assert "mean" not in model.state_dict()
    with pytest.raises(TypeError, match=r"cannot assign list as buffer 'count' \(expected a numpy.ndarray or None\)"):
        model.count = [1]
    model.count = lorac.Parameter(np.zeros(1))  # a Parameter takes the name over, as in torch
    assert "count" not in model._buffers and "count" in model._parameters
    del model.scratch
    assert "scratch" not in dict(model.named_buffers())
    model.register_buffer("scratch", np.zeros(2))
    assert "scratch" in model.state_dict()  # registered anew: persistent by default
    fortran = np.asfortranarray(np.ones((2, 3)))
    model.register_buffer("grid", fortran)
    assert model.grid.flags.c_contiguous


def test_deepcopy_copies_buffers():
    model = Normalized()
    twin = copy.deepcopy(model)
    twin.mean[...] = -1
    assert model.mean.tolist() == [0, 1, 2]
    assert list(twin.state_dict()) == list(model.state_dict())
    assert twin._non_persistent_buffers == {"scratch"} and twin._non_persistent_buffers is not \
        model._non_persistent_buffers


@pytest.mark.parametrize("name,array,error,match", [
    (1, np.zeros(1), TypeError, r"name must be a str, got int"),
    ("a.b", np.zeros(1), KeyError, r"without '\.', got 'a.b'"),
    ("", np.zeros(1), KeyError, r"non-empty"),
    ("lin", np.zeros(1), KeyError, r"attribute 'lin' already exists"),
    ("forward", np.zeros(1), KeyError, r"attribute 'forward' already exists"),
    ("plain", np.zeros(1), KeyError, r"attribute 'plain' already exists"),
    ("x", [1.0], TypeError, r"register_buffer\('x'\): expected a numpy.ndarray or None, got list"),
    ("x", np.array(["s"]), TypeError, r"buffer 'x': expected a numeric or bool array, got dtype <U1"),
    ("x", np.array([None]), TypeError, r"got dtype object"),
])
def test_register_buffer_bad_input(name, array, error, match):
    model = Normalized()
    model.plain = 3
    before = dict(model._buffers)
    with pytest.raises(error, match=match):
        model.register_buffer(name, array)
    assert model._buffers == before


def test_get_buffer_names_what_exists():
    model = lorac.Sequential(Normalized())
    with pytest.raises(AttributeError, match=r"get_buffer\('0.nope'\): 'nope' is not a buffer of '0' \(Normalized\), "
                                             r"whose buffers are \['mean', 'count', 'scratch'\]"):
        model.get_buffer("0.nope")
    with pytest.raises(TypeError, match=r"get_buffer: target must be a dotted str path"):
        model.get_buffer(0)

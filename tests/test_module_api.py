"""torch.nn.Module / Sequential conveniences: get_submodule, get_parameter,
apply, dir(), train(mode) checking, and Sequential's list operations
(insert, extend, pop, item assignment and deletion), each against torch doing
the same thing on a model of the same shape."""

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")


class LoraBlock(lorac.Module):
    def __init__(self):
        super().__init__()
        self.proj = lorac.Linear(4, 4, r=2, rng=0)
        self.act = lorac.ReLU()
        self.head = lorac.Linear(4, 2, rng=1)
        self.scale = lorac.Parameter(np.ones(2, np.float32))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(4, 2)
        self.scale = torch.nn.Parameter(torch.ones(2))


def twin_models():
    return (lorac.Sequential(LoraBlock(), lorac.Linear(2, 3, rng=2)),
            torch.nn.Sequential(TorchBlock(), torch.nn.Linear(2, 3)))


def kinds(modules):
    """Class names, with lorac's and torch's spelled alike."""
    return [type(m).__name__.replace("Lora", "").replace("Torch", "") for m in modules]


@pytest.mark.parametrize("path", ["", "0", "0.proj", "0.act", "0.head", "1"])
def test_get_submodule_finds_what_torch_finds(path):
    ours, theirs = twin_models()
    assert kinds([ours.get_submodule(path)]) == kinds([theirs.get_submodule(path)])
    assert ours.get_submodule(path) is dict(ours.named_modules())[path]


@pytest.mark.parametrize("path", ["0.scale", "0.proj.weight", "0.head.bias", "1.weight"])
def test_get_parameter_finds_what_torch_finds(path):
    ours, theirs = twin_models()
    assert ours.get_parameter(path).shape == tuple(theirs.get_parameter(path).shape)
    assert ours.get_parameter(path) is dict(ours.named_parameters())[path]


@pytest.mark.parametrize("path, message", [
    ("2", "'2' is not a child of the model (Sequential), whose children are ['0', '1']"),
    ("0.proj.lora_A", "'lora_A' is a parameter of '0.proj' (Linear), not a module"),
    ("0.nope.head", "'nope' is not a child of '0' (LoraBlock), whose children are ['proj', 'act', 'head']"),
])
def test_get_submodule_names_the_missing_step(path, message):
    ours, theirs = twin_models()
    with pytest.raises(AttributeError):
        theirs.get_submodule(path.replace("lora_A", "weight"))
    with pytest.raises(AttributeError) as info:
        ours.get_submodule(path)
    assert str(info.value) == f"get_submodule({path!r}): {message}"


@pytest.mark.parametrize("path, message", [
    ("0.proj.nope", "'nope' is not a parameter of '0.proj' (Linear), whose parameters are "
                    "['weight', 'bias', 'lora_A', 'lora_B']"),
    ("0.act.weight", "'weight' is not a parameter of '0.act' (ReLU), whose parameters are []"),
    ("scale", "'scale' is not a parameter of the model (Sequential), whose parameters are []"),
])
def test_get_parameter_names_what_is_there(path, message):
    ours, theirs = twin_models()
    with pytest.raises(AttributeError):
        theirs.get_parameter(path)
    with pytest.raises(AttributeError) as info:
        ours.get_parameter(path)
    assert str(info.value) == f"get_parameter({path!r}): {message}"


@pytest.mark.parametrize("method", ["get_submodule", "get_parameter"])
def test_paths_must_be_strings(method):
    with pytest.raises(TypeError, match="must be a dotted str path, got int"):
        getattr(twin_models()[0], method)(0)


def test_apply_visits_children_first_in_torch_order():
    ours, theirs = twin_models()
    seen_ours, seen_theirs = [], []
    assert ours.apply(seen_ours.append) is ours
    theirs.apply(seen_theirs.append)
    assert kinds(seen_ours) == kinds(seen_theirs) == ["Linear", "ReLU", "Linear", "Block", "Linear", "Sequential"]


def test_apply_can_reinitialise_adapters():
    model = lorac.Sequential(lorac.Linear(4, 4, r=2, rng=0), lorac.ReLU(), lorac.Linear(4, 2, r=2, rng=1))

    def fill_b(module):
        if isinstance(module, lorac.Linear):
            module.lora_B.data[...] = 1.0

    model.apply(fill_b)
    assert all(np.all(model[i].lora_B.data == 1.0) for i in (0, 2))


def test_dir_lists_parameters_and_children_as_torch_does():
    ours, theirs = twin_models()
    for name in ("proj", "act", "head", "scale", "forward", "training"):
        assert (name in dir(ours[0])) == (name in dir(theirs[0])) == True  # noqa: E712
    assert "lora_A" in dir(ours[0].proj) and "weight" in dir(ours[1])
    assert "0" not in dir(ours) and "0" not in dir(theirs)  # not identifiers: torch leaves them out


def test_parameter_requires_grad_in_place_as_torch():
    ours, theirs = twin_models()
    for model in (ours, theirs):
        assert model.get_parameter("1.weight").requires_grad_(False) is model.get_parameter("1.weight")
        assert not model.get_parameter("1.weight").requires_grad
        assert model.get_parameter("1.weight").requires_grad_().requires_grad
    layer = ours[1]  # r = 0: a plain linear layer, its weight frozen by hand
    layer.weight.requires_grad_(False)
    layer(np.ones((1, 2), np.float32))
    layer.backward(np.ones((1, 3), np.float32))
    assert layer.weight.grad is None and layer.bias.grad is not None


@pytest.mark.parametrize("mode", ["eval", 1, None, np.bool_(False)])
def test_train_mode_must_be_a_bool_and_a_bad_one_changes_nothing(mode):
    model = lorac.Sequential(lorac.Linear(4, 4, r=2, rng=0))
    with pytest.raises(ValueError):
        torch.nn.Linear(2, 2).train(mode)
    with pytest.raises(ValueError, match=f"mode must be a bool, got {type(mode).__name__}"):
        model.train(mode)
    assert model.training and model[0].training and not model[0].merged


# -- Sequential's list operations -----------------------------------------

def twin_chains(n=3):
    """lorac and torch Sequentials of n layers; layer i maps 2 -> 2 and is tagged i."""
    ours, theirs = lorac.Sequential(), torch.nn.Sequential()
    for i in range(n):
        ours.append(tagged(i))
        theirs.append(torch.nn.Linear(2, 2 + i))  # out size as the tag
    return ours, theirs


def tagged(i):
    layer = lorac.Linear(2, 2, r=1, rng=i)
    layer.tag = i
    return layer


def layout(seq):
    """(child names, tags) of a Sequential, torch's out size standing in for the tag."""
    tags = [m.tag if isinstance(m, lorac.Module) else m.out_features - 2 for m in seq]
    return list(seq._modules), tags


@pytest.mark.parametrize("operation", [
    ("insert", 0), ("insert", 1), ("insert", 3), ("insert", -1), ("insert", -3),
    ("delitem", 0), ("delitem", -1), ("delitem", slice(0, 2)), ("delitem", slice(None, None, 2)),
    ("pop", 1), ("pop", -1), ("setitem", 1), ("setitem", -3), ("extend", 2),
])
def test_list_operations_match_torch(operation):
    what, where = operation
    ours, theirs = twin_chains()
    if what == "insert":
        ours.insert(where, tagged(9))
        theirs.insert(where, torch.nn.Linear(2, 11))
    elif what == "delitem":
        del ours[where]
        del theirs[where]
    elif what == "pop":
        assert ours.pop(where).tag == theirs.pop(where).out_features - 2
    elif what == "setitem":
        ours[where] = tagged(9)
        theirs[where] = torch.nn.Linear(2, 11)
    else:
        ours.extend([tagged(9 + i) for i in range(where)])
        theirs.extend([torch.nn.Linear(2, 11 + i) for i in range(where)])
    assert layout(ours) == layout(theirs)


def test_renumbered_children_give_torch_state_dict_keys():
    ours, theirs = lorac.Sequential(lorac.ReLU(), lorac.Linear(2, 2)), torch.nn.Sequential(
        torch.nn.ReLU(), torch.nn.Linear(2, 2))
    del ours[0]
    del theirs[0]
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["0.weight", "0.bias"]
    ours.insert(0, lorac.Linear(2, 2))
    theirs.insert(0, torch.nn.Linear(2, 2))
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_the_chain_still_runs_after_edits(rng):
    ours, _ = twin_chains()
    del ours[1]
    ours.insert(1, lorac.ReLU())
    x = rng.standard_normal((3, 2)).astype(np.float32)
    expected = ours[2](np.maximum(ours[0](x), 0))
    np.testing.assert_array_equal(ours(x), expected)
    assert ours.backward(np.ones_like(expected)).shape == x.shape


@pytest.mark.parametrize("index, error, message", [
    ("0", TypeError, "Sequential index must be an int or a slice, got str '0'"),
    (True, TypeError, "Sequential index must be an int or a slice, got bool True"),
    (1.0, TypeError, "Sequential index must be an int or a slice, got float 1.0"),
    (3, IndexError, "Sequential index 3 out of range for 3 modules"),
    (-4, IndexError, "Sequential index -4 out of range for 3 modules"),
])
def test_bad_indices_raise_and_change_nothing(index, error, message):
    ours, _ = twin_chains()
    before = layout(ours)
    for operation in (lambda: ours[index], lambda: ours.__setitem__(index, tagged(9)),
                      lambda: ours.__delitem__(index), lambda: ours.pop(index)):
        with pytest.raises(error) as info:
            operation()
        assert str(info.value) == message
    assert layout(ours) == before


def test_numpy_integers_index_like_ints():
    ours, _ = twin_chains()
    assert ours[np.int64(1)].tag == 1 and ours[np.int32(-1)].tag == 2


@pytest.mark.parametrize("index", [4, -4])
def test_insert_out_of_range_raises_as_torch_does(index):
    ours, theirs = twin_chains()
    with pytest.raises(IndexError):
        theirs.insert(index, torch.nn.Linear(2, 2))
    with pytest.raises(IndexError, match=f"insert index {index} out of range for 3 modules"):
        ours.insert(index, tagged(9))
    assert layout(ours) == (["0", "1", "2"], [0, 1, 2])


def test_a_non_module_is_refused_before_anything_changes():
    ours, _ = twin_chains()
    with pytest.raises(TypeError, match="item 4 must be a lorac.Module, got int"):
        ours.extend([tagged(9), 5])
    with pytest.raises(TypeError, match="must be a lorac.Module, got str"):
        ours[0] = "layer"
    with pytest.raises(TypeError, match="must be a lorac.Module, got NoneType"):
        ours.insert(0, None)
    assert layout(ours) == (["0", "1", "2"], [0, 1, 2])


def test_extend_with_itself_doubles_the_chain():
    ours, _ = twin_chains(2)
    ours.extend(ours)
    assert layout(ours) == (["0", "1", "2", "3"], [0, 1, 0, 1])

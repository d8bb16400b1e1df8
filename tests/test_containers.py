"""ModuleList and ModuleDict against torch.nn's: the same children, names and
state-dict keys after the same operations."""

import numpy as np
import pytest

import lorac

torch = pytest.importorskip("torch")


def layers(n):
    return [lorac.Linear(3, 3, r=1, rng=i) for i in range(n)], [torch.nn.Linear(3, 3) for _ in range(n)]


def names_and_order(ours, theirs, ours_pool, theirs_pool):
    """Child names of both, and each child's index in its pool."""
    mine = [(name, ours_pool.index(m)) for name, m in ours.named_children()]
    other = [(name, theirs_pool.index(m)) for name, m in theirs.named_children()]
    return mine, other


OPS = [
    ("append", lambda c, pool: c.append(pool[3])),
    ("extend", lambda c, pool: c.extend(pool[3:5])),
    ("iadd", lambda c, pool: c.__iadd__(pool[3:5])),
    ("insert 0", lambda c, pool: c.insert(0, pool[3])),
    ("setitem", lambda c, pool: c.__setitem__(1, pool[3])),
    ("setitem -1", lambda c, pool: c.__setitem__(-1, pool[3])),
    ("delitem", lambda c, pool: c.__delitem__(0)),
    ("del slice", lambda c, pool: c.__delitem__(slice(0, 2))),
    ("pop", lambda c, pool: c.pop(1)),
    ("pop last", lambda c, pool: c.pop(-1)),
]


@pytest.mark.parametrize("name,op", OPS, ids=[n for n, _ in OPS])
def test_module_list_operations_match_torch(name, op):
    ours_pool, theirs_pool = layers(5)
    ours, theirs = lorac.ModuleList(ours_pool[:3]), torch.nn.ModuleList(theirs_pool[:3])
    op(ours, ours_pool)
    op(theirs, theirs_pool)
    mine, other = names_and_order(ours, theirs, ours_pool, theirs_pool)
    assert mine == other
    assert len(ours) == len(theirs)
    assert [ours_pool.index(m) for m in ours] == [theirs_pool.index(m) for m in theirs]


def test_module_list_insert_takes_negative_positions_as_list_does():
    # torch's ModuleList.insert raises KeyError for a negative index; lorac's is list.insert's
    pool, _ = layers(4)
    for index in (-1, -3, 3, 0):
        modules, expected = lorac.ModuleList(pool[:3]), pool[:3]
        modules.insert(index, pool[3])
        expected.insert(index, pool[3])
        assert list(modules) == expected and [n for n, _ in modules.named_children()] == ["0", "1", "2", "3"]


def test_module_list_slices_indexing_and_keys_match_torch():
    ours_pool, theirs_pool = layers(4)
    ours, theirs = lorac.ModuleList(ours_pool), torch.nn.ModuleList(theirs_pool)
    part, tpart = ours[1:3], theirs[1:3]
    assert type(part) is lorac.ModuleList and [n for n, _ in part.named_children()] == ["0", "1"]
    assert [ours_pool.index(m) for m in part] == [theirs_pool.index(m) for m in tpart] == [1, 2]
    assert ours[-1] is ours_pool[3]
    both = ours[:1] + ours[3:]
    assert [ours_pool.index(m) for m in both] == [0, 3]

    class Owner(lorac.Module):
        def __init__(self):
            super().__init__()
            self.blocks = lorac.ModuleList(lorac.Linear(3, 3, r=2, rng=i) for i in range(2))

    class TorchOwner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))

    model = Owner()
    assert [k for k in model.state_dict() if "lora_" not in k] == list(TorchOwner().state_dict())
    assert list(lorac.lora_state_dict(model)) == ["blocks.0.lora_A", "blocks.0.lora_B", "blocks.1.lora_A",
                                                  "blocks.1.lora_B"]
    lorac.mark_only_lora_as_trainable(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(lorac.lora_state_dict(model))
    with pytest.raises(NotImplementedError, match="ModuleList does not define forward"):
        model.blocks(np.zeros((1, 3), np.float32))


def test_module_dict_matches_torch():
    ours_pool, theirs_pool = layers(4)
    ours = lorac.ModuleDict({"q": ours_pool[0], "v": ours_pool[1]})
    theirs = torch.nn.ModuleDict({"q": theirs_pool[0], "v": theirs_pool[1]})
    for c, pool in ((ours, ours_pool), (theirs, theirs_pool)):
        c["k"] = pool[2]
        c["q"] = pool[3]  # replaced in place: keeps its position
        c.update([("o", pool[0])])
        del c["v"]
    assert list(ours) == list(theirs) == ["q", "k", "o"]
    assert [ours_pool.index(m) for m in ours.values()] == [theirs_pool.index(m) for m in theirs.values()]
    assert [k for k in ours.state_dict() if "lora_" not in k] == list(theirs.state_dict())
    assert "k" in ours and "v" not in ours and len(ours) == 3
    assert ours.pop("k") is ours_pool[2] and list(ours.keys()) == ["q", "o"]
    assert [k for k, _ in ours.items()] == ["q", "o"]
    ours.clear()
    assert len(ours) == 0 and list(ours.state_dict()) == []


@pytest.mark.parametrize("make,error,match", [
    (lambda: lorac.ModuleList([lorac.ReLU(), 3]), TypeError, r"ModuleList: item 1 must be a lorac.Module, got int"),
    (lambda: lorac.ModuleList([lorac.ReLU()])[1], IndexError, r"ModuleList index 1 out of range for 1 modules"),
    (lambda: lorac.ModuleList([lorac.ReLU()])["0"], TypeError, r"ModuleList index must be an int or a slice"),
    (lambda: lorac.ModuleList().insert(2, lorac.ReLU()), IndexError, r"insert index 2 out of range for 0"),
    (lambda: lorac.ModuleDict({"a.b": lorac.ReLU()}), KeyError, r"non-empty str without '\.', got 'a.b'"),
    (lambda: lorac.ModuleDict({1: lorac.ReLU()}), KeyError, r"got 1"),
    (lambda: lorac.ModuleDict({"keys": lorac.ReLU()}), KeyError, r"'keys' is already an attribute"),
    (lambda: lorac.ModuleDict({"a": lorac.ReLU(), "b": "no"}), TypeError, r"item 'b' must be a lorac.Module, got str"),
    (lambda: lorac.ModuleDict(["ab"]), TypeError, r"item 0 must be a \(key, module\) pair, got str"),
    (lambda: lorac.ModuleDict({"a": lorac.ReLU()})["b"], KeyError, r"no key 'b'; its keys are \['a'\]"),
])
def test_container_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_failed_updates_change_nothing():
    items = [lorac.ReLU(), lorac.Tanh()]
    modules = lorac.ModuleList(items)
    with pytest.raises(TypeError):
        modules.extend([lorac.GELU(), None])
    assert list(modules) == items
    table = lorac.ModuleDict({"a": items[0]})
    with pytest.raises(TypeError):
        table.update({"b": items[1], "c": None})
    assert list(table) == ["a"]


def test_sequential_messages_keep_their_name():
    with pytest.raises(TypeError, match=r"Sequential: item 0 must be a lorac.Module, got int"):
        lorac.Sequential(0)
    assert lorac.nn.ModuleList is lorac.ModuleList and lorac.nn.ModuleDict is lorac.ModuleDict

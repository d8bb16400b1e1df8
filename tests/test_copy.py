"""copy.copy, copy.deepcopy and pickle of modules (as torch users do with
nn.Module): a copy owns its arrays, computes what the original computes, and
has a lock of its own and no forward cache (layers/_threading.py)."""

import copy
import pickle

import numpy as np
import pytest

import lorac


def pickle_round_trip(module):
    return pickle.loads(pickle.dumps(module))


COPIERS = {"deepcopy": copy.deepcopy, "pickle": pickle_round_trip}


def make_model():
    """Every layer kind that keeps a forward cache, in one chain (in 6 -> out 4)."""
    return lorac.Sequential(
        lorac.Linear(6, 8, r=2, lora_alpha=4, lora_dropout=0.25, rng=0),
        lorac.GELU(),
        lorac.MergedLinear(8, 9, r=2, lora_alpha=4, enable_lora=(True, False, True), fan_in_fan_out=True, rng=1),
        lorac.Tanh(),
        lorac.LayerNorm(9),
        lorac.Dropout(0.2, rng=2),
        lorac.MoLoRALinear(9, 7, r=4, num_experts=2, top_k=1, lora_alpha=8, rng=3),
        lorac.ReLU(),
        lorac.Linear(7, 4, rng=4),  # r = 0: a plain trainable layer
    )


def randomize_adapters(model, seed=5):
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data[...] = rng.standard_normal(p.shape).astype(p.data.dtype)


def step(model, x):
    y = model(x)
    model.backward(np.ones_like(y))
    return y


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS.keys())
def test_a_copied_model_computes_the_same_and_owns_its_arrays(copier):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    model = make_model()
    randomize_adapters(model)
    step(model, x)  # gradients exist
    y = model(x)    # and a forward is pending

    twin = copier(model)

    original_state, twin_state = model.state_dict(), twin.state_dict()
    assert original_state.keys() == twin_state.keys()
    for key, value in original_state.items():
        np.testing.assert_array_equal(twin_state[key], value)
        assert not np.shares_memory(twin_state[key], value), key
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert q.requires_grad == p.requires_grad, name
        if p.grad is None:
            assert q.grad is None, name
        else:
            np.testing.assert_array_equal(q.grad, p.grad)
            assert not np.shares_memory(q.grad, p.grad), name

    # the forward cache stays with the original; the copy needs its own forward
    model.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        twin.backward(np.ones_like(y))

    # the same outputs, dropout included (each has its own copy of the generators)
    np.testing.assert_array_equal(step(twin, x), step(model, x))
    model.eval(), twin.eval()
    np.testing.assert_array_equal(twin(x), model(x))

    # changing the copy leaves the original as it was
    before = model.state_dict()
    for p in twin.parameters():
        p.data[...] += 1
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS.keys())
def test_a_copied_merged_layer_with_named_adapters_unmerges_like_the_original(copier):
    rng = np.random.default_rng(1)
    layer = lorac.Linear(5, 4, r=2, lora_alpha=4, dtype=np.float64, rng=0)
    layer.add_adapter("task", r=3, lora_alpha=3)
    layer.set_adapter(["default", "task"])
    for name, p in layer.named_parameters():
        if "lora_" in name:
            p.data[...] = rng.standard_normal(p.shape)
    x = rng.standard_normal((2, 5))
    layer.eval()  # merges both adapters into the weight
    assert layer.merged

    twin = copier(layer)

    assert twin.merged and twin.active_adapters == layer.active_adapters
    np.testing.assert_array_equal(twin(x), layer(x))
    layer.train(), twin.train()
    assert not twin.merged
    np.testing.assert_array_equal(twin.weight.data, layer.weight.data)
    np.testing.assert_array_equal(twin(x), layer(x))


def test_a_copied_embedding_and_loss():
    emb = lorac.Embedding(7, 3, r=2, lora_alpha=4, rng=0)
    ids = np.array([[1, 4], [6, 0]])
    emb(ids)
    for twin in (copy.deepcopy(emb), pickle_round_trip(emb)):
        np.testing.assert_array_equal(twin(ids), emb(ids))
    loss = lorac.CrossEntropyLoss()
    logits, target = np.eye(3, dtype=np.float32), np.array([0, 2, 1])
    assert copy.deepcopy(loss)(logits, target) == loss(logits, target)
    assert pickle_round_trip(loss)(logits, target) == loss(logits, target)


def test_a_shallow_copy_has_its_own_lock_and_no_forward_cache():
    layer = lorac.Linear(4, 3, r=2, rng=0)
    x = np.ones((2, 4), np.float32)
    y = layer(x)
    twin = copy.copy(layer)
    assert twin.__dict__.get("_lock") is not layer.__dict__.get("_lock")
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        twin.backward(np.ones_like(y))
    layer.backward(np.ones_like(y))
    twin(x)
    twin.backward(np.ones_like(y))

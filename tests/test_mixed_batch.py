"""One batch, one adapter per row: model(x, adapter_names=...) / adapter_ids=...
through Embedding, Linear and MergedLinear layers, against running each row
alone with set_adapter; and every refusal (training, merged, unknown, length)."""

import threading

import numpy as np
import pytest

import lorac
from lorac.adapters import adapter_layers

from test_adapters import Net, net_with_adapters


def per_row_reference(net, x, names):
    """Each row alone, with set_adapter (or disable_adapters for "__base__")."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with lorac.disable_adapters(net):
                rows.append(net(x[i:i + 1]))
        else:
            lorac.set_adapter(net, name)
            rows.append(net(x[i:i + 1]))
    lorac.set_adapter(net, "default")
    return np.concatenate(rows)


def eval_net():
    net = net_with_adapters(merge_weights=False)
    return net.eval()


@pytest.mark.parametrize("lead", [(5,), (5, 3), (5, 2, 2)])
def test_mixed_names_match_per_row_forwards(lead):
    net = eval_net()
    rng = np.random.default_rng(len(lead))
    idx = rng.integers(0, 11, lead)
    names = ["b", "default", "__base__", "a", "b"]
    y = net(idx, adapter_names=names)
    np.testing.assert_allclose(y, per_row_reference(net, idx, names), rtol=1e-12, atol=1e-12)
    ids = [lorac.adapter_names(net).index(n) if n != "__base__" else -1 for n in names]
    np.testing.assert_array_equal(net(idx, adapter_ids=np.array(ids)), y)
    np.testing.assert_array_equal(net(idx, adapter_ids=ids), y)  # a list works too


def test_mixed_batch_leaves_the_layers_as_they_were():
    net = eval_net()
    lorac.set_adapter(net, ["a", "default"])
    idx = np.arange(8).reshape(4, 2)
    before = net(idx)
    net(idx, adapter_names=["a", "a", "b", "__base__"])
    assert net.proj.active_adapters == ("a", "default") and not net.proj._mixed_users
    np.testing.assert_array_equal(net(idx), before)
    lorac.set_adapter(net, "default")
    assert all(layer._plain for _, layer in adapter_layers(net))
    with pytest.raises(IndexError):  # an error inside the forward also restores the state
        net(np.arange(4) + 100, adapter_names=["a"] * 4)
    assert all(layer._plain and not layer._mixed_users for _, layer in adapter_layers(net))


def test_mixed_batch_on_a_single_layer_with_per_adapter_ranks():
    layer = lorac.Linear(8, 6, r=2, lora_alpha=4, dtype=np.float64, rng=0, merge_weights=False)
    for name, r in (("x", 5), ("y", 1)):
        layer.add_adapter(name, r=r, lora_alpha=3, use_rslora=name == "y", init=False)
    layer.eval()
    x = np.random.default_rng(0).standard_normal((7, 3, 8))
    names = ["x", "y", "x", "__base__", "default", "y", "x"]
    expected = per_row_reference(layer, x, names)
    np.testing.assert_allclose(layer(x, adapter_names=names), expected, rtol=1e-12, atol=1e-12)


def test_float32_mixed_batch():
    net = lorac.Sequential(lorac.Linear(16, 12, r=4, rng=0, merge_weights=False), lorac.GELU(),
                           lorac.MergedLinear(12, 12, r=2, enable_lora=(True, True, False), rng=1,
                                              merge_weights=False))
    lorac.add_adapter(net, "t1", r=8, init=False, rng=2)
    lorac.add_adapter(net, "t2", r=3, init=False, rng=3)
    net.eval()
    x = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    names = list(np.random.default_rng(2).choice(["t1", "t2", "default", "__base__"], 40))
    y = net(x, adapter_names=names)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, per_row_reference(net, x, names), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(adapter_names=["a", "zz", "b", "a"]), ValueError,
     r"unknown adapter 'zz' at row 1; the model has \['default', 'a', 'b'\]"),
    (dict(adapter_names=["a", "b"]), ValueError, r"2 adapter names for an input of shape \(4, 2\)"),
    (dict(adapter_names="a"), TypeError, "adapter_names must be a list of str"),
    (dict(adapter_names=["a", 1, "b", "a"]), TypeError, "got int at row 1"),
    (dict(adapter_ids=np.array([0, 3, 1, 1])), ValueError, r"adapter_ids must lie in \[-1, 3\).*got 3 at row 1"),
    (dict(adapter_ids=np.array([0, -2, 1, 1])), ValueError, r"got -2 at row 1"),
    (dict(adapter_ids=np.array([0.0, 1, 1, 1])), TypeError, "adapter_ids must be integers"),
    (dict(adapter_ids=np.zeros((4, 1), int)), ValueError, "adapter_ids must be 1-D"),
    (dict(adapter_ids=[0] * 4, adapter_names=["a"] * 4), TypeError, "exactly one of adapter_names and adapter_ids"),
])
def test_mixed_batch_bad_requests(kwargs, error, match):
    net = eval_net()
    with pytest.raises(error, match=match):
        net(np.zeros((4, 2), int), **kwargs)
    assert all(not layer._mixed_users for _, layer in adapter_layers(net))


def test_mixed_batch_refuses_training_and_merged_layers():
    net = net_with_adapters(merge_weights=True)
    idx = np.zeros((2, 3), int)
    with pytest.raises(RuntimeError, match="inference only.*'emb' is in training mode"):
        net(idx, adapter_names=["a", "b"])
    net.eval()  # merge_weights: eval() merges "default"
    with pytest.raises(RuntimeError, match=r"'emb' has adapters \['default'\] merged .* lorac.unmerge_adapter"):
        net(idx, adapter_names=["a", "b"])
    lorac.unmerge_adapter(net)
    np.testing.assert_allclose(net(idx, adapter_names=["a", "b"]), per_row_reference(net, idx, ["a", "b"]),
                               rtol=1e-12, atol=1e-12)
    layer = lorac.Linear(4, 4, r=2, merge_weights=False)
    layer.eval()
    with pytest.raises(ValueError, match=r"1 adapter names for an input of shape \(4,\)"):
        layer(np.zeros(4, np.float32), adapter_names=["default"])


def test_mixed_batch_refuses_molora():
    net = lorac.Sequential(lorac.Linear(4, 4, r=2), lorac.MoLoRALinear(4, 4, r=2, num_experts=2))
    net.eval()
    with pytest.raises(ValueError, match="not supported by MoLoRALinear"):
        net(np.zeros((1, 4), np.float32), adapter_names=["default"])


def test_layer_reached_with_a_different_batch_axis_is_an_error():
    class Transposing(lorac.Module):
        def __init__(self):
            super().__init__()
            self.lin = lorac.Linear(3, 3, r=2, merge_weights=False)

        def forward(self, x):
            return self.lin(np.swapaxes(x, 0, 1))

    model = Transposing().eval()
    with pytest.raises(ValueError, match=r"has 2 rows .* leading shape \(4, 2\)"):
        model(np.zeros((2, 4, 3), np.float32), adapter_names=["default", "__base__"])


def test_mixed_batches_and_plain_forwards_in_threads():
    """Thread A runs mixed batches while thread B runs the layer's ordinary
    forward: each gets its own correct results (the ids are thread-local)."""
    net = eval_net()
    idx = np.random.default_rng(0).integers(0, 11, (6, 4))
    names = ["a", "b", "__base__", "default", "a", "b"]
    mixed_expected = per_row_reference(net, idx, names)
    lorac.set_adapter(net, "a")
    plain_expected = net(idx)
    errors = []

    def mixed():
        for _ in range(200):
            if not np.allclose(net(idx, adapter_names=names), mixed_expected, rtol=1e-12, atol=1e-12):
                errors.append("mixed")

    def plain():
        for _ in range(200):
            if not np.allclose(net(idx), plain_expected, rtol=1e-12, atol=1e-12):
                errors.append("plain")

    threads = [threading.Thread(target=mixed), threading.Thread(target=plain), threading.Thread(target=mixed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(not layer._mixed_users for _, layer in adapter_layers(net))


def test_fresh_net_without_named_adapters():
    net = Net(merge_weights=False).eval()
    idx = np.arange(6).reshape(3, 2)
    np.testing.assert_allclose(net(idx, adapter_ids=[0, -1, 0]), per_row_reference(net, idx, ["default", "__base__",
                                                                                                 "default"]))

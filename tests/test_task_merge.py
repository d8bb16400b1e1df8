"""lorac/_task_merge.py (TIES, DARE, magnitude pruning) on hand-worked examples, and the
pruning combinations of add_weighted_adapter on a MergedLinear (groups), which PEFT lacks."""

import numpy as np
import pytest

import lorac
from lorac._task_merge import merge_task_tensors

T1 = np.array([1.0, -2.0, 3.0, 0.5])
T2 = np.array([-1.0, -1.0, 2.0, -3.0])


@pytest.mark.parametrize("sign_method, expected", [
    # total: sums (0, -3, 5, -2.5) elect (+, -, +, -); weighted T1 (1, -2, 3, .5), 2 T2 (-2, -2, 4, -6)
    ("total", [1.0, -2.0, 3.5, -6.0]),
    # frequency: sign counts (0, -2, 2, 0) elect (+, -, +, +): the last entry keeps T1's 0.5 alone
    ("frequency", [1.0, -2.0, 3.5, 0.5]),
])
def test_ties_by_hand(sign_method, expected):
    np.testing.assert_array_equal(merge_task_tensors("ties", [T1, T2], [1.0, 2.0], 1.0, sign_method), expected)


def test_magnitude_pruning_keeps_the_largest_entries():
    # density 0.5 keeps int(0.5 * 4) = 2 entries of each: T1 -> (0, -2, 3, 0), T2 -> (0, 0, 2, -3)
    np.testing.assert_array_equal(merge_task_tensors("magnitude_prune", [T1, T2], [1.0, -1.0], 0.5),
                                  [0.0, -2.0, 1.0, 3.0])
    # ties after the same pruning: sums (0, -2, 5, -3) elect (+, -, +, -)
    np.testing.assert_array_equal(merge_task_tensors("ties", [T1, T2], [1.0, 1.0], 0.5), [0.0, -2.0, 2.5, -3.0])
    assert not merge_task_tensors("magnitude_prune", [T1, T2], [1.0, 1.0], 0.0).any()


def test_dare_keeps_a_density_fraction_rescaled():
    big = np.ones((200, 50))
    merged = merge_task_tensors("dare_linear", [big], [1.0], 0.25, rng=np.random.default_rng(0))
    assert set(np.unique(merged)) == {0.0, 4.0}
    assert abs((merged > 0).mean() - 0.25) < 0.02


def test_pruning_combinations_on_merged_linear_groups():
    layer = lorac.MergedLinear(6, 9, r=2, lora_alpha=4, enable_lora=[True, False, True], dtype=np.float64, rng=0)
    layer.add_adapter("x", 2, lora_alpha=3, init=False, rng=1)
    layer.add_adapter("y", 2, lora_alpha=5, init=False, rng=2)
    net = lorac.Sequential(layer)
    lorac.add_weighted_adapter(net, ["x", "y"], [0.5, -1.0], "ties", combination="ties", density=0.5)
    coefs = [0.5 * layer._scaling_of("x"), -1.0 * layer._scaling_of("y")]
    roots = [np.sqrt(abs(c)) for c in coefs]
    A = [layer.adapter_parameters(n)[0].data for n in ("x", "y")]   # (2 groups * r, in): pruned as one tensor
    want = merge_task_tensors("ties", A, [np.copysign(r, c) for r, c in zip(roots, coefs)], 0.5)
    np.testing.assert_allclose(layer.adapter_parameters("ties")[0].data, want, rtol=1e-14)

    lorac.add_weighted_adapter(net, ["x", "y"], [0.5, -1.0], "svd4", combination="magnitude_prune_svd", density=0.5,
                               svd_rank=4)
    deltas = []
    for name in ("x", "y"):   # each group's (og, in) delta
        a, b = layer.adapter_parameters(name)
        deltas.append(np.stack([layer._scaling_of(name) * b.data[e * 3:(e + 1) * 3] @ a.data[e * 2:(e + 1) * 2]
                                for e in range(2)]))
    merged = merge_task_tensors("magnitude_prune", deltas, [0.5, -1.0], 0.5)
    a, b = layer.adapter_parameters("svd4")
    for e in range(2):   # rank 4 >= the (3, 6) blocks' rank: exact
        np.testing.assert_allclose(b.data[e * 3:(e + 1) * 3] @ a.data[e * 4:(e + 1) * 4], merged[e], atol=1e-12)

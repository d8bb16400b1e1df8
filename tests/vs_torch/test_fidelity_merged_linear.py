"""lorac.MergedLinear vs loralib.MergedLinear on the same weights: outputs and every
gradient, in train mode, after eval() (merged) and after train() again."""

import itertools

import numpy as np
import pytest

from fidelity import stable_seed, assert_matches, loralib, run_train_eval_train, randomize_torch, torch, twin

import lorac

pytestmark = pytest.mark.torch

IN, OUT = 10, 12
PATTERNS = [[True, False, True], [False, True], [True, True, False, True]]
CASES = list(itertools.product([1, 4, 16], [1, 8, 32], [False, True], [False, True], [(5,), (2, 3)],
                               [np.float32, np.float64]))


@pytest.mark.parametrize("r,lora_alpha,fan_in_fan_out,bias,lead,dtype", CASES)
def test_merged_linear_matches_loralib(r, lora_alpha, fan_in_fan_out, bias, lead, dtype):
    seed = stable_seed((r, lora_alpha, fan_in_fan_out, bias, lead))
    enable_lora = PATTERNS[seed % len(PATTERNS)]
    torch_layer = randomize_torch(loralib.MergedLinear(IN, OUT, r=r, lora_alpha=lora_alpha, enable_lora=enable_lora,
                                                       fan_in_fan_out=fan_in_fan_out, bias=bias), seed)
    ours = lorac.MergedLinear(IN, OUT, r=r, lora_alpha=lora_alpha, enable_lora=enable_lora,
                              fan_in_fan_out=fan_in_fan_out, bias=bias, dtype=dtype, rng=0)
    twin(torch_layer, ours, dtype)
    x = np.random.default_rng(seed).standard_normal(lead + (IN,)).astype(dtype)
    run_train_eval_train(torch_layer, ours, x, dtype, seed)


@pytest.mark.parametrize("enable_lora", PATTERNS)
def test_same_parameter_shapes_and_lora_ind(enable_lora):
    theirs = loralib.MergedLinear(IN, OUT, r=3, enable_lora=enable_lora)
    ours = lorac.MergedLinear(IN, OUT, r=3, enable_lora=enable_lora)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    np.testing.assert_array_equal(ours.lora_ind, theirs.lora_ind.numpy())


def test_all_false_enable_lora_is_a_plain_linear_layer_where_loralib_fails():
    theirs = loralib.MergedLinear(IN, OUT, r=4, enable_lora=[False, False])
    ours = lorac.MergedLinear(IN, OUT, r=4, enable_lora=[False, False], dtype=np.float32)
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((3, IN)).astype(np.float32)
    with pytest.raises(AttributeError):  # loralib: 'MergedLinear' object has no attribute 'lora_A'
        theirs(torch.from_numpy(x))
    expected = torch.nn.functional.linear(torch.from_numpy(x), theirs.weight, theirs.bias)
    assert_matches(ours(x), expected, np.float32)
    assert ours.weight.requires_grad == theirs.weight.requires_grad  # both: trainable base weight

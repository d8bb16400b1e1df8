"""lorac.Linear vs loralib.Linear on the same weights: outputs and every gradient,
in train mode, after eval() (merged) and after train() again."""

import itertools

import numpy as np
import pytest

from fidelity import stable_seed, loralib, run_train_eval_train, randomize_torch, twin

import lorac

pytestmark = pytest.mark.torch

IN, OUT = 12, 10
CASES = list(itertools.product([0, 1, 4, 16], [1, 8, 32], [False, True], [False, True], [(5,), (2, 3)],
                               [np.float32, np.float64]))


@pytest.mark.parametrize("r,lora_alpha,fan_in_fan_out,bias,lead,dtype", CASES)
def test_linear_matches_loralib(r, lora_alpha, fan_in_fan_out, bias, lead, dtype):
    seed = stable_seed((r, lora_alpha, fan_in_fan_out, bias, lead))
    torch_layer = randomize_torch(loralib.Linear(IN, OUT, r=r, lora_alpha=lora_alpha,
                                                 fan_in_fan_out=fan_in_fan_out, bias=bias), seed)
    ours = lorac.Linear(IN, OUT, r=r, lora_alpha=lora_alpha, fan_in_fan_out=fan_in_fan_out, bias=bias,
                        dtype=dtype, rng=0)
    twin(torch_layer, ours, dtype)
    x = np.random.default_rng(seed).standard_normal(lead + (IN,)).astype(dtype)
    run_train_eval_train(torch_layer, ours, x, dtype, seed)

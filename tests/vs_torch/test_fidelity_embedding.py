"""lorac.Embedding vs loralib.Embedding on the same weights: outputs and every
gradient (repeated and padding indices included), in train mode, after eval()
(merged) and after train() again."""

import itertools

import numpy as np
import pytest

from fidelity import stable_seed, loralib, run_train_eval_train, randomize_torch, twin

import lorac

pytestmark = pytest.mark.torch

NUM, DIM = 11, 7
CASES = list(itertools.product([0, 1, 4, 16], [1, 8, 32], [None, 2, -1], [(9,), (3, 4)],
                               [np.float32, np.float64]))


@pytest.mark.parametrize("r,lora_alpha,padding_idx,lead,dtype", CASES)
def test_embedding_matches_loralib(r, lora_alpha, padding_idx, lead, dtype):
    seed = stable_seed((r, lora_alpha, padding_idx, lead))
    torch_layer = randomize_torch(loralib.Embedding(NUM, DIM, r=r, lora_alpha=lora_alpha, padding_idx=padding_idx),
                                  seed)
    ours = lorac.Embedding(NUM, DIM, r=r, lora_alpha=lora_alpha, padding_idx=padding_idx, dtype=dtype, rng=0)
    twin(torch_layer, ours, dtype)
    idx = np.random.default_rng(seed).integers(0, NUM, size=lead)
    idx.reshape(-1)[:3] = [2, 2, NUM - 1]  # repeats, and both padding indices used above
    run_train_eval_train(torch_layer, ours, idx, dtype, seed, input_grad=False)


def test_padding_row_is_zero_at_init_in_both():
    ours = lorac.Embedding(NUM, DIM, r=4, padding_idx=3, rng=0)
    theirs = loralib.Embedding(NUM, DIM, r=4, padding_idx=3)
    assert np.all(ours.weight.data[3] == 0) and bool((theirs.weight[3] == 0).all())
    assert np.all(ours.lora_A.data == 0) and bool((theirs.lora_A == 0).all())
    assert ours.lora_B.data.std() > 0 and float(theirs.lora_B.detach().std()) > 0

"""Parameter initialisers, numpy Generator based (torch.nn.init's formulas)."""

import math

import numpy as np


def kaiming_uniform(shape, fan_in, rng, dtype, a=math.sqrt(5)):
    """U(-bound, bound) with bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)).

    With a = sqrt(5) (torch's default for nn.Linear and loralib's lora_A) the
    bound is 1 / sqrt(fan_in).
    """
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in) if fan_in > 0 else 0.0
    return uniform(shape, bound, rng, dtype)


def uniform(shape, bound, rng, dtype):
    """U(-bound, bound)."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, std, rng, dtype, mean=0.0):
    return rng.normal(mean, std, size=shape).astype(dtype)


def zeros(shape, dtype):
    return np.zeros(shape, dtype=dtype)

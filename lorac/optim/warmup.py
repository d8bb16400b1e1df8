"""Warm-up schedules as Hugging Face transformers defines them (the ones PEFT
examples train LoRA with), built on lr_scheduler.LambdaLR.

    opt = lorac.optim.AdamW(model.parameters(), lr=2e-4)
    sched = lorac.optim.get_cosine_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=1000)

The factor on each group's initial lr at step t, for w warm-up steps of T:
t / max(1, w) while t < w; then 1 (constant), max(0, (T - t) / max(1, T - w))
(linear: 0 from step T on, also when T = w), or, with
p = (t - w) / max(1, T - w), max(0, (1 + cos(2 pi num_cycles p)) / 2)
(cosine: num_cycles = 0.5 is one half-wave down to 0).
"""

import math
import numbers

from .lr_scheduler import LambdaLR

_KINDS = ("constant", "linear", "cosine")


class WarmupFactor:
    """The schedule's factor as a callable object, so LambdaLR's state_dict saves its settings."""

    def __init__(self, kind, num_warmup_steps, num_training_steps=0, num_cycles=0.5):
        self.kind = kind
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.num_cycles = num_cycles

    def __call__(self, step):
        warmup = self.num_warmup_steps
        if step < warmup:
            return step / max(1, warmup)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.num_training_steps - warmup)
        if self.kind == "linear":
            return max(0.0, (self.num_training_steps - step) / span)
        progress = (step - warmup) / span
        return max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * self.num_cycles * progress)))


def _steps(value, what, owner):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{owner}: {what} must be >= 0, got {value}")
    return int(value)


def get_constant_schedule_with_warmup(optimizer, num_warmup_steps, last_epoch=-1):
    """A LambdaLR rising linearly from 0 over num_warmup_steps, then constant."""
    owner = "get_constant_schedule_with_warmup"
    factor = WarmupFactor("constant", _steps(num_warmup_steps, "num_warmup_steps", owner))
    return LambdaLR(optimizer, factor, last_epoch)


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    """A LambdaLR rising linearly from 0 over num_warmup_steps, then falling
    linearly to 0 at num_training_steps (and staying there)."""
    owner = "get_linear_schedule_with_warmup"
    factor = WarmupFactor("linear", _steps(num_warmup_steps, "num_warmup_steps", owner),
                          _steps(num_training_steps, "num_training_steps", owner))
    return LambdaLR(optimizer, factor, last_epoch)


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, num_cycles=0.5,
                                    last_epoch=-1):
    """A LambdaLR rising linearly from 0 over num_warmup_steps, then following
    a cosine down to 0 at num_training_steps (num_cycles = 0.5)."""
    owner = "get_cosine_schedule_with_warmup"
    if isinstance(num_cycles, bool) or not isinstance(num_cycles, numbers.Real) or \
            not math.isfinite(num_cycles) or num_cycles < 0:
        raise ValueError(f"{owner}: num_cycles must be a finite number >= 0, got {num_cycles!r}")
    factor = WarmupFactor("cosine", _steps(num_warmup_steps, "num_warmup_steps", owner),
                          _steps(num_training_steps, "num_training_steps", owner), float(num_cycles))
    return LambdaLR(optimizer, factor, last_epoch)

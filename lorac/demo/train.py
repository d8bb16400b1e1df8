"""Training, evaluation and measurement helpers of the demo.

Everything is driven by explicit numpy Generators, so a run is reproducible.
"""

import gc
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from ..losses import CrossEntropyLoss
from ..optim import AdamW
from ._deps import require


@dataclass
class History:
    """Per-epoch record of one training run."""

    losses: list = field(default_factory=list)          # mean training loss
    test_accuracy: list = field(default_factory=list)   # after the epoch
    epoch_seconds: list = field(default_factory=list)   # training time only


def minibatches(n, batch_size, rng):
    """Index arrays of a fresh random permutation of range(n), batch_size at a time."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_step(model, optimizer, criterion, x, y):
    """One forward/backward/update; returns the batch loss."""
    loss = criterion(model(x), y)
    model.backward(criterion.backward())
    optimizer.step()
    optimizer.zero_grad()
    return loss


def accuracy(model, x, y, batch_size=1024):
    """Fraction of rows whose arg-max logit is the label (model's current mode)."""
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        correct += int(np.count_nonzero(logits.argmax(axis=-1) == y[start:start + batch_size]))
    return correct / max(len(x), 1)


def progress_bar(total, desc, enabled):
    """A tqdm bar that shows only on a terminal (and not at all when disabled)."""
    tqdm = require("tqdm.auto", "tqdm").tqdm
    return tqdm(total=total, desc=desc, unit="epoch", leave=False, dynamic_ncols=True,
                disable=None if enabled else True, file=sys.stderr)


def fit(model, split, epochs, lr, config, seed, desc):
    """Train with AdamW and cross-entropy for `epochs`; returns a History.

    Only parameters with requires_grad are handed to the optimizer's state
    (lorac.optim creates none for frozen ones anyway).  Test accuracy is
    measured after each epoch in train() mode -- without dropout that is the
    same function as eval(), and it avoids merging the adapter back and forth.
    """
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    criterion = CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    history = History()
    model.train()
    with progress_bar(epochs, desc, config.progress) as bar:
        for _ in range(epochs):
            start = time.perf_counter()
            losses = [train_step(model, optimizer, criterion, split.x_train[idx], split.y_train[idx])
                      for idx in minibatches(len(split.x_train), config.batch_size, rng)]
            history.epoch_seconds.append(time.perf_counter() - start)
            history.losses.append(float(np.mean(losses)))
            history.test_accuracy.append(accuracy(model, split.x_test, split.y_test))
            bar.set_postfix(loss=f"{history.losses[-1]:.3f}", test_acc=f"{history.test_accuracy[-1]:.3f}")
            bar.update(1)
    return history


def peak_training_memory(model, split, lr, config, seed):
    """Peak bytes allocated while training `model` for config.memory_steps steps.

    Measured with tracemalloc from just before the optimizer is created, so
    the model's weights (allocated earlier) are not counted: the figure is
    the training memory *above* the weights -- gradients, optimizer state,
    activations kept for backward and temporaries.  (NumPy reports its
    allocations to tracemalloc; the kernels' small per-call scratch is not.)
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        optimizer = AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
        criterion = CrossEntropyLoss()
        rng = np.random.default_rng(seed)
        model.train()
        batches = minibatches(len(split.x_train), config.batch_size, rng)
        for _, idx in zip(range(config.memory_steps), batches):
            train_step(model, optimizer, criterion, split.x_train[idx], split.y_train[idx])
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return peak


def median_latencies(functions, repeats):
    """{name: median seconds} of calling each function, interleaved to share the machine's noise."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

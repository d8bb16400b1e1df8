"""Task-vector merging (TIES, DARE, magnitude pruning) for add_weighted_adapter.

Pure functions over a stack of same-shaped float64 arrays, one per adapter
(the "task tensors"), and their weights; written from the definitions PEFT
0.21 implements in ``peft.utils.merge_utils``, quirks included:

- magnitude pruning keeps the ``int(density * size)`` entries of largest
  |value| of each tensor and zeroes the rest;
- random pruning (DARE) keeps each entry with probability ``density`` and
  divides the kept ones by ``density``;
- TIES elects a sign per entry from the pruned, *unweighted* tensors
  (``"total"``: the sign of their sum, ``"frequency"``: the sign held by
  more of them; a tie elects +), then averages the weighted entries that
  carry the elected sign (entries of the other sign and zeros count as
  absent; an entry no tensor keeps is 0);
- the linear kinds (``magnitude_prune``, ``dare_linear``) sum the weighted
  pruned tensors.
"""

import numpy as np

PRUNING = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_ties": "random", "dare_linear": "random"}
SIGN_METHODS = ("total", "frequency")


def merge_task_tensors(method, tensors, weights, density, sign_method="total", rng=None):
    """Merge ``tensors`` (a list of same-shaped arrays) with ``weights`` by
    ``method``, one of PRUNING's keys; ``rng`` (a numpy Generator) draws
    DARE's masks.  Returns a new float64 array of the tensors' shape."""
    stack = np.stack([_pruned(np.asarray(t, np.float64), density, PRUNING[method], rng) for t in tensors])
    weighted = stack * np.asarray(weights, np.float64).reshape((-1,) + (1,) * (stack.ndim - 1))
    if method in ("magnitude_prune", "dare_linear"):
        return weighted.sum(axis=0)
    keep = _majority_sign_mask(stack, sign_method)
    count = np.maximum(keep.sum(axis=0), 1)
    return np.where(keep, weighted, 0.0).sum(axis=0) / count


def _pruned(tensor, density, how, rng):
    if density >= 1:
        return tensor
    if how == "random":
        return np.where(rng.random(tensor.shape) < density, tensor, 0.0) / density
    flat = tensor.reshape(-1)
    k = int(density * flat.size)
    kept = np.zeros_like(flat)
    if k:
        top = np.argpartition(-np.abs(flat), k - 1)[:k]
        kept[top] = flat[top]
    return kept.reshape(tensor.shape)


def _majority_sign_mask(stack, sign_method):
    """Where each tensor's entry carries the elected sign: (n, ...) bool."""
    sign = np.sign(stack)
    votes = stack.sum(axis=0) if sign_method == "total" else sign.sum(axis=0)
    elected = np.where(votes >= 0, 1.0, -1.0)
    return sign == elected

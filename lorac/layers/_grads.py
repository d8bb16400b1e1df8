"""Gradient accumulators: the .grad arrays a layer's backward kernel writes into."""


def grad_accumulators(*params):
    """(accumulators, created) for a backward kernel call.

    accumulators: each parameter's .grad, in order, or None for an absent or
    frozen one (no array is allocated for it).  A trainable parameter without
    a .grad gets zeros; `created` lists those (None when there are none) so
    that forget_created() can drop them again if the call then fails and the
    parameters stay as they were.  A plain function, not a context manager:
    this is on a one-row training step's hot path."""
    accumulators = []
    created = None
    for param in params:
        if param is None or not param.requires_grad:
            accumulators.append(None)
            continue
        grad = param.grad
        if grad is None:
            grad = param.grad_buffer()
            created = [param] if created is None else created + [param]
        accumulators.append(grad)
    return accumulators, created


def forget_created(created):
    """Undo grad_accumulators' allocations after a failed backward."""
    for param in created or ():
        param.grad = None


class GradBuffers:
    """Context manager over grad_accumulators for keyword-argument kernels:
    `params` maps each kernel argument to its Parameter (or None); entering
    gives {argument: accumulator or None}.  If the call inside fails, the
    accumulators it allocated are dropped."""

    def __init__(self, params):
        self.params = params
        self.created = None

    def __enter__(self):
        accumulators, self.created = grad_accumulators(*self.params.values())
        return dict(zip(self.params, accumulators))

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            forget_created(self.created)
        return False

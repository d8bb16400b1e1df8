"""GradBuffers: the gradient accumulators a layer's backward kernel writes into."""


class GradBuffers:
    """Context manager: gradient accumulators for the trainable parameters among
    `params` ({kernel argument: Parameter or None}); frozen ones get None and no
    allocation.  If the call inside fails, buffers it allocated are dropped so
    the parameters are left as they were."""

    def __init__(self, params):
        self.params = params
        self.created = []

    def __enter__(self):
        buffers = {}
        for arg, param in self.params.items():
            if param is None or not param.requires_grad:
                buffers[arg] = None
                continue
            if param.grad is None:
                self.created.append(param)
            buffers[arg] = param.grad_buffer()
        return buffers

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for param in self.created:
                param.grad = None
        return False

"""A lorac.Linear training step made of the binding's calls alone (lorac._C,
no layer Python): what the kernels cost, apart from the layer's checks, lock
and forward cache.  Shared by bench_linear.py and bench_overhead.py."""

from lorac import _C


def kernel_train_step(layer, x, g):
    """A zero-argument callable running `layer`'s forward and backward kernels
    on its own arrays and .grad accumulators, as layer(x); layer.backward(g)
    does in train() mode (an unmerged adapter with r > 0, no dropout)."""
    layer(x)
    layer.backward(g)  # creates the .grad arrays the direct calls accumulate into
    w, a, bb, s, fan_in_fan_out = (layer.weight.data, layer.lora_A.data, layer.lora_B.data, layer.scaling,
                                   layer.fan_in_fan_out)
    b = None if layer.bias is None else layer.bias.data
    grads = (None if layer.bias is None else layer.bias.grad, layer.lora_A.grad, layer.lora_B.grad)

    def step():
        _, u = _C.linear_forward(x, w, b, a, bb, s, fan_in_fan_out, None, 1.0)
        _C.linear_backward(g, x, w, a, bb, u, s, fan_in_fan_out, None, 1.0, True, None, *grads)

    return step

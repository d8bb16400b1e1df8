"""Helpers of the fidelity suite: lorac vs PyTorch + loralib on the same weights.

Importing this module skips the importing test module when torch or loralib
is missing (they are test extras: ``pip install -e .[test]``)."""

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
loralib = pytest.importorskip("loralib")

torch.set_num_threads(1)  # small problems: threads only add noise

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def stable_seed(params):
    """A seed derived from the test's parameters, the same in every run (hash() is not)."""
    return zlib.crc32(repr(params).encode())


def tolerance(dtype):
    """(rtol, atol relative to the array's scale): the issue's bar."""
    return (1e-5, 1e-5) if np.dtype(dtype) == np.float32 else (1e-10, 1e-10)


def assert_matches(actual, expected, dtype, what=""):
    """|lorac - torch| <= atol * max|torch| + rtol * |torch|, elementwise."""
    expected = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual is not None, f"{what}: lorac has no value where torch has one"
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != torch's {expected.shape}"
    rtol, atol = tolerance(dtype)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol,
                               atol=atol * scale, err_msg=what)


def numpy_state_dict(module):
    """torch state dict -> {key: ndarray}, the way a user moves weights to lorac."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def randomize_torch(module, seed, std=0.5):
    """Every parameter of the torch module (lora_B and Embedding's lora_A included) ~ N(0, std^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def twin(torch_module, lorac_module, dtype):
    """Cast the torch module to `dtype` and load its weights into the lorac module."""
    torch_module.to(TORCH_DTYPES[np.dtype(dtype)])
    lorac_module.load_state_dict(numpy_state_dict(torch_module))
    return torch_module, lorac_module


def zero_grads(torch_module, lorac_module):
    torch_module.zero_grad(set_to_none=True)
    lorac_module.zero_grad()


def compare_parameter_grads(torch_module, lorac_module, dtype):
    """Every parameter: same name, same trainability, same gradient (None where torch has None)."""
    ours = dict(lorac_module.named_parameters())
    assert list(ours) == [n for n, _ in torch_module.named_parameters()]
    for name, p in torch_module.named_parameters():
        assert ours[name].requires_grad == p.requires_grad, name
        if p.grad is None:
            assert ours[name].grad is None, f"{name}: lorac has a gradient, torch has none"
        else:
            assert_matches(ours[name].grad, p.grad, dtype, f"grad of {name}")


def run_step(torch_module, lorac_module, inputs, dtype, seed, input_grad=True):
    """Forward, backward with the same random grad_output; compare y, dx and every parameter grad."""
    zero_grads(torch_module, lorac_module)
    if input_grad:
        x_t = torch.from_numpy(inputs).requires_grad_(True)
    else:
        x_t = torch.from_numpy(inputs)
    y_t = torch_module(x_t)
    y = lorac_module(inputs)
    assert y.dtype == np.dtype(dtype)
    assert_matches(y, y_t, dtype, "forward output")
    g = np.random.default_rng(seed).standard_normal(y.shape).astype(dtype)
    if y_t.requires_grad:  # else nothing trains (a merged Embedding): lorac must agree
        y_t.backward(torch.from_numpy(g))
    dx = lorac_module.backward(g)
    if input_grad:
        assert_matches(dx, x_t.grad, dtype, "input gradient")
    else:
        assert dx is None
    compare_parameter_grads(torch_module, lorac_module, dtype)


def run_train_eval_train(torch_module, lorac_module, inputs, dtype, seed, input_grad=True):
    """The comparison in train mode, after eval() (merged) and after train() again."""
    run_step(torch_module, lorac_module, inputs, dtype, seed, input_grad)
    torch_module.eval()
    lorac_module.eval()
    assert lorac_module.merged == torch_module.merged
    run_step(torch_module, lorac_module, inputs, dtype, seed + 1, input_grad)
    torch_module.train()
    lorac_module.train()
    assert not lorac_module.merged and not torch_module.merged
    run_step(torch_module, lorac_module, inputs, dtype, seed + 2, input_grad)

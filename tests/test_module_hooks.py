"""Module.register_forward_pre_hook / register_forward_hook (lorac/_hooks.py):
call order, arguments and replacements as torch's, observe-only in training."""

import copy

import numpy as np
import pytest

import lorac


class Shift(lorac.Module):
    def __init__(self):
        super().__init__()
        self.lin = lorac.Linear(3, 2, rng=0, dtype=np.float64)

    def forward(self, x, shift=0.0):
        return self.lin(x) + shift


def torch_twin(ours):
    torch = pytest.importorskip("torch")

    class TorchShift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2).double()

        def forward(self, x, shift=0.0):
            return self.lin(x) + shift

    theirs = TorchShift()
    theirs.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    return theirs


def as_numpy(value):
    return value.detach().numpy() if hasattr(value, "detach") else np.asarray(value)


def install(module, log):
    """The same hooks on a lorac or a torch module: each logs its name and what it saw."""
    handles = [
        module.register_forward_pre_hook(lambda m, args: log.append(("pre", len(args)))),
        module.register_forward_pre_hook(lambda m, args, kwargs: log.append(("pre-kw", sorted(kwargs))),
                                         with_kwargs=True),
        module.register_forward_pre_hook(lambda m, args: log.append(("pre-first", len(args))), prepend=True),
        module.register_forward_hook(lambda m, args, out: log.append(("post", as_numpy(out).shape))),
        module.register_forward_hook(lambda m, args, kwargs, out: log.append(("post-kw", sorted(kwargs))),
                                     with_kwargs=True),
        module.register_forward_hook(lambda m, args, out: log.append(("post-first", len(args))), prepend=True),
    ]
    return handles


@pytest.mark.torch
def test_hooks_run_in_torchs_order_with_torchs_arguments():
    torch = pytest.importorskip("torch")
    ours = Shift()
    theirs = torch_twin(ours)
    x = np.random.default_rng(0).standard_normal((4, 3))
    ours_log, theirs_log = [], []
    install(ours, ours_log)
    install(theirs, theirs_log)
    y = ours(x, shift=1.5)
    expected = theirs(torch.from_numpy(x), shift=1.5)
    np.testing.assert_allclose(y, expected.detach().numpy(), rtol=1e-12)
    assert ours_log == theirs_log
    assert [event for event, _ in ours_log] == ["pre-first", "pre", "pre-kw", "post-first", "post", "post-kw"]


@pytest.mark.torch
def test_hooks_replace_inputs_and_outputs_in_eval_mode_as_torch():
    torch = pytest.importorskip("torch")
    ours = Shift().eval()
    theirs = torch_twin(ours).eval()
    x = np.random.default_rng(1).standard_normal((2, 3))
    for module, wrap in ((ours, np.asarray), (theirs, torch.from_numpy)):
        module.register_forward_pre_hook(lambda m, args: args[0] * 2)            # a bare value: the new args[0]
        module.register_forward_pre_hook(lambda m, args, kwargs: (args, {"shift": kwargs.get("shift", 0) + 1}),
                                         with_kwargs=True)
        module.register_forward_hook(lambda m, args, out: out * 3)
    y = ours(x, shift=0.5)
    expected = theirs(torch.from_numpy(x), shift=0.5).detach().numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_allclose(y, 3 * (ours.lin(2 * x) + 1.5), rtol=1e-12)


@pytest.mark.parametrize("register, match", [
    (lambda m: m.register_forward_pre_hook(lambda mod, args: args), "returned a new input in training mode"),
    (lambda m: m.register_forward_hook(lambda mod, args, out: out + 1), "returned a new output in training mode"),
])
def test_a_hook_may_only_observe_while_training(register, match):
    model = Shift()
    x = np.ones((2, 3))
    register(model)
    with pytest.raises(RuntimeError, match=match):
        model(x)
    model.eval()
    model(x)  # allowed in eval mode


def test_always_call_hooks_run_when_forward_raises():
    model, seen = Shift(), []
    model.register_forward_hook(lambda m, args, out: seen.append(("always", out)), always_call=True)
    model.register_forward_hook(lambda m, args, out: seen.append(("plain", out)))
    with pytest.raises(ValueError, match="input"):
        model(np.ones((2, 5)))
    assert seen == [("always", None)]


def test_handles_remove_once_work_as_context_managers_and_copies_keep_hooks():
    model, seen = Shift(), []
    x = np.ones((1, 3))
    with model.register_forward_hook(lambda m, args, out: seen.append("a")):
        handle = model.register_forward_pre_hook(lambda m, args: seen.append("b"))
        model(x)
        twin = copy.deepcopy(model)
        handle.remove()
        handle.remove()  # idempotent
        model(x)
    model(x)
    assert seen == ["b", "a", "a"] and "_forward_hooks" not in model.__dict__
    twin(x)
    assert seen[-2:] == ["b", "a"]  # the copy kept both hooks, as torch's deepcopy does


def test_hooks_on_children_capture_activations_of_a_sequential():
    model = lorac.Sequential(lorac.Linear(4, 5, r=2, rng=0), lorac.ReLU(), lorac.Linear(5, 2, rng=1))
    captured = {}
    for name, child in model.named_children():
        child.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, out.copy()))
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    y = model(x)
    np.testing.assert_array_equal(captured["2"], y)
    np.testing.assert_array_equal(captured["1"], np.maximum(captured["0"], 0))
    model.backward(np.ones_like(y))  # observing hooks leave training alone
    assert model[0].lora_A.grad is not None


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.register_forward_hook(3), TypeError, "hook must be callable, got int"),
    (lambda m: m.register_forward_hook(print, prepend=1), TypeError, "prepend must be a bool"),
    (lambda m: m.register_forward_pre_hook(print, with_kwargs="yes"), TypeError, "with_kwargs must be a bool"),
])
def test_bad_registrations(call, error, match):
    model = Shift()
    with pytest.raises(error, match=match):
        call(model)
    assert "_forward_hooks" not in model.__dict__


def test_a_kwargs_pre_hook_must_return_args_and_kwargs():
    model = Shift().eval()
    model.register_forward_pre_hook(lambda m, args, kwargs: args, with_kwargs=True)
    with pytest.raises(RuntimeError, match=r"must return None or a tuple \(new_args, new_kwargs\)"):
        model(np.ones((1, 3)))

"""lorac.optim.lr_scheduler vs closed-form references and torch.optim.lr_scheduler."""

import math

import numpy as np
import pytest

import lorac
from lorac.optim import lr_scheduler

EPOCHS = 30


def optimizer(kind="SGD", lrs=(0.1, 0.02)):
    """Two parameter groups with their own learning rates."""
    groups = [{"params": [lorac.Parameter(np.ones(3))], "lr": lr} for lr in lrs]
    return getattr(lorac.optim, kind)(groups, lr=lrs[0])


SCHEDULES = {  # name -> (kwargs, the factor on initial_lr at epoch e)
    "StepLR": ({"step_size": 4, "gamma": 0.5}, lambda e: 0.5 ** (e // 4)),
    "MultiStepLR": ({"milestones": [9, 3, 20], "gamma": 0.3}, lambda e: 0.3 ** sum(e >= m for m in (3, 9, 20))),
    "ExponentialLR": ({"gamma": 0.9}, lambda e: 0.9 ** e),
    "LinearLR": ({"start_factor": 0.25, "end_factor": 1.0, "total_iters": 8}, lambda e: 0.25 + 0.75 * min(e, 8) / 8),
    "CosineAnnealingLR": ({"T_max": 12, "eta_min": 0.0}, lambda e: (1 + math.cos(math.pi * e / 12)) / 2),
    "LambdaLR": ({"lr_lambda": lambda e: 1.0 / (1 + e)}, lambda e: 1.0 / (1 + e)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_schedule_follows_its_closed_form(name):
    kwargs, factor = SCHEDULES[name]
    opt = optimizer()
    sched = getattr(lr_scheduler, name)(opt, **kwargs)
    for epoch in range(EPOCHS):
        expected = [lr * factor(epoch) for lr in (0.1, 0.02)]
        np.testing.assert_allclose(sched.get_last_lr(), expected, rtol=1e-14, atol=1e-17)
        assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()
        assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.02]
        opt.step()
        sched.step()


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_schedule_matches_torch(name):
    torch = pytest.importorskip("torch")
    kwargs, _ = SCHEDULES[name]
    opt = optimizer()
    torch_opt = torch.optim.SGD([{"params": [torch.zeros(3, requires_grad=True)], "lr": lr} for lr in (0.1, 0.02)],
                                lr=0.1)
    sched = getattr(lr_scheduler, name)(opt, **kwargs)
    torch_sched = getattr(torch.optim.lr_scheduler, name)(torch_opt, **kwargs)
    for _ in range(EPOCHS):
        np.testing.assert_allclose(sched.get_last_lr(), torch_sched.get_last_lr(), rtol=1e-12, atol=1e-17)
        opt.step()
        torch_opt.step()
        sched.step()
        torch_sched.step()


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_resuming_from_state_dicts_continues_the_schedule(name):
    kwargs, _ = SCHEDULES[name]
    opt = optimizer("AdamW")
    sched = getattr(lr_scheduler, name)(opt, **kwargs)
    for _ in range(7):
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    assert "optimizer" not in saved_sched and saved_sched["last_epoch"] == 7
    resumed_opt = optimizer("AdamW", lrs=(5.0, 5.0))  # other lrs: all come back from the state dicts
    resumed_opt.load_state_dict(saved_opt)
    assert [g["initial_lr"] for g in resumed_opt.param_groups] == [0.1, 0.02]
    resumed = getattr(lr_scheduler, name)(resumed_opt, last_epoch=6, **kwargs)  # torch's resume form
    resumed.load_state_dict(saved_sched)
    for _ in range(10):
        sched.step()
        resumed.step()
        assert resumed.get_last_lr() == sched.get_last_lr()
        assert [g["lr"] for g in resumed_opt.param_groups] == [g["lr"] for g in opt.param_groups]


def test_lambda_lr_per_group_functions_and_callable_objects_state():
    class Warmup:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, epoch):
            return min(1.0, (epoch + 1) / self.steps)

    opt = optimizer()
    warmup = Warmup(4)
    sched = lr_scheduler.LambdaLR(opt, [warmup, lambda e: 0.5])
    assert sched.get_last_lr() == [0.1 * 0.25, 0.02 * 0.5]
    state = sched.state_dict()
    assert state["lr_lambdas"] == [{"steps": 4}, None]
    other = Warmup(100)
    fresh = lr_scheduler.LambdaLR(optimizer(), [other, lambda e: 0.5])
    fresh.load_state_dict(state)
    assert other.steps == 4 and fresh.last_epoch == 0


def test_a_bad_learning_rate_from_a_lambda_raises_and_changes_nothing():
    opt = optimizer()
    sched = lr_scheduler.LambdaLR(opt, lambda e: 1.0 if e < 3 else (math.nan if e == 3 else -1.0))
    for _ in range(2):
        sched.step()
    for _ in range(2):
        with pytest.raises(ValueError, match="learning rate of group 0 at epoch 3 must be a finite number >= 0"):
            sched.step()
        assert sched.last_epoch == 2 and [g["lr"] for g in opt.param_groups] == [0.1, 0.02]


@pytest.mark.parametrize("build, error, message", [
    (lambda o: lr_scheduler.StepLR(o, step_size=0), ValueError, "step_size must be > 0, got 0"),
    (lambda o: lr_scheduler.StepLR(o, step_size=2.5), TypeError, "step_size must be an int, got float"),
    (lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=-0.1), ValueError, "gamma must be >= 0"),
    (lambda o: lr_scheduler.MultiStepLR(o, milestones=[3, -1]), ValueError, "each milestone must be > 0"),
    (lambda o: lr_scheduler.ExponentialLR(o, gamma=math.inf), ValueError, "gamma must be finite"),
    (lambda o: lr_scheduler.LinearLR(o, start_factor=0), ValueError, "start_factor must be > 0"),
    (lambda o: lr_scheduler.LinearLR(o, end_factor=1.5), ValueError, "end_factor must be <= 1"),
    (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=-1), ValueError, "eta_min must be >= 0"),
    (lambda o: lr_scheduler.LambdaLR(o, [lambda e: 1.0]), ValueError, "expected 2 lr_lambdas"),
    (lambda o: lr_scheduler.LambdaLR(o, 0.5), TypeError, "must be a callable"),
    (lambda o: lr_scheduler.StepLR(o, 2, last_epoch=4), KeyError, "has no 'initial_lr'"),
    (lambda o: lr_scheduler.StepLR(o, 2, last_epoch=-2), ValueError, "last_epoch must be an int >= -1"),
    (lambda o: lr_scheduler.StepLR(object(), 2), TypeError, "optimizer must be a lorac.optim optimizer"),
])
def test_bad_arguments_raise_and_leave_the_optimizer_alone(build, error, message):
    opt = optimizer()
    with pytest.raises(error, match=message):
        build(opt)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]


def test_a_hostile_state_dict_is_refused():
    sched = lr_scheduler.StepLR(optimizer(), 2)
    with pytest.raises(ValueError, match="unexpected keys \\['optimizer'\\]"):
        sched.load_state_dict({"optimizer": None})
    with pytest.raises(TypeError, match="expected a dict, got list"):
        sched.load_state_dict([])
    for bad, message in [({"base_lrs": [0.1]}, "base_lrs has 1 entries, the optimizer 2 groups"),
                         ({"base_lrs": [0.1, -1.0]}, "base_lrs must be >= 0"),
                         ({"last_epoch": "3"}, "last_epoch must be an int >= -1")]:
        with pytest.raises(ValueError, match=message):
            sched.load_state_dict(bad)
    assert sched.base_lrs == [0.1, 0.02] and sched.last_epoch == 0
    saved = optimizer().state_dict()
    saved["param_groups"][0]["initial_lr"] = "fast"
    with pytest.raises(TypeError, match="initial_lr must be a real number, got str"):
        optimizer().load_state_dict(saved)

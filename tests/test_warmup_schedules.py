"""Hugging Face's warm-up schedules (lorac.optim.get_*_schedule_with_warmup)
against transformers' own functions driving a torch optimizer, and against
the closed forms."""

import math

import numpy as np
import pytest

import lorac
from lorac.optim import (SGD, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                         get_linear_schedule_with_warmup)

CASES = [
    ("constant", dict(num_warmup_steps=4)),
    ("constant", dict(num_warmup_steps=0)),
    ("linear", dict(num_warmup_steps=3, num_training_steps=10)),
    ("linear", dict(num_warmup_steps=0, num_training_steps=7)),
    ("linear", dict(num_warmup_steps=5, num_training_steps=5)),
    ("cosine", dict(num_warmup_steps=3, num_training_steps=12)),
    ("cosine", dict(num_warmup_steps=2, num_training_steps=9, num_cycles=1.5)),
    ("cosine", dict(num_warmup_steps=0, num_training_steps=1)),
]
OURS = {"constant": get_constant_schedule_with_warmup, "linear": get_linear_schedule_with_warmup,
        "cosine": get_cosine_schedule_with_warmup}


def closed_form(kind, t, num_warmup_steps, num_training_steps=0, num_cycles=0.5):
    if t < num_warmup_steps:
        return t / max(1, num_warmup_steps)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (num_training_steps - t) / max(1, num_training_steps - num_warmup_steps))
    p = (t - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * p)))


def lorac_lrs(kind, kwargs, steps, lr=0.3):
    opt = SGD([lorac.Parameter(np.zeros(2))], lr=lr)
    sched = OURS[kind](opt, **kwargs)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert sched.get_last_lr() == [lrs[-1]]
    return lrs


@pytest.mark.parametrize("kind,kwargs", CASES)
def test_matches_closed_form(kind, kwargs):
    lrs = lorac_lrs(kind, kwargs, 15)
    np.testing.assert_allclose(lrs, [0.3 * closed_form(kind, t, **kwargs) for t in range(16)], rtol=1e-15,
                               atol=1e-18)


@pytest.mark.torch
@pytest.mark.parametrize("kind,kwargs", CASES)
def test_matches_transformers(kind, kwargs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
    tsched = getattr(transformers, OURS[kind].__name__)(topt, **kwargs)
    expected = [topt.param_groups[0]["lr"]]
    for _ in range(15):
        topt.step()
        tsched.step()
        expected.append(topt.param_groups[0]["lr"])
    np.testing.assert_allclose(lorac_lrs(kind, kwargs, 15), expected, rtol=1e-15, atol=1e-18)


def test_state_dict_resumes_the_schedule():
    opt = SGD([lorac.Parameter(np.zeros(2))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, 2, 10)
    for _ in range(4):
        sched.step()
    saved = sched.state_dict()
    assert saved["lr_lambdas"][0] == {"kind": "cosine", "num_warmup_steps": 2, "num_training_steps": 10,
                                      "num_cycles": 0.5}
    opt2 = SGD([lorac.Parameter(np.zeros(2))], lr=1.0)
    resumed = get_cosine_schedule_with_warmup(opt2, 0, 1)  # settings come from the state dict
    resumed.load_state_dict(saved)
    sched.step()
    resumed.step()
    assert resumed.get_last_lr() == sched.get_last_lr() == [pytest.approx(closed_form("cosine", 5, 2, 10))]


@pytest.mark.parametrize("make,error,match", [
    (lambda o: get_linear_schedule_with_warmup(o, -1, 10), ValueError, r"num_warmup_steps must be >= 0, got -1"),
    (lambda o: get_linear_schedule_with_warmup(o, 1, 2.5), TypeError, r"num_training_steps must be an int, got float"),
    (lambda o: get_constant_schedule_with_warmup(o, True), TypeError, r"must be an int, got bool"),
    (lambda o: get_cosine_schedule_with_warmup(o, 1, 5, num_cycles=float("nan")), ValueError,
     r"num_cycles must be a finite number >= 0, got nan"),
    (lambda o: get_cosine_schedule_with_warmup(object(), 1, 5), TypeError, r"optimizer must be a lorac.optim"),
])
def test_bad_input(make, error, match):
    opt = SGD([lorac.Parameter(np.zeros(2))], lr=1.0)
    with pytest.raises(error, match=match):
        make(opt)
    assert opt.param_groups[0]["lr"] == 1.0 and "initial_lr" not in opt.param_groups[0]

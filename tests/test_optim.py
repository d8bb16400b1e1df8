"""lorac.optim (SGD, Adam, AdamW) vs NumPy float64 references and torch.optim."""

import numpy as np
import pytest

import lorac
from lorac import _C
from lorac.optim import SGD, Adam, AdamW

DTYPES = [np.float32, np.float64]
SIZES = [0, 1, 7, 64, 1001]


# -- NumPy float64 references of torch's update rules --------------------------------

def sgd_reference(p, g, buf, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False):
    p, g = p.astype(np.float64), g.astype(np.float64)
    d = -g if maximize else g.copy()
    d = d + weight_decay * p
    if momentum:
        buf = d.copy() if buf is None else momentum * buf.astype(np.float64) + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf


def adam_reference(p, g, m, v, vmax, step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                   maximize=False):
    p, g, m, v = (a.astype(np.float64) for a in (p, g, m, v))
    g = -g if maximize else g
    if weight_decay:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    denom_v = v
    if amsgrad:
        vmax = np.maximum(vmax.astype(np.float64), v)
        denom_v = vmax
    denom = np.sqrt(denom_v) / np.sqrt(1 - beta2 ** step) + eps
    return p - lr / (1 - beta1 ** step) * m / denom, m, v, vmax


def tol(dtype):
    return dict(rtol=3e-6, atol=3e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-13)


# -- kernels --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize", [
    (0.0, 0.0, False, 0.0, False), (0.9, 0.0, False, 0.0, False), (0.9, 0.3, False, 0.01, False),
    (0.8, 0.0, True, 0.05, False), (0.5, 0.0, True, 0.0, True)])
def test_sgd_kernel_matches_reference(rng, dtype, n, momentum, dampening, nesterov, weight_decay, maximize):
    p = rng.standard_normal(n).astype(dtype)
    buf = None
    ref_p, ref_buf = p.astype(np.float64), None
    kbuf = np.zeros(n, dtype) if momentum else None
    for step in range(3):
        g = rng.standard_normal(n).astype(dtype)
        _C.sgd_step(p, g, kbuf, 0.1, momentum, dampening, weight_decay, nesterov, maximize, step == 0)
        ref_p, ref_buf = sgd_reference(ref_p, g, ref_buf, 0.1, momentum, dampening, weight_decay, nesterov,
                                       maximize)
        np.testing.assert_allclose(p, ref_p, **tol(dtype))
        if momentum:
            np.testing.assert_allclose(kbuf, ref_buf, **tol(dtype))
    del buf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("decoupled,amsgrad,weight_decay,maximize", [
    (False, False, 0.0, False), (False, True, 0.1, False), (True, False, 0.01, False), (True, True, 0.1, True)])
def test_adam_kernel_matches_reference(rng, dtype, n, decoupled, amsgrad, weight_decay, maximize):
    p = rng.standard_normal(n).astype(dtype)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    vmax = np.zeros(n, dtype) if amsgrad else None
    ref = (p.astype(np.float64), np.zeros(n), np.zeros(n), np.zeros(n) if amsgrad else None)
    for step in range(1, 5):
        g = (rng.standard_normal(n) * (0.1 if step % 2 else 3.0)).astype(dtype)  # amsgrad's max matters
        _C.adam_step(p, g, m, v, vmax, step, 1e-2, 0.9, 0.99, 1e-8, weight_decay, decoupled, amsgrad, maximize)
        ref = adam_reference(ref[0], g, ref[1], ref[2], ref[3], step, 1e-2, 0.9, 0.99, 1e-8, weight_decay,
                             decoupled, amsgrad, maximize)
        np.testing.assert_allclose(p, ref[0], **tol(dtype))
        np.testing.assert_allclose(m, ref[1], **tol(dtype))
        np.testing.assert_allclose(v, ref[2], **tol(dtype))
        if amsgrad:
            np.testing.assert_allclose(vmax, ref[3], **tol(dtype))


def test_adam_kernel_propagates_nan_like_torch_maximum():
    p, g = np.zeros(2), np.array([np.nan, 1.0])
    m, v, vmax = np.zeros(2), np.zeros(2), np.zeros(2)
    _C.adam_step(p, g, m, v, vmax, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, False, True, False)
    assert np.isnan(vmax[0]) and np.isnan(p[0]) and np.isfinite(p[1])


def test_kernels_bad_input():
    p, g = np.zeros(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(TypeError, match=r"adam_step\(\): 'grad' must have dtype float32, got float64"):
        _C.adam_step(p, g.astype(np.float64), np.zeros(3, np.float32), np.zeros(3, np.float32), None, 1,
                     0.1, 0.9, 0.999, 1e-8, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"adam_step\(\): 'exp_avg' must have shape \(n,\) = \(3,\), got shape \(4,\)"):
        _C.adam_step(p, g, np.zeros(4, np.float32), np.zeros(3, np.float32), None, 1, 0.1, 0.9, 0.999,
                     1e-8, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"'step' must be >= 1, got 0"):
        _C.adam_step(p, g, p.copy(), p.copy(), None, 0, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"'beta1' must be in \[0, 1\), got 1"):
        _C.adam_step(p, g, p.copy(), p.copy(), None, 1, 0.1, 1.0, 0.999, 1e-8, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"'max_exp_avg_sq' must be an array exactly when amsgrad"):
        _C.adam_step(p, g, p.copy(), p.copy(), None, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, False, True, False)
    with pytest.raises(ValueError, match=r"'lr' must be finite, got nan"):
        _C.sgd_step(p, g, None, float("nan"), 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"'momentum_buffer' must be None exactly when momentum == 0"):
        _C.sgd_step(p, g, None, 0.1, 0.9, 0.0, 0.0, False, False, True)
    ro = p.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"sgd_step\(\): 'param' is updated in place but is read-only"):
        _C.sgd_step(ro, g, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"sgd_step\(\): 'param' is updated in place and must be"):
        _C.sgd_step(np.zeros(6, np.float32)[::2], g, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(TypeError, match=r"sgd_step\(\): 'param' must have dtype float32 or float64, got int64"):
        _C.sgd_step(np.zeros(3, np.int64), g, None, 0.1, 0.0, 0.0, 0.0, False, False, False)


# -- optimizers vs torch.optim --------------------------------------------------------------

SHAPES = [(5, 3), (7,), (2, 3, 4), (1, 1)]
TORCH_CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.5, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.3, betas=(0.5, 0.9))),
    ("AdamW", dict(lr=1e-2, amsgrad=True)),
]


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,kwargs", TORCH_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TORCH_CASES)])
def test_matches_torch_over_20_steps(rng, dtype, name, kwargs):
    torch = pytest.importorskip("torch")
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ours = [lorac.Parameter(a.copy()) for a in init]
    theirs = [torch.nn.Parameter(torch.tensor(a.copy(), dtype=tdtype)) for a in init]
    ours[3].requires_grad = False  # frozen: never gets a gradient, like a LoRA base weight
    theirs[3].requires_grad_(False)
    opt = getattr(lorac.optim, name)(ours, **kwargs)
    topt = getattr(torch.optim, name)(theirs, **kwargs)
    for step in range(20):
        if step == 10:  # a scheduler-style learning-rate change
            opt.param_groups[0]["lr"] *= 0.5
            topt.param_groups[0]["lr"] *= 0.5
        for i, (p, tp) in enumerate(zip(ours, theirs)):
            if i == 3 or (i == 1 and step % 3 == 2):  # no gradient this step: skipped by both
                p.grad, tp.grad = None, None
                continue
            g = (rng.standard_normal(p.shape) * (1 + step % 4)).astype(dtype)
            p.grad = g.copy()
            tp.grad = torch.tensor(g, dtype=tdtype)
        opt.step()
        topt.step()
    t = dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), **t)
    assert ours[3] not in opt.state and len(opt.state) == len(topt.state)
    assert len(opt.state) == (0 if name == "SGD" and not kwargs.get("momentum") else 3)
    for p, tp in zip(ours[:3], theirs[:3]):
        for key, value in topt.state.get(tp, {}).items():
            if key == "step":
                assert opt.state[p]["step"] == int(value)
            elif value is not None:
                np.testing.assert_allclose(opt.state[p][key], value.numpy(), **t)


@pytest.mark.torch
def test_loads_torch_state_dict_and_continues_identically(rng):
    torch = pytest.importorskip("torch")
    init = rng.standard_normal((4, 6))
    tp = torch.nn.Parameter(torch.tensor(init))
    topt = torch.optim.AdamW([tp], lr=1e-2, amsgrad=True)
    grads = [rng.standard_normal((4, 6)) for _ in range(8)]
    for g in grads[:4]:
        tp.grad = torch.tensor(g)
        topt.step()
    p = lorac.Parameter(tp.detach().numpy().copy())
    opt = AdamW([p], lr=1.0)  # hyper-parameters come from the state dict
    opt.load_state_dict(topt.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["amsgrad"]
    for g in grads[4:]:
        tp.grad, p.grad = torch.tensor(g), g.copy()
        topt.step()
        opt.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


# -- state: frozen parameters, state dicts ------------------------------------------------------

def _lora_model(seed=0, dtype=np.float32):
    model = lorac.Sequential(lorac.Linear(6, 8, r=2, rng=seed, dtype=dtype), lorac.ReLU(),
                             lorac.Linear(8, 3, r=2, rng=seed + 1, dtype=dtype))
    for layer in (model[0], model[2]):
        layer.lora_B.data[...] = np.random.default_rng(seed).standard_normal(layer.lora_B.shape)
    lorac.mark_only_lora_as_trainable(model)
    return model


def _train(model, opt, steps, seed):
    rng = np.random.default_rng(seed)
    crit = lorac.CrossEntropyLoss()
    for _ in range(steps):
        x = rng.standard_normal((5, 6)).astype(model[0].dtype)
        crit(model(x), rng.integers(0, 3, 5))
        model.backward(crit.backward())
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_frozen_parameters_get_no_state_or_gradients(cls):
    model = _lora_model()
    kwargs = dict(lr=0.1, momentum=0.9) if cls is SGD else {}
    opt = cls(model.parameters(), **kwargs)
    frozen = {id(p) for n, p in model.named_parameters() if "lora_" not in n}
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    _train(model, opt, 3, 0)
    assert len(opt.state) == 4  # lora_A and lora_B of two layers
    assert all(id(p) not in frozen for p in opt.state)
    for name, p in model.named_parameters():
        assert p.grad is None
        changed = not np.array_equal(p.data, before[name])
        assert changed == ("lora_" in name), name
    state_bytes = sum(a.nbytes for s in opt.state.values() for a in s.values() if isinstance(a, np.ndarray))
    lora_bytes = sum(p.nbytes for n, p in model.named_parameters() if "lora_" in n)
    assert state_bytes == (lora_bytes if cls is SGD else 2 * lora_bytes)


@pytest.mark.parametrize("cls,kwargs", [(SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
                                        (Adam, dict(lr=0.01, amsgrad=True)), (AdamW, dict(lr=0.01))])
def test_state_dict_round_trip(cls, kwargs):
    a, b = _lora_model(1, np.float64), _lora_model(1, np.float64)
    opt_a = cls(a.parameters(), **kwargs)
    _train(a, opt_a, 4, 7)
    sd = opt_a.state_dict()
    assert set(sd) == {"state", "param_groups"} and sd["param_groups"][0]["params"] == list(range(8))
    assert sorted(sd["state"]) == [2, 3, 6, 7]  # indices of the lora_ parameters in model.parameters()
    b.load_state_dict(a.state_dict())
    opt_b = cls(b.parameters(), lr=123.0)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] == kwargs["lr"]
    for arr in (v for s in sd["state"].values() for v in s.values() if isinstance(v, np.ndarray)):
        arr[...] = 1e6  # the state dict holds copies: neither optimizer sees this
    _train(a, opt_a, 3, 8)
    _train(b, opt_b, 3, 8)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)


def test_load_state_dict_is_all_or_nothing():
    model = _lora_model()
    opt = Adam(model.parameters(), lr=0.01)
    _train(model, opt, 2, 0)
    sd = opt.state_dict()
    before = {id(p): {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
              for p, s in opt.state.items()}
    bad = opt.state_dict()
    bad["state"][7]["exp_avg"] = np.zeros((9, 9))
    bad["param_groups"][0]["lr"] = 5.0
    with pytest.raises(ValueError, match=r"state\[7\]\['exp_avg'\] has shape \(9, 9\), the parameter has shape"):
        opt.load_state_dict(bad)
    missing = opt.state_dict()
    del missing["state"][2]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"state\[2\] lacks \['exp_avg_sq'\]"):
        opt.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"1 parameter group\(s\) in the state dict"):
        Adam([{"params": [model[0].lora_A]}, {"params": [model[0].lora_B]}]).load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.01
    for p, s in opt.state.items():
        for k, v in s.items():
            np.testing.assert_array_equal(v, before[id(p)][k])


def test_param_groups_have_their_own_hyper_parameters():
    p1, p2 = lorac.Parameter(np.ones(3)), lorac.Parameter(np.ones(3))
    opt = SGD([{"params": [p1]}, {"params": [p2], "lr": 1.0}], lr=0.1)
    p1.grad, p2.grad = np.ones(3), np.ones(3)
    opt.step()
    np.testing.assert_allclose(p1.data, 0.9)
    np.testing.assert_allclose(p2.data, 0.0)


def test_zero_grad_and_closure():
    p = lorac.Parameter(np.ones(3))
    opt = SGD([p], lr=0.5)
    p.grad = np.ones(3)
    assert opt.step(closure=lambda: 42.0) == 42.0
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(p.grad, 0)
    opt.zero_grad()
    assert p.grad is None


@pytest.mark.parametrize("make,error,match", [
    (lambda ps: SGD(ps, lr=-1), ValueError, r"SGD: lr must be >= 0, got -1"),
    (lambda ps: SGD(ps, lr=0.1, nesterov=True), ValueError, r"nesterov momentum requires momentum > 0"),
    (lambda ps: SGD(ps, lr="fast"), TypeError, r"SGD: lr must be a real number, got str"),
    (lambda ps: Adam(ps, betas=(0.9, 1.0)), ValueError, r"Adam: betas\[1\] must be < 1, got 1"),
    (lambda ps: Adam(ps, betas=0.9), TypeError, r"betas must be a pair"),
    (lambda ps: AdamW(ps, eps=-1e-8), ValueError, r"AdamW: eps must be >= 0"),
    (lambda ps: AdamW(ps, weight_decay=float("inf")), ValueError, r"weight_decay must be finite"),
    (lambda ps: Adam([]), ValueError, r"Adam got an empty parameter list"),
    (lambda ps: Adam(ps[0]), TypeError, r"got a single Parameter"),
    (lambda ps: Adam([np.zeros(3)]), TypeError, r"params\[0\] must be a lorac.Parameter, got ndarray"),
    (lambda ps: Adam([ps[0], ps[0]]), ValueError, r"appears twice"),
    (lambda ps: Adam([{"params": ps}, {"params": ps[:1]}]), ValueError, r"more than one parameter group"),
    (lambda ps: Adam([{"params": ps, "momentum": 0.9}]), TypeError, r"unknown hyper-parameter\(s\) \['momentum'\]"),
    (lambda ps: Adam([lorac.Parameter(np.zeros(3, np.int32))]), TypeError, r"dtype float32 or float64, got int32"),
])
def test_constructor_bad_input(make, error, match):
    params = [lorac.Parameter(np.zeros((2, 2), np.float32)), lorac.Parameter(np.zeros(2, np.float32))]
    with pytest.raises(error, match=match):
        make(params)


@pytest.mark.parametrize("bad_grad,error,match", [
    (np.zeros((3, 2), np.float32), ValueError, r"gradient of shape \(3, 2\) for a parameter of shape \(2, 3\)"),
    (np.zeros((2, 3), np.float64), TypeError, r"gradient of dtype float64 for a parameter of dtype float32"),
    ([[0.0] * 3] * 2, TypeError, r"a gradient must be a numpy.ndarray, got list"),
])
def test_step_checks_every_gradient_before_updating(bad_grad, error, match):
    good, bad = lorac.Parameter(np.ones(4, np.float32)), lorac.Parameter(np.ones((2, 3), np.float32))
    opt = Adam([good, bad], lr=0.1)
    good.grad, bad.grad = np.ones(4, np.float32), bad_grad
    with pytest.raises(error, match=match):
        opt.step()
    np.testing.assert_array_equal(good.data, 1.0)  # the valid parameter was not updated either
    assert not opt.state


def test_step_refuses_aliased_or_non_contiguous_parameters():
    p = lorac.Parameter(np.ones(4))
    opt = SGD([p], lr=0.1)
    p.grad = p.data
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    p.data = np.ones((4, 2))[:, 0]
    p.grad = np.ones(4)
    with pytest.raises(ValueError, match="writable C-contiguous"):
        opt.step()


# -- named parameters (torch's optimizer(model.named_parameters())) ----------------------------

def test_named_parameters_are_kept_saved_and_do_not_change_updates():
    named, plain = _lora_model(2, np.float64), _lora_model(2, np.float64)
    opt_named = Adam(named.named_parameters(), lr=0.01)
    opt_plain = Adam(plain.parameters(), lr=0.01)
    names = [n for n, _ in named.named_parameters()]
    assert opt_named.param_groups[0]["param_names"] == names
    assert "param_names" not in opt_plain.param_groups[0]
    _train(named, opt_named, 3, 5)
    _train(plain, opt_plain, 3, 5)
    for (name, pa), pb in zip(named.named_parameters(), plain.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
    sd = opt_named.state_dict()
    assert sd["param_groups"][0]["param_names"] == names
    sd["param_groups"][0]["param_names"].append("changed")  # a copy: the optimizer keeps its list
    assert opt_named.param_groups[0]["param_names"] == names
    # saved names replace the optimizer's (torch's rule); an unnamed optimizer takes them too
    renamed = opt_named.state_dict()
    renamed["param_groups"][0]["param_names"] = [f"p{i}" for i in range(len(names))]
    opt_plain.load_state_dict(renamed)
    assert opt_plain.param_groups[0]["param_names"] == [f"p{i}" for i in range(len(names))]
    opt_named.load_state_dict(opt_plain.state_dict() | {"param_groups": [
        {k: v for k, v in g.items() if k != "param_names"} for g in opt_plain.state_dict()["param_groups"]]})
    assert opt_named.param_groups[0]["param_names"] == names  # none saved: ours stay


def test_named_parameter_groups():
    model = _lora_model()
    first = [(n, p) for n, p in model.named_parameters() if n.startswith("0.")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("0.")]
    opt = SGD([{"params": first, "lr": 1.0}, {"params": rest}], lr=0.1)
    assert [g["param_names"] for g in opt.param_groups] == [[n for n, _ in first], [n for n, _ in rest]]
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.1]
    assert "param_names: ['0.weight'" in repr(opt)


@pytest.mark.torch
def test_named_state_dict_matches_torch_and_loads(rng):
    torch = pytest.importorskip("torch")
    init = {"a.weight": rng.standard_normal((3, 4)), "a.bias": rng.standard_normal(3)}
    tparams = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in init.items()}
    topt = torch.optim.Adam(tparams.items(), lr=1e-2)
    params = {n: lorac.Parameter(v.copy()) for n, v in init.items()}
    opt = Adam(params.items(), lr=1e-2)
    for _ in range(3):
        grads = {n: rng.standard_normal(v.shape) for n, v in init.items()}
        for n in init:
            tparams[n].grad, params[n].grad = torch.tensor(grads[n]), grads[n].copy()
        topt.step()
        opt.step()
    tsd, sd = topt.state_dict(), opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == tsd["param_groups"][0]["param_names"] == list(init)
    fresh = Adam([(f"x{i}", lorac.Parameter(v.copy())) for i, v in enumerate(init.values())], lr=1.0)
    fresh.load_state_dict(tsd)
    assert fresh.param_groups[0]["param_names"] == list(init)
    for (n, p), q in zip(params.items(), fresh.param_groups[0]["params"]):
        np.testing.assert_allclose(fresh.state[q]["exp_avg"], topt.state[tparams[n]]["exp_avg"].numpy(),
                                   rtol=1e-12, err_msg=n)


@pytest.mark.parametrize("make,error,match", [
    (lambda m: SGD([("w", m[0].weight), m[0].bias], lr=0.1), ValueError, r"mixes \(name, Parameter\) pairs"),
    (lambda m: SGD([(0, m[0].weight)], lr=0.1), TypeError, r"params\[0\] must be a \(str name, Parameter\) pair"),
    (lambda m: SGD([("w", m[0].weight, 1)], lr=0.1), TypeError, r"pair, got a tuple of str, Parameter, int"),
    (lambda m: SGD([{"params": [("w", m[0].weight)]}, {"params": [m[0].bias]}], lr=0.1), ValueError,
     r"all parameter groups must be named .* or none; cannot add a group without names"),
    (lambda m: SGD([{"params": [m[0].bias]}, {"params": [("w", m[0].weight)]}], lr=0.1), ValueError,
     r"cannot add a group with names"),
    (lambda m: SGD(set(m.parameters()), lr=0.1), TypeError, r"ordered iterable .* got a set"),
    (lambda m: SGD([{"params": set(m.parameters())}], lr=0.1), TypeError, r"got a set"),
])
def test_named_parameters_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make(_lora_model())


@pytest.mark.parametrize("names,error,match", [
    ("abc", TypeError, r"group 0's param_names must be a list of str, got str"),
    (["a"], ValueError, r"group 0's param_names must be 8 str"),
    ([1] * 8, ValueError, r"must be 8 str"),
])
def test_load_state_dict_checks_param_names_before_changing_anything(names, error, match):
    model = _lora_model()
    opt = Adam(model.named_parameters(), lr=0.01)
    _train(model, opt, 1, 0)
    bad = opt.state_dict()
    bad["param_groups"][0]["param_names"] = names
    bad["param_groups"][0]["lr"] = 5.0
    with pytest.raises(error, match=match):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]

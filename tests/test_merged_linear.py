"""lorac.MergedLinear and its C kernels vs a NumPy float64 reference.

The reference builds loralib's dense block-diagonal delta (zero rows for the
disabled groups) — exactly what the kernels avoid — so it is independent of
their per-group slicing."""

import itertools

import numpy as np
import pytest

import lorac
from lorac import _C
from reference import assert_close, central_difference

DTYPES = [np.float32, np.float64]
# (n, in, groups, og, r): empty batch, one row, odd sizes, r > in, > 64 rows (dropout blocks)
SHAPES = [(0, 5, 3, 2, 2), (1, 1, 1, 1, 1), (1, 7, 3, 5, 3), (13, 31, 3, 7, 4), (70, 20, 4, 9, 8),
          (9, 6, 2, 3, 16), (4, 0, 3, 2, 2), (4, 6, 3, 0, 2)]
PATTERNS = [(True, False, True), (True, True, True), (False, True, False), (True, False, False, True),
            (True,), (False, True)]


# -- float64 references --------------------------------------------------------
def dense_delta(a, b, enable_lora, out):
    """loralib's zero-padded delta (out, in): group e's B_e A_e in the rows of its block."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    groups, enabled = len(enable_lora), [g for g, on in enumerate(enable_lora) if on]
    og, r = out // groups, a.shape[0] // max(len(enabled), 1)
    delta = np.zeros((out, a.shape[1]))
    for e, g in enumerate(enabled):
        delta[g * og:(g + 1) * og] = b[e * og:(e + 1) * og] @ a[e * r:(e + 1) * r]
    return delta


def ref_forward(x, w, bias, a, b, enable_lora, scaling, fan_in_fan_out=False, mask=None, keep=1.0):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    w_out_in = w.T if fan_in_fan_out else w
    y = x @ w_out_in.T
    if bias is not None:
        y = y + bias
    if a is not None:
        xd = x if mask is None else x * mask * keep
        y = y + scaling * xd @ dense_delta(a, b, enable_lora, w_out_in.shape[0]).T
    return y


def ref_backward(g, x, w, a, b, enable_lora, scaling, fan_in_fan_out=False, mask=None, keep=1.0):
    """dict of dx, dw (stored layout), dbias, da, db in float64, through the dense delta."""
    g, x, w = np.asarray(g, np.float64), np.asarray(x, np.float64), np.asarray(w, np.float64)
    w_out_in = w.T if fan_in_fan_out else w
    out = w_out_in.shape[0]
    dw = g.T @ x
    res = {"dx": g @ w_out_in, "dw": dw.T if fan_in_fan_out else dw, "dbias": g.sum(axis=0)}
    if a is not None:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        m = 1.0 if mask is None else mask * keep
        xd = x * m
        res["dx"] = res["dx"] + scaling * (g @ dense_delta(a, b, enable_lora, out)) * m
        # d(loss)/d(delta) = scaling * g^T xd, then the chain rule through delta's blocks
        d_delta = scaling * g.T @ xd
        enabled = [k for k, on in enumerate(enable_lora) if on]
        og, r = out // len(enable_lora), a.shape[0] // len(enabled)
        da, db = np.zeros_like(a), np.zeros_like(b)
        for e, k in enumerate(enabled):
            blk = d_delta[k * og:(k + 1) * og]
            da[e * r:(e + 1) * r] = b[e * og:(e + 1) * og].T @ blk
            db[e * og:(e + 1) * og] = blk @ a[e * r:(e + 1) * r].T
        res["da"], res["db"] = da, db
    return res


def make_operands(rng, n, fin, groups, og, r, enable_lora, dtype, fan_in_fan_out, bias, dropout):
    fout, n_en = groups * og, sum(enable_lora)
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fin, fout) if fan_in_fan_out else (fout, fin)).astype(dtype)
    bvec = rng.standard_normal(fout).astype(dtype) if bias else None
    a = rng.standard_normal((r * n_en, fin)).astype(dtype)
    b = rng.standard_normal((og * n_en, r)).astype(dtype)
    mask = (rng.random((n, fin)) >= 0.3).astype(np.uint8) if dropout else None
    return x, w, bvec, a, b, mask


def fit_pattern(pattern, groups):
    """The pattern resized to `groups` entries (cycled), with at least one True."""
    flags = tuple(pattern[i % len(pattern)] for i in range(groups))
    return flags if any(flags) else (True,) + flags[1:]


def randomize(layer, rng):
    for p in layer.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    return layer


# -- kernels ---------------------------------------------------------------------
CASES = list(itertools.product(SHAPES, DTYPES, [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("shape,dtype,fan_in_fan_out,bias,dropout", CASES)
def test_forward_matches_reference(rng, shape, dtype, fan_in_fan_out, bias, dropout):
    n, fin, groups, og, r = shape
    for pattern in PATTERNS[:3]:
        en = fit_pattern(pattern, groups)
        x, w, bv, a, b, mask = make_operands(rng, n, fin, groups, og, r, en, dtype, fan_in_fan_out, bias, dropout)
        keep = 1 / 0.7
        y, u = _C.merged_linear_forward(x, w, bv, a, b, list(en), 0.75, fan_in_fan_out, mask, keep)
        assert y.dtype == dtype and y.shape == (n, groups * og) and u.shape == (n, r * sum(en))
        assert_close(y, ref_forward(x, w, bv, a, b, en, 0.75, fan_in_fan_out, mask, keep), dtype)
        xd = x.astype(np.float64) * (1 if mask is None else mask * keep)
        assert_close(u, xd @ a.astype(np.float64).T, dtype)


@pytest.mark.parametrize("shape,dtype,fan_in_fan_out,bias,dropout", CASES)
def test_backward_matches_reference(rng, shape, dtype, fan_in_fan_out, bias, dropout):
    n, fin, groups, og, r = shape
    for pattern in PATTERNS[:3]:
        en = fit_pattern(pattern, groups)
        x, w, bv, a, b, mask = make_operands(rng, n, fin, groups, og, r, en, dtype, fan_in_fan_out, bias, dropout)
        keep = 1 / 0.7
        _, u = _C.merged_linear_forward(x, w, bv, a, b, en, 0.75, fan_in_fan_out, mask, keep)
        g = rng.standard_normal((n, groups * og)).astype(dtype)
        start = {k: rng.standard_normal(s).astype(dtype) for k, s in
                 {"dw": w.shape, "dbias": (groups * og,), "da": a.shape, "db": b.shape}.items()}
        acc = {k: v.copy() for k, v in start.items()}
        dx = _C.merged_linear_backward(g, x, w, a, b, u, en, 0.75, fan_in_fan_out, mask, keep, True,
                                       acc["dw"], acc["dbias"] if bias else None, acc["da"], acc["db"])
        ref = ref_backward(g, x, w, a, b, en, 0.75, fan_in_fan_out, mask, keep)
        assert dx.shape == (n, fin) and dx.dtype == dtype
        assert_close(dx, ref["dx"], dtype)
        for k in ("dw", "da", "db") + (("dbias",) if bias else ()):
            assert_close(acc[k], start[k] + ref[k], dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_enable_pattern(rng, pattern, dtype):
    groups, og, r, fin, n = len(pattern), 5, 3, 11, 17
    en = pattern
    x, w, bv, a, b, _ = make_operands(rng, n, fin, groups, og, r, en, dtype, False, True, False)
    if not any(en):  # no adapter: lora arrays must be None
        with pytest.raises(ValueError, match="no True entry"):
            _C.merged_linear_forward(x, w, bv, np.zeros((r, fin), dtype), np.zeros((og, r), dtype), en, 1.0, False)
        y, u = _C.merged_linear_forward(x, w, bv, None, None, en, 1.0, False)
        assert u is None
        assert_close(y, ref_forward(x, w, bv, None, None, en, 1.0), dtype)
        return
    y, _ = _C.merged_linear_forward(x, w, bv, a, b, np.array(en), 2.0, False)
    assert_close(y, ref_forward(x, w, bv, a, b, en, 2.0), dtype)
    # disabled blocks are exactly the base layer's
    base = x.astype(np.float64) @ w.T.astype(np.float64) + bv
    off = np.repeat(~np.array(en), og)
    assert_close(y[:, off], base[:, off], dtype)


def test_frozen_gradients_are_not_touched(rng):
    en = (True, False, True)
    x, w, bv, a, b, _ = make_operands(rng, 5, 6, 3, 4, 2, en, np.float32, False, True, False)
    _, u = _C.merged_linear_forward(x, w, bv, a, b, en, 2.0, False)
    g = rng.standard_normal((5, 12)).astype(np.float32)
    db = np.zeros_like(b)
    out = _C.merged_linear_backward(g, x, w, a, b, u, en, 2.0, False, None, 1.0, False, None, None, None, db)
    assert out is None
    assert_close(db, ref_backward(g, x, w, a, b, en, 2.0)["db"], np.float32)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_gradients_match_finite_differences(rng, fan_in_fan_out, dropout):
    en = (True, False, True)
    n, fin, groups, og, r = 3, 5, 3, 2, 2
    x, w, bv, a, b, mask = make_operands(rng, n, fin, groups, og, r, en, np.float64, fan_in_fan_out, True, dropout)
    keep, s = 1 / 0.7, 1.5
    g = rng.standard_normal((n, groups * og))

    def loss():
        y, _ = _C.merged_linear_forward(x, w, bv, a, b, en, s, fan_in_fan_out, mask, keep)
        return float(np.sum(y * g))

    _, u = _C.merged_linear_forward(x, w, bv, a, b, en, s, fan_in_fan_out, mask, keep)
    grads = {"w": np.zeros_like(w), "bv": np.zeros_like(bv), "a": np.zeros_like(a), "b": np.zeros_like(b)}
    dx = _C.merged_linear_backward(g, x, w, a, b, u, en, s, fan_in_fan_out, mask, keep, True,
                                   grads["w"], grads["bv"], grads["a"], grads["b"])
    for name, param in [("x", x), ("w", w), ("bv", bv), ("a", a), ("b", b)]:
        analytic = dx if name == "x" else grads[name]
        np.testing.assert_allclose(analytic, central_difference(loss, param), rtol=1e-6, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS[:4])
def test_merge_and_unmerge(rng, dtype, fan_in_fan_out, pattern):
    groups, og, fin, r = len(pattern), 7, 9, 3
    _, w, _, a, b, _ = make_operands(rng, 1, fin, groups, og, r, pattern, dtype, fan_in_fan_out, False, False)
    merged = w.copy()
    _C.merged_linear_merge(merged, a, b, pattern, 0.5, fan_in_fan_out)
    delta = 0.5 * dense_delta(a, b, pattern, groups * og)
    delta = delta.T if fan_in_fan_out else delta
    assert_close(merged, w.astype(np.float64) + delta, dtype)
    _C.merged_linear_merge(merged, a, b, pattern, -0.5, fan_in_fan_out)
    bound = 4 * np.finfo(dtype).eps * (np.abs(w) + np.abs(delta))
    assert np.all(np.abs(merged.astype(np.float64) - w) <= bound)


def test_strided_inputs_are_read_correctly(rng):
    en = (True, False, True)
    big = rng.standard_normal((20, 30))
    x = big[::2, 3:13]
    w = np.ascontiguousarray(rng.standard_normal((12, 14)))[:, 2:12]  # row stride 14
    a = rng.standard_normal((4, 10))
    b = rng.standard_normal((8, 2))
    for xin in (x, np.asfortranarray(x), big[::-2, 5:15], big[:10, ::3]):
        y, _ = _C.merged_linear_forward(xin, w, None, a, b, en, 1.0, False)
        assert_close(y, ref_forward(xin, w, None, a, b, en, 1.0), np.float64)


# -- bad input: errors before anything is written -------------------------------------
@pytest.mark.parametrize("case,error", [
    ("not_divisible", ValueError), ("empty_enable", ValueError), ("int_enable", TypeError),
    ("enable_not_seq", TypeError), ("a_rows", ValueError), ("b_shape", ValueError), ("a_dtype", TypeError),
    ("only_a", ValueError), ("x_shape", ValueError), ("g_shape", ValueError), ("u_shape", ValueError),
    ("da_readonly", ValueError), ("db_shape", ValueError), ("keep_inf", ValueError)])
def test_bad_operands_raise_and_write_nothing(rng, case, error):
    en = [True, False, True]
    x, w, bv, a, b, _ = make_operands(rng, 4, 6, 3, 2, 2, en, np.float32, False, True, False)
    _, u = _C.merged_linear_forward(x, w, bv, a, b, en, 1.0, False)
    g = rng.standard_normal((4, 6)).astype(np.float32)
    acc = [np.ones_like(w), np.ones_like(bv), np.ones_like(a), np.ones_like(b)]
    fwd = dict(x=x, weight=w, bias=bv, lora_A=a, lora_B=b, enable_lora=en, scaling=1.0, fan_in_fan_out=False)
    bwd = dict(grad_output=g, x=x, weight=w, lora_A=a, lora_B=b, u=u, enable_lora=en, scaling=1.0,
               fan_in_fan_out=False, grad_weight=acc[0], grad_bias=acc[1], grad_lora_A=acc[2], grad_lora_B=acc[3])
    only_backward = case in ("g_shape", "u_shape", "da_readonly", "db_shape")
    if case == "not_divisible":
        fwd["enable_lora"] = bwd["enable_lora"] = [True, False, True, False]
    elif case == "empty_enable":
        fwd["enable_lora"] = bwd["enable_lora"] = []
    elif case == "int_enable":
        fwd["enable_lora"] = bwd["enable_lora"] = [1, 0, 1]
    elif case == "enable_not_seq":
        fwd["enable_lora"] = bwd["enable_lora"] = True
    elif case == "a_rows":
        fwd["lora_A"] = bwd["lora_A"] = a[:3]
    elif case == "b_shape":
        fwd["lora_B"] = bwd["lora_B"] = np.ones((6, 2), np.float32)
    elif case == "a_dtype":
        fwd["lora_A"] = bwd["lora_A"] = a.astype(np.float64)
    elif case == "only_a":
        fwd["lora_B"] = bwd["lora_B"] = None
    elif case == "x_shape":
        fwd["x"] = bwd["x"] = x[:, :5]
    elif case == "keep_inf":
        fwd["keep_scale"] = bwd["keep_scale"] = float("inf")
    elif case == "g_shape":
        bwd["grad_output"] = g[:, :5]
    elif case == "u_shape":
        bwd["u"] = u[:, :3]
    elif case == "da_readonly":
        acc[2].flags.writeable = False
    elif case == "db_shape":
        bwd["grad_lora_B"] = np.ones((6, 2), np.float32)
    with pytest.raises(error, match="merged_linear_backward"):
        _C.merged_linear_backward(**bwd)
    if not only_backward:
        with pytest.raises(error, match="merged_linear_forward"):
            _C.merged_linear_forward(**fwd)
    if not only_backward and case not in ("x_shape", "keep_inf"):  # merge takes no x / keep_scale
        merged = w.copy()
        with pytest.raises(error, match="merged_linear_merge"):
            _C.merged_linear_merge(merged, fwd["lora_A"], fwd["lora_B"], fwd["enable_lora"], 1.0, False)
        np.testing.assert_array_equal(merged, w)
    for arr in acc:
        assert np.all(arr == 1)


def test_error_messages_name_expected_and_received(rng):
    en = [True, False, True]
    x, w, bv, a, b, _ = make_operands(rng, 4, 6, 3, 2, 2, en, np.float32, False, True, False)
    with pytest.raises(ValueError, match=r"len\(enable_lora\) = 4 must divide out_features = 6"):
        _C.merged_linear_forward(x, w, bv, a, b, [True] * 4, 1.0, False)
    with pytest.raises(ValueError, match=r"'lora_B' must have shape .* = \(4, 2\), got shape \(6, 2\)"):
        _C.merged_linear_forward(x, w, bv, a, np.ones((6, 2), np.float32), en, 1.0, False)
    with pytest.raises(TypeError, match="sequence of bools, got int at position 0"):
        _C.merged_linear_forward(x, w, bv, a, b, [1, 0, 1], 1.0, False)


# -- the layer -------------------------------------------------------------------
def test_loralib_parameters_and_init():
    layer = lorac.MergedLinear(64, 96, r=8, lora_alpha=16, enable_lora=[True, False, True], rng=0)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.weight.shape == (96, 64) and layer.lora_A.shape == (16, 64) and layer.lora_B.shape == (64, 8)
    assert layer.scaling == 2.0 and not layer.weight.requires_grad and layer.bias.requires_grad
    bound = 1 / np.sqrt(64)
    assert np.abs(layer.lora_A.data).max() <= bound and np.abs(layer.lora_A.data).max() > 0.8 * bound
    assert np.all(layer.lora_B.data == 0)
    np.testing.assert_array_equal(layer.lora_ind, np.repeat([True, False, True], 32))
    assert lorac.MergedLinear(64, 96, r=8, enable_lora=[True, False, True], fan_in_fan_out=True).weight.shape \
        == (64, 96)
    assert lorac.MergedLinear(4, 6, r=4, lora_alpha=8, enable_lora=[True, True], use_rslora=True).scaling == 4.0
    assert "enable_lora=[True, False, True]" in repr(layer) and isinstance(layer, lorac.LoRALayer)


@pytest.mark.parametrize("kwargs,error", [
    (dict(enable_lora=[True, True, True, True]), ValueError), (dict(enable_lora=[]), ValueError),
    (dict(enable_lora=[1, 0, 1]), TypeError), (dict(enable_lora=True), TypeError),
    (dict(enable_lora="TFT"), TypeError), (dict(lora_dropout=1.0), ValueError), (dict(r=-2), ValueError)])
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        lorac.MergedLinear(4, 6, **{"r": 2, **kwargs})


@pytest.mark.parametrize("enable_lora", [[False], [False, False, False]])
@pytest.mark.parametrize("r", [0, 4])
def test_no_enabled_group_is_a_plain_linear_layer(rng, enable_lora, r):
    layer = lorac.MergedLinear(5, 6, r=r, enable_lora=enable_lora, dtype=np.float64, rng=0)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"] and layer.weight.requires_grad
    x = rng.standard_normal((3, 5))
    y = layer(x)
    np.testing.assert_allclose(y, x @ layer.weight.data.T + layer.bias.data, rtol=1e-14)
    g = rng.standard_normal((3, 6))
    dx = layer.backward(g)
    np.testing.assert_allclose(dx, g @ layer.weight.data, rtol=1e-14)
    np.testing.assert_allclose(layer.weight.grad, g.T @ x, rtol=1e-14)
    np.testing.assert_allclose(layer.bias.grad, g.sum(0), rtol=1e-14)
    w0 = layer.weight.data.copy()
    layer.eval()
    np.testing.assert_array_equal(layer.weight.data, w0)
    np.testing.assert_allclose(layer(x), y, rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(), (1,), (6,), (2, 3), (0,)])
def test_layer_forward_backward_match_reference(rng, dtype, fan_in_fan_out, bias, lead):
    en = (False, True, True)
    layer = randomize(lorac.MergedLinear(7, 9, r=2, lora_alpha=6, enable_lora=en, fan_in_fan_out=fan_in_fan_out,
                                         bias=bias, dtype=dtype, rng=1), rng)
    x = rng.standard_normal(lead + (7,)).astype(dtype)
    y = layer(x)
    assert y.shape == lead + (9,) and y.dtype == dtype
    args = (layer.weight.data, layer.lora_A.data, layer.lora_B.data, en, layer.scaling, fan_in_fan_out)
    bvec = None if layer.bias is None else layer.bias.data
    assert_close(y.reshape(-1, 9), ref_forward(x.reshape(-1, 7), args[0], bvec, *args[1:]), dtype)
    g = rng.standard_normal(lead + (9,)).astype(dtype)
    dx = layer.backward(g)
    assert dx.shape == x.shape
    ref = ref_backward(g.reshape(-1, 9), x.reshape(-1, 7), *args)
    assert_close(dx.reshape(-1, 7), ref["dx"], dtype)
    assert layer.weight.grad is None  # frozen: never allocated
    assert_close(layer.lora_A.grad, ref["da"], dtype)
    assert_close(layer.lora_B.grad, ref["db"], dtype)
    if bias:
        assert_close(layer.bias.grad, ref["dbias"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_eval_merges_and_equals_train_output(rng, dtype, fan_in_fan_out):
    en = (True, False, True)
    layer = randomize(lorac.MergedLinear(8, 12, r=3, lora_alpha=5, enable_lora=en, fan_in_fan_out=fan_in_fan_out,
                                         dtype=dtype, rng=0), rng)
    x = rng.standard_normal((2, 4, 8)).astype(dtype)
    w0 = layer.weight.data.copy()
    y_train = layer(x)
    layer.eval()
    assert layer.merged
    delta = layer.scaling * dense_delta(layer.lora_A.data, layer.lora_B.data, en, 12)
    assert_close(layer.weight.data, w0.astype(np.float64) + (delta.T if fan_in_fan_out else delta), dtype)
    assert_close(layer(x), y_train.astype(np.float64), dtype)
    layer.train()
    assert not layer.merged
    assert_close(layer(x), y_train.astype(np.float64), dtype)
    scale = np.abs(w0).max() + np.abs(delta).max()
    assert np.abs(layer.weight.data - w0).max() <= 8 * np.finfo(dtype).eps * scale


def test_state_dict_is_unmerged_and_loads_into_a_merged_layer(rng):
    make = lambda seed: randomize(lorac.MergedLinear(5, 6, r=2, enable_lora=[True, False], dtype=np.float64,
                                                     rng=seed), rng)
    layer = make(0)
    sd_train = {k: v.copy() for k, v in layer.state_dict().items()}
    layer.eval()
    for k, v in layer.state_dict().items():
        np.testing.assert_allclose(v, sd_train[k], rtol=1e-14, atol=1e-14)
    other = make(1).eval()
    other.load_state_dict(sd_train)
    assert other.merged
    x = rng.standard_normal((3, 5))
    np.testing.assert_allclose(other(x), layer(x), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="lora_B"):  # a wrong shape loads nothing
        other.load_state_dict({**sd_train, "lora_B": np.zeros((6, 2))})
    np.testing.assert_allclose(other(x), layer(x), rtol=1e-13, atol=1e-13)


def test_dropout_mask_is_shared_by_groups_and_reused_in_backward(rng):
    # W0 = 0, A_e = B_e = I, scaling 1: block e of y is drop(x) itself
    k = 6
    layer = lorac.MergedLinear(k, 3 * k, r=k, lora_alpha=k, lora_dropout=0.5, enable_lora=[True, False, True],
                               bias=False, dtype=np.float64, rng=5)
    layer.weight.data[...] = 0
    layer.lora_A.data[...] = np.vstack([np.eye(k)] * 2)
    layer.lora_B.data[...] = np.vstack([np.eye(k)] * 2)
    x = np.ones((40, k))
    y = layer(x)
    np.testing.assert_array_equal(y[:, :k], y[:, 2 * k:])
    assert np.all(y[:, k:2 * k] == 0) and set(np.unique(y[:, :k])) == {0.0, 2.0}
    dx = layer.backward(np.ones_like(y))
    np.testing.assert_array_equal(dx, 2 * y[:, :k])  # drop'(g B A): the forward's mask, scaled twice
    layer.eval()
    np.testing.assert_array_equal(layer(x), np.hstack([x, 0 * x, x]))


def test_backward_errors_leave_the_layer_unchanged(rng):
    layer = randomize(lorac.MergedLinear(4, 6, r=2, enable_lora=[True, False, True], rng=0), rng)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        layer.backward(np.zeros((1, 6), np.float32))
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 4\)"):
        layer(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="input must have dtype float32"):
        layer(np.zeros((2, 4), np.float64))
    layer(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 6\)"):
        layer.backward(np.zeros((2, 5), np.float32))
    assert all(p.grad is None for p in layer.parameters())
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_concurrent_calls_release_the_gil_and_agree(rng):
    from concurrent.futures import ThreadPoolExecutor
    en = (True, False, True)
    x, w, bv, a, b, mask = make_operands(rng, 150, 40, 3, 20, 4, en, np.float64, False, True, True)
    expected = ref_forward(x, w, bv, a, b, en, 0.5, False, mask, 2.0)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _C.merged_linear_forward(x, w, bv, a, b, en, 0.5, False, mask, 2.0)[0],
                                range(16)))
    for y in results:
        assert_close(y, expected, np.float64)

"""The bad-input matrix (issue 7): every kind of bad input tried, what lorac
answers, and a test per row.

ROWS below is the single source: docs/BAD_INPUT.md is generated from it
(``python tests/test_bad_input_matrix.py > docs/BAD_INPUT.md``) and
``test_doc_lists_exactly_these_rows`` fails when the two disagree.  Each row's
check runs against every entry point of lorac._C where the row says "every
C function" (the catalogue in tests/entry_points.py), so a new C function is
covered by adding it there.
"""

import io
import json
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import lorac
import lorac._C as C
from lorac.checkpoint import CheckpointError

import entry_points as E

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BAD_INPUT.md")


@dataclass(frozen=True)
class Row:
    family: str
    bad_input: str
    answer: str
    check: Callable


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def cases():
    """(EntryPoint, kwargs) per C function: a valid case whose arrays are all non-empty."""
    for ep in E.ENTRY_POINTS:
        for seed in range(3000):
            kw = E.build(ep.name, seed).kwargs
            arrays = [v for _, v in E.arrays_in(kw)]
            if arrays and all(v.size for v in arrays) and all(kw.get(n) is not None for n in ep.inplace[:1]):
                yield ep, kw
                break
        else:
            raise AssertionError(f"no non-empty case for {ep.name}")


def top_arrays(kw):
    return [n for n, v in kw.items() if isinstance(v, np.ndarray)]


def refused(fn, kw, exc, *fragments):
    """fn(**kw) raises exc whose message names each fragment; in-place arrays untouched."""
    before = E.snapshot(kw)
    with pytest.raises(exc) as info:
        fn(**kw)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for n, v in E.arrays_in(kw):
        orig = before[n] if "[" not in n else before[n.split("[")[0]][int(n.split("[")[1][:-1])]
        if v.dtype.kind in "fiub" and v.shape == orig.shape:
            np.testing.assert_array_equal(v, orig, err_msg=f"{n} changed by a refused call")
    return message


def matches_reference(ep, kw):
    with np.errstate(all="ignore"):
        expected = ep.reference(E.snapshot(kw))
    result = getattr(C, ep.name)(**kw)
    dtype = next(v.dtype for _, v in E.arrays_in(kw) if v.dtype.kind == "f")
    E.assert_matches(result, expected.returns, E.tolerance(ep, dtype))
    for n, value in expected.inplace.items():
        E.assert_matches(kw[n], value, E.tolerance(ep, dtype), n)
    return result


def float_layers():
    """A LoRA Linear and a DoRA one (4 -> 3, r = 2) with non-zero adapters: the layer rows run on both."""
    for cls in (lorac.Linear, lorac.DoRALinear):
        layer = cls(4, 3, r=2, lora_alpha=4)
        layer.lora_B.data[...] = np.random.default_rng(0).standard_normal(layer.lora_B.shape)
        yield layer


def layer_state(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}, \
        {n: (None if p.grad is None else p.grad.copy()) for n, p in layer.named_parameters()}


def assert_layer_unchanged(layer, state):
    params, grads = state
    now_params, now_grads = layer_state(layer)
    assert params.keys() == now_params.keys()
    for k in params:
        np.testing.assert_array_equal(params[k], now_params[k], err_msg=k)
    for k in grads:
        assert (grads[k] is None) == (now_grads[k] is None), k
        if grads[k] is not None:
            np.testing.assert_array_equal(grads[k], now_grads[k], err_msg=k)


X = np.ones((2, 4), np.float32)


# --------------------------------------------------------------------------
# rows: C functions
# --------------------------------------------------------------------------

def check_not_an_array():
    for ep, kw in cases():
        for name in top_arrays(kw):
            refused(getattr(C, ep.name), dict(kw, **{name: kw[name].tolist()}), TypeError, f"{ep.name}()",
                    f"'{name}'")


def check_wrong_dtype():
    swap = {"f": lambda a: a.astype(np.int8), "i": lambda a: a.astype(np.float64),
            "u": lambda a: a.astype(np.float32)}
    other = {np.dtype(np.float32): np.float64, np.dtype(np.float64): np.float32}
    for ep, kw in cases():
        # aux and lse are float64 whatever the layer's dtype
        floats = [n for n in top_arrays(kw) if kw[n].dtype.kind == "f" and n not in ("aux", "lse")]
        for name in top_arrays(kw):
            bad = swap[kw[name].dtype.kind](kw[name])
            refused(getattr(C, ep.name), dict(kw, **{name: bad}), TypeError, f"{ep.name}()", "dtype")
            if name in floats and len(floats) > 1:  # float32 next to float64: never mixed
                bad = kw[name].astype(other[kw[name].dtype])
                refused(getattr(C, ep.name), dict(kw, **{name: bad}), TypeError, f"{ep.name}()", "dtype")


def check_exotic_dtypes():
    for ep, kw in cases():
        name = top_arrays(kw)[0]
        for dtype in (np.complex64, object, [("a", "f4")], "U2", np.bool_, np.float16):
            refused(getattr(C, ep.name), dict(kw, **{name: np.zeros(kw[name].shape, dtype)}), TypeError,
                    f"'{name}'")


def check_wrong_ndim():
    for ep, kw in cases():
        for name in top_arrays(kw):
            if name in ("indices",):  # any shape is allowed: read flat
                continue
            refused(getattr(C, ep.name), dict(kw, **{name: kw[name][..., None]}), ValueError, f"'{name}'")


def check_wrong_shape():
    """Each axis of each array one longer: refused (ValueError), or -- where
    the axis is free (rows of a batch, a rank) and everything else follows --
    the correct result for the arguments as given.  Never a silent wrong answer."""
    for ep, kw in cases():
        for name, value in E.arrays_in(kw):
            for axis in range(value.ndim):
                grown = np.concatenate([value, np.take(value, [0], axis=axis)], axis=axis)
                new = dict(kw)
                if "[" in name:
                    base, i = name.split("[")[0], int(name.split("[")[1][:-1])
                    new[base] = list(kw[base])
                    new[base][i] = grown
                else:
                    new[name] = grown
                try:
                    with np.errstate(all="ignore"):
                        expected = ep.reference(E.snapshot(new))
                except (ValueError, IndexError, E.Ambiguous):
                    expected = None  # the reference cannot make sense of it either
                if expected is None:
                    with pytest.raises((ValueError, IndexError)):
                        getattr(C, ep.name)(**new)
                    continue
                try:
                    matches_reference(ep, new)
                except (ValueError, IndexError):
                    pass  # refused: fine


def check_in_place_layout():
    for ep, kw in cases():
        for name in ep.inplace:
            a = kw.get(name)
            if a is None or a.ndim != 2 or min(a.shape) < 2:
                continue
            for bad in (np.asfortranarray(a), a[::-1], a[:, ::-1]):
                refused(getattr(C, ep.name), dict(kw, **{name: bad}), ValueError, f"'{name}' is updated in place",
                        "row-major")


def check_read_only_output():
    for ep, kw in cases():
        for name in ep.inplace:
            if kw.get(name) is None:
                continue
            ro = kw[name].copy()
            ro.flags.writeable = False
            refused(getattr(C, ep.name), dict(kw, **{name: ro}), ValueError, f"'{name}'", "read-only")


def check_read_only_inputs():
    for ep, kw in cases():
        new = {}
        for n, v in kw.items():
            if isinstance(v, np.ndarray) and n not in ep.inplace:
                v = v.copy()
                v.flags.writeable = False
            new[n] = v
        matches_reference(ep, new)


def check_swapped_unaligned_inputs():
    def unaligned(a):
        raw = np.zeros(a.nbytes + 1, np.uint8)
        out = raw[1:].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out
    for ep, kw in cases():
        for transform in (lambda a: a.astype(a.dtype.newbyteorder()), unaligned):
            new = {n: transform(v) if isinstance(v, np.ndarray) and n not in ep.inplace and v.dtype.itemsize > 1
                   else v for n, v in kw.items()}
            matches_reference(ep, new)


def check_swapped_output():
    for ep, kw in cases():
        for name in ep.inplace:
            if kw.get(name) is None or kw[name].size < 2:
                continue
            bad = kw[name].astype(kw[name].dtype.newbyteorder())
            refused(getattr(C, ep.name), dict(kw, **{name: bad}), ValueError, f"'{name}'")


def check_empty():
    """Zero rows, zero features, zero rank: results of the right (possibly empty) shape, per the reference."""
    seen = 0
    for ep in E.ENTRY_POINTS:
        for seed in range(200):
            kw = E.build(ep.name, seed).kwargs
            if any(v.size == 0 for _, v in E.arrays_in(kw)):
                try:
                    matches_reference(ep, kw)
                except E.Ambiguous:
                    continue
                seen += 1
    assert seen > 100


def check_nan_inputs():
    """NaN / inf in data arrays propagate as IEEE arithmetic says: no exception, no effect on
    rows they do not touch (checked on linear_forward: a NaN in row i of x poisons row i of y only)."""
    for ep, kw in cases():
        for name in top_arrays(kw):
            if kw[name].dtype.kind != "f":
                continue
            bad = kw[name].copy()
            bad.flat[0] = np.nan
            with np.errstate(all="ignore"):
                getattr(C, ep.name)(**dict(kw, **{name: bad}))
    x = np.ones((3, 4))
    x[1, 2] = np.nan
    y, _ = C.linear_forward(x, np.ones((5, 4)), None, None, None, 1.0, False)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def check_non_finite_scalars():
    scalars = {"scaling", "keep_scale", "alpha", "lr", "momentum", "dampening", "weight_decay", "eps", "scale",
               "beta1", "beta2"}
    for ep, kw in cases():
        for name in scalars & set(kw):
            for bad in (float("nan"), float("inf"), -float("inf")):
                refused(getattr(C, ep.name), dict(kw, **{name: bad}), ValueError, f"'{name}'", "finite")


def check_out_of_range_hyper_parameters():
    p = np.zeros(3)
    adam = dict(param=p, grad=p.copy(), exp_avg=p.copy(), exp_avg_sq=p.copy(), max_exp_avg_sq=None, step=1, lr=0.1,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False, maximize=False)
    refused(C.adam_step, dict(adam, beta1=1.0), ValueError, "'beta1'")
    refused(C.adam_step, dict(adam, beta2=-0.1), ValueError, "'beta2'")
    refused(C.adam_step, dict(adam, step=0), ValueError, "'step'")
    refused(C.adam_step, dict(adam, amsgrad=True), ValueError, "'max_exp_avg_sq'")
    refused(C.sgd_step, dict(param=p, grad=p, momentum_buffer=None, lr=0.1, momentum=0.9, dampening=0.0,
                             weight_decay=0.0, nesterov=False, maximize=False, init_buffer=False),
            ValueError, "'momentum_buffer'")
    refused(C.layernorm_forward, dict(x=np.ones((2, 3)), weight=None, bias=None, eps=-1e-5), ValueError, "'eps'")
    with pytest.raises(ValueError, match="set_num_threads"):
        C.set_num_threads(0)
    kw = dict(E.build("molora_forward", 3).kwargs)
    refused(C.molora_forward, dict(kw, top_k=kw["lora_router"].shape[0] + 1), ValueError, "'top_k'")
    refused(C.molora_forward, dict(kw, top_k=0), ValueError, "'top_k'")
    emb = next(k for ep, k in cases() if ep.name == "embedding_backward")
    refused(C.embedding_backward, dict(emb, padding_idx=emb["weight"].shape[0]), ValueError, "'padding_idx'")
    refused(C.embedding_backward, dict(emb, padding_idx=-1), ValueError, "'padding_idx'")
    refused(C.embedding_backward, dict(emb, padding_idx=1.5), TypeError, "'padding_idx'")


def check_index_out_of_range():
    for ep, kw in cases():
        if "indices" not in kw:
            continue
        num = kw["weight"].shape[0]
        for bad in (np.array([num]), np.array([-1]), np.array([2**63], np.uint64), np.array([0, num + 5])):
            if bad.size != kw["indices"].size and "ids" in kw:
                continue
            if "grad_output" in kw and bad.size != kw["indices"].size:
                continue
            refused(getattr(C, ep.name), dict(kw, indices=bad), IndexError, "'indices' must lie in")
    kw = dict(E.build("embedding_forward", 0).kwargs)
    num = kw["weight"].shape[0]
    refused(C.embedding_forward, dict(kw, indices=np.array([num])), IndexError, f"[0, {num})")


def check_target_and_ids_out_of_range():
    logits = np.zeros((2, 3))
    refused(C.cross_entropy_forward, dict(logits=logits, target=np.array([0, 3]), ignore_index=-100), ValueError,
            "'target'")
    refused(C.cross_entropy_forward, dict(logits=logits, target=np.array([-2, 0]), ignore_index=-100), ValueError,
            "'target'")
    for ep, kw in cases():
        if "ids" not in kw:
            continue
        k = len(kw["lora_As"])
        for bad_id in (k, -2):
            ids = kw["ids"].astype(np.int64)
            ids[0] = bad_id
            refused(getattr(C, ep.name), dict(kw, ids=ids), ValueError, "'ids' must lie in")


def check_huge_sizes():
    """(details and the no-allocation proof: tests/test_limits.py)"""
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(2**31, 4), strides=(0, 0))
    with pytest.raises(ValueError, match="32-bit"):
        C.linear_forward(huge, np.ones((3, 4), np.float32), None, None, None, 1.0, False)


def check_aliasing():
    """(the full story: tests/test_aliasing.py and the property tests)"""
    p = np.ones(4)
    refused(C.adam_step, dict(param=p, grad=np.ones(4), exp_avg=p, exp_avg_sq=np.zeros(4), max_exp_avg_sq=None,
                              step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=False,
                              amsgrad=False, maximize=False), ValueError, "'param' and 'exp_avg'", "share memory")
    q = np.linspace(-1, 1, 4)
    expected = q - 0.5 * q
    C.sgd_step(q, q, None, 0.5, 0.0, 0.0, 0.0, False, False, False)
    np.testing.assert_allclose(q, expected)


def check_wrong_scalar_types():
    for ep, kw in cases():
        for name, value in kw.items():
            if isinstance(value, bool):
                continue  # 'p' accepts any object with a truth value
            if isinstance(value, float):
                refused(getattr(C, ep.name), dict(kw, **{name: "1.0"}), TypeError)
            elif isinstance(value, int) and name not in ("padding_idx",):
                refused(getattr(C, ep.name), dict(kw, **{name: 1.5}), TypeError)


def check_missing_and_unknown_arguments():
    for ep, kw in cases():
        fn = getattr(C, ep.name)
        refused(fn, dict(kw, no_such_argument=1), TypeError, ep.name)
        required = next(iter(kw))
        refused(fn, {k: v for k, v in kw.items() if k != required}, TypeError, required)
        with pytest.raises(TypeError):
            fn()


def check_bad_enumerations():
    refused(C.activation_forward, dict(kind="swish", x=np.ones(3)), ValueError, "'kind'", "swish")
    refused(C.activation_forward, dict(kind=3, x=np.ones(3)), TypeError)
    kw = dict(E.build("merged_linear_forward", 2).kwargs)
    out = kw["weight"].shape[1] if kw["fan_in_fan_out"] else kw["weight"].shape[0]
    refused(C.merged_linear_forward, dict(kw, enable_lora=[]), ValueError, "'enable_lora'")
    refused(C.merged_linear_forward, dict(kw, enable_lora=[True] * (out + 1)), ValueError, "enable_lora")
    refused(C.merged_linear_forward, dict(kw, enable_lora=["yes"]), TypeError, "'enable_lora'")
    refused(C.merged_linear_forward, dict(kw, enable_lora=5), TypeError, "'enable_lora'")


def check_half_an_adapter():
    for ep, kw in cases():
        if "lora_A" in kw and kw["lora_A"] is not None and not ep.name.startswith("molora") and \
                not ep.name.endswith("merge"):
            refused(getattr(C, ep.name), dict(kw, lora_B=None), ValueError, "'lora_A' and 'lora_B'")
        if "lora_As" in kw:
            refused(getattr(C, ep.name), dict(kw, lora_Bs=kw["lora_Bs"] + [kw["lora_Bs"][0]] if kw["lora_Bs"]
                                              else [np.zeros((1, 1))]), ValueError, "same length")
            refused(getattr(C, ep.name), dict(kw, lora_As=np.zeros((1, 1))), TypeError, "'lora_As'")


class _Raises:
    def __float__(self):
        raise ZeroDivisionError("from __float__")

    def __bool__(self):
        raise ZeroDivisionError("from __bool__")

    def __index__(self):
        raise ZeroDivisionError("from __index__")


def check_hostile_objects():
    """An object raising in __float__ / __bool__ / __index__: its own exception propagates, nothing written."""
    for ep, kw in cases():
        for name, value in kw.items():
            if isinstance(value, (bool, float)) or (isinstance(value, int) and name != "padding_idx"):
                refused(getattr(C, ep.name), dict(kw, **{name: _Raises()}), ZeroDivisionError)


def check_mutated_argument_lists():
    """scalings[0].__float__ empties lora_As / lora_Bs while the binding reads them: the call
    uses the lists as they were passed (the binding works on private copies)."""
    As = [np.ones((2, 3)) for _ in range(8)]
    Bs = [np.ones((4, 2)) for _ in range(8)]

    class Clearing(int):
        def __float__(self):
            As.clear()
            Bs.clear()
            return 1.0

    y = C.multi_linear_forward(np.ones((5, 3)), np.ones((4, 3)), None, As, Bs, [Clearing(1)] + [1.0] * 7,
                               np.zeros(5, np.int64), False)
    np.testing.assert_allclose(y, 3 + 6 * np.ones((5, 4)))


def check_lazy_huge_sequences():
    """range(10**12) or a zero-stride array as a list argument: refused from its length,
    never expanded into a Python list (which would exhaust memory).  (No snapshot of
    the arguments here: copying a 2**33-element view would itself allocate 8 GiB.)"""
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, bool), shape=(2**33,), strides=(0,))
    x, w, ids = np.ones((2, 3)), np.ones((4, 3)), np.zeros(2, np.int64)
    for seq in (range(10**12), huge):
        with pytest.raises(ValueError, match=r"len\(enable_lora\)"):
            C.merged_linear_forward(x, w, None, None, None, seq, 1.0, False)
        with pytest.raises(ValueError, match="'scalings' has"):
            C.multi_linear_forward(x, w, None, [], [], seq, ids, False)
    with pytest.raises(ValueError, match="'lora_As' has"):
        C.multi_linear_forward(x, w, None, range(10**12), [], [], ids, False)


# --------------------------------------------------------------------------
# rows: layers
# --------------------------------------------------------------------------

def check_layer_wrong_features():
    for layer in float_layers():
        state = layer_state(layer)
        with pytest.raises(ValueError, match=r"Linear.forward: input must have shape \(\.\.\., 4\), got shape "
                                             r"\(2, 5\)"):
            layer(np.ones((2, 5), np.float32))
        assert_layer_unchanged(layer, state)
        with pytest.raises(ValueError, match="LayerNorm.forward"):
            lorac.LayerNorm(4)(np.ones((2, 5), np.float32))


def check_layer_wrong_dtype():
    for layer in float_layers():
        for bad in (np.ones((2, 4)), np.ones((2, 4), np.int64), np.ones((2, 4), np.complex64), [["a"] * 4]):
            with pytest.raises(TypeError, match="Linear.forward: input"):
                layer(bad)
    for cls in (lorac.Embedding, lorac.DoRAEmbedding):
        with pytest.raises(TypeError, match="Embedding.forward: indices"):
            cls(5, 3, r=2)(np.array([0.5]))


def check_layer_nan_input():
    for layer in float_layers():
        state = layer_state(layer)
        x = np.ones((3, 4), np.float32)
        x[1, 2] = np.nan
        y = layer(x)
        assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
        assert_layer_unchanged(layer, state)


def check_layer_shapes_accepted():
    for layer in float_layers():
        assert layer(np.ones((0, 4), np.float32)).shape == (0, 3)
        assert layer(np.ones((2, 5, 4), np.float32)).shape == (2, 5, 3)
        assert layer(np.ones(4, np.float32)).shape == (3,)
        assert type(layer)(0, 3, r=2)(np.ones((2, 0), np.float32)).shape == (2, 3)
    for empty in (lorac.Linear(0, 3, r=2), lorac.DoRALinear(0, 3, r=2), lorac.Linear(3, 0, r=2),
                  lorac.MergedLinear(0, 4, r=1, enable_lora=[True, False]),
                  lorac.MoLoRALinear(0, 3, r=2, num_experts=2)):   # 3-D with a zero-size feature axis
        y = empty(np.ones((2, 5, empty.in_features), np.float32))
        assert y.shape == (2, 5, empty.out_features)
        assert empty.backward(np.ones_like(y)).shape == (2, 5, empty.in_features)


def check_backward_without_forward():
    for layer in float_layers():
        with pytest.raises(RuntimeError, match="without a preceding forward"):
            layer.backward(np.ones((2, 3), np.float32))
        layer(X)
        layer.backward(np.ones((2, 3), np.float32))
        state = layer_state(layer)
        with pytest.raises(RuntimeError, match="twice"):
            layer.backward(np.ones((2, 3), np.float32))
        assert_layer_unchanged(layer, state)
        layer(X)
        layer.eval()  # merging between forward and backward invalidates the forward
        with pytest.raises(RuntimeError):
            layer.backward(np.ones((2, 3), np.float32))


def check_backward_bad_grad():
    for layer in float_layers():
        layer(X)
        state = layer_state(layer)
        for bad, exc in ((np.ones((2, 2), np.float32), ValueError), (np.ones((2, 3)), TypeError),
                         ([["x"] * 3] * 2, TypeError)):
            with pytest.raises(exc, match="Linear.backward: grad_output"):
                layer.backward(bad)
            assert_layer_unchanged(layer, state)


def check_embedding_index_out_of_range():
    for emb in (lorac.Embedding(5, 3, r=2), lorac.DoRAEmbedding(5, 3, r=2)):
        state = layer_state(emb)
        for bad in (np.array([0, 5]), np.array([-1]), np.array([[1], [9]])):
            with pytest.raises(IndexError, match=r"'indices' must lie in \[0, 5\)"):
                emb(bad)
        assert_layer_unchanged(emb, state)


def check_embedding_backward_misuse():
    idx, g = np.array([[0, 4], [2, 2]]), np.ones((2, 2, 3), np.float32)
    for emb in (lorac.Embedding(5, 3, r=2), lorac.DoRAEmbedding(5, 3, r=2)):
        with pytest.raises(RuntimeError, match="without a preceding forward"):
            emb.backward(g)
        emb(idx)
        state = layer_state(emb)
        with pytest.raises(ValueError, match=r"Embedding.backward: grad_output must have shape \(2, 2, 3\)"):
            emb.backward(g[0])
        with pytest.raises(TypeError, match="Embedding.backward: grad_output"):
            emb.backward(g.astype(np.complex64))
        assert_layer_unchanged(emb, state)
        emb.backward(g)
        with pytest.raises(RuntimeError, match="twice"):
            emb.backward(g)
        emb(idx)
        emb.eval()  # merging between forward and backward invalidates the forward
        state = layer_state(emb)
        with pytest.raises(RuntimeError):
            emb.backward(g)
        assert_layer_unchanged(emb, state)


def check_load_state_dict_bad():
    for layer in float_layers():
        state = layer_state(layer)
        with pytest.raises(ValueError, match=r"state_dict\['weight'\]: size mismatch"):
            layer.load_state_dict({"weight": np.ones((3, 5), np.float32)}, strict=False)
        with pytest.raises(TypeError, match=r"state_dict\['weight'\]"):
            layer.load_state_dict({"weight": np.array(["abc"] * 12).reshape(3, 4)}, strict=False)
        with pytest.raises(KeyError, match="unexpected keys: 'nope'"):
            layer.load_state_dict({"nope": np.ones(3)})
        # all-or-nothing: a good key next to a bad one is not applied either
        with pytest.raises(ValueError):
            layer.load_state_dict({"bias": np.zeros(3, np.float32), "weight": np.ones((3, 5), np.float32)},
                                  strict=False)
        assert_layer_unchanged(layer, state)


def check_bad_constructor_arguments():
    with pytest.raises(ValueError, match="must divide out_features"):
        lorac.MergedLinear(4, 5, r=2, enable_lora=[True, False])
    with pytest.raises(ValueError, match="lora_dropout"):
        lorac.Linear(4, 3, r=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="in_features"):
        lorac.Linear(-1, 3)
    with pytest.raises(TypeError, match="dtype"):
        lorac.Linear(4, 3, dtype=np.int32)
    p = lorac.Parameter(np.ones(3))
    with pytest.raises(ValueError, match="lr"):
        lorac.optim.SGD([p], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        lorac.optim.Adam([p], betas=(1.5, 0.9))


# --------------------------------------------------------------------------
# rows: loaders
# --------------------------------------------------------------------------

def _write(tmp, name, data):
    path = os.path.join(tmp, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def check_checkpoint_garbage(tmp):
    for name, data in (("empty.safetensors", b""), ("random.bin", bytes(range(256)) * 3),
                       ("text.npz", b"hello, world\n")):
        with pytest.raises(CheckpointError, match=name.split(".")[0]):
            lorac.load(_write(tmp, name, data))


def check_checkpoint_truncated(tmp):
    for suffix in (".safetensors", ".npz"):
        path = os.path.join(tmp, "good" + suffix)
        lorac.save({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, path)
        data = open(path, "rb").read()
        for cut in (8, len(data) // 2, len(data) - 1):
            with pytest.raises(CheckpointError):
                lorac.load(_write(tmp, "cut" + suffix, data[:cut]))


def check_checkpoint_huge_header(tmp):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}).encode()
    blob = len(header).to_bytes(8, "little") + header + b"\0" * 16
    with pytest.raises(CheckpointError):
        lorac.load(_write(tmp, "huge.safetensors", blob))
    blob = (2**60).to_bytes(8, "little") + b"{}"
    with pytest.raises(CheckpointError):
        lorac.load(_write(tmp, "huge_len.safetensors", blob))


def check_checkpoint_code_execution(tmp):
    marker = os.path.join(tmp, "pwned")
    pkl = b"cos\nsystem\n(S'touch " + marker.encode() + b"'\ntR."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", b"3\n")
    with pytest.raises(CheckpointError, match="os"):
        lorac.load(_write(tmp, "evil.pt", buf.getvalue()))
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointError):
        lorac.load(_write(tmp, "legacy.pt", pickle.dumps({"a": 1})))


def check_checkpoint_not_a_file(tmp):
    with pytest.raises(FileNotFoundError):
        lorac.load(os.path.join(tmp, "missing.safetensors"))
    with pytest.raises(IsADirectoryError):
        lorac.load(tmp)


def _peft_folder(tmp):
    model = lorac.Sequential(lorac.Linear(4, 3, r=2), lorac.Linear(3, 2))
    folder = os.path.join(tmp, "adapter")
    lorac.save_peft_adapter(model, folder)
    return folder


def _target_model():
    return lorac.Sequential(lorac.Linear(4, 3, r=2), lorac.Linear(3, 2))


def _load_refused(folder, exc, match):
    model = _target_model()
    state = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        lorac.load_peft_adapter(model, folder)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(np.array_equal(state[k], after[k]) for k in state)


def check_peft_missing_files(tmp):
    folder = _peft_folder(tmp)
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    _load_refused(folder, ValueError, "no adapter weights")
    os.remove(os.path.join(folder, "adapter_config.json"))
    _load_refused(folder, ValueError, "adapter_config.json")
    _load_refused(os.path.join(tmp, "nowhere"), ValueError, "expected a PEFT adapter folder")


def check_peft_bad_config(tmp):
    folder = _peft_folder(tmp)
    config_path = os.path.join(folder, "adapter_config.json")
    good = json.load(open(config_path))
    for text, match in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                        (json.dumps(dict(good, peft_type="IA3")), "peft_type"),
                        (json.dumps(dict(good, use_dora=True)), "use_dora"),
                        (json.dumps(dict(good, r=-2)), "r"),
                        (json.dumps(dict(good, rank_pattern={"[": 2})), "regular expression")):
        with open(config_path, "w") as fh:
            fh.write(text)
        _load_refused(folder, ValueError, match)


def check_peft_bad_layout_metadata(tmp):
    folder = _peft_folder(tmp)
    weights = os.path.join(folder, "adapter_model.safetensors")
    tensors = lorac.load(weights)
    for text, match in (("{", "not valid JSON"), ('{"0": "yes"}', "must map layer paths to true / false"),
                        ('{"1": true}', "not a Linear LoRA layer of the file")):
        lorac.save(tensors, weights, metadata={"format": "pt", "lorac_fan_in_fan_out": text})
        _load_refused(folder, ValueError, match)


def check_peft_bad_lora_bias(tmp):
    folder = _peft_folder(tmp)
    weights, config_path = (os.path.join(folder, n) for n in ("adapter_model.safetensors", "adapter_config.json"))
    tensors, good = lorac.load(weights), json.load(open(config_path))
    key = "base_model.model.0.lora_B.bias"
    for value, config, match in ((np.zeros(4, np.float32), dict(good, lora_bias=True), "1-D float tensor"),
                                 (np.zeros(3, np.int32), dict(good, lora_bias=True), "1-D float tensor"),
                                 (np.zeros(3, np.float32), good, "does not set lora_bias"),
                                 (np.zeros(3, np.float32), dict(good, lora_bias=True, use_dora=True),
                                  "lora_bias and use_dora are both set"),
                                 (np.zeros(3, np.float32), dict(good, lora_bias=True, init_lora_weights="gaussian"),
                                  "takes lora_bias with true or false only")):
        lorac.save({**tensors, key: value}, weights, metadata={"format": "pt"})
        with open(config_path, "w") as fh:
            json.dump(config, fh)
        _load_refused(folder, ValueError, match)
    lorac.save({**tensors, key: np.zeros(3, np.float32)}, weights, metadata={"format": "pt"})
    with open(config_path, "w") as fh:
        json.dump(dict(good, lora_bias=True), fh)
    model = lorac.Sequential(lorac.Linear(4, 3, bias=False), lorac.Linear(3, 2))
    with pytest.raises(ValueError, match="has no bias, which lorac's lora_bias needs"):
        lorac.load_peft_adapter(model, folder)
    assert model[0].r == 0


def check_eva_bad_input():
    model = lorac.get_peft_model(lorac.Sequential(lorac.Linear(4, 3), lorac.Linear(3, 2)),
                                 lorac.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights="eva",
                                                  eva_config=lorac.EvaConfig()), rng=0)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    for entry, error, match in (({"2": np.zeros((2, 4))}, ValueError, "is not an adapted layer"),
                                ({"0": np.zeros((2, 5))}, ValueError, r"must be a real \(k, 4\) array"),
                                ({"0": np.array([["a"] * 4])}, ValueError, "dtype <U1"),
                                ({"0": np.full((2, 4), np.inf)}, ValueError, "holds NaN or infinite values"),
                                ([("0", np.zeros((2, 4)))], TypeError, "must be a dict")):
        with pytest.raises(error, match=match):
            lorac.initialize_lora_eva_weights(model, eva_state_dict=entry)
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="layer '0': its inputs hold NaN"):
        lorac.initialize_lora_eva_weights(model, [np.full((8, 4), np.nan, np.float32)], show_progress_bar=False)
    assert model[0].r == 2 and all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def check_peft_bad_trainable_tokens(tmp):
    folder = _peft_folder(tmp)
    weights, config_path = (os.path.join(folder, n) for n in ("adapter_model.safetensors", "adapter_config.json"))
    tensors, good = lorac.load(weights), json.load(open(config_path))
    key = "base_model.model.1.token_adapter.trainable_tokens_delta"
    for value, config, match in ((np.zeros((2, 3), np.float32), good, "sets no trainable_token_indices"),
                                 (np.zeros((3, 3), np.float32), dict(good, trainable_token_indices={"1": [0, 1]}),
                                  "must be a float array of 2 rows"),
                                 (np.zeros((2, 3), np.int32), dict(good, trainable_token_indices={"1": [0, 1]}),
                                  "must be a float array"),
                                 (np.zeros((2, 3), np.float32), dict(good, trainable_token_indices={"0": [0, 1]}),
                                  "no trainable_token_indices entry names the layer '1'"),
                                 (np.zeros((2, 3), np.float32), dict(good, trainable_token_indices="all"),
                                  "trainable_token_indices must be a list")):
        lorac.save({**tensors, key: value}, weights, metadata={"format": "pt"})
        with open(config_path, "w") as fh:
            json.dump(config, fh)
        _load_refused(folder, ValueError, match)
    with open(config_path, "w") as fh:       # the target is a Linear, not an Embedding
        json.dump(dict(good, trainable_token_indices={"1": [0, 1]}), fh)
    _load_refused(folder, ValueError, "trainable tokens go on a plain lorac.Embedding")


def check_corda_bad_files(tmp):
    config = lorac.LoraConfig(r=2, target_modules=["0"], init_lora_weights="corda",
                              corda_config=lorac.CordaConfig(cache_file=os.path.join(tmp, "cache")))
    model = lorac.Sequential(lorac.Linear(4, 3), lorac.Linear(3, 2))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    cache = config.corda_config.cache_file
    good = {"0.eigens.S_WC": np.ones(2), "0.eigens.U_WC": np.ones((3, 2)), "0.eigens.V_WC": np.ones((4, 2))}
    for tensors, match in (({**good, "0.eigens.U_WC": np.ones((2, 3))}, r"no finite \(3, 2\) entry 0.eigens.U_WC"),
                           ({k: v for k, v in good.items() if "S_WC" not in k}, r"no finite \(2,\) entry"),
                           ({**good, "0.eigens.V_WC": np.full((4, 2), np.nan)}, "no finite")):
        lorac.save(tensors, cache)
        with pytest.raises(ValueError, match=match):
            lorac.preprocess_corda(model, config)
    _write(tmp, "cache", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(CheckpointError):
        lorac.preprocess_corda(model, config)
    covariance = os.path.join(tmp, "cov")
    lorac.save({"0": np.ones((3, 3))}, covariance)
    with pytest.raises(ValueError, match=r"has no finite \(4, 4\) entry for layer '0'"):
        lorac.preprocess_corda(model, lorac.LoraConfig(r=2, target_modules=["0"], init_lora_weights="corda",
                                                       corda_config=lorac.CordaConfig(covariance_file=covariance)))
    assert "_peft_prepared" not in model[0].__dict__
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def check_peft_mismatch(tmp):
    model = lorac.Sequential(lorac.Linear(5, 3, r=2), lorac.Linear(3, 2))  # in_features 5, target has 4
    folder = os.path.join(tmp, "other")
    lorac.save_peft_adapter(model, folder)
    _load_refused(folder, ValueError, "size mismatch")


def check_peft_corrupt_weights(tmp):
    folder = _peft_folder(tmp)
    _write(folder, "adapter_model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    _load_refused(folder, ValueError, "safetensors")


ROWS = [
    # C functions (every entry point of the catalogue unless said otherwise)
    Row("C functions", "an array argument that is not an ndarray (a list)",
        "TypeError naming the function, the argument and the dtype expected", check_not_an_array),
    Row("C functions", "an array of the other float dtype, an integer array for a float one, a float array "
        "for indices / target / ids / mask", "TypeError naming the argument, the dtype expected and the one given",
        check_wrong_dtype),
    Row("C functions", "complex, object, structured, string, bool or float16 arrays",
        "TypeError (never converted silently)", check_exotic_dtypes),
    Row("C functions", "an array with an extra dimension", "ValueError naming the argument, the shape expected "
        "(with names: (N, in), (r, in), ...) and the shape given", check_wrong_ndim),
    Row("C functions", "any axis of any array one element longer",
        "ValueError naming the mismatch; a free axis (batch rows, rank) gives the correct result for the "
        "arguments given -- never a silent wrong answer", check_wrong_shape),
    Row("C functions", "an in-place argument (gradient, weight being merged, optimizer state) in Fortran "
        "order or with negative strides", "ValueError: it must be row-major with unit inner stride; nothing "
        "written", check_in_place_layout),
    Row("C functions", "a read-only in-place argument", "ValueError: updated in place but read-only; nothing "
        "written", check_read_only_output),
    Row("C functions", "read-only inputs", "accepted (inputs are only read); correct result",
        check_read_only_inputs),
    Row("C functions", "byte-swapped or unaligned inputs", "copied to native layout; correct result",
        check_swapped_unaligned_inputs),
    Row("C functions", "a byte-swapped in-place argument", "ValueError (an in-place array is never copied)",
        check_swapped_output),
    Row("C functions", "empty arrays: 0 rows, 0 features, rank 0, no indices",
        "correct (possibly empty) result of the right shape", check_empty),
    Row("C functions", "NaN or inf inside data arrays", "no exception: IEEE propagation, confined to the rows "
        "it touches", check_nan_inputs),
    Row("C functions", "NaN or inf hyper-parameters (scaling, keep_scale, alpha, lr, eps, betas, ...)",
        "ValueError: must be finite", check_non_finite_scalars),
    Row("C functions", "hyper-parameters out of range (beta >= 1, step < 1, eps < 0, top_k outside [1, E], "
        "padding_idx outside [0, num), state array missing or extra)", "ValueError (TypeError for a "
        "non-int padding_idx) naming the parameter and its range", check_out_of_range_hyper_parameters),
    Row("C functions", "embedding indices outside [0, num_embeddings) (negative, too large, uint64 >= 2**63)",
        "IndexError naming the value and its flat position, before anything is computed",
        check_index_out_of_range),
    Row("C functions", "cross-entropy targets outside [0, C) and not ignore_index; mixed-batch ids outside "
        "[-1, K)", "ValueError naming the value and its row", check_target_and_ids_out_of_range),
    Row("C functions", "sizes beyond BLAS's 32-bit integers (zero-stride views claiming 2**31 rows, or "
        "2**32 indices)", "ValueError before any allocation (tests/test_limits.py)", check_huge_sizes),
    Row("C functions", "an input sharing memory with an in-place argument; two in-place arguments sharing "
        "memory", "the input is read as it was when the call began (copied); ValueError naming both "
        "in-place arguments (tests/test_aliasing.py)", check_aliasing),
    Row("C functions", "a string where a number is expected, a float where an int is expected",
        "TypeError (from argument parsing)", check_wrong_scalar_types),
    Row("C functions", "a missing, unknown or no argument", "TypeError naming the function (and the missing "
        "argument)",
        check_missing_and_unknown_arguments),
    Row("C functions", "an unknown activation kind; enable_lora empty, not dividing out_features, not bools, "
        "not a sequence", "ValueError / TypeError naming the argument and the choices", check_bad_enumerations),
    Row("C functions", "lora_A without lora_B; adapter lists of different lengths; an array where a list of "
        "adapters is expected", "ValueError / TypeError naming the arguments", check_half_an_adapter),
    Row("C functions", "a lazy huge sequence (range(10**12), a zero-stride array) as enable_lora or an "
        "adapter list", "ValueError from its length, before it is expanded into a list", check_lazy_huge_sequences),
    Row("C functions", "objects whose __float__ / __bool__ / __index__ raise",
        "their exception propagates; nothing written", check_hostile_objects),
    Row("C functions", "argument lists emptied during the call (by a scalings entry's __float__)",
        "the lists are used as passed (private copies): correct result, no crash", check_mutated_argument_lists),
    # layers
    Row("layers", "an input whose last dimension is not in_features",
        "ValueError naming the layer, the shape expected and the shape given; layer unchanged",
        check_layer_wrong_features),
    Row("layers", "an input of another dtype (float64 for a float32 layer, ints, complex, strings)",
        "TypeError: lorac never changes an array's precision silently", check_layer_wrong_dtype),
    Row("layers", "NaN in the input", "NaN in those output rows only; layer unchanged", check_layer_nan_input),
    Row("layers", "empty batch, 0 features, 1-D and 3-D inputs", "accepted, output of the matching shape",
        check_layer_shapes_accepted),
    Row("layers", "backward before forward, twice for one forward, or after merging (eval()) in between",
        "RuntimeError; gradients unchanged", check_backward_without_forward),
    Row("layers", "grad_output of the wrong shape, dtype or type", "ValueError / TypeError naming "
        "grad_output; no gradient changed or allocated", check_backward_bad_grad),
    Row("layers", "Embedding indices out of range", "IndexError naming the range; layer unchanged",
        check_embedding_index_out_of_range),
    Row("layers", "Embedding / DoRAEmbedding backward before forward, twice, after merging, bad grad_output",
        "RuntimeError / ValueError / TypeError; layer unchanged", check_embedding_backward_misuse),
    Row("layers", "load_state_dict with a wrong shape, a non-numeric array, unexpected keys",
        "ValueError / TypeError / StateDictKeyError (a KeyError); all-or-nothing: layer unchanged",
        check_load_state_dict_bad),
    Row("layers", "bad constructor arguments (enable_lora not dividing out, dropout 1, negative sizes, int "
        "dtype, negative lr, betas >= 1)", "ValueError / TypeError naming the argument",
        check_bad_constructor_arguments),
    # loaders
    Row("loaders", "checkpoint.load of an empty file, random bytes, text", "CheckpointError (a ValueError) "
        "whose message begins with the path", check_checkpoint_garbage),
    Row("loaders", "truncated safetensors / .npz files", "CheckpointError", check_checkpoint_truncated),
    Row("loaders", "a safetensors header declaring 2**62 elements or an 2**60-byte header",
        "CheckpointError before allocating", check_checkpoint_huge_header),
    Row("loaders", "a torch pickle calling os.system; a legacy (non-zip) pickle",
        "CheckpointError; the code never runs", check_checkpoint_code_execution),
    Row("loaders", "a missing path, a directory", "FileNotFoundError / IsADirectoryError (OSError)",
        check_checkpoint_not_a_file),
    Row("loaders", "load_peft_adapter: folder without adapter_config.json or weights, path that is no folder",
        "PeftFolderError (a ValueError); model unchanged", check_peft_missing_files),
    Row("loaders", "adapter_config.json: invalid JSON, not an object, another peft_type, use_dora without "
        "magnitude vectors, r < 1, a bad regex in rank_pattern", "PeftFolderError / PeftConfigError "
        "(ValueErrors) naming the field; model unchanged", check_peft_bad_config),
    Row("loaders", "weights-file layout metadata (lorac_fan_in_fan_out): not JSON, not a map of booleans, "
        "naming no Linear layer of the file", "PeftFolderError naming the entry; model unchanged",
        check_peft_bad_layout_metadata),
    Row("loaders", "PEFT lora_bias: lora_B.bias of the wrong shape or dtype, without lora_bias in the config, "
        "with use_dora or a gaussian init; a target layer without a bias",
        "PeftFolderError / AdapterMismatchError (ValueErrors) naming the key or layer; model unchanged",
        check_peft_bad_lora_bias),
    Row("loaders", "PEFT trainable tokens: token_adapter.trainable_tokens_delta without trainable_token_indices, "
        "of the wrong shape or dtype, or for a layer the config does not name; a malformed "
        "trainable_token_indices; a target that is not a plain Embedding",
        "PeftFolderError / PeftConfigError / AdapterMismatchError (ValueErrors) naming the key, field or layer; "
        "model unchanged", check_peft_bad_trainable_tokens),
    Row("loaders", "adapter shapes that do not fit the model", "AdapterMismatchError (a ValueError); model "
        "unchanged", check_peft_mismatch),
    Row("loaders", "corrupt adapter_model.safetensors", "CheckpointError (a ValueError); model unchanged",
        check_peft_corrupt_weights),
    Row("EVA", "an eva_state_dict entry naming no adapted Linear layer, of the wrong shape or dtype, or holding "
        "NaN / inf, or not a dict; layer inputs holding NaN",
        "ValueError / TypeError naming the entry or layer; model unchanged", check_eva_bad_input),
    Row("CorDA", "a cache_file or covariance_file that is corrupt, lacks a layer's entry, or holds one of "
        "the wrong shape or with NaN", "CheckpointError / ValueError naming the file and entry; no layer takes "
        "factors", check_corda_bad_files),
    Row("everything", "arbitrary argument tuples and arbitrary file bytes (fuzzing)",
        "only the exceptions above; no crash (tests/test_fuzz.py, tests/fuzz/fuzz_lorac.py)",
        lambda: None),
]


def _row_id(row):
    return f"{row.family}: {row.bad_input}"[:80]


@pytest.mark.parametrize("row", ROWS, ids=[_row_id(r) for r in ROWS])
def test_row(row, tmp_path):
    if "tmp" in row.check.__code__.co_varnames[:row.check.__code__.co_argcount]:
        row.check(str(tmp_path))
    else:
        row.check()


def markdown():
    lines = ["# Bad-input matrix",
             "",
             "Every kind of bad input lorac's tests try, and what lorac answers.  Generated from",
             "`ROWS` in tests/test_bad_input_matrix.py (`python tests/test_bad_input_matrix.py >",
             "docs/BAD_INPUT.md`); each row is one test there (`pytest tests/test_bad_input_matrix.py`).",
             "\"C functions\" rows run against every function of `lorac._C` listed in",
             "tests/entry_points.py.  Exceptions name the function (or layer), the argument, what was",
             "expected and what came.",
             "",
             "| # | family | bad input | what lorac answers |",
             "| --- | --- | --- | --- |"]
    for i, row in enumerate(ROWS, 1):
        lines.append(f"| {i} | {row.family} | {row.bad_input} | {row.answer} |")
    return "\n".join(lines) + "\n"


def test_doc_lists_exactly_these_rows():
    with open(DOC) as fh:
        text = fh.read()
    assert text == markdown(), ("docs/BAD_INPUT.md is out of date: regenerate it with "
                                "`python tests/test_bad_input_matrix.py > docs/BAD_INPUT.md`")


if __name__ == "__main__":
    sys.stdout.write(markdown())

"""lorac.extract_lora and lorac.extract_adapter: LoRA adapters from weight differences."""

import math

import numpy as np
import pytest

import lorac
from lorac.lowrank import ExtractedAdapter, extract_adapter, extract_lora, lora_factors

DTYPES = [np.float32, np.float64]


def low_rank(out, inp, rank, rng):
    return rng.standard_normal((out, rank)) @ rng.standard_normal((rank, inp))


def best_rank_r(M, r):
    u, s, vt = np.linalg.svd(M, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], math.sqrt(np.sum(s[r:] ** 2))


# -- one layer ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out, inp, true_rank, r", [(1, 1, 1, 1), (7, 5, 2, 2), (5, 7, 2, 4), (12, 9, 3, 3),
                                                      (3, 20, 3, 8), (16, 16, 1, 4)])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_known_low_rank_delta_is_extracted_exactly(out, inp, true_rank, r, fan_in_fan_out, dtype, rng):
    base = rng.standard_normal((out, inp))
    delta = low_rank(out, inp, true_rank, rng)
    if fan_in_fan_out:                       # weights stored (in, out)
        base, delta = base.T.copy(), delta.T.copy()
    base = base.astype(dtype)
    finetuned = (base.astype(np.float64) + delta).astype(dtype)
    exact = finetuned.astype(np.float64) - base           # the delta the weights really hold
    ext = extract_lora(finetuned, base, r, lora_alpha=2 * r, fan_in_fan_out=fan_in_fan_out)
    assert ext.lora_A.shape == (r, inp) and ext.lora_B.shape == (out, r)
    assert ext.lora_A.dtype == dtype and ext.lora_B.dtype == dtype
    assert ext.scaling == 2.0 and ext.lora_alpha == 2 * r and ext.r == r
    scale = np.abs(exact).max()
    np.testing.assert_allclose(ext.delta(), exact, atol=(3e-5 if dtype == np.float32 else 1e-11) * scale)
    assert ext.energy == pytest.approx(1.0, abs=1e-6 if dtype == np.float32 else 1e-12)
    assert ext.relative_error < (1e-3 if dtype == np.float32 else 1e-12)
    assert ext.delta_norm == pytest.approx(np.linalg.norm(exact), rel=1e-12)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_higher_rank_delta_gives_the_best_rank_r_adapter(fan_in_fan_out, rng):
    base = rng.standard_normal((10, 8))
    finetuned = base + rng.standard_normal((10, 8))
    delta = finetuned - base
    oriented = delta.T if fan_in_fan_out else delta
    for r in (1, 3, 6):
        ext = extract_lora(finetuned, base, r, fan_in_fan_out=fan_in_fan_out)
        best, error = best_rank_r(oriented, r)
        np.testing.assert_allclose(ext.lora_B @ ext.lora_A, best, atol=1e-11)  # scaling 1 by default
        np.testing.assert_allclose(ext.delta(), best.T if fan_in_fan_out else best, atol=1e-11)
        assert ext.scaling == 1.0 and ext.lora_alpha == r
        assert ext.error == pytest.approx(error, rel=1e-10)
        assert ext.error == pytest.approx(np.linalg.norm(oriented - ext.lora_B @ ext.lora_A), rel=1e-9)
        assert ext.relative_error == pytest.approx(error / np.linalg.norm(delta), rel=1e-10)


def test_alpha_only_rescales_the_factors(rng):
    base = rng.standard_normal((9, 6))
    finetuned = base + low_rank(9, 6, 4, rng)
    one = extract_lora(finetuned, base, 4)
    sixteen = extract_lora(finetuned, base, 4, lora_alpha=16)        # scaling 4: factors / 2
    np.testing.assert_allclose(sixteen.lora_A, one.lora_A / 2, atol=1e-12)
    np.testing.assert_allclose(sixteen.lora_B, one.lora_B / 2, atol=1e-12)
    rs = extract_lora(finetuned, base, 4, use_rslora=True)           # default alpha sqrt(r): scaling 1
    assert rs.lora_alpha == 2.0 and rs.scaling == 1.0
    rs8 = extract_lora(finetuned, base, 4, lora_alpha=8, use_rslora=True)
    assert rs8.scaling == 4.0
    np.testing.assert_allclose(rs8.delta(), finetuned - base, atol=1e-11)
    # the split is balanced: B^T B == A A^T == diag(S / scaling)
    s = np.linalg.svd(finetuned - base, compute_uv=False)[:4]
    np.testing.assert_allclose(sixteen.lora_B.T @ sixteen.lora_B, np.diag(s / 4), atol=1e-11)
    np.testing.assert_allclose(sixteen.lora_A @ sixteen.lora_A.T, np.diag(s / 4), atol=1e-11)


def test_randomized_extraction_of_an_exact_low_rank_delta(rng):
    base = rng.standard_normal((60, 40))
    finetuned = base + low_rank(60, 40, 3, rng)
    ext = extract_lora(finetuned, base, 3, randomized=True, niter=1, rng=0)
    np.testing.assert_allclose(ext.delta(), finetuned - base, atol=1e-10)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_linear_with_the_extracted_adapter_reproduces_the_finetuned_layer(fan_in_fan_out, rng):
    layer = lorac.Linear(7, 5, r=2, lora_alpha=6, fan_in_fan_out=fan_in_fan_out, rng=0, dtype=np.float64)
    base = layer.weight.data.copy()
    delta = low_rank(5, 7, 2, rng)
    finetuned = base + (delta.T if fan_in_fan_out else delta)
    ext = extract_lora(finetuned, base, 2, lora_alpha=6, fan_in_fan_out=fan_in_fan_out)
    layer.load_state_dict(ext.state_dict(), strict=False)
    x = rng.standard_normal((4, 7))
    reference = x @ (finetuned if fan_in_fan_out else finetuned.T) + layer.bias.data
    np.testing.assert_allclose(layer(x), reference, atol=1e-11)
    assert set(ext.state_dict("blk.q")) == {"blk.q.lora_A", "blk.q.lora_B"}


def test_lora_factors_is_the_split_pissa_needs(rng):
    W = rng.standard_normal((8, 6)).astype(np.float32)
    a, b, approx = lora_factors(W, 3, scaling=0.5)
    best, error = best_rank_r(W.astype(np.float64), 3)
    np.testing.assert_allclose(0.5 * b.astype(np.float64) @ a, best, atol=1e-5)
    assert a.dtype == np.float32 and approx.error == pytest.approx(error, rel=1e-5)


@pytest.mark.parametrize("args, kwargs, exc, fragment", [
    ((np.ones((3, 4)), np.ones((4, 3)), 1), {}, ValueError, "same shape"),
    ((np.ones((3, 4)), np.ones((3, 4)), 0), {}, ValueError, "r must be >= 1"),
    ((np.ones((3, 4)), np.ones((3, 4)), 1), {"lora_alpha": -1}, ValueError, "lora_alpha"),
    ((np.ones((3, 4)), np.ones((3, 4)), 1), {"lora_alpha": "8"}, TypeError, "lora_alpha"),
    ((np.ones((3, 4)), np.full((3, 4), np.nan), 1), {}, ValueError, "W_base must hold finite"),
    ((np.ones(4), np.ones(4), 1), {}, ValueError, "2-D"),
    (("abc", np.ones((3, 4)), 1), {}, TypeError, "W_finetuned"),
])
def test_extract_lora_bad_input(args, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment) as info:
        extract_lora(*args, **kwargs)
    assert str(info.value).startswith("extract_lora")


# -- whole models -------------------------------------------------------------------------------------------------
def architecture(r=0, lora_alpha=1, seed=0):
    """Embedding(12, 6) -> Linear(6, 8) -> ReLU -> Linear(8, 5, fan_in_fan_out) -> LayerNorm(5)."""
    return lorac.Sequential(
        lorac.Embedding(12, 6, r=r, lora_alpha=lora_alpha, rng=seed, dtype=np.float64),
        lorac.Linear(6, 8, r=r, lora_alpha=lora_alpha, rng=seed + 1, dtype=np.float64),
        lorac.ReLU(),
        lorac.Linear(8, 5, r=r, lora_alpha=lora_alpha, fan_in_fan_out=True, rng=seed + 2, dtype=np.float64),
        lorac.LayerNorm(5, dtype=np.float64))


def finetune_low_rank(model, rng, rank=2):
    """A copy of model's state with a rank-`rank` change to every 2-D weight, and changed biases."""
    state = {k: v.copy() for k, v in model.state_dict().items()}
    for key, value in state.items():
        if value.ndim == 2:
            value += low_rank(*value.shape, rank, rng)
        elif key.endswith("bias"):
            value += 0.1
    return state


@pytest.mark.parametrize("as_models", [False, True])
def test_extract_adapter_rebuilds_the_finetuned_model(as_models, rng):
    base = architecture()
    ft_state = finetune_low_rank(base, rng)
    finetuned = architecture(seed=5)
    finetuned.load_state_dict(ft_state)
    base_state = {k: v.copy() for k, v in base.state_dict().items()}
    if as_models:
        result = extract_adapter(finetuned, base, 2, lora_alpha=4, copy_changed=True)
    else:   # a bare state dict cannot say that '0' is an embedding or that '3' is stored (in, out)
        result = extract_adapter(ft_state, base_state, 2, lora_alpha=4, copy_changed=True, embeddings=["0"])
    assert isinstance(result, ExtractedAdapter)
    assert list(result.layers) == ["0", "1", "3"]
    assert result.kinds == {"0": "embedding", "1": "linear", "3": "linear"}
    assert set(result.extra) == {"1.bias", "3.bias", "4.bias"}
    assert result.skipped == {} and "4.weight" in result.unchanged
    assert all(layer.energy == pytest.approx(1.0) for layer in result.layers.values())   # rank-2 deltas
    state = result.state_dict()
    assert list(state)[:6] == ["0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B", "3.lora_A", "3.lora_B"]
    assert state["0.lora_A"].shape == (2, 12) and state["0.lora_B"].shape == (6, 2)
    assert state["3.lora_A"].shape == ((2, 8) if as_models else (2, 5))

    if as_models:
        adapted = architecture(r=2, lora_alpha=4, seed=9)
        adapted.load_state_dict(base_state, strict=False)
        missing, unexpected = adapted.load_state_dict(state, strict=False)
        assert not unexpected
        tokens = rng.integers(0, 12, size=(3, 4))
        np.testing.assert_allclose(adapted(tokens), finetuned(tokens), atol=1e-10)
        adapted.eval()                            # merged: the weights themselves are the fine-tuned ones
        for key, value in ft_state.items():
            np.testing.assert_allclose(adapted.state_dict()[key] if "weight" not in key
                                       else _merged_weight(adapted, key), value, atol=1e-10)
    # the inputs were not modified
    for key, value in base.state_dict().items():
        np.testing.assert_array_equal(value, base_state[key])


def _merged_weight(model, key):
    module = dict(model.named_modules())[key.rpartition(".")[0]]
    return module.weight.data


def test_extract_adapter_fan_in_fan_out_and_metadata_round_trip(rng):
    base = architecture()
    ft_state = finetune_low_rank(base, rng)
    base_state = base.state_dict()
    result = extract_adapter(ft_state, base_state, 3, embeddings=["0"], include=["1", "3"],
                             fan_in_fan_out=True)
    assert list(result.layers) == ["1", "3"]
    # '1' is really (out, in): read transposed it is still rank 2, but the factors are swapped
    assert result.layers["1"].lora_A.shape == (3, 8) and result.layers["3"].lora_A.shape == (3, 8)
    meta = result.metadata()
    adapter = lorac.peft.from_lorac_state(result.state_dict(), meta)
    assert adapter.layers["3"].fan_in_fan_out is True and adapter.layers["3"].scaling == 1.0
    assert adapter.layers["1"].kind == "linear" and adapter.layers["1"].lora_alpha == 3.0
    emb = extract_adapter(ft_state, base_state, 2, embeddings=["0"], include="0")
    back = lorac.peft.from_lorac_state(emb.state_dict(), emb.metadata())
    assert back.layers["0"].kind == "embedding" and back.layers["0"].transposed


def test_extract_adapter_filters_skips_and_progress(rng):
    base = {"a.weight": rng.standard_normal((4, 3)), "b.weight": rng.standard_normal((5, 4)),
            "b.bias": np.zeros(5), "c.weight": rng.standard_normal((2, 2)), "old.weight": np.ones((2, 2)),
            "steps": np.array([3], dtype=np.int64)}
    ft = {k: v.copy() for k, v in base.items() if k != "old.weight"}
    ft["a.weight"] += 1.0
    ft["b.weight"] += 1.0
    ft["b.bias"] += 1.0
    ft["c.weight"] = np.ones((3, 2))                                  # resized
    ft["new.weight"] = np.ones((2, 2))
    ft["steps"] = np.array([4], dtype=np.int64)
    seen = []

    def progress(paths):
        seen.append(list(paths))
        return paths
    result = extract_adapter(ft, base, 1, exclude=["b"], progress=progress)
    assert list(result.layers) == ["a"] and seen == [["a"]]
    assert "shapes differ" in result.skipped["c.weight"]
    assert result.skipped["new.weight"] == "only in the fine-tuned model"
    assert result.skipped["old.weight"] == "only in the base model"
    assert "not a 2-D float weight" in result.skipped["steps"]
    assert "b.weight" not in result.skipped and "b.bias" not in result.skipped     # excluded
    np.testing.assert_allclose(result.layers["a"].delta(), np.ones((4, 3)), atol=1e-12)
    kept = extract_adapter(ft, base, 1, include="b", copy_changed=True)
    assert list(kept.layers) == ["b"] and set(kept.extra) == {"b.bias"}
    np.testing.assert_array_equal(kept.state_dict()["b.bias"], ft["b.bias"])
    assert kept.relative_error == pytest.approx(0.0, abs=1e-12)


def test_extract_adapter_refuses_adapters_and_bad_arguments(rng):
    base = {"a.weight": np.zeros((2, 2))}
    with pytest.raises(ValueError, match="holds LoRA tensors"):
        extract_adapter({"a.weight": np.ones((2, 2)), "a.lora_A": np.ones((1, 2))}, base, 1)
    with pytest.raises(ValueError, match="r must be >= 1"):
        extract_adapter(base, base, 0)
    with pytest.raises(TypeError, match="finetuned must be a lorac Module or a state dict"):
        extract_adapter([1], base, 1)
    with pytest.raises(TypeError, match="include"):
        extract_adapter(base, base, 1, include=[3])
    with pytest.raises(TypeError, match="progress"):
        extract_adapter(base, base, 1, progress=3)
    with pytest.raises(ValueError, match="finite"):
        extract_adapter({"a.weight": np.full((2, 2), np.inf)}, base, 1)
    with pytest.raises(TypeError, match="keys must be str"):
        extract_adapter({1: np.ones((2, 2))}, base, 1)
    assert extract_adapter(base, base, 1).layers == {}


def test_extract_adapter_skips_merged_linear_weights(rng):
    base = lorac.Sequential(lorac.MergedLinear(4, 6, enable_lora=[True, False], rng=0), lorac.Linear(6, 2, rng=1))
    ft = {k: v + 1.0 for k, v in base.state_dict().items()}
    result = extract_adapter(ft, base, 1)
    assert list(result.layers) == ["1"]
    assert result.skipped["0.weight"].startswith("a MergedLinear weight")
    assert extract_adapter(ft, base, 1, copy_changed=True).extra.keys() == {"0.weight", "0.bias", "1.bias"}


def test_extract_adapter_carries_changed_biases_as_lora_bias(rng):
    """lora_bias=True: the extracted Linear layers' bias changes become lora_bias (over the scaling),
    so a model built with lora_bias=True computes the fine-tuned model exactly (rank-2 deltas); a
    changed bias of a layer without an adapter (the LayerNorm) stays copied or skipped."""
    base = architecture()
    ft_state = finetune_low_rank(base, rng)
    finetuned = architecture(seed=5)
    finetuned.load_state_dict(ft_state)
    base_state = {k: v.copy() for k, v in base.state_dict().items()}
    result = extract_adapter(finetuned, base, 2, lora_alpha=4, lora_bias=True, copy_changed=True)
    assert set(result.lora_biases) == {"1", "3"} and set(result.extra) == {"4.bias"}
    state = result.state_dict()
    np.testing.assert_allclose(state["3.lora_bias"] * 2.0, ft_state["3.bias"] - base_state["3.bias"], rtol=1e-12)
    skipped = extract_adapter(finetuned, base, 2, lora_bias=True).skipped
    assert set(skipped) == {"4.bias"}

    adapted = lorac.Sequential(
        lorac.Embedding(12, 6, r=2, lora_alpha=4, rng=0, dtype=np.float64),
        lorac.Linear(6, 8, r=2, lora_alpha=4, rng=1, dtype=np.float64, lora_bias=True),
        lorac.ReLU(),
        lorac.Linear(8, 5, r=2, lora_alpha=4, fan_in_fan_out=True, rng=2, dtype=np.float64, lora_bias=True),
        lorac.LayerNorm(5, dtype=np.float64))
    adapted.load_state_dict(base_state, strict=False)
    missing, unexpected = adapted.load_state_dict(state, strict=False)
    assert not unexpected
    tokens = rng.integers(0, 12, size=(3, 4))
    np.testing.assert_allclose(adapted(tokens), finetuned(tokens), rtol=1e-9, atol=1e-9)

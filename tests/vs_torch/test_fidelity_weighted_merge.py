"""add_weighted_adapter's task-vector merges (ties, magnitude_prune, dare_*,
and their _svd forms) against PEFT's add_weighted_adapter on the same
adapters: identical factors (or, for the _svd forms, identical deltas) for
the deterministic merges; DARE's random masks cannot be shared with torch, so
it is checked against PEFT at density 1, for unbiasedness, and against a
NumPy reference drawing the same masks.

PEFT holds the merge weights in a float32 tensor, so its results carry
float32 rounding of the weights (relative 6e-8 each): close() allows 1e-6 of
the largest entry, far below what a wrong pruning, sign or weight gives."""

import warnings

import numpy as np
import pytest

import lorac
from fidelity import torch

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch

ADAPTERS = {"a": (2, 4, False), "b": (2, 3, True), "c": (2, 6, False)}   # name: (r, lora_alpha, use_rslora)
PATHS = ("emb", "proj", "head")


def twins():
    """A PEFT model and a lorac one with the same base weights and adapters a, b, c on emb, proj, head."""
    from test_fidelity_mixed_batch import LNet, TNet

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(TNet().double(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(PATHS),
                                                                      init_lora_weights=False))
        ours = LNet()
        for name, (r, alpha, rslora) in ADAPTERS.items():
            pmodel.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                                     target_modules=list(PATHS), init_lora_weights=False))
            lorac.add_adapter(ours, name, r=r, lora_alpha=alpha, use_rslora=rslora)
    pmodel.double()
    for path in PATHS:
        player, layer = pmodel.base_model.model.get_submodule(path), getattr(ours, path)
        layer.weight.data[...] = player.base_layer.weight.detach().numpy()
        if path != "emb":
            layer.bias.data[...] = player.base_layer.bias.detach().numpy()
        for name in layer.adapter_names:
            a, b = peft_factors(player, name)
            A, B = layer.adapter_parameters(name)
            A.data[...], B.data[...] = a, b
    return pmodel, ours


def peft_factors(player, name):
    if name in player.lora_embedding_A:
        return player.lora_embedding_A[name].detach().numpy(), player.lora_embedding_B[name].detach().numpy()
    return player.lora_A[name].weight.detach().numpy(), player.lora_B[name].weight.detach().numpy()


def combine_both(combination, names, weights, **options):
    pmodel, ours = twins()
    with warnings.catch_warnings():   # PEFT warns that density 1 prunes nothing
        warnings.simplefilter("ignore")
        pmodel.add_weighted_adapter(names, weights, "mix", combination_type=combination, **options)
    lorac.add_weighted_adapter(ours, names, weights, "mix", combination=combination, **options)
    return pmodel, ours


def close(actual, expected, what):
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * scale, err_msg=what)


def delta(layer, name):
    A, B = layer.adapter_parameters(name)
    return layer._scaling_of(name) * B.data @ A.data


MERGES = [("ties", {"density": 0.5}), ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
          ("magnitude_prune", {"density": 0.6}), ("dare_linear", {"density": 1.0}),
          ("dare_ties", {"density": 1.0, "majority_sign_method": "frequency"})]


@pytest.mark.parametrize("combination, options", MERGES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(MERGES)])
def test_factor_merges_match_peft(combination, options):
    pmodel, ours = combine_both(combination, ["a", "b", "c"], [0.8, -1.5, 0.4], **options)
    for path in PATHS:
        player, layer = pmodel.base_model.model.get_submodule(path), getattr(ours, path)
        a, b = peft_factors(player, "mix")
        A, B = layer.adapter_parameters("mix")
        close(A.data, a, path)
        close(B.data, b, path)
        assert layer._scaling_of("mix") == pytest.approx(player.scaling["mix"])


SVD_MERGES = [("ties_svd", {"density": 0.4}), ("magnitude_prune_svd", {"density": 0.7, "svd_rank": 3}),
              ("dare_linear_svd", {"density": 1.0}), ("ties_svd", {"density": 0.5, "svd_rank": 4})]


@pytest.mark.parametrize("combination, options", SVD_MERGES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(SVD_MERGES)])
def test_svd_merges_match_peft(combination, options):
    pmodel, ours = combine_both(combination, ["a", "b", "c"], [1.2, 0.5, -0.9], **options)
    idx = np.random.default_rng(0).integers(0, 11, (4, 3))
    pmodel.set_adapter("mix")
    lorac.set_adapter(ours, "mix")
    for path in PATHS:
        player, layer = pmodel.base_model.model.get_submodule(path), getattr(ours, path)
        expected = player.get_delta_weight("mix").detach().numpy()
        got = delta(layer, "mix")
        close(got.T if path == "emb" else got, expected, path)
    with torch.no_grad():
        expected = pmodel(torch.from_numpy(idx)).numpy()
    close(ours(idx), expected, "forward")


@pytest.mark.parametrize("combination, options", [("svd", {}), ("ties_svd", {"density": 0.5}),
                                                  ("magnitude_prune_svd", {"density": 0.7, "svd_rank": 3})])
@pytest.mark.parametrize("quantile", [0.9, 0.55])
def test_svd_clamp_is_pefts(combination, options, quantile):
    """lorac's clamp_factors applied to PEFT's unclamped factors gives PEFT's svd_clamp result
    (a singular vector's sign is LAPACK's choice, so the two libraries' own factors may differ
    in sign; test_adapters checks that add_weighted_adapter clamps its factors so)."""
    pmodel, _ = twins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, clamp in (("raw", None), ("clamped", quantile)):
            pmodel.add_weighted_adapter(["a", "b", "c"], [1.2, 0.5, -0.9], name, combination_type=combination,
                                        svd_clamp=clamp, **options)
    for path in PATHS:
        player = pmodel.base_model.model.get_submodule(path)
        (a, b), (ca, cb) = peft_factors(player, "raw"), peft_factors(player, "clamped")
        got_b, got_a = lorac.adapters.clamp_factors(b, a, quantile)
        assert np.any(got_b != b) or np.any(got_a != a)
        close(got_a, ca, path)
        close(got_b, cb, path)


def test_a_single_adapter_falls_back_to_linear_as_in_peft():
    pmodel, ours = combine_both("ties", ["b"], [0.7], density=0.2)
    for path in PATHS:
        a, b = peft_factors(pmodel.base_model.model.get_submodule(path), "mix")
        A, B = getattr(ours, path).adapter_parameters("mix")
        close(A.data, a, path)
        close(B.data, b, path)
        np.testing.assert_allclose(delta(getattr(ours, path), "mix"), 0.7 * delta(getattr(ours, path), "b"),
                                   atol=1e-12)


def dare_reference(tensors, weights, density, rng, ties):
    """DARE from its definition: keep each entry with probability density (the draws in
    lorac's order: one uniform array per tensor), rescale by 1 / density, then sum the
    weighted tensors, or (ties) average those agreeing with the elected sign of the sum."""
    kept = [np.where(rng.random(t.shape) < density, t, 0.0) / density for t in tensors]
    weighted = [w * t for w, t in zip(weights, kept)]
    if not ties:
        return sum(weighted)
    elected = np.where(sum(kept) >= 0, 1.0, -1.0)
    agree = [np.sign(t) == elected for t in kept]
    total = sum(np.where(m, t, 0.0) for m, t in zip(agree, weighted))
    return total / np.maximum(sum(m.astype(int) for m in agree), 1)


@pytest.mark.parametrize("ties", [False, True])
def test_dare_against_a_reference_with_the_same_masks(ties):
    _, ours = twins()
    names, weights, density = ["a", "c"], [0.6, -1.1], 0.4
    lorac.add_weighted_adapter(ours, names, weights, "mix", combination="dare_ties" if ties else "dare_linear",
                               density=density, rng=7)
    rng = np.random.default_rng(7)
    for path in PATHS:   # the layers in model order, A then B in each: the order lorac draws in
        layer = getattr(ours, path)
        coefs = [w * layer._scaling_of(n) for n, w in zip(names, weights)]
        roots = [np.sqrt(abs(c)) for c in coefs]
        As = [layer.adapter_parameters(n)[0].data for n in names]
        Bs = [layer.adapter_parameters(n)[1].data for n in names]
        want_a = dare_reference(As, [np.copysign(r, c) for r, c in zip(roots, coefs)], density, rng, ties)
        want_b = dare_reference(Bs, roots, density, rng, ties)
        A, B = layer.adapter_parameters("mix")
        np.testing.assert_allclose(A.data, want_a, rtol=1e-12, atol=1e-14, err_msg=path)
        np.testing.assert_allclose(B.data, want_b, rtol=1e-12, atol=1e-14, err_msg=path)


def test_dare_linear_is_unbiased_like_peft():
    """E[DARE's merge] = the linear merge: the mean over many seeds approaches PEFT's 'linear' factors."""
    pmodel, ours = combine_both("linear", ["a", "c"], [0.6, 1.1])
    expected = peft_factors(pmodel.base_model.model.get_submodule("proj"), "mix")[0]
    draws = []
    for seed in range(400):
        lorac.add_weighted_adapter(ours, ["a", "c"], [0.6, 1.1], f"d{seed}", combination="dare_linear",
                                   density=0.5, rng=seed)
        draws.append(ours.proj.adapter_parameters(f"d{seed}")[0].data)
    mean, spread = np.mean(draws, axis=0), np.std(draws, axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - expected) < 5 * spread + 1e-12)


def test_merge_options_are_checked_before_any_change():
    _, ours = twins()
    before = lorac.adapter_names(ours)
    for kwargs, error, match in [
        (dict(combination="ties"), ValueError, "needs density"),
        (dict(combination="ties", density=1.5), ValueError, r"density must be in \[0, 1\], got 1.5"),
        (dict(combination="dare_linear", density=0.0), ValueError, "density must be > 0"),
        (dict(combination="svd", density=0.5), ValueError, "density applies to the pruning combinations"),
        (dict(combination="ties", density=0.5, majority_sign_method="mean"), ValueError, "majority_sign_method"),
        (dict(combination="ties", density="half"), TypeError, "density"),
        (dict(combination="dare_ties", density=0.5, rng="x"), TypeError, "rng"),
    ]:
        with pytest.raises(error, match=match):
            lorac.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", **kwargs)
    lorac.add_adapter(ours, "r3", r=3)
    with pytest.raises(ValueError, match="'ties' needs equal ranks"):
        lorac.add_weighted_adapter(ours, ["a", "r3"], [1.0, 1.0], "mix", combination="ties", density=0.5)
    assert lorac.adapter_names(ours) == before + ("r3",)

"""EVA (lorac.get_eva_state_dict / initialize_lora_eva_weights) against a NumPy
float64 reference: the principal directions of each layer's inputs, PEFT's
rank redistribution worked by hand, and every refusal.  PEFT itself is
compared in tests/vs_torch/test_fidelity_eva.py."""

import sys
import warnings

import numpy as np
import pytest

import lorac

pytest.importorskip("sklearn")

H = 8


class TwoInputs(lorac.Module):
    """a(x1) and b(x2): two layers whose inputs the test chooses independently."""

    def __init__(self, dtype=np.float64, c=False):
        super().__init__()
        self.a = lorac.Linear(H, 5, rng=1, dtype=dtype)
        self.b = lorac.Linear(H, 5, rng=2, dtype=dtype)
        if c:
            self.c = lorac.Linear(H, 5, rng=3, dtype=dtype)

    def forward(self, x1, x2, x3=None):
        out = self.a(x1) + self.b(x2)
        return out if x3 is None else out + self.c(x3)


class Shared(lorac.Module):
    """q(x) * k(x) -> o: q and k see the same input."""

    def __init__(self, dtype=np.float64):
        super().__init__()
        self.q = lorac.Linear(H, H, rng=1, dtype=dtype)
        self.k = lorac.Linear(H, H, rng=2, dtype=dtype)
        self.o = lorac.Linear(H, 3, rng=3, dtype=dtype)

    def forward(self, x):
        return self.o(self.q(x) * self.k(x))


def low_rank_rows(rng, n, variances, mean_scale=1.0):
    """n rows in R^H of exact rank len(variances) around a random mean (IncrementalPCA is exact on them)."""
    basis = np.linalg.qr(rng.standard_normal((H, len(variances))))[0].T       # (k, H) orthonormal
    return rng.standard_normal((n, len(variances))) * np.sqrt(variances) @ basis + mean_scale * rng.standard_normal(H)


def reference_pca(rows):
    """float64 PCA of all rows: (components (k, H) with scikit-learn's signs, explained-variance ratios, S)."""
    centred = rows - rows.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
    return vt * signs[:, None], s ** 2 / np.sum(centred ** 2), s


def reference_ranks(ratios, max_components, budget):
    """PEFT's redistribution by hand: the budget largest ratios over all layers (each its first max_components)."""
    pool = sorted(((r, path) for path, values in ratios.items() for r in values[:max_components]), reverse=True)
    counts = {path: 0 for path in ratios}
    for _, path in pool[:budget]:
        counts[path] += 1
    return counts


def eva_model(model, **config):
    defaults = dict(r=2, lora_alpha=4, target_modules=["a", "b", "c", "q", "k", "o"], init_lora_weights="eva",
                    eva_config=lorac.EvaConfig())
    lorac.get_peft_model(model, lorac.LoraConfig(**{**defaults, **config}), rng=0)
    return model


def two_input_batches(seed, n_batches=1, rows=240, va=(9.0, 1.0), vb=(5.0, 4.0, 3.0, 2.0), vc=None):
    """Batches of keyword inputs x1, x2 (x3) and all rows by layer.  One batch by default: cycled, it is
    the only data the PCA sees, so its result is the PCA of that batch whenever it stops."""
    rng = np.random.default_rng(seed)
    x1 = low_rank_rows(rng, n_batches * rows, va)
    x2 = low_rank_rows(rng, n_batches * rows, vb)
    x3 = None if vc is None else rng.standard_normal((n_batches * rows, H)) * np.sqrt(vc)
    batches = []
    for i in range(n_batches):
        part = slice(i * rows, (i + 1) * rows)
        batch = dict(x1=x1[part], x2=x2[part])
        if x3 is not None:
            batch["x3"] = x3[part]
        batches.append(batch)
    return batches, dict(a=x1, b=x2, c=x3)


NO_MASK = dict(prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)


# -- the reference --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_components_and_ranks_match_the_float64_reference(dtype):
    batches, inputs = two_input_batches(0)
    batches = [{k: v.astype(dtype) for k, v in b.items()} for b in batches]
    inputs = {k: None if v is None else v.astype(dtype).astype(np.float64) for k, v in inputs.items()}
    model = eva_model(TwoInputs(dtype))
    state = lorac.get_eva_state_dict(model, batches, **NO_MASK)
    refs = {path: reference_pca(inputs[path]) for path in ("a", "b")}
    expected = reference_ranks({p: ref[1] for p, ref in refs.items()}, max_components=4, budget=4)
    assert expected == {"a": 1, "b": 3}          # the data is built for a redistribution
    assert {p: v.shape for p, v in state.items()} == {p: (k, H) for p, k in expected.items()}
    tol = 1e-5 if dtype == np.float32 else 1e-9
    for path, (components, _, _) in refs.items():
        assert state[path].dtype == dtype
        np.testing.assert_allclose(state[path], components[:expected[path]], atol=tol, err_msg=path)


def test_rho_one_keeps_every_rank_and_whiten_divides_by_root_singular_values():
    batches, inputs = two_input_batches(1)
    plain = lorac.get_eva_state_dict(eva_model(TwoInputs(), eva_config=lorac.EvaConfig(rho=1.0)), batches,
                                     **NO_MASK)
    white = lorac.get_eva_state_dict(eva_model(TwoInputs(), eva_config=lorac.EvaConfig(rho=1.0, whiten=True)),
                                     batches, **NO_MASK)
    assert {p: v.shape[0] for p, v in plain.items()} == {"a": 2, "b": 2}
    for path in ("a", "b"):
        _, _, s = reference_pca(inputs[path])
        norms = np.linalg.norm(white[path], axis=1)
        np.testing.assert_allclose(white[path] / norms[:, None], plain[path], atol=1e-9)
        # the PCA has seen the data a number of times, which scales every singular value alike
        np.testing.assert_allclose(norms[1] / norms[0], np.sqrt(s[0] / s[1]), rtol=1e-9)


def test_initialize_sets_lora_A_zero_B_new_ranks_and_scaled_alphas():
    batches, _ = two_input_batches(0)
    model = eva_model(TwoInputs())
    expected = lorac.get_eva_state_dict(model, batches, **NO_MASK)
    before = model(**batches[0])
    assert lorac.initialize_lora_eva_weights(model, batches, **NO_MASK) is model
    for path, rank in (("a", 1), ("b", 3)):
        layer = model.get_submodule(path)
        assert (layer.r, layer.lora_alpha, layer.scaling) == (rank, 4 * rank / 2, 2.0)
        np.testing.assert_array_equal(layer.lora_A.data, expected[path])
        np.testing.assert_array_equal(layer.lora_B.data, 0)
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and not layer.weight.requires_grad
    np.testing.assert_array_equal(model(**batches[0]), before)     # lora_B = 0: the output is the base model's
    config = model.peft_config["default"]
    assert (config.rank_pattern, config.alpha_pattern) == ({"a": 1, "b": 3}, {"a": 2.0, "b": 6.0})
    assert config.target_modules == ["a", "b"]


def test_without_adjusted_scaling_factors_alpha_stays():
    batches, _ = two_input_batches(0)
    model = eva_model(TwoInputs(), eva_config=lorac.EvaConfig(adjust_scaling_factors=False))
    lorac.initialize_lora_eva_weights(model, batches, **NO_MASK)
    assert [(model.get_submodule(p).r, model.get_submodule(p).lora_alpha) for p in "ab"] == [(1, 4), (3, 4)]
    assert model.peft_config["default"].alpha_pattern == {}


def test_a_layer_given_rank_zero_loses_its_adapter():
    # c's inputs are isotropic: its ratios (about 1/8 each) lose to a's and b's three of >= 0.2
    batches, _ = two_input_batches(2, va=(4.0, 3.0, 2.0), vb=(5.0, 3.0, 2.0), vc=np.ones(H))
    model = eva_model(TwoInputs(c=True))
    before = model(**batches[0])
    lorac.initialize_lora_eva_weights(model, batches, **NO_MASK)
    c = model.c
    assert type(c) is lorac.Linear and c.r == 0 and not c.weight.requires_grad
    assert not any("lora_" in name for name, _ in c.named_parameters())
    assert (model.a.r, model.b.r) == (3, 3)
    assert "c" not in model.peft_config["default"].target_modules
    np.testing.assert_allclose(model(**batches[0]), before, rtol=1e-12, atol=1e-12)


def test_layers_with_equal_inputs_share_one_pca():
    rng = np.random.default_rng(3)
    batches = [low_rank_rows(rng, 250, (4.0, 2.0, 1.0, 0.5))]
    model = eva_model(Shared(), target_modules=["q", "k"])
    state = lorac.get_eva_state_dict(model, batches, show_progress_bar=False)
    k = min(state["q"].shape[0], state["k"].shape[0])
    assert state["q"].shape[0] >= state["k"].shape[0]
    np.testing.assert_array_equal(state["q"][:k], state["k"][:k])
    reference = reference_pca(np.concatenate(batches))[0]
    np.testing.assert_allclose(state["q"], reference[:state["q"].shape[0]], atol=1e-9)


def test_the_language_model_mask_selects_the_rows_that_count():
    vocab = 30

    class TokenNet(lorac.Module):
        def __init__(self):
            super().__init__()
            self.embed = lorac.Embedding(vocab, H, rng=0, dtype=np.float64)
            self.fc = lorac.Linear(H, H, rng=1, dtype=np.float64)

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.fc(self.embed(input_ids))

    rng = np.random.default_rng(4)
    emb_weight = low_rank_rows(rng, vocab, (5.0, 2.0, 1.0), mean_scale=0.0)
    batches, kept = [], []
    for _ in range(1):   # one batch: the PCA sees exactly its rows (see two_input_batches)
        ids = rng.integers(0, vocab, (3, 40))
        mask = (rng.random((3, 40)) > 0.2).astype(np.int64)
        labels = np.where(rng.random((3, 40)) > 0.3, ids, -100)
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
        kept.append(ids[(mask == 1) & (labels != -100)])

    def model():
        net = TokenNet()
        net.embed.weight.data[...] = emb_weight
        return eva_model(net, target_modules=["fc"], eva_config=lorac.EvaConfig(rho=1.0))

    masked = lorac.get_eva_state_dict(model(), batches, show_progress_bar=False)
    filtered = lorac.get_eva_state_dict(model(), kept, show_progress_bar=False)
    np.testing.assert_array_equal(masked["fc"], filtered["fc"])
    np.testing.assert_allclose(masked["fc"], reference_pca(emb_weight[np.concatenate(kept)])[0][:2], atol=1e-9)
    unmasked = lorac.get_eva_state_dict(model(), [b["input_ids"] for b in batches], show_progress_bar=False)
    assert not np.allclose(np.abs(unmasked["fc"]), np.abs(masked["fc"]), atol=1e-6)


def test_batches_may_be_pairs_or_an_iterator_and_a_custom_layer_function_is_used():
    batches, _ = two_input_batches(0)
    model = eva_model(lorac.Sequential(lorac.Linear(H, H, rng=0, dtype=np.float64)), target_modules=["0"],
                      eva_config=lorac.EvaConfig(rho=1.0))
    pairs = [(b["x2"], np.zeros(len(b["x2"]))) for b in batches]
    from_pairs = lorac.get_eva_state_dict(model, iter(pairs), show_progress_bar=False)
    np.testing.assert_allclose(from_pairs["0"], reference_pca(np.concatenate([b["x2"] for b in batches]))[0][:2],
                               atol=1e-9)
    seen = []

    def first_half(layer_input, model_input, layer_name):
        seen.append(layer_name)
        return layer_input[0][: len(layer_input[0]) // 2]

    halves = lorac.get_eva_state_dict(model, [b["x2"] for b in batches], prepare_layer_inputs_fn={"0": first_half},
                                      show_progress_bar=False)
    np.testing.assert_allclose(halves["0"], reference_pca(np.concatenate([b["x2"][:120] for b in batches]))[0][:2],
                               atol=1e-9)
    assert set(seen) == {"0"}


def test_a_plain_model_with_a_config_and_the_model_mode_hooks_and_merges_come_back():
    batches, _ = two_input_batches(0)
    plain = TwoInputs()
    config = lorac.LoraConfig(r=2, target_modules=["a"], init_lora_weights="eva", eva_config=lorac.EvaConfig())
    state = lorac.get_eva_state_dict(plain, batches, peft_config=config, **NO_MASK)
    assert list(state) == ["a"] and state["a"].shape == (2, H)     # one layer: the budget is its own r
    every = lorac.get_eva_state_dict(plain, batches, peft_config=lorac.LoraConfig(r=2, target_modules="all-linear"),
                                     **NO_MASK)
    assert list(every) == ["a", "b"]      # PEFT's shorthand: every Linear layer
    model = eva_model(TwoInputs())
    model.eval()
    merged_weight = model.a.weight.data.copy()
    lorac.get_eva_state_dict(model, batches, **NO_MASK)
    assert not model.training and model.a.merged
    np.testing.assert_array_equal(model.a.weight.data, merged_weight)
    assert all("_forward_hooks" not in m.__dict__ for m in model.modules())


def test_dora_layers_take_a_new_rank_with_their_magnitude():
    batches, _ = two_input_batches(0)
    model = eva_model(TwoInputs(), use_dora=True)
    before = model(**batches[0])
    lorac.initialize_lora_eva_weights(model, batches, **NO_MASK)
    assert type(model.a) is lorac.DoRALinear and (model.a.r, model.b.r) == (1, 3)
    for layer in (model.a, model.b):
        np.testing.assert_allclose(layer.lora_magnitude_vector.data, np.linalg.norm(layer.weight.data, axis=1),
                                   rtol=1e-12)
    np.testing.assert_allclose(model(**batches[0]), before, rtol=1e-12, atol=1e-12)


def test_the_saved_folder_loads_with_the_new_ranks(tmp_path):
    batches, _ = two_input_batches(0)
    model = eva_model(TwoInputs())
    lorac.initialize_lora_eva_weights(model, batches, **NO_MASK)
    for layer in (model.a, model.b):
        layer.lora_B.data[...] = np.random.default_rng(5).standard_normal(layer.lora_B.shape)
    lorac.save_peft_adapter(model, tmp_path)
    fresh = TwoInputs()
    fresh.load_state_dict(model.state_dict(), strict=False)
    lorac.load_peft_adapter(fresh, tmp_path)
    assert (fresh.a.r, fresh.b.r) == (1, 3)
    np.testing.assert_allclose(fresh(**batches[0]), model(**batches[0]), rtol=1e-12, atol=1e-12)


def test_unconverged_layers_and_too_small_batches_are_a_clear_error():
    batches, _ = two_input_batches(0, rows=3)
    model = eva_model(TwoInputs())
    with pytest.raises(RuntimeError, match=r"'a', 'b'\].*never saw a batch of at least as many rows .*4"):
        lorac.get_eva_state_dict(model, batches, max_passes=2, **NO_MASK)
    assert all("_forward_hooks" not in m.__dict__ for m in model.modules())
    noisy, _ = two_input_batches(0, n_batches=2, va=np.ones(H), vb=np.ones(H))
    with pytest.raises(RuntimeError, match="has not converged.*after 1 passes"):
        lorac.get_eva_state_dict(model, noisy, max_passes=1,
                                 peft_config=lorac.LoraConfig(r=2, target_modules=["a", "b"],
                                                              eva_config=lorac.EvaConfig(tau=1.0)), **NO_MASK)


# -- refusals: a clear error, the model unchanged ---------------------------------------------------
def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="rho must be >= 1.0"):
        lorac.EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau must be between 0.0 and 1.0"):
        lorac.EvaConfig(tau=1.5)
    with pytest.raises(TypeError, match="rho must be a finite real number"):
        lorac.EvaConfig(rho=float("nan"))
    with pytest.raises(TypeError, match="whiten must be True or False"):
        lorac.EvaConfig(whiten="yes")
    with pytest.raises(TypeError, match="eva_config must be a lorac.EvaConfig"):
        lorac.get_peft_model(TwoInputs(), lorac.LoraConfig(target_modules=["a"], init_lora_weights="eva",
                                                           eva_config=3))
    with pytest.warns(UserWarning, match="eva_config is not given; using the default"):
        model = lorac.get_peft_model(TwoInputs(), lorac.LoraConfig(target_modules=["a"], init_lora_weights="eva"))
    assert model.peft_config["default"].eva_config == lorac.EvaConfig()
    with pytest.warns(UserWarning, match="eva_config is ignored"):
        lorac.get_peft_model(TwoInputs(), lorac.LoraConfig(target_modules=["a"], eva_config=dict(rho=3.0)))


def test_eva_starts_as_peft_does_before_initialisation():
    model = eva_model(TwoInputs())
    assert np.all(model.a.lora_B.data == 0) and np.any(model.a.lora_A.data != 0)


def test_bad_calls_are_refused_before_anything_changes():
    batches, _ = two_input_batches(0)
    model = eva_model(TwoInputs())
    state = model.state_dict()
    with pytest.raises(ValueError, match="peft_config is required when the model does not come from"):
        lorac.get_eva_state_dict(TwoInputs(), batches, **NO_MASK)
    with pytest.raises(ValueError, match="needs init_lora_weights='eva'"):
        lorac.initialize_lora_eva_weights(lorac.get_peft_model(TwoInputs(), lorac.LoraConfig(target_modules=["a"])),
                                          batches, **NO_MASK)
    with pytest.raises(ValueError, match="give a dataloader"):
        lorac.initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="dataloader is empty"):
        lorac.get_eva_state_dict(model, [], **NO_MASK)
    with pytest.raises(ValueError, match="dataloader is empty"):
        lorac.get_eva_state_dict(model, iter([]), **NO_MASK)
    with pytest.raises(ValueError, match="max_passes must be an integer >= 1"):
        lorac.get_eva_state_dict(model, batches, max_passes=0, **NO_MASK)
    with pytest.raises(ValueError, match=r"not EVA targets: \['nope'\]"):
        lorac.get_eva_state_dict(model, batches, prepare_model_inputs_fn=None,
                                 prepare_layer_inputs_fn={"nope": lambda *a: a[0][0]}, show_progress_bar=False)
    with pytest.raises(ValueError, match=r"layer 'a': prepare_layer_inputs_fn must return a 2-D array of shape "
                                         r"\(rows, 8\), got shape \(240, 3\)"):
        lorac.get_eva_state_dict(model, batches, prepare_model_inputs_fn=None,
                                 prepare_layer_inputs_fn=lambda x, m, n: x[0][:, :3], show_progress_bar=False)
    nan = [dict(b, x1=np.where(b["x1"] > 1, np.nan, b["x1"])) for b in batches]
    with pytest.raises(ValueError, match="layer 'a': its inputs hold NaN"):
        lorac.get_eva_state_dict(model, nan, **NO_MASK)
    with pytest.raises(ValueError, match=r"layers \['b'\] received no input"):
        lorac.get_eva_state_dict(model, batches, forward_fn=lambda m, b: m.a(b["x1"]), **NO_MASK)
    with pytest.raises(ValueError, match="needs 'input_ids' for the language-modelling mask"):
        lorac.get_eva_state_dict(model, batches, show_progress_bar=False)
    for name, value in state.items():
        np.testing.assert_array_equal(model.state_dict()[name], value)
    assert all("_forward_hooks" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("entry, message", [
    ({"nope": np.zeros((2, H))}, r"'nope' is not an adapted layer of the model"),
    ({"a": np.zeros((2, H + 1))}, r"eva_state_dict\['a'\] must be a real \(k, 8\) array .*got shape \(2, 9\)"),
    ({"a": np.zeros(H)}, r"got shape \(8,\)"),
    ({"a": np.full((2, H), np.nan)}, r"eva_state_dict\['a'\] holds NaN"),
    ({"a": np.zeros((2, H), complex)}, r"dtype complex128"),
])
def test_a_bad_eva_state_dict_leaves_the_model_unchanged(entry, message):
    model = eva_model(TwoInputs())
    state = {k: v.copy() for k, v in model.state_dict().items()}
    good = {"b": np.ones((3, H))}
    with pytest.raises(ValueError, match=message):
        lorac.initialize_lora_eva_weights(model, eva_state_dict={**good, **entry})
    assert model.b.r == 2 and model.peft_config["default"].rank_pattern == {}
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name])
    with pytest.raises(TypeError, match="eva_state_dict must be a dict"):
        lorac.initialize_lora_eva_weights(model, eva_state_dict=[("a", np.zeros((2, H)))])


def test_embeddings_are_left_with_a_warning_and_several_active_adapters_are_refused():
    class WithEmbedding(lorac.Module):
        def __init__(self):
            super().__init__()
            self.emb = lorac.Embedding(10, H, rng=0, dtype=np.float64)
            self.a = lorac.Linear(H, 3, rng=1, dtype=np.float64)

        def forward(self, ids):
            return self.a(self.emb(ids))

    model = eva_model(WithEmbedding(), target_modules=["emb", "a"], eva_config=lorac.EvaConfig(rho=1.0))
    ids = [np.random.default_rng(i).integers(0, 10, 30) for i in range(5)]
    with pytest.raises(ValueError, match=r"eva_state_dict\['emb'\]: 'emb' is a Embedding; EVA starts Linear"):
        lorac.initialize_lora_eva_weights(model, eva_state_dict={"emb": np.zeros((2, 10))})
    with pytest.warns(RuntimeWarning, match=r"layers \['emb'\] keep their initialisation"):
        lorac.initialize_lora_eva_weights(model, ids, show_progress_bar=False)
    assert model.peft_config["default"].target_modules == ["a", "emb"]
    lorac.add_adapter(model, "other", r=2)
    lorac.set_adapter(model, ["default", "other"])
    with pytest.raises(ValueError, match="several active adapters; EVA starts one adapter"):
        lorac.initialize_lora_eva_weights(model, ids, show_progress_bar=False)


def test_without_scikit_learn_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)
    batches, _ = two_input_batches(0)
    with pytest.raises(ImportError, match=r"pip install 'lorac\[eva\]'"):
        lorac.get_eva_state_dict(eva_model(TwoInputs()), batches, **NO_MASK)


def test_the_progress_bar_reports_converged_layers(capsys):
    batches, _ = two_input_batches(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorac.get_eva_state_dict(eva_model(TwoInputs()), batches, prepare_model_inputs_fn=None,
                                 prepare_layer_inputs_fn=None, show_progress_bar=True)
    assert "layers have converged" in capsys.readouterr().err

"""PEFT adapter folders: lorac.load_peft_adapter / save_peft_adapter against real
PEFT (torch-marked) and against hand-written folders (no torch needed)."""

import json
import os
import warnings

import numpy as np
import pytest

import lorac
from lorac.peft import PeftConfigError, PeftFolderError
from lorac.peft.config import parse_config
from lorac.peft.keys import UnsupportedKeyError, parse_key, peft_key

RTOL, ATOL = 2e-5, 2e-5


# -- models ------------------------------------------------------------------------------
def lorac_mlp(sizes=(6, 8, 8, 3), dtype=np.float32, fan_in_fan_out=()):
    """lorac.Sequential(Linear, ReLU, Linear, ReLU, ..., Linear): module names 0, 2, 4."""
    layers = []
    for i, (fin, fout) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(lorac.ReLU())
        layers.append(lorac.Linear(fin, fout, dtype=dtype, rng=i, fan_in_fan_out=2 * i in fan_in_fan_out))
    return lorac.Sequential(*layers)


class EmbedNet(lorac.Module):
    """emb (Embedding 10 x 6) -> fc (Linear 6 -> 4) -> head (Linear 4 -> 2), like TorchEmbedNet."""

    def __init__(self):
        super().__init__()
        self.emb = lorac.Embedding(10, 6, rng=0)
        self.fc = lorac.Linear(6, 4, rng=1)
        self.head = lorac.Linear(4, 2, rng=2)

    def forward(self, idx):
        return self.head(self.fc(self.emb(idx)))


def _torch():
    return pytest.importorskip("torch")


def _peft():
    _torch()
    return pytest.importorskip("peft")


def torch_mlp(sizes=(6, 8, 8, 3)):
    torch = _torch()
    layers = []
    for i, (fin, fout) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(fin, fout))
    return torch.nn.Sequential(*layers)


def torch_embed_net():
    torch = _torch()

    class TorchEmbedNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6)
            self.fc = torch.nn.Linear(6, 4)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, idx):
            return self.head(self.fc(self.emb(idx)))

    return TorchEmbedNet()


def base_state(torch_model):
    return {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}


def copy_base(lorac_model, state, transpose=()):
    """Load torch base weights into a lorac model (transposing fan_in_fan_out layers)."""
    state = {k: (v.T.copy() if k.rpartition(".")[0] in transpose and k.endswith("weight") else v)
             for k, v in state.items()}
    lorac_model.load_state_dict(state, strict=False)
    return lorac_model


def torch_out(model, x):
    torch = _torch()
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def assert_same(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(expected).max())))


def make_peft_folder(tmp_path, torch_model, name="adapter", save_kwargs=None, adapter_name="default",
                     perturb_bias=False, **config):
    """get_peft_model + random (non-zero) adapters + save_pretrained; returns (folder, peft model)."""
    torch, peft = _torch(), _peft()
    config.setdefault("init_lora_weights", False)  # random A and B: the adapter changes the output
    model = peft.get_peft_model(torch_model, peft.LoraConfig(**config), adapter_name=adapter_name)
    if perturb_bias:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.add_(0.5)
    folder = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(folder), **(save_kwargs or {}))
    return folder, model


X = np.random.default_rng(7).standard_normal((5, 6)).astype(np.float32)
IDX = np.array([[0, 3, 9], [2, 2, 7]])


# -- loading adapters written by PEFT --------------------------------------------------
PEFT_CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["0", "2", "4"]),
    "rslora": dict(r=4, lora_alpha=6, target_modules=["0", "4"], use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["0", "2", "4"],
                     rank_pattern={"2": 2, "^4$": 3}, alpha_pattern={"0": 5, "4": 1.5}),
    "regex_targets": dict(r=2, lora_alpha=4, target_modules=r"[24]", lora_dropout=0.1),
    "gaussian_init": dict(r=3, lora_alpha=3, target_modules=["2"], init_lora_weights="gaussian"),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_peft_adapter_outputs_match_torch(tmp_path, case, weights):
    _torch().manual_seed(0)
    tmodel = torch_mlp()
    base = base_state(tmodel)
    kwargs = {"safe_serialization": weights == "safetensors"}
    folder, pmodel = make_peft_folder(tmp_path, tmodel, save_kwargs=kwargs, **PEFT_CONFIGS[case])
    if case == "gaussian_init":  # gaussian init leaves B = 0: make the adapter count
        torch = _torch()
        with torch.no_grad():
            pmodel.base_model.model[2].lora_B["default"].weight.normal_()
        pmodel.save_pretrained(str(folder), **kwargs)
    assert (folder / f"adapter_model.{weights}").exists()
    expected = torch_out(pmodel, X)

    model = copy_base(lorac_mlp(), base)
    plain = model(X)
    assert not np.allclose(plain, expected, atol=1e-3)  # the adapter matters
    result = lorac.load_peft_adapter(model, folder)
    assert result == lorac.IncompatibleKeys([], [])
    model.eval()
    assert_same(model(X), expected)   # merged
    model.train()
    if not PEFT_CONFIGS[case].get("lora_dropout"):
        assert_same(model(X), expected)   # unmerged


@pytest.mark.torch
def test_ranks_alphas_and_scaling_follow_the_patterns(tmp_path):
    _torch().manual_seed(1)
    folder, _ = make_peft_folder(tmp_path, torch_mlp(), **PEFT_CONFIGS["patterns"])
    model = lorac_mlp()
    lorac.load_peft_adapter(model, folder)
    assert [(model[i].r, model[i].lora_alpha) for i in (0, 2, 4)] == [(4, 5.0), (2, 8.0), (3, 1.5)]
    assert model[2].scaling == 4.0 and model[4].scaling == 0.5
    folder2, _ = make_peft_folder(tmp_path, torch_mlp(), name="rs", **PEFT_CONFIGS["rslora"])
    model = lorac_mlp()
    lorac.load_peft_adapter(model, folder2)
    assert model[0].use_rslora and model[0].scaling == pytest.approx(6 / 2)
    assert model[2].r == 0  # not targeted: left a plain layer


@pytest.mark.torch
def test_embedding_bias_and_modules_to_save(tmp_path):
    torch = _torch()
    torch.manual_seed(2)
    tnet = torch_embed_net()
    base = base_state(tnet)
    folder, pmodel = make_peft_folder(tmp_path, tnet, adapter_name="foo", perturb_bias=True, r=3, lora_alpha=6,
                                      target_modules=["emb", "fc"], modules_to_save=["head"], bias="all")
    with torch.no_grad():  # the trained copy of the head differs from the base head
        pmodel.base_model.model.head.modules_to_save["foo"].weight.mul_(-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(str(folder))
    pmodel.eval()
    with torch.no_grad():
        expected = pmodel(torch.from_numpy(IDX)).numpy()

    net = copy_base(EmbedNet(), base)
    lorac.load_peft_adapter(net, folder, adapter_name="foo")   # PEFT saved it in folder/foo
    assert isinstance(net.emb, lorac.Embedding) and net.emb.r == 3 and net.fc.r == 3 and net.head.r == 0
    assert_same(net(IDX), expected)
    net.eval()
    assert_same(net(IDX), expected)


@pytest.mark.torch
def test_lorac_saved_adapter_loads_in_peft(tmp_path):
    """The reverse direction: save_peft_adapter -> PeftModel.from_pretrained, mixed ranks,
    alphas, rsLoRA per layer and a fan_in_fan_out layer."""
    torch, peft = _torch(), _peft()
    torch.manual_seed(3)
    tmodel = torch_mlp()
    base = base_state(tmodel)
    model = copy_base(lorac_mlp(fan_in_fan_out=(2,)), base, transpose=("2",))
    lorac.inject_lora(model, ["0", "2"], r=4, lora_alpha=8, rng=0, fan_in_fan_out=None)
    lorac.inject_lora(model, ["4"], r=2, lora_alpha=3, use_rslora=True, rng=1)
    rng = np.random.default_rng(0)
    for layer in (model[0], model[2], model[4]):
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    expected = model(X)
    config = lorac.save_peft_adapter(model, tmp_path / "out", base_model_name_or_path="tiny-mlp")
    assert config["use_rslora"] is False and config["alpha_pattern"] == {"^4$": pytest.approx(3 * 2 / np.sqrt(2))}
    assert config["rank_pattern"] == {"^4$": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.PeftModel.from_pretrained(tmodel, str(tmp_path / "out"))
    assert_same(torch_out(pmodel, X), expected)
    assert pmodel.peft_config["default"].base_model_name_or_path == "tiny-mlp"


@pytest.mark.torch
def test_lorac_saved_embedding_adapter_loads_in_peft(tmp_path):
    torch, peft = _torch(), _peft()
    torch.manual_seed(4)
    tnet = torch_embed_net()
    net = copy_base(EmbedNet(), base_state(tnet))
    lorac.inject_lora(net, ["emb", "fc"], r=2, lora_alpha=4, rng=0)
    net.emb.lora_A.data[...] = np.random.default_rng(1).standard_normal(net.emb.lora_A.shape)
    net.fc.lora_B.data[...] = np.random.default_rng(2).standard_normal(net.fc.lora_B.shape)
    lorac.save_peft_adapter(net, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.PeftModel.from_pretrained(tnet, str(tmp_path / "out"))
    pmodel.eval()
    with torch.no_grad():
        assert_same(pmodel(torch.from_numpy(IDX)).numpy(), net(IDX))


# -- refusals with real PEFT files ---------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("option,match", [
    (dict(init_lora_weights="olora"), "changes the base model's weights"),
])
def test_peft_features_lorac_cannot_honour_are_refused(tmp_path, option, match):
    _torch().manual_seed(5)
    folder, _ = make_peft_folder(tmp_path, torch_mlp(), r=2, lora_alpha=2, target_modules=["0"], **option)
    model = lorac_mlp()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(PeftConfigError, match=match):
        lorac.load_peft_adapter(model, folder)
    assert model[0].r == 0 and all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.torch
def test_other_peft_types_are_refused(tmp_path):
    _torch()
    peft = _peft()
    model = peft.get_peft_model(torch_mlp(), peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    model.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(PeftConfigError, match="peft_type must be 'LORA', got 'IA3'"):
        lorac.load_peft_adapter(lorac_mlp(), tmp_path / "ia3")


@pytest.mark.torch
def test_shape_mismatch_names_key_expected_and_found(tmp_path):
    _torch().manual_seed(6)
    folder, _ = make_peft_folder(tmp_path, torch_mlp((6, 8, 8, 3)), r=2, lora_alpha=2, target_modules=["0", "2"])
    model = lorac_mlp((6, 8, 9, 3))   # layer 2 has 9 outputs, the adapter's lora_B 8
    with pytest.raises(ValueError, match=r"'base_model\.model\.2\.lora_B\.weight'.*expected shape \(9, 2\), "
                                         r"found shape \(8, 2\)"):
        lorac.load_peft_adapter(model, folder)
    assert model[0].r == 0 and model[2].r == 0   # layer 0 was fine, and still untouched


# -- hand-written folders: no torch needed ----------------------------------------------------
def write_folder(path, tensors, **config):
    os.makedirs(path, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0", "2"], **config}
    lorac.save(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(config, fh)
    return path


def adapter_tensors(rng, sizes=(6, 8, 8, 3), layers=(0, 2), r=2, prefix="base_model.model."):
    out = {}
    for i in layers:
        fin, fout = sizes[i // 2], sizes[i // 2 + 1]
        out[f"{prefix}{i}.lora_A.weight"] = rng.standard_normal((r, fin)).astype(np.float32)
        out[f"{prefix}{i}.lora_B.weight"] = rng.standard_normal((fout, r)).astype(np.float32)
    return out


def reference_output(model, tensors, scaling, x=X):
    """NumPy float64 forward of the plain MLP with adapters W + scaling B A."""
    h = np.asarray(x, np.float64)
    for i in (0, 2, 4):
        w, b = model[i].weight.data.astype(np.float64), model[i].bias.data.astype(np.float64)
        if f"base_model.model.{i}.lora_A.weight" in tensors:
            a = tensors[f"base_model.model.{i}.lora_A.weight"].astype(np.float64)
            bb = tensors[f"base_model.model.{i}.lora_B.weight"].astype(np.float64)
            w = w + scaling * bb @ a
        h = h @ w.T + b
        if i < 4:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_written_folder_vs_numpy_reference(tmp_path, rng, dtype):
    tensors = adapter_tensors(rng)
    folder = write_folder(tmp_path / "a", tensors)
    model = lorac_mlp(dtype=dtype)
    expected = reference_output(model, tensors, 4 / 2)
    lorac.load_peft_adapter(model, folder)
    assert model[0].dtype == dtype and model[0].lora_A.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(model(X.astype(dtype)), expected, rtol=tol, atol=tol * 10)


def test_weights_are_kept_and_frozen(tmp_path, rng):
    folder = write_folder(tmp_path / "a", adapter_tensors(rng))
    model = lorac_mlp()
    weight, bias = model[0].weight, model[0].bias
    saved = weight.data.copy()
    lorac.load_peft_adapter(model, folder)
    assert model[0].weight is weight and model[0].bias is bias
    assert np.array_equal(weight.data, saved) and not weight.requires_grad and weight.grad is None
    assert model[0].lora_A.requires_grad and model[4].r == 0


def test_layers_keep_eval_mode_and_merge(tmp_path, rng):
    tensors = adapter_tensors(rng)
    folder = write_folder(tmp_path / "a", tensors)
    model = lorac_mlp().eval()
    expected = reference_output(model, tensors, 2.0)
    lorac.load_peft_adapter(model, folder)
    assert not model.training and model[0].merged
    assert_same(model(X), expected)
    assert_same(model.train()(X), expected)


def test_existing_adapter_of_another_rank_is_rebuilt(tmp_path, rng):
    tensors = adapter_tensors(rng)
    folder = write_folder(tmp_path / "a", tensors)
    model = lorac.inject_lora(lorac_mlp(), ["0", "2"], r=5, lora_alpha=1, rng=0).eval()   # merged, r=5
    expected = reference_output(lorac_mlp(), tensors, 2.0)
    lorac.load_peft_adapter(model, folder)
    assert model[0].r == 2 and model[0].lora_alpha == 4
    assert_same(model(X), expected)


def test_key_variants_with_adapter_names(tmp_path, rng):
    tensors = {k.replace(".weight", ".default.weight"): v for k, v in adapter_tensors(rng).items()}
    model = lorac_mlp()
    lorac.load_peft_adapter(model, write_folder(tmp_path / "a", tensors))
    assert model[0].r == 2
    tensors = {k.replace(".default.", ".mine."): v for k, v in tensors.items()}
    folder = write_folder(tmp_path / "b", tensors)
    with pytest.raises(PeftFolderError, match="unexpected key"):
        lorac.load_peft_adapter(lorac_mlp(), folder)
    lorac.load_peft_adapter(lorac_mlp(), folder, adapter_name="mine")


def test_all_or_nothing(tmp_path, rng):
    tensors = adapter_tensors(rng)
    tensors["base_model.model.4.bias"] = np.ones(5, np.float32)   # wrong size: layer 4 has 3 outputs
    folder = write_folder(tmp_path / "a", tensors)
    model = lorac_mlp()
    layers = list(model)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'4\.bias'.*expected shape \(3,\), found shape \(5,\)"):
        lorac.load_peft_adapter(model, folder)
    assert list(model) == layers
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def test_strict_reports_missing_and_unexpected(tmp_path, rng):
    tensors = adapter_tensors(rng)
    tensors.update(adapter_tensors(rng, layers=(0,), prefix="base_model.model.extra."))
    folder = write_folder(tmp_path / "a", tensors)
    model = lorac.inject_lora(lorac_mlp(), ["4"], r=1, rng=0)
    with pytest.raises(lorac.StateDictKeyError) as info:
        lorac.load_peft_adapter(model, folder)
    assert info.value.missing_keys == ["4.lora_A", "4.lora_B"]
    assert info.value.unexpected_keys == ["base_model.model.extra.0.lora_A.weight",
                                          "base_model.model.extra.0.lora_B.weight"]
    assert model[0].r == 0
    result = lorac.load_peft_adapter(model, folder, strict=False)
    assert result.missing_keys == ["4.lora_A", "4.lora_B"] and len(result.unexpected_keys) == 2
    assert model[0].r == 2 and model[4].r == 1


def test_rank_in_file_must_agree_with_config(tmp_path, rng):
    folder = write_folder(tmp_path / "a", adapter_tensors(rng, layers=(0,), r=3))
    with pytest.raises(PeftFolderError, match=r"'base_model\.model\.0\.lora_A\.weight': expected shape "
                                              r"\(2, 6\) \(r=2 from adapter_config.json\), found shape \(3, 6\)"):
        lorac.load_peft_adapter(lorac_mlp(), folder)


def test_layer_kind_checks(tmp_path, rng):
    folder = write_folder(tmp_path / "a", adapter_tensors(rng, layers=(0,)))
    model = lorac.Sequential(lorac.MergedLinear(6, 8, r=0, enable_lora=[True, False]))
    with pytest.raises(ValueError, match=r"'0' is a MergedLinear; PEFT LoRA adapters load into lorac.Linear"):
        lorac.load_peft_adapter(model, folder)
    tensors = {"base_model.model.0.lora_embedding_A": rng.standard_normal((2, 6)).astype(np.float32),
               "base_model.model.0.lora_embedding_B": rng.standard_normal((8, 2)).astype(np.float32)}
    with pytest.raises(ValueError, match="is a embedding adapter but '0' is a lorac.Linear"):
        lorac.load_peft_adapter(lorac_mlp(), write_folder(tmp_path / "b", tensors))


@pytest.mark.parametrize("key,value,match", [
    ("use_qalora", True, "QALoRA"),
    ("peft_type", "LOHA", "peft_type must be 'LORA', got 'LOHA'"),
    ("init_lora_weights", "pissa_niter_4", "changes the base model's weights"),
    ("init_lora_weights", "olora", "changes the base model's weights"),
    ("init_lora_weights", "something_new", "not one lorac knows"),
    ("layer_replication", [[0, 2]], "layer_replication"),
    ("trainable_token_indices", [1, -2], "trainable_token_indices must be a list of token ids or a dict"),
    ("trainable_token_indices", {"embed_tokens": [1.5]}, "trainable_token_indices must be a list"),
    ("r", 0, "r must be > 0"),
    ("lora_alpha", "big", "lora_alpha must be a finite number"),
    ("rank_pattern", {"(": 2}, "not a valid regular expression"),
    ("bias", "some", "bias must be"),
])
def test_config_refusals(key, value, match):
    raw = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, key: value}
    with pytest.raises(PeftConfigError, match=match):
        parse_config(raw, "cfg.json")


def test_unknown_config_keys_warn_but_load(tmp_path, rng):
    folder = write_folder(tmp_path / "a", adapter_tensors(rng), shiny_new_option=True, another=1)
    model = lorac_mlp()
    with pytest.warns(UserWarning, match="unknown to lorac.*another, shiny_new_option"):
        lorac.load_peft_adapter(model, folder)
    assert model[0].r == 2


def test_pattern_lookup_follows_peft():
    config = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                           "rank_pattern": {"q": 2, "layers\\.1\\..*": 4}, "alpha_pattern": {"^q$": 1}}, "c")
    assert config.rank_for("q") == 2 and config.rank_for("layers.0.q") == 2 and config.rank_for("xq") == 8
    assert config.rank_for("layers.1.k") == 4 and config.rank_for("layers.2.k") == 8
    assert config.alpha_for("q") == 1 and config.alpha_for("layers.0.q") == 16


@pytest.mark.parametrize("key,expected", [
    ("base_model.model.a.b.lora_A.weight", ("a.b", "lora_A", "linear", False)),
    ("base_model.model.a.lora_B.default.weight", ("a", "lora_B", "linear", False)),
    ("base_model.model.emb.lora_embedding_A", ("emb", "lora_A", "embedding", False)),
    ("base_model.model.emb.lora_embedding_B.default", ("emb", "lora_B", "embedding", False)),
    ("base_model.model.fc.base_layer.bias", ("fc", "bias", None, False)),
    ("base_model.model.head.modules_to_save.default.weight", ("head", "weight", None, False)),
    ("base_model.model.head.modules_to_save.bias", ("head", "bias", None, False)),
    ("base_model.model.head.original_module.bias", ("head", "bias", None, True)),
    ("base_model.model.head.weight", ("head", "weight", None, False)),
    ("fc.lora_A.weight", ("fc", "lora_A", "linear", False)),
    ("base_model.model.fc.lora_A.other.weight", None),
    ("base_model.model.fc.lora_C.weight", None),
    ("weight", None),
])
def test_parse_key(key, expected):
    parsed = parse_key(key)
    assert (parsed if parsed is None else tuple(parsed)) == expected


def test_parse_key_reads_lora_bias_and_refuses_a_bias_on_lora_A():
    assert tuple(parse_key("base_model.model.fc.lora_B.bias")) == ("fc", "lora_bias", "lora_bias", False)
    assert tuple(parse_key("fc.lora_B.default.bias")) == ("fc", "lora_bias", "lora_bias", False)
    with pytest.raises(UnsupportedKeyError, match="a bias on lora_A"):
        parse_key("base_model.model.fc.lora_A.bias")


@pytest.mark.parametrize("key", ["base_model.model.fc.lora_magnitude_vector",
                                 "base_model.model.fc.lora_magnitude_vector.weight",
                                 "fc.lora_magnitude_vector.default.weight", "fc.lora_magnitude_vector.default"])
def test_parse_key_reads_dora_magnitudes(key):
    assert tuple(parse_key(key)) == ("fc", "lora_magnitude_vector", "dora", False)
    assert parse_key("fc.lora_magnitude_vector.other.weight") is None
    assert parse_key("lora_magnitude_vector") is None


def test_peft_key_inverts_parse_key():
    for path, param, kind in [("a.b", "lora_A", "linear"), ("e", "lora_B", "embedding"), ("f", "bias", None)]:
        assert tuple(parse_key(peft_key(path, param, kind)))[:3] == (path, param, kind)


def test_lorac_round_trip_without_torch(tmp_path, rng):
    """save_peft_adapter -> load_peft_adapter into a fresh base model gives the same outputs,
    including mixed ranks, alphas, rsLoRA and an embedding."""
    net = EmbedNet()
    base = {k: v.copy() for k, v in net.state_dict().items()}
    lorac.inject_lora(net, ["emb"], r=3, lora_alpha=2, use_rslora=True, rng=0)
    lorac.inject_lora(net, ["fc", "head"], r=2, lora_alpha=5, rng=1)
    for layer in (net.emb, net.fc, net.head):
        layer.lora_A.data[...] = rng.standard_normal(layer.lora_A.shape)
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    net.head.lora_alpha, net.head.scaling = 3.0, 1.5
    expected = net(IDX)
    lorac.save_peft_adapter(net, tmp_path / "out")
    fresh = EmbedNet()
    fresh.load_state_dict(base)
    lorac.load_peft_adapter(fresh, tmp_path / "out")
    assert (fresh.emb.r, fresh.fc.r, fresh.head.r) == (3, 2, 2)
    assert fresh.emb.scaling == pytest.approx(net.emb.scaling) and fresh.head.scaling == pytest.approx(1.5)
    assert_same(fresh(IDX), expected)


def test_save_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layer"):
        lorac.save_peft_adapter(lorac_mlp(), tmp_path / "out")
    model = lorac.Sequential(lorac.MergedLinear(4, 6, r=2, enable_lora=[True, False]))
    with pytest.raises(ValueError, match="MergedLinear with a LoRA adapter"):
        lorac.save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_errors(tmp_path):
    with pytest.raises(PeftFolderError, match="expected a PEFT adapter folder"):
        lorac.load_peft_adapter(lorac_mlp(), tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftFolderError, match="no adapter_config.json"):
        lorac.load_peft_adapter(lorac_mlp(), tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(PeftFolderError, match="no adapter weights"):
        lorac.load_peft_adapter(lorac_mlp(), tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text('{"peft_type": ')
    with pytest.raises(PeftFolderError, match="not valid JSON"):
        lorac.load_peft_adapter(lorac_mlp(), tmp_path / "empty")
    with pytest.raises(TypeError, match="must be a lorac.Module"):
        lorac.load_peft_adapter(object(), tmp_path / "empty")


@pytest.mark.parametrize("layouts, match", [
    ("{", "is not valid JSON"), ("[true]", "must map layer paths to true / false"),
    ('{"0": 1}', "must map layer paths to true / false"), ('{"9": true}', "names '9', which is not a Linear"),
])
def test_bad_layout_metadata_is_refused(tmp_path, rng, layouts, match):
    from lorac.peft.folder import read_peft_folder

    folder = write_folder(tmp_path / "a", adapter_tensors(rng))
    weights = folder / "adapter_model.safetensors"
    lorac.save(lorac.load(weights), weights, metadata={"format": "pt", "lorac_fan_in_fan_out": layouts})
    with pytest.raises(PeftFolderError, match=match):
        read_peft_folder(folder)
    lorac.save(lorac.load(weights), weights, metadata={"format": "pt", "lorac_fan_in_fan_out": '{"2": true}'})
    adapter, _ = read_peft_folder(folder)
    assert adapter.layers["2"].fan_in_fan_out is True and adapter.layers["0"].fan_in_fan_out is False


def test_absurd_config_json_is_refused(tmp_path, rng):
    folder = write_folder(tmp_path / "a", adapter_tensors(rng))
    (folder / "adapter_config.json").write_text("[" * 100_000)
    with pytest.raises(PeftFolderError, match="not valid JSON: RecursionError"):
        lorac.load_peft_adapter(lorac_mlp(), folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(PeftConfigError, match="expected a JSON object, got list"):
        lorac.load_peft_adapter(lorac_mlp(), folder)


def test_hostile_adapter_model_bin_runs_nothing(tmp_path):
    """adapter_model.bin goes through lorac's safe torch reader: a pickle calling os.system is
    refused by name and its command never runs."""
    import pickle
    import zipfile

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with zipfile.ZipFile(folder / "adapter_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"base_model.model.0.lora_A.weight": Evil()}, protocol=2))
        archive.writestr("archive/version", "3\n")
    model = lorac_mlp()
    with pytest.raises(lorac.checkpoint.CheckpointError, match="system"):
        lorac.load_peft_adapter(model, folder)
    assert not marker.exists() and model[0].r == 0


def test_root_lora_layer_cannot_be_a_peft_target(tmp_path):
    with pytest.raises(ValueError, match="the model itself is a LoRA Linear"):
        lorac.save_peft_adapter(lorac.Linear(3, 2, r=1), tmp_path / "out")


def test_named_adapters_as_peft_folders(tmp_path, rng):
    """save_peft_adapter(adapter_name=) writes one named adapter; load_adapter takes a PEFT folder into a
    named adapter, refusing what a named adapter cannot hold (trained biases, DoRA magnitudes)."""
    net = EmbedNet()
    lorac.inject_lora(net, ["emb", "fc"], r=2, lora_alpha=4, rng=0)
    lorac.add_adapter(net, "x", r=3, lora_alpha=5, use_rslora=True, init=False, rng=1)
    config = lorac.save_peft_adapter(net, tmp_path / "x", adapter_name="x")
    assert config["r"] == 3 and config["use_rslora"] is True
    twin = lorac.inject_lora(EmbedNet(), ["emb", "fc"], r=2, lora_alpha=4, rng=5)
    twin.load_state_dict({k: v for k, v in net.state_dict().items() if not k.endswith("_x")})
    lorac.load_adapter(twin, tmp_path / "x", "x")
    lorac.set_adapter(net, "x")
    lorac.set_adapter(twin, "x")
    assert_same(twin(IDX), net(IDX))
    for kwargs, error, match in [(dict(adapter_name="nope"), ValueError, "no LoRA layer holding 'nope'"),
                                 (dict(adapter_name=5), TypeError, "adapter_name must be a str")]:
        with pytest.raises(error, match=match):
            lorac.save_peft_adapter(net, tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
    lorac.save_peft_adapter(net, tmp_path / "biased", bias="all")
    with pytest.raises(ValueError, match="bias / modules_to_save"):
        lorac.load_adapter(twin, tmp_path / "biased", "y")
    dora = lorac.inject_lora(lorac.Sequential(lorac.Linear(6, 4, rng=0)), ["0"], r=2, use_dora=True)
    lorac.save_peft_adapter(dora, tmp_path / "dora")
    plain = lorac.inject_lora(lorac.Sequential(lorac.Linear(6, 4, rng=0)), ["0"], r=2)
    with pytest.raises(ValueError, match="is a DoRA magnitude"):
        lorac.load_adapter(plain, tmp_path / "dora", "y")
    assert "y" not in twin.fc.adapter_names and plain[0].adapter_names == ("default",)


@pytest.mark.parametrize("keys, config, match", [
    (("0.lora_magnitude_vector", "0.lora_magnitude_vector.weight"), dict(use_dora=True),
     "both give the DoRA magnitude of '0'"),
    (("0.lora_B.bias", "0.lora_B.default.bias"), dict(lora_bias=True), "both give the lora_bias of '0'"),
])
def test_a_layer_vector_given_twice_is_refused(tmp_path, rng, keys, config, match):
    tensors = adapter_tensors(rng, layers=(0,))
    for key in keys:
        tensors["base_model.model." + key] = np.ones(8, np.float32)
    folder = write_folder(tmp_path / "f", tensors, **config)
    with pytest.raises(ValueError, match=match):
        lorac.load_peft_adapter(lorac_mlp(), folder)

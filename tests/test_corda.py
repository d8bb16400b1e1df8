"""CorDA (lorac.preprocess_corda, then get_peft_model with init_lora_weights='corda')
against a NumPy float64 reference of the method, and its refusals.  PEFT itself
is compared in tests/vs_torch/test_fidelity_corda.py."""

import copy
import warnings

import numpy as np
import pytest

import lorac

IN, OUT = 7, 5


def model(dtype=np.float64, fan_in_fan_out=False, seed=0):
    """a (IN -> OUT), relu, b (OUT -> 3)."""
    net = lorac.Sequential(lorac.Linear(IN, OUT, fan_in_fan_out=fan_in_fan_out, rng=seed, dtype=dtype),
                           lorac.ReLU(), lorac.Linear(OUT, 3, rng=seed + 1, dtype=dtype))
    for p in net.parameters():
        p.data[...] = np.random.default_rng(seed + 7).standard_normal(p.data.shape)
    return net


def batches(seed=1, n=4, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 6, IN)).astype(dtype) for _ in range(n)]


def config(r=2, method="ipm", **extra):
    return lorac.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"], init_lora_weights="corda",
                            corda_config=lorac.CordaConfig(corda_method=method, **extra.pop("corda", {})), **extra)


def corda(net, cfg, data, **kwargs):
    lorac.preprocess_corda(net, cfg, run_model=lambda: [net(x) for x in data], **kwargs)
    return lorac.get_peft_model(net, cfg)


def reference(weight_out_in, inputs, r, scaling, method):
    """The method by hand in float64: (B A product, residual weight (out, in), A rows up to sign)."""
    cov = np.zeros((weight_out_in.shape[1],) * 2)
    for x in inputs:
        x = x.reshape(-1, x.shape[-1]) / abs(x.max())
        cov += x.T @ x
    cov /= len(inputs)
    fixed = cov + np.eye(len(cov)) * np.mean(np.diag(cov)) * 0.01   # well conditioned: the first damping holds
    u, s, vt = np.linalg.svd(weight_out_in @ fixed, full_matrices=False)
    v = np.linalg.solve(fixed.T, vt.T)                               # (in, m) = (vt C^-1)^T
    keep = slice(None, r) if method == "ipm" else slice(len(s) - r, None)
    s = s[keep] / scaling
    a = v[:, keep].T * np.sqrt(s)[:, None]
    b = u[:, keep] * np.sqrt(s)
    return b @ a, weight_out_in - scaling * (b @ a), a


def layer_inputs(net, data):
    """The inputs each target layer sees, by hand."""
    first = [x for x in data]
    second = [np.maximum(x @ net[0].weight.data.T + net[0].bias.data, 0) if not net[0].fan_in_fan_out
              else np.maximum(x @ net[0].weight.data + net[0].bias.data, 0) for x in data]
    return {"0": first, "2": second}


@pytest.mark.filterwarnings("ignore:inject_lora. fan_in_fan_out")   # the config's flag fits one of the layers
@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_factors_and_residual_match_the_float64_reference(method, fan_in_fan_out):
    net, data = model(fan_in_fan_out=fan_in_fan_out), batches()
    inputs = layer_inputs(net, data)
    weights = {"0": net[0].weight.data.copy(), "2": net[2].weight.data.copy()}
    before = net(data[0])
    corda(net, config(method=method, fan_in_fan_out=fan_in_fan_out), data)
    for path in ("0", "2"):
        layer = net.get_submodule(path)
        w = weights[path].T if layer.fan_in_fan_out else weights[path]
        product, residual, a = reference(w, inputs[path], 2, layer.scaling, method)
        np.testing.assert_allclose(layer.lora_B.data @ layer.lora_A.data, product, rtol=1e-9, atol=1e-12)
        stored = layer.weight.data.T if layer.fan_in_fan_out else layer.weight.data
        np.testing.assert_allclose(stored, residual, rtol=1e-9, atol=1e-12)
        signs = np.sign(np.sum(layer.lora_A.data * a, axis=1))
        np.testing.assert_allclose(layer.lora_A.data * signs[:, None], a, rtol=1e-9, atol=1e-12)
        assert layer.lora_A.requires_grad and not layer.weight.requires_grad
        assert "_peft_prepared" not in layer.__dict__
    np.testing.assert_allclose(net(data[0]), before, rtol=1e-12, atol=1e-12)   # the model computes what it did


def test_ipm_keeps_the_largest_singular_directions_of_w_c_and_kpm_the_smallest():
    data = batches()
    inputs = layer_inputs(model(), data)["0"]
    cov = sum((x.reshape(-1, IN) / abs(x.max())).T @ (x.reshape(-1, IN) / abs(x.max())) for x in inputs) / len(inputs)
    fixed = cov + np.eye(IN) * np.mean(np.diag(cov)) * 0.01
    spectrum = np.linalg.svd(model()[0].weight.data @ fixed, compute_uv=False)      # descending, 5 values
    for method, expected in (("ipm", spectrum[:2]), ("kpm", spectrum[-2:])):
        layer = corda(model(), config(method=method), data)[0]
        # s B A = U_k S_k V_k^T C^-1, so s B A C has the kept singular values of W C
        kept = np.linalg.svd(layer.scaling * layer.lora_B.data @ layer.lora_A.data @ fixed, compute_uv=False)[:2]
        np.testing.assert_allclose(kept, expected, rtol=1e-9)


def test_float32_dora_eval_mode_and_rank_pattern():
    data = batches(dtype=np.float32)
    net = model(np.float32)
    net.eval()
    before = net(data[0])
    cfg = config(r=2, use_dora=True, rank_pattern={"2": 3})
    corda(net, cfg, data)
    assert type(net[0]) is lorac.DoRALinear and (net[0].r, net[2].r) == (2, 3) and not net.training
    np.testing.assert_allclose(net(data[0]), before, rtol=1e-4, atol=1e-4)
    net.train()
    for layer in (net[0], net[2]):
        full = layer.weight.data.astype(np.float64) + layer.scaling * (layer.lora_B.data.astype(np.float64)
                                                                      @ layer.lora_A.data)
        np.testing.assert_allclose(layer.lora_magnitude_vector.data, np.linalg.norm(full, axis=1), rtol=1e-5)


def test_float16_covariance_option_sums_in_float32():
    data = batches()
    exact, light = model(), model()
    corda(exact, config(), data)
    corda(light, config(corda=dict(use_float16_for_covariance=True)), data)
    np.testing.assert_allclose(light[0].weight.data, exact[0].weight.data, rtol=1e-4, atol=1e-4)


def test_the_cache_and_covariance_files_are_reused(tmp_path):
    data = batches()
    files = dict(cache_file=str(tmp_path / "cache.safetensors"), covariance_file=str(tmp_path / "cov.safetensors"))
    first = corda(model(), config(corda=files), data)
    assert sorted(lorac.load(files["cache_file"])) == sorted(f"{p}.eigens.{f}" for p in ("0", "2")
                                                             for f in ("S_WC", "U_WC", "V_WC"))
    assert lorac.load(files["covariance_file"])["0"].shape == (IN, IN)
    again = model()
    lorac.preprocess_corda(again, config(corda=files))        # no run_model: the cache is there
    lorac.get_peft_model(again, config(corda=files))
    for a, b in zip(first.parameters(), again.parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    other_rank = model()       # the covariance file serves another rank; the cache of rank 2 does not
    lorac.preprocess_corda(other_rank, config(r=3, corda=dict(covariance_file=files["covariance_file"])))
    lorac.get_peft_model(other_rank, config(r=3))
    assert other_rank[0].r == 3
    with pytest.raises(ValueError, match=r"has no finite \(3,\) entry 0.eigens.S_WC; build it with the same"):
        lorac.preprocess_corda(model(), config(r=3, corda=files))


def test_a_hooked_copy_gives_the_same_factors_and_modes_come_back():
    data = batches()
    direct = corda(model(), config(), data)
    net = model()
    twin = copy.deepcopy(net)
    twin.eval()
    lorac.preprocess_corda(net, config(), run_model=lambda: [twin(x) for x in data], hooked_model=twin)
    assert not twin.training and net.training
    lorac.get_peft_model(net, config())
    np.testing.assert_array_equal(net[0].lora_A.data, direct[0].lora_A.data)


# -- refusals ------------------------------------------------------------------------------
def test_bad_configs_and_calls_are_refused_and_the_model_is_unchanged():
    with pytest.raises(ValueError, match="corda_method must be 'ipm' or 'kpm'"):
        lorac.CordaConfig(corda_method="xpm")
    with pytest.raises(TypeError, match="cache_file must be a path or None"):
        lorac.CordaConfig(cache_file=3)
    data = batches()
    net = model()
    state = {k: v.copy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="run_model .* is required when corda_config's cache_file"):
        lorac.preprocess_corda(net, config())
    with pytest.raises(ValueError, match="layer '0' has no CorDA factors; call lorac.preprocess_corda"):
        lorac.get_peft_model(net, config())
    with pytest.raises(ValueError, match=r"cannot take CorDA's rank 6 > min\(in, out\)"):
        lorac.preprocess_corda(net, config(r=6), run_model=lambda: None)
    with pytest.raises(ValueError, match=r"layers \['2'\] received no input while run_model ran"):
        lorac.preprocess_corda(net, config(), run_model=lambda: net[0](data[0]))
    with pytest.raises(ValueError, match="layer '0': its input is empty, has maximum 0"):
        lorac.preprocess_corda(net, config(), run_model=lambda: net(np.zeros_like(data[0])))
    with pytest.raises(ValueError, match="not finite"):
        lorac.preprocess_corda(net, config(), run_model=lambda: net(np.full_like(data[0], np.nan)))
    with pytest.raises(ValueError, match="no Linear layer matches"):
        lorac.preprocess_corda(net, lorac.LoraConfig(target_modules=["zzz"], init_lora_weights="corda"),
                               run_model=lambda: None)
    assert all("_forward_hooks" not in m.__dict__ for m in net.modules())
    lorac.preprocess_corda(net, config(r=2), run_model=lambda: [net(x) for x in data])
    with pytest.raises(ValueError, match="has CorDA factors of rank 2, the config gives it rank 3"):
        lorac.get_peft_model(net, config(r=3))
    with pytest.raises(ValueError, match="lora_bias=True needs init_lora_weights True or False"):
        lorac.get_peft_model(net, config(lora_bias=True))
    assert net[0].r == 0
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, state[name])
    lorac.get_peft_model(net, config())
    with pytest.raises(ValueError, match=r"layers \['0', '2'\] already have an adapter"):
        lorac.preprocess_corda(net, config(), run_model=lambda: None)


def test_embeddings_are_refused_and_the_sub_configs_warn_as_peft():
    net = lorac.Sequential(lorac.Embedding(10, IN, dtype=np.float64), lorac.Linear(IN, OUT, dtype=np.float64))
    with pytest.raises(ValueError, match=r"CorDA starts Linear layers only; .*Embedding layers \['0'\]"):
        lorac.preprocess_corda(net, lorac.LoraConfig(target_modules=["0", "1"], init_lora_weights="corda",
                                                     corda_config=lorac.CordaConfig()), run_model=lambda: None)
    with pytest.warns(UserWarning, match="corda_config is not given; using the default CordaConfig"):
        with pytest.raises(ValueError, match="no CorDA factors"):
            lorac.get_peft_model(model(), lorac.LoraConfig(r=2, target_modules=["0"], init_lora_weights="corda"))
    with pytest.warns(UserWarning, match="corda_config is ignored"):
        lorac.get_peft_model(model(), lorac.LoraConfig(target_modules=["0"], corda_config={"corda_method": "kpm"}))
    with pytest.raises(TypeError, match="corda_config must be a lorac.CordaConfig"):
        lorac.get_peft_model(model(), lorac.LoraConfig(target_modules=["0"], corda_config=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="lora_bias=True needs init_lora_weights True or False"):
            lorac.get_peft_model(model(), lorac.LoraConfig(target_modules=["0"], init_lora_weights="eva",
                                                           lora_bias=True))

"""lorac combine: adapters in files combined as lorac.add_weighted_adapter combines them on a model."""

import numpy as np
import pytest

import lorac
from lorac.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def model_with_adapters(rng):
    """An Embedding and two Linears; adapters a (r 2), b (r 2, rsLoRA), c (r 3, not on the embedding)."""
    f64 = np.float64
    model = lorac.Sequential(lorac.Embedding(9, 5, rng=0, dtype=f64), lorac.Linear(5, 6, rng=1, dtype=f64),
                             lorac.Linear(6, 4, rng=2, dtype=f64))
    lorac.add_adapter(model, "a", r=2, lora_alpha=4, target_modules=["0", "1", "2"], init=False, rng=3)
    lorac.add_adapter(model, "b", r=2, lora_alpha=3, use_rslora=True, target_modules=["0", "1", "2"], init=False,
                      rng=4)
    lorac.add_adapter(model, "c", r=3, lora_alpha=6, target_modules=["1", "2"], init=False, rng=5)
    for layer in model:
        for name in layer.adapter_names:
            layer.adapter_parameters(name)[1].data[...] = rng.standard_normal(layer.adapter_parameters(name)[1].shape)
    return model


def deltas(model, name):
    out = {}
    for i, layer in enumerate(model):
        if name in layer.adapter_names:
            a, b = layer.adapter_parameters(name)
            out[i] = layer._scaling_of(name) * b.data @ a.data
    return out


@pytest.mark.parametrize("names, weights, options", [
    (["a", "b", "c"], [0.5, -1.0, 2.0], ["--combination", "cat"]),
    (["a", "c"], [1.5, 0.5], ["--combination", "svd", "--svd-rank", "2"]),
    (["a", "b"], [1.0, -0.7], ["--combination", "ties", "--density", "0.5"]),
    (["a", "b", "c"], [0.8, 0.4, 1.0], ["--combination", "magnitude_prune_svd", "--density", "0.6"]),
    (["a", "c"], [1.5, 0.5], ["--combination", "svd", "--svd-clamp", "0.7"]),
])
def test_combine_equals_add_weighted_adapter(capsys, tmp_path, rng, names, weights, options):
    model = model_with_adapters(rng)
    files = []
    for name in names:
        lorac.save_adapter(model, tmp_path / f"{name}.safetensors", name)
        files.append(tmp_path / f"{name}.safetensors")
    code, out, err = run(capsys, "combine", *files, "-o", tmp_path / "mix.safetensors",
                         "--weights", *weights, *options)
    assert code == 0, err
    combination = options[1]
    kwargs = dict(density=float(options[3])) if "--density" in options else {}
    if "--svd-rank" in options:
        kwargs["svd_rank"] = int(options[3])
    if "--svd-clamp" in options:
        kwargs["svd_clamp"] = float(options[3])
    lorac.add_weighted_adapter(model, names, weights, "ref", combination=combination, **kwargs)
    lorac.load_adapter(model, tmp_path / "mix.safetensors", "mix")
    want, got = deltas(model, "ref"), deltas(model, "mix")
    assert want.keys() == got.keys()
    for i in want:
        np.testing.assert_allclose(got[i], want[i], rtol=1e-12, atol=1e-12, err_msg=f"layer {i}")


def test_combine_reads_and_writes_peft_folders(capsys, tmp_path, rng):
    model = model_with_adapters(rng)
    lorac.save_peft_adapter(model, tmp_path / "a", adapter_name="a")
    lorac.save_adapter(model, tmp_path / "b.safetensors", "b")
    code, _, err = run(capsys, "combine", tmp_path / "a", tmp_path / "b.safetensors", "-o", str(tmp_path / "mix") + "/",
                       "--weights", "1", "2", "--combination", "dare_linear", "--density", "1")
    assert code == 0, err
    lorac.load_adapter(model, tmp_path / "mix", "mix")
    lorac.add_weighted_adapter(model, ["a", "b"], [1.0, 2.0], "ref", combination="linear")
    for i, want in deltas(model, "ref").items():
        np.testing.assert_allclose(deltas(model, "mix")[i], want, rtol=1e-6, atol=1e-9)


def test_combine_refuses_what_it_cannot_do(capsys, tmp_path, rng):
    model = model_with_adapters(rng)
    lorac.save_adapter(model, tmp_path / "a.safetensors", "a")
    lorac.save(lorac.lora_state_dict(model, adapter="a"), tmp_path / "noalpha.npz")
    other = lorac.Sequential(lorac.Linear(7, 6, r=2, rng=0))
    lorac.save_adapter(other, tmp_path / "other.safetensors")
    dora = lorac.inject_lora(lorac.Sequential(lorac.Linear(5, 6, rng=1)), ["0"], r=2, use_dora=True)
    lorac.save_adapter(dora, tmp_path / "dora.safetensors")
    a = tmp_path / "a.safetensors"
    for argv, message in [
        ([a, a, "--weights", "1"], "2 adapters but 1 weights"),
        ([a, a, "--combination", "ties"], "needs density"),
        ([a, a, "--combination", "cat", "--density", "0.5"], "density applies to the pruning combinations"),
        ([a, tmp_path / "other.safetensors"], "layer '0' differs between the adapters"),
        ([a, tmp_path / "dora.safetensors"], "is a DoRA layer"),
        ([a, tmp_path / "noalpha.npz"], "lora_alpha of layer"),
        ([a, tmp_path / "missing.safetensors"], "no such file"),
        ([a, "--svd-rank", "0", "--combination", "svd"], "--svd-rank must be >= 1"),
        ([a, a, "--svd-clamp", "0.9"], "svd_clamp applies to the svd combinations"),
    ]:
        code, _, err = run(capsys, "combine", *argv, "-o", tmp_path / "out.safetensors")
        assert code == 2 and message in err, (message, err)
    assert not (tmp_path / "out.safetensors").exists()

"""The `lorac` command line: info, convert, merge (in-process through main(), plus one
real subprocess)."""

import json
import subprocess
import sys

import numpy as np
import pytest

import lorac
from lorac.cli import main



def run(capsys, *argv):
    """(exit code, stdout, stderr) of `lorac argv...`."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:   # argparse: --help, usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorac "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def mlp(fan_in_fan_out=False):
    return lorac.Sequential(lorac.Linear(6, 8, rng=0), lorac.ReLU(),
                            lorac.Linear(8, 3, rng=1, fan_in_fan_out=fan_in_fan_out))


def trained(model, rng, **inject):
    """model with LoRA on '0' and '2' (random, non-zero adapters)."""
    lorac.inject_lora(model, ["0", "2"], r=inject.pop("r", 2), lora_alpha=inject.pop("lora_alpha", 4), rng=0,
                      fan_in_fan_out=None, **inject)
    for i in (0, 2):
        model[i].lora_B.data[...] = rng.standard_normal(model[i].lora_B.shape)
    return model


@pytest.fixture
def files(tmp_path, rng):
    """base.safetensors (plain model), adapter.safetensors (lorac file with metadata), peft/ folder,
    and the expected merged state dict."""
    model = trained(mlp(), rng)
    base = {k: v for k, v in mlp().state_dict().items()}
    lorac.save(base, tmp_path / "base.safetensors")
    lorac.save(lorac.lora_state_dict(model), tmp_path / "adapter.safetensors",
               metadata=lorac.peft.adapter_metadata(model))
    lorac.save_peft_adapter(model, tmp_path / "peft")
    merged = {k: v.astype(np.float64) for k, v in base.items()}
    for i in (0, 2):
        merged[f"{i}.weight"] += 2.0 * model[i].lora_B.data.astype(np.float64) @ model[i].lora_A.data
    return tmp_path, model, merged


@pytest.mark.parametrize("command", ["info", "convert", "merge"])
def test_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: lorac {command}")
    code, out, _ = run(capsys, "--help")
    assert code == 0 and command in out


def test_usage_errors(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "required" in err
    code, _, err = run(capsys, "merge", "a", "b")
    assert code == 2 and "-o/--output" in err


def test_info_on_lorac_file(capsys, files):
    tmp, model, _ = files
    code, out, err = run(capsys, "info", tmp / "adapter.safetensors")
    assert code == 0 and err == ""
    assert "0.lora_A  (2, 6)  float32" in out and "2.lora_B  (3, 2)  float32" in out
    assert "LoRA layers: 2" in out
    assert "0      linear  2  6   8    28      4           2" in out
    assert "adapter: 50 parameters, 200 bytes" in out


def test_info_counts_dora_magnitudes(capsys, tmp_path):
    model = lorac.Sequential(lorac.DoRAEmbedding(10, 4, r=2, rng=0), lorac.DoRALinear(4, 3, r=2, rng=0))
    lorac.save_adapter(model, tmp_path / "dora.safetensors")
    lorac.save_peft_adapter(model, tmp_path / "peft")
    for source in (tmp_path / "dora.safetensors", tmp_path / "peft"):
        code, out, _ = run(capsys, "info", source)
        assert code == 0
        assert "0      embedding  2  10  4    32      1           0.5      DoRA" in out   # 20 + 8 + 4 magnitudes
        assert "adapter: 49 parameters, 196 bytes" in out


def test_info_on_peft_folder_and_npz(capsys, files):
    tmp, _, _ = files
    code, out, _ = run(capsys, "info", tmp / "peft")
    assert code == 0 and "PEFT adapter folder (adapter_model.safetensors), 4 tensors" in out
    assert "base_model.model.2.lora_B.weight  (3, 2)  float32" in out and 'peft_type="LORA"' in out
    assert "adapter: 50 parameters" in out
    lorac.save({"w": np.zeros((3, 4), np.float64), "x.lora_A": np.zeros((1, 4)), "x.lora_B": np.zeros((5, 1))},
               tmp / "f.npz")
    code, out, _ = run(capsys, "info", tmp / "f.npz")
    assert code == 0 and "npz file, 3 tensors" in out and "w         (3, 4)  float64" in out
    assert "x      -     1  4   5    9       ?           ?" in out


def test_info_reports_half_precision_as_stored(capsys, tmp_path):
    from safetensors.numpy import save_file

    save_file({"a.lora_A": np.zeros((2, 3), np.float16), "a.lora_B": np.zeros((4, 2), np.float16)},
              str(tmp_path / "h.safetensors"))
    code, out, _ = run(capsys, "info", tmp_path / "h.safetensors")
    assert code == 0 and "a.lora_A  (2, 3)  float16" in out and "adapter: 14 parameters, 28 bytes" in out


def test_convert_peft_to_lorac_and_back(capsys, files):
    tmp, model, _ = files
    code, out, _ = run(capsys, "convert", tmp / "peft", tmp / "c.safetensors")
    assert code == 0 and "2 LoRA layers" in out
    state = lorac.load(tmp / "c.safetensors")
    assert sorted(state) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    np.testing.assert_array_equal(state["2.lora_B"], model[2].lora_B.data)
    meta = lorac.checkpoint.read_metadata(tmp / "c.safetensors")
    assert json.loads(meta["lora_layers"])["0"]["lora_alpha"] == 4 and meta["lora_alpha"] == "4"
    code, _, _ = run(capsys, "convert", tmp / "c.safetensors", tmp / "p2", "--to", "peft")
    assert code == 0
    fresh = mlp()
    lorac.load_peft_adapter(fresh, tmp / "p2")
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(fresh(x), model(x), rtol=1e-6, atol=1e-6)


def test_convert_file_to_peft_needs_alpha(capsys, tmp_path, rng):
    model = trained(mlp(), rng)
    lorac.save(lorac.lora_state_dict(model, bias="all"), tmp_path / "plain.safetensors")  # no metadata
    out = str(tmp_path / "out") + "/"   # a trailing slash asks for a PEFT folder
    code, _, err = run(capsys, "convert", tmp_path / "plain.safetensors", out)
    assert_one_line_error(code, err, "lora_alpha of layer '", "is not recorded in the file", "--alpha")
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, "convert", tmp_path / "plain.safetensors", out, "--alpha", "4")
    assert code == 0 and "2 non-LoRA tensors not written" in err
    fresh = mlp()
    lorac.load_peft_adapter(fresh, tmp_path / "out")
    x = np.ones((2, 6), np.float32)
    np.testing.assert_allclose(fresh(x), model(x), rtol=1e-6, atol=1e-6)


def test_convert_to_npz_drops_metadata_with_a_note(capsys, files):
    tmp, _, _ = files
    code, _, err = run(capsys, "convert", tmp / "adapter.safetensors", tmp / "a.npz")
    assert code == 0 and "cannot hold metadata" in err
    assert sorted(lorac.load(tmp / "a.npz")) == sorted(lorac.load(tmp / "adapter.safetensors"))


@pytest.mark.parametrize("adapter", ["adapter.safetensors", "peft"])
def test_merge_matches_numpy(capsys, files, adapter):
    tmp, _, expected = files
    code, out, err = run(capsys, "merge", tmp / "base.safetensors", tmp / adapter, "-o", tmp / "m.safetensors")
    assert code == 0 and "2 layers merged into 4 tensors" in out, err
    merged = lorac.load(tmp / "m.safetensors")
    assert sorted(merged) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(merged[key], value, rtol=1e-6, atol=1e-6, err_msg=key)


def test_merge_alpha_override_rslora_and_progress(capsys, files, monkeypatch):
    tmp, model, expected = files
    monkeypatch.setattr("lorac.cli.merge.PROGRESS_BYTES", 0)
    code, _, _ = run(capsys, "merge", tmp / "base.safetensors", tmp / "peft", "-o", tmp / "m.npz",
                     "--alpha", "8", "--rslora")
    assert code == 0
    merged = lorac.load(tmp / "m.npz")
    want = model[2].weight.data + 8 / np.sqrt(2) * model[2].lora_B.data @ model[2].lora_A.data
    np.testing.assert_allclose(merged["2.weight"], want, rtol=1e-6, atol=1e-6)


def gpt2_like(dtype=np.float64):
    """Both Linear layers store (in, out), the second one square (GPT-2's c_attn / c_proj)."""
    return lorac.Sequential(lorac.Linear(6, 8, rng=0, fan_in_fan_out=True, dtype=dtype), lorac.ReLU(),
                            lorac.Linear(8, 8, rng=1, fan_in_fan_out=True, dtype=dtype))


def test_merged_model_equals_the_adapted_model(capsys, tmp_path, rng):
    """fan_in_fan_out layers, rsLoRA, float64: the merged file gives the adapted model's outputs."""
    model = trained(gpt2_like(), rng, use_rslora=True)
    base = gpt2_like()
    lorac.save(base.state_dict(), tmp_path / "base.safetensors")
    lorac.save(lorac.lora_state_dict(model), tmp_path / "ad.safetensors", metadata=lorac.peft.adapter_metadata(model))
    code, _, err = run(capsys, "merge", tmp_path / "base.safetensors", tmp_path / "ad.safetensors",
                       "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    merged = lorac.load(tmp_path / "m.safetensors")
    base.load_state_dict(merged)
    x = rng.standard_normal((4, 6))
    np.testing.assert_allclose(base(x), model(x), rtol=1e-12, atol=1e-12)

    # Without metadata: layer 0 is found (in, out) from its shape, so the square layer 2 is
    # ambiguous and the command asks; --fan-in-fan-out settles it.
    lorac.save(lorac.lora_state_dict(model), tmp_path / "bare.safetensors")
    argv = ["merge", tmp_path / "base.safetensors", tmp_path / "bare.safetensors", "-o", tmp_path / "m2.safetensors",
            "--alpha", "4", "--rslora"]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "'2.weight' is square and its layout is not recorded", "--fan-in-fan-out")
    code, _, err = run(capsys, *argv, "--fan-in-fan-out")
    assert code == 0, err
    for key, value in lorac.load(tmp_path / "m2.safetensors").items():
        np.testing.assert_array_equal(value, merged[key])
    code, _, err = run(capsys, *argv, "--no-fan-in-fan-out")
    assert_one_line_error(code, err, "size mismatch for '0.weight'", "(8, 6) (out, in)", "found shape (6, 8)",
                          "the other layout fits")


def test_square_layers_default_to_torch_layout(capsys, tmp_path, rng):
    model = trained(lorac.Sequential(lorac.Linear(8, 8, rng=0), lorac.ReLU(), lorac.Linear(8, 8, rng=1)), rng)
    base = lorac.Sequential(lorac.Linear(8, 8, rng=0), lorac.ReLU(), lorac.Linear(8, 8, rng=1))
    lorac.save(base.state_dict(), tmp_path / "base.npz")
    lorac.save(lorac.lora_state_dict(model), tmp_path / "bare.npz")
    code, _, err = run(capsys, "merge", tmp_path / "base.npz", tmp_path / "bare.npz", "-o", tmp_path / "m.npz",
                       "--alpha", "4")
    assert code == 0, err
    base.load_state_dict(lorac.load(tmp_path / "m.npz"))
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(base(x), model(x), rtol=1e-5, atol=1e-5)


def test_merge_embedding_from_peft_keys(capsys, tmp_path, rng):
    net = lorac.Sequential(lorac.Embedding(10, 4, rng=0))
    lorac.save(net.state_dict(), tmp_path / "base.safetensors")
    lorac.inject_lora(net, ["0"], r=2, lora_alpha=2, rng=0)
    net[0].lora_A.data[...] = rng.standard_normal((2, 10))
    lorac.save_peft_adapter(net, tmp_path / "peft")
    code, _, _ = run(capsys, "merge", tmp_path / "base.safetensors", tmp_path / "peft",
                     "-o", tmp_path / "m.safetensors")
    assert code == 0
    plain = lorac.Sequential(lorac.Embedding(10, 4))
    plain.load_state_dict(lorac.load(tmp_path / "m.safetensors"))
    idx = np.array([0, 5, 9])
    np.testing.assert_allclose(plain(idx), net(idx), rtol=1e-6, atol=1e-6)


def test_merge_errors(capsys, files, tmp_path):
    tmp, model, _ = files
    base, out = tmp / "base.safetensors", tmp / "m.safetensors"
    lorac.save(lorac.lora_state_dict(model), tmp / "bare.safetensors")
    code, _, err = run(capsys, "merge", base, tmp / "bare.safetensors", "-o", out)
    assert_one_line_error(code, err, "lorac merge: error:", "is not recorded in the file", "--alpha")
    small = {k: v for k, v in mlp().state_dict().items() if not k.startswith("2.")}
    small["2.weight"] = np.zeros((3, 7), np.float32)
    lorac.save(small, tmp / "small.safetensors")
    code, _, err = run(capsys, "merge", tmp / "small.safetensors", tmp / "peft", "-o", out)
    assert_one_line_error(code, err, "size mismatch for '2.weight'", "(3, 8)", "found shape (3, 7)")
    del small["2.weight"]
    lorac.save(small, tmp / "small.safetensors")
    code, _, err = run(capsys, "merge", tmp / "small.safetensors", tmp / "peft", "-o", out)
    assert_one_line_error(code, err, "no tensor '2.weight'")
    code, _, err = run(capsys, "merge", tmp / "adapter.safetensors", tmp / "peft", "-o", out)
    assert_one_line_error(code, err, "BASE already holds LoRA tensors")
    code, _, err = run(capsys, "merge", base, tmp / "peft", "-o", base)
    assert_one_line_error(code, err, "OUT must differ")
    assert not out.exists()


def test_bad_input_gives_one_line_errors(capsys, tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    (tmp_path / "folder").mkdir()
    cases = [
        (("info", tmp_path / "missing.safetensors"), "No such file"),
        (("info", tmp_path / "junk.bin"), "unrecognised checkpoint format"),
        (("info", tmp_path / "folder"), "not a PEFT adapter"),
        (("convert", tmp_path / "junk.bin", tmp_path / "o.safetensors"), "unrecognised checkpoint format"),
        (("convert", tmp_path / "missing", tmp_path / "o.safetensors"), "no such file"),
        (("merge", tmp_path / "junk.bin", tmp_path / "folder", "-o", tmp_path / "o"), "not a PEFT adapter"),
    ]
    for argv, fragment in cases:
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, fragment)


def test_refused_peft_adapter_in_cli(capsys, files):
    tmp, _, _ = files
    config = json.loads((tmp / "peft" / "adapter_config.json").read_text())
    config["use_qalora"] = True
    (tmp / "peft" / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "convert", tmp / "peft", tmp / "x.safetensors")
    assert_one_line_error(code, err, "use_qalora=True asks for QALoRA")
    code, out, _ = run(capsys, "info", tmp / "peft")
    assert code == 0 and "lorac cannot load this adapter" in out
    config["use_qalora"], config["use_dora"] = False, True   # DoRA loads, but needs its magnitude vectors
    (tmp / "peft" / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "convert", tmp / "peft", tmp / "x.safetensors")
    assert_one_line_error(code, err, "use_dora is set but layer")


def test_console_entry_point_runs(files, child_env):
    tmp, _, _ = files
    env = child_env
    done = subprocess.run([sys.executable, "-m", "lorac", "info", str(tmp / "peft")], capture_output=True,
                          text=True, env=env, cwd=tmp, timeout=120)
    assert done.returncode == 0 and "LoRA layers: 2" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lorac", "merge", str(tmp / "nothing"), str(tmp / "peft"),
                           "-o", str(tmp / "o.safetensors")], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no such file" in done.stderr


def test_info_on_corrupt_safetensors_headers(capsys, tmp_path):
    """Header JSON that the safetensors parser rejects: one-line error, no traceback."""
    import struct

    for i, header in enumerate([b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}',
                                b'{"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}   ',
                                b'{"a": 5}']):
        path = tmp_path / f"bad{i}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
        code, _, err = run(capsys, "info", path)
        assert_one_line_error(code, err, str(path))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_of_dora_adapters_equals_merge_and_unload(capsys, tmp_path, rng, fan_in_fan_out):
    model = lorac.Sequential(lorac.Embedding(7, 6, rng=2), lorac.Linear(6, 8, rng=0, fan_in_fan_out=fan_in_fan_out),
                             lorac.ReLU(), lorac.Linear(8, 3, rng=1, fan_in_fan_out=fan_in_fan_out))
    lorac.save(model.state_dict(), tmp_path / "base.safetensors")
    lorac.inject_lora(model, ["0", "1", "3"], r=2, lora_alpha=4, rng=0, use_dora=True, fan_in_fan_out=None)
    for layer in (model[0], model[1], model[3]):
        layer.lora_A.data[...] = rng.standard_normal(layer.lora_A.shape)
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
        layer.lora_magnitude_vector.data *= rng.uniform(0.5, 1.5, layer.lora_magnitude_vector.shape)
    layer.lora_magnitude_vector.data[1] = 0.0   # a zeroed row stays finite
    lorac.save_peft_adapter(model, tmp_path / "dora")
    code, out, _ = run(capsys, "merge", tmp_path / "base.safetensors", tmp_path / "dora", "-o",
                       tmp_path / "merged.safetensors")
    assert code == 0 and "3 layers merged" in out
    merged = lorac.load(tmp_path / "merged.safetensors")
    expected = lorac.merge_and_unload(model).state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(merged[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_convert_keeps_dora_magnitudes(capsys, files, rng):
    tmp, _, _ = files
    model = trained(mlp(), rng, use_dora=True)
    lorac.save_peft_adapter(model, tmp / "dora")
    assert run(capsys, "convert", tmp / "dora", tmp / "dora.safetensors")[0] == 0
    back = lorac.load(tmp / "dora.safetensors")
    np.testing.assert_array_equal(back["0.lora_magnitude_vector"], model[0].lora_magnitude_vector.data)
    assert run(capsys, "convert", tmp / "dora.safetensors", str(tmp / "again") + "/")[0] == 0
    restored = mlp()
    restored.load_state_dict(lorac.load(tmp / "base.safetensors"))
    lorac.load_peft_adapter(restored, tmp / "again")
    x = rng.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(restored(x), model(x), rtol=1e-5, atol=1e-6)


def test_merge_of_a_peft_folder_whose_layers_store_their_weights_both_ways(capsys, tmp_path, rng):
    """adapter_config.json has one fan_in_fan_out; the weights file's metadata records the layers that
    differ, so a square (in, out) layer is not merged transposed."""
    model = lorac.Sequential(lorac.Linear(5, 5, rng=0, fan_in_fan_out=True), lorac.Linear(5, 4, rng=1),
                             lorac.Linear(4, 4, rng=2))
    lorac.save(model.state_dict(), tmp_path / "base.safetensors")
    lorac.inject_lora(model, ["0", "1", "2"], r=2, lora_alpha=4, rng=0, fan_in_fan_out=None)
    for layer in model:
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    config = lorac.save_peft_adapter(model, tmp_path / "peft")
    assert config["fan_in_fan_out"] is False
    metadata = lorac.checkpoint.read_metadata(tmp_path / "peft" / "adapter_model.safetensors")
    assert metadata["lorac_fan_in_fan_out"] == '{"0": true}'
    assert run(capsys, "merge", tmp_path / "base.safetensors", tmp_path / "peft", "-o", tmp_path / "m.npz")[0] == 0
    merged, expected = lorac.load(tmp_path / "m.npz"), lorac.merge_and_unload(model).state_dict()
    for key, value in expected.items():
        np.testing.assert_allclose(merged[key], value, rtol=1e-6, atol=1e-6, err_msg=key)

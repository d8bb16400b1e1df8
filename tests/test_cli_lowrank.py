"""The low-rank subcommands: lorac extract, lorac similarity, lorac rank (in-process through main())."""

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


def table_row(out, first):
    """The whitespace-split row of a printed table whose first cell is `first`."""
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{out}")


def merge_base(capsys, folder):
    """`lorac merge base.safetensors ad.safetensors` in `folder`: the merged state dict."""
    code, _, err = run(capsys, "merge", folder / "base.safetensors", folder / "ad.safetensors",
                       "-o", folder / "merged.safetensors", "--no-progress")
    assert code == 0, err
    return lorac.load(folder / "merged.safetensors")


@pytest.fixture
def checkpoints(tmp_path, rng):
    """base / finetuned safetensors of a 3-layer MLP: layer '0' changed by a rank-2 delta, '2' by a
    full-rank one, '4' unchanged, '0.bias' changed."""
    model = lorac.Sequential(lorac.Linear(6, 10, rng=0), lorac.ReLU(), lorac.Linear(10, 7, rng=1), lorac.ReLU(),
                             lorac.Linear(7, 3, rng=2))
    base = {k: v.copy() for k, v in model.state_dict().items()}
    ft = {k: v.copy() for k, v in base.items()}
    ft["0.weight"] += (rng.standard_normal((10, 2)) @ rng.standard_normal((2, 6))).astype(np.float32)
    ft["2.weight"] += rng.standard_normal((7, 10)).astype(np.float32)
    ft["0.bias"] += 1
    lorac.save(base, tmp_path / "base.safetensors")
    lorac.save(ft, tmp_path / "ft.safetensors")
    return tmp_path, base, ft


@pytest.mark.parametrize("command", ["extract", "similarity", "rank"])
def test_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and f"lorac {command}" in out


def test_extract_writes_an_adapter_that_merge_turns_back_into_the_finetuned_weights(capsys, checkpoints):
    folder, base, ft = checkpoints
    code, out, err = run(capsys, "extract", folder / "base.safetensors", folder / "ft.safetensors", "-r", 2,
                         "-o", folder / "ad.safetensors", "--alpha", 8, "--no-progress")
    assert code == 0, err
    assert float(table_row(out, "0")[2]) < 1e-6                     # rank-2 delta: exact
    delta2 = ft["2.weight"].astype(np.float64) - base["2.weight"]
    s = np.linalg.svd(delta2, compute_uv=False)
    assert float(table_row(out, "2")[2]) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s ** 2)), rel=1e-3)
    assert "skipped 0.bias" in out and "wrote" in out
    adapter = lorac.load(folder / "ad.safetensors")
    assert sorted(adapter) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    assert adapter["0.lora_A"].shape == (2, 6) and adapter["0.lora_A"].dtype == np.float32
    meta = lorac.checkpoint.read_metadata(folder / "ad.safetensors")
    assert meta["lora_alpha"] == "8"

    merged = merge_base(capsys, folder)
    np.testing.assert_allclose(merged["0.weight"], ft["0.weight"], atol=1e-5)
    np.testing.assert_array_equal(merged["4.weight"], base["4.weight"])


def test_extract_lora_bias_makes_merge_rebuild_the_finetuned_bias(capsys, checkpoints):
    folder, base, ft = checkpoints
    code, out, err = run(capsys, "extract", folder / "base.safetensors", folder / "ft.safetensors", "-r", 2,
                         "-o", folder / "ad.safetensors", "--alpha", 4, "--lora-bias", "--no-progress")
    assert code == 0, err
    assert "0.bias: its change is 0.lora_bias" in out and "skipped 0.bias" not in out
    adapter = lorac.load(folder / "ad.safetensors")
    np.testing.assert_allclose(adapter["0.lora_bias"], np.full(10, 0.5, np.float32))   # change 1 over scaling 2
    merged = merge_base(capsys, folder)
    np.testing.assert_allclose(merged["0.bias"], ft["0.bias"], rtol=1e-6)
    np.testing.assert_array_equal(merged["2.bias"], base["2.bias"])


def test_extract_options_copy_changed_include_and_npz(capsys, checkpoints):
    folder, base, ft = checkpoints
    code, out, err = run(capsys, "extract", folder / "base.safetensors", folder / "ft.safetensors", "-r", 3,
                         "-o", folder / "ad.npz", "--include", "0", "--copy-changed", "--randomized")
    assert code == 0, err
    assert "copied 0.bias whole" in out and "no metadata" in out
    adapter = lorac.load(folder / "ad.npz")
    assert sorted(adapter) == ["0.bias", "0.lora_A", "0.lora_B"]
    np.testing.assert_array_equal(adapter["0.bias"], ft["0.bias"])


def test_extract_errors(capsys, checkpoints):
    folder, _, _ = checkpoints
    b, f = folder / "base.safetensors", folder / "ft.safetensors"
    assert_one_line_error(*run(capsys, "extract", b, folder / "nope", "-r", 2, "-o", folder / "x")[::2],
                          "no such file")
    assert_one_line_error(*run(capsys, "extract", b, f, "-r", 0, "-o", folder / "x")[::2], "-r must be >= 1")
    assert_one_line_error(*run(capsys, "extract", b, f, "-r", 2, "-o", b)[::2], "OUT must differ")
    assert_one_line_error(*run(capsys, "extract", b, b, "-r", 2, "-o", folder / "x")[::2],
                          "no changed 2-D weight")
    assert_one_line_error(*run(capsys, "extract", b, f, "-r", 2, "-o", folder / "x", "--embedding", "9")[::2],
                          "--embedding '9'")
    assert_one_line_error(*run(capsys, "extract", b, f, "-r", 2, "-o", folder / "x", "--alpha", "-1")[::2],
                          "lora_alpha")
    (folder / "junk.safetensors").write_bytes(b"not a checkpoint")
    assert_one_line_error(*run(capsys, "extract", b, folder / "junk.safetensors", "-r", 2, "-o",
                               folder / "x")[::2], "junk.safetensors")
    assert not (folder / "x").exists()


@pytest.fixture
def adapters(capsys, checkpoints):
    """ad2 (r=2) and ad5 (r=5) extracted from the same fine-tune."""
    folder, _, _ = checkpoints
    for r in (2, 5):
        code, _, err = run(capsys, "extract", folder / "base.safetensors", folder / "ft.safetensors", "-r", r,
                           "-o", folder / f"ad{r}.safetensors", "--no-progress")
        assert code == 0, err
    return folder


def test_similarity_of_two_extractions(capsys, adapters):
    folder = adapters
    code, out, err = run(capsys, "similarity", folder / "ad2.safetensors", folder / "ad5.safetensors",
                         "-o", folder / "phi.safetensors")
    assert code == 0, err
    one = lorac.load(folder / "ad2.safetensors")
    two = lorac.load(folder / "ad5.safetensors")
    written = lorac.load(folder / "phi.safetensors")
    for layer in ("0", "2"):
        phi = lorac.subspace_similarity(one[f"{layer}.lora_A"], two[f"{layer}.lora_A"])
        np.testing.assert_allclose(written[layer], phi, atol=1e-12)
        row = table_row(out, layer)
        assert row[1:3] == ["2", "5"]
        assert float(row[3]) == pytest.approx(phi[0, 0], abs=1e-4)
        assert float(row[4]) == pytest.approx(phi[:2, :2].mean(), abs=1e-4)
    # both are truncated SVDs of the same delta: the top-2 directions are shared
    assert float(table_row(out, "2")[3]) == pytest.approx(1.0, abs=1e-4)

    code, out, err = run(capsys, "similarity", folder / "ad2.safetensors", folder / "ad5.safetensors",
                         "--layer", "2.lora_B", "--kind", "B")
    assert code == 0, err
    assert "lora_B" in out and table_row(out, "2") and "\n0 " not in out


def test_similarity_errors(capsys, adapters, tmp_path):
    folder = adapters
    a = folder / "ad2.safetensors"
    assert_one_line_error(*run(capsys, "similarity", a, folder / "missing")[::2], "no such file")
    assert_one_line_error(*run(capsys, "similarity", a, a, "--layer", "7")[::2], "no LoRA layer '7'")
    lorac.save({"x.lora_A": np.ones((1, 6)), "x.lora_B": np.ones((10, 1))}, tmp_path / "other.safetensors")
    assert_one_line_error(*run(capsys, "similarity", a, tmp_path / "other.safetensors")[::2], "no LoRA layer in common")
    lorac.save({"0.lora_A": np.ones((1, 4)), "0.lora_B": np.ones((10, 1))}, tmp_path / "wrong.safetensors")
    assert_one_line_error(*run(capsys, "similarity", a, tmp_path / "wrong.safetensors")[::2], "in_features")


def test_rank_table(capsys, adapters, rng):
    folder = adapters
    code, out, err = run(capsys, "rank", folder / "ad5.safetensors")
    assert code == 0, err
    state = lorac.load(folder / "ad5.safetensors")
    report = lorac.rank_report(state)            # alpha = r: scaling 1
    for layer in ("0", "2"):
        row = table_row(out, layer)
        info = report[layer]
        assert row[1:4] == ["5", str(info.in_features), str(info.out_features)]
        assert int(row[6]) == info.rank_90 and int(row[7]) == info.rank_99
        assert float(row[9]) == pytest.approx(info.singular_values[0], rel=1e-3)
    assert int(table_row(out, "0")[7]) == 2                   # the rank-2 delta uses 2 directions
    assert "unknown" not in out

    # without metadata: scaling 1 and a note; --alpha sets it
    lorac.save({"q.lora_A": rng.standard_normal((4, 6)), "q.lora_B": rng.standard_normal((5, 4))},
               folder / "bare.npz")
    code, out, _ = run(capsys, "rank", folder / "bare.npz")
    assert code == 0 and "lora_alpha unknown" in out and table_row(out, "q")[4] == "1"
    code, out, _ = run(capsys, "rank", folder / "bare.npz", "--alpha", 8, "--top", 2)
    assert code == 0 and table_row(out, "q")[4] == "2" and "unknown" not in out
    assert len(table_row(out, "q")) == 11                     # 9 columns + 2 singular values


def test_rank_merged_linear_file(capsys, tmp_path, rng):
    layer = lorac.MergedLinear(5, 9, r=2, lora_alpha=4, enable_lora=[True, False, True], rng=0)
    layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    lorac.save(lorac.lora_state_dict(lorac.Sequential(layer)), tmp_path / "merged.safetensors")
    code, out, err = run(capsys, "rank", tmp_path / "merged.safetensors", "--alpha", 4)
    assert code == 0, err
    row = table_row(out, "0")
    assert row[1] == "2x2" and row[4] == "2"


def test_rank_errors(capsys, checkpoints):
    folder, _, _ = checkpoints
    assert_one_line_error(*run(capsys, "rank", folder / "missing")[::2], "no such file")
    assert_one_line_error(*run(capsys, "rank", folder / "base.safetensors")[::2], "no LoRA layers")
    assert_one_line_error(*run(capsys, "rank", folder / "base.safetensors", "--top", -1)[::2], "--top")

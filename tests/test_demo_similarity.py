"""`lorac demo --similarity`: the LoRA paper's phi(i, j) figure in small (lorac.demo.similarity)."""

import contextlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lorac import load, subspace_similarity  # noqa: E402
from lorac.cli import main  # noqa: E402
from lorac.demo import quick_config  # noqa: E402
from lorac.demo.similarity import COMPARISONS, observation, random_expectation, run_experiment  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One shortened `lorac demo --similarity --quick` run, shared by the tests below."""
    out = tmp_path_factory.mktemp("similarity")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--similarity", "--quick", "--epochs", "4", "--pretrain-epochs", "4", "--out",
                     str(out), "--no-progress"])
    return code, out, buffer.getvalue()


def test_writes_its_files_and_prints_the_numbers(quick_run):
    code, out, text = quick_run
    assert code == 0
    for name in ["similarity.png", "similarity_corner.png"]:
        assert (out / name).read_bytes()[:8] == PNG, name
    for name in ["similarity.json", "similarity.txt", "similarity_pretrained.safetensors",
                 "similarity_adapter_r8.safetensors", "similarity_adapter_r64.safetensors",
                 "similarity_adapter_r64_seed2.safetensors"]:
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "similarity.json").read_text())
    for path in ("0", "2", "4"):
        assert f"layer {path} (" in text and "top direction shared" in text
    for label in ["r=8 vs r=64", "r=64 vs r=64 (other seed)", "random Gaussian", "(random expectation)",
                  "phi(1,1)", "mean 8x8 corner"]:
        assert label in text, label
    assert "the seed's observation (top direction shared with phi(1,1) > 0.5, random baseline ~ 0) holds on" in text
    assert (out / "similarity.txt").read_text().strip() in text
    # the printed phi(1, 1) of layer 2, r=8 vs r=64, is the JSON's
    row = next(line for line in text.splitlines() if line.startswith("2 ") and "r=8 vs r=64" in line)
    assert f"{results['layers']['2']['comparisons']['small_vs_large']['phi11']['median']:.3f}" in row


def test_numbers_are_similarities_in_unit_interval(quick_run):
    _, out, _ = quick_run
    results = json.loads((out / "similarity.json").read_text())
    assert results["ranks"] == [8, 64]
    assert [run["r"] for run in results["runs"]] == [8, 64, 64]
    assert set(results["layers"]) == {"0", "2", "4"}
    for path, layer in results["layers"].items():
        for key in COMPARISONS:
            phi = np.asarray(layer["phi"][key])
            assert phi.shape == (8, 64), (path, key)
            assert np.all((phi >= 0) & (phi <= 1)) and np.isfinite(phi).all()
            for stat in ("phi11", "phi22", "corner_mean"):
                value = layer["comparisons"][key][stat]["median"]
                assert 0.0 <= value <= 1.0, (path, key, stat)
            assert layer["comparisons"][key]["phi11"]["median"] == pytest.approx(phi[0, 0])
            assert layer["comparisons"][key]["corner_mean"]["median"] == pytest.approx(phi[:8, :8].mean())
        if layer["in_features"] == 64:                  # a rank-64 A spans all of R^64
            np.testing.assert_allclose(np.asarray(layer["phi"]["small_vs_large"])[:, -1], 1.0, atol=1e-9)


def test_phi_matches_the_saved_adapters(quick_run):
    """The JSON's matrices are subspace_similarity of the adapters written beside it."""
    _, out, _ = quick_run
    results = json.loads((out / "similarity.json").read_text())
    r8 = load(str(out / "similarity_adapter_r8.safetensors"))
    r64 = load(str(out / "similarity_adapter_r64.safetensors"))
    r64b = load(str(out / "similarity_adapter_r64_seed2.safetensors"))
    for path in ("0", "2", "4"):
        a8, a64, a64b = r8[f"{path}.lora_A"], r64[f"{path}.lora_A"], r64b[f"{path}.lora_A"]
        assert a8.shape[0] == 8 and a64.shape[0] == 64
        np.testing.assert_allclose(results["layers"][path]["phi"]["small_vs_large"], subspace_similarity(a8, a64),
                                   atol=1e-12)
        np.testing.assert_allclose(results["layers"][path]["phi"]["large_vs_large"],
                                   subspace_similarity(a64, a64b)[:8], atol=1e-12)


def test_trained_subspaces_overlap_far_more_than_random_ones(quick_run):
    """The part of the seed's observation that survives even a few epochs: what two adapters
    learn overlaps many times more than random subspaces, and the baseline is ~ 0."""
    _, out, _ = quick_run
    results = json.loads((out / "similarity.json").read_text())
    for path in ("2", "4"):                               # d = 512: random expectation ~ 0.01
        comp = results["layers"][path]["comparisons"]
        assert comp["random"]["corner_mean"]["median"] < 0.05
        assert comp["random"]["phi11"]["median"] < 0.05
        for key in ("small_vs_large", "large_vs_large"):
            assert comp[key]["corner_mean"]["median"] > 5 * comp["random"]["corner_mean"]["median"], (path, key)


def test_random_expectation_matches_sampling():
    rng = np.random.default_rng(0)
    d, small, large = 24, 4, 10
    samples = [subspace_similarity(rng.standard_normal((small, d)), rng.standard_normal((large, d)))
               for _ in range(400)]
    expect = random_expectation(d, small)
    assert np.mean([s[0, 0] for s in samples]) == pytest.approx(expect["phi11"], rel=0.15)
    assert np.mean([s[1, 1] for s in samples]) == pytest.approx(expect["phi22"], rel=0.1)
    assert np.mean([s[:small, :small].mean() for s in samples]) == pytest.approx(expect["corner_mean"], rel=0.05)


def test_observation_verdict():
    def layer(phi11, random_phi11, random_corner):
        stat = lambda v: {"median": v}  # noqa: E731
        return {"comparisons": {"small_vs_large": {"phi11": stat(phi11)},
                                "random": {"phi11": stat(random_phi11), "corner_mean": stat(random_corner)}},
                "random_expectation": {"phi11": 0.002}}
    assert observation(layer(0.7, 0.001, 0.01))["holds"]
    seen = observation(layer(0.4, 0.001, 0.01))
    assert not seen["holds"] and not seen["top_shared"] and seen["random_near_zero"]
    assert seen["times_random"] == pytest.approx(200)
    assert not observation(layer(0.7, 0.3, 0.01))["holds"]
    assert not observation(layer(0.7, 0.001, 0.2))["holds"]


def test_unknown_layer_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"similarity_layers: \['7'\] are not LoRA layers of the demo MLP"):
        run_experiment(quick_config(similarity_layers=("2", "7"), progress=False), str(tmp_path), log=lambda *_: None)


def test_ranks_must_be_two(tmp_path, capsys):
    assert main(["demo", "--similarity", "--ranks", "4,8,16", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--ranks with --similarity takes exactly two ranks (small,large), got 4,8,16" in capsys.readouterr().err

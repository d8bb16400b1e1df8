"""`lorac demo --inits`: LoRA's initialisations side by side (lorac.demo.inits)."""

import contextlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from lorac.cli import main  # noqa: E402
from lorac.demo import quick_config  # noqa: E402
from lorac.demo.data import load_tasks  # noqa: E402
from lorac.demo.inits import adapted_model, init_names  # noqa: E402
from lorac.demo.model import build_mlp  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inits")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--inits", "--quick", "--epochs", "2", "--pretrain-epochs", "2", "--ranks", "6",
                     "--out", str(out), "--no-progress"])
    return code, out, buffer.getvalue()


def test_every_init_trains_and_the_table_says_so(quick_run):
    code, out, text = quick_run
    assert code == 0
    results = json.loads((out / "inits.json").read_text())
    assert [run["init"] for run in results["runs"]] == list(init_names())
    table = (out / "inits.txt").read_text()
    for run in results["runs"]:
        assert len(run["history"]["test_accuracy"]) == 2
        assert run["init"] in table and run["init"] in text
        expected_ranks = None if run["init"] == "eva" else [4, 6]     # the head takes at most 4
        assert expected_ranks is None or run["ranks"] == expected_ranks
    by_name = {run["init"]: run for run in results["runs"]}
    assert by_name["mica"]["trainable_params"] < by_name["kaiming"]["trainable_params"]   # lora_A only
    assert by_name["pissa"]["trainable_params"] == by_name["lora_ga"]["trainable_params"]


def test_every_start_keeps_the_pretrained_function():
    """Each init's model computes what the pretrained MLP does before training (up to rounding)."""
    config = quick_config(pretrain_epochs=1, inits_rank=4)
    down = load_tasks(config).downstream
    pretrained = build_mlp(config.hidden, seed=0)
    state = {k: v.copy() for k, v in pretrained.state_dict().items()}
    x = down.x_test[:32]
    expected = pretrained(x)
    for name in init_names():
        model, _ = adapted_model(name, state, config, down, seed=2)
        np.testing.assert_allclose(model(x), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max(), err_msg=name)


def test_bad_combinations_are_refused(capsys):
    assert main(["demo", "--inits", "--similarity", "--no-progress"]) != 0
    assert "two different runs" in capsys.readouterr().err
    assert main(["demo", "--inits", "--ranks", "4,8", "--no-progress"]) != 0
    assert "--ranks with --inits takes exactly one rank" in capsys.readouterr().err

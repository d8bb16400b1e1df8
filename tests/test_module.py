"""Module / Parameter / Sequential bookkeeping and loralib's model-level helpers."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import lorac


class Block(lorac.Module):
    def __init__(self):
        super().__init__()
        self.proj = lorac.Linear(4, 4, r=2, rng=0)
        self.head = lorac.Linear(4, 2, rng=1)
        self.scale = lorac.Parameter(np.ones(2, np.float32))

    def forward(self, x):
        return self.head(self.proj(x)) * self.scale.data


def test_registration_and_traversal():
    model = lorac.Sequential(Block(), lorac.Linear(2, 3, r=1, rng=2))
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.scale", "0.proj.weight", "0.proj.bias", "0.proj.lora_A", "0.proj.lora_B",
                     "0.head.weight", "0.head.bias", "1.weight", "1.bias", "1.lora_A", "1.lora_B"]
    assert [n for n, _ in model.named_modules()] == ["", "0", "0.proj", "0.head", "1"]
    assert len(list(model.children())) == 2 and len(list(model.modules())) == 5
    assert list(model.state_dict()) == names
    assert len(model) == 2 and isinstance(model[1], lorac.Linear) and isinstance(model[-1], lorac.Linear)
    with pytest.raises(IndexError):
        model[5]


def test_shared_parameters_are_listed_once():
    model = lorac.Sequential(lorac.Linear(3, 3), lorac.Linear(3, 3))
    model[1].weight = model[0].weight
    assert sum(1 for _ in model.parameters()) == 3


def test_train_eval_recurse_and_zero_grad(rng):
    model = lorac.Sequential(lorac.Linear(4, 4, r=2, rng=0), lorac.Linear(4, 2, r=2, rng=1))
    model.eval()
    assert all(not m.training for m in model.modules()) and model[0].merged and model[1].merged
    model.train()
    assert all(m.training for m in model.modules()) and not model[0].merged
    x = rng.standard_normal((3, 4)).astype(np.float32)
    model.backward(np.ones_like(model(x)))
    assert model[0].lora_A.grad is not None
    model.zero_grad(set_to_none=False)
    assert np.all(model[0].lora_A.grad == 0)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_sequential_chains_backward(rng):
    model = lorac.Sequential(lorac.Linear(5, 6, r=2, dtype=np.float64, rng=0),
                             lorac.Linear(6, 3, r=2, dtype=np.float64, rng=1))
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    x = rng.standard_normal((4, 5))
    g = rng.standard_normal((4, 3))
    model(x)
    dx = model.backward(g)
    h = model[0](x)
    model[1](h)
    expected = model[0].backward(model[1].backward(g))
    np.testing.assert_allclose(dx, expected)


def test_assigning_wrong_types_raises():
    layer = lorac.Linear(3, 2)
    with pytest.raises(TypeError, match="bias"):
        layer.bias = np.zeros(2)
    layer.bias = None
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]
    with pytest.raises(TypeError):
        lorac.Sequential(lorac.Linear(2, 2), "not a module")
    with pytest.raises(TypeError):
        lorac.Parameter(np.array(["x"]))


def test_load_state_dict_strict_and_non_strict(rng):
    source = lorac.Sequential(lorac.Linear(4, 4, r=2, rng=0))
    for p in source.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    target = lorac.Sequential(lorac.Linear(4, 4, r=2, rng=1))
    result = target.load_state_dict(source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for (k, v), (_, w) in zip(source.state_dict().items(), target.state_dict().items()):
        np.testing.assert_array_equal(v, w)
    with pytest.raises(lorac.StateDictKeyError, match="missing keys: '0.lora_A'.*unexpected keys: 'extra'"):
        target.load_state_dict({**{k: v for k, v in source.state_dict().items() if k != "0.lora_A"},
                                "extra": np.zeros(1)})
    result = target.load_state_dict({"0.lora_B": np.ones((4, 2)), "extra": np.zeros(1)}, strict=False)
    assert result.missing_keys == ["0.weight", "0.bias", "0.lora_A"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(target[0].lora_B.data, 1)
    with pytest.raises(TypeError):
        target.load_state_dict([("0.weight", 1)])


def test_mark_only_lora_as_trainable_bias_modes():
    def fresh():
        return lorac.Sequential(lorac.Linear(4, 4, r=2, rng=0), lorac.Linear(4, 2, rng=1))

    def trainable(model):
        return sorted(n for n, p in model.named_parameters() if p.requires_grad)

    model = fresh()
    model[0].lora_A.requires_grad = False  # lorac re-enables lora_ parameters (loralib leaves them)
    lorac.mark_only_lora_as_trainable(model)
    assert trainable(model) == ["0.lora_A", "0.lora_B"]
    assert trainable(lorac.mark_only_lora_as_trainable(fresh(), bias="all")) == [
        "0.bias", "0.lora_A", "0.lora_B", "1.bias"]
    assert trainable(lorac.mark_only_lora_as_trainable(fresh(), bias="lora_only")) == [
        "0.bias", "0.lora_A", "0.lora_B"]
    with pytest.raises(ValueError, match="bias must be one of"):
        lorac.mark_only_lora_as_trainable(fresh(), bias="some")


def test_lora_state_dict_bias_modes():
    model = lorac.Sequential(lorac.Linear(4, 4, r=2, rng=0), lorac.Linear(4, 2, rng=1))
    assert list(lorac.lora_state_dict(model)) == ["0.lora_A", "0.lora_B"]
    assert list(lorac.lora_state_dict(model, bias="all")) == ["0.bias", "0.lora_A", "0.lora_B", "1.bias"]
    assert list(lorac.lora_state_dict(model, bias="lora_only")) == ["0.lora_A", "0.bias", "0.lora_B"]
    with pytest.raises(ValueError):
        lorac.lora_state_dict(model, bias="nope")


def test_count_parameters():
    model = lorac.Sequential(lorac.Linear(10, 20, r=4, rng=0))
    assert lorac.count_parameters(model) == 10 * 20 + 20 + 4 * (10 + 20)
    lorac.mark_only_lora_as_trainable(model)
    assert lorac.count_parameters(model, trainable_only=True) == 4 * (10 + 20)


def test_peft_parameter_counts_count_a_tied_parameter_once(capsys):
    model = lorac.Sequential(lorac.Linear(10, 20, r=4, rng=0), lorac.Linear(10, 20, rng=1))
    model[1].weight = model[0].weight  # tied: frozen with the LoRA layer's base weight
    assert lorac.get_nb_trainable_parameters(model) == (20 + 4 * 30 + 20, 200 + 20 + 4 * 30 + 20)
    lorac.print_trainable_parameters(model)
    assert capsys.readouterr().out == "trainable params: 160 || all params: 360 || trainable%: 44.4444\n"
    lorac.print_trainable_parameters(lorac.Sequential())
    assert capsys.readouterr().out == "trainable params: 0 || all params: 0 || trainable%: 0.0000\n"


def test_blas_threads_and_config(capsys):
    n = lorac.get_num_threads()
    assert n >= 1
    lorac.set_num_threads(1)
    assert lorac.get_num_threads() == 1
    lorac.set_num_threads(n)
    with pytest.raises(ValueError):
        lorac.set_num_threads(0)
    lorac.show_config()
    out = capsys.readouterr().out
    assert "BLAS:" in out and "OpenBLAS" in out and lorac.__version__ in out and "threads:" in out


def test_a_source_tree_without_the_extension_says_so(tmp_path):
    """Importing lorac/ with no built _C (the source tree from its root, say)
    names the missing extension and the way out, not a circular import."""
    package = os.path.dirname(lorac.__file__)
    shutil.copytree(package, tmp_path / "lorac", ignore=shutil.ignore_patterns("_C.*", "*.so", "__pycache__"))
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import lorac"
    # -S: no site-packages, so neither an installed lorac nor an editable install's finder answers
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert "lorac._C is not built for this Python" in last_line and "pip install ." in last_line, done.stderr

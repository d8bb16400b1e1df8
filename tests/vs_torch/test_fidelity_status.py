"""lorac.get_layer_status / get_model_status against PEFT's on twin models
holding adapters default, a, b, c, in the states that make PEFT report
"irregular": an adapter merged in one layer only, an adapter partly
frozen, one layer's adapters disabled, layers with different active
adapters.  Every field is compared except the names of the types (lorac's
layers and model are not PEFT's)."""

import warnings
from contextlib import ExitStack

import pytest

import lorac
from fidelity import torch  # noqa: F401  (skips without torch)
from test_fidelity_weighted_merge import PATHS, twins

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch

TYPE_FIELDS = {"module_type", "base_model_type", "adapter_model_type", "peft_types"}


def same_fields(ours, theirs):
    mine, other = vars(ours), vars(theirs)
    assert mine.keys() == other.keys()
    for key in mine.keys() - TYPE_FIELDS:
        expected = other[key]
        if key in ("active_adapters", "merged_adapters") and isinstance(expected, list):
            expected = list(expected)
        assert mine[key] == expected, (key, mine[key], expected)


def freeze_peft(pmodel, path, name):
    layer = pmodel.base_model.model.get_submodule(path)
    module = layer.lora_embedding_A if name in layer.lora_embedding_A else layer.lora_A[name]
    (module[name] if isinstance(module, torch.nn.ParameterDict) else module.weight).requires_grad = False


STATES = {
    "fresh": [],
    "other active adapter": [("set_adapter", "b")],
    "merged in one layer": [("merge_one", "proj", "a")],
    "partly frozen": [("freeze", "head", "default")],
    "one layer disabled": [("disable_one", "emb")],
    "active differs": [("set_one", "head", "c")],
}


@pytest.mark.parametrize("steps", STATES.values(), ids=STATES.keys())
def test_status_matches_pefts(steps):
    pmodel, ours = twins()
    for name, param in ours.named_parameters():   # PEFT's bias="none" freezes the biases loralib leaves trainable
        if name.endswith(".bias"):
            param.requires_grad = False
    with ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, *args in steps:
            if step == "set_adapter":
                pmodel.set_adapter(args[0])
                lorac.set_adapter(ours, args[0])
            elif step == "merge_one":
                pmodel.base_model.model.get_submodule(args[0]).merge(adapter_names=[args[1]])
                getattr(ours, args[0]).merge([args[1]])
            elif step == "freeze":
                freeze_peft(pmodel, *args)
                getattr(ours, args[0]).adapter_parameters(args[1])[0].requires_grad = False
            elif step == "disable_one":
                pmodel.base_model.model.get_submodule(args[0]).enable_adapters(False)
                stack.enter_context(getattr(ours, args[0]).disable_adapters())
            else:   # set_one
                pmodel.base_model.model.get_submodule(args[0]).set_adapter(args[1])
                getattr(ours, args[0]).set_adapter(args[1])
        theirs_layers, mine_layers = peft.get_layer_status(pmodel), lorac.get_layer_status(ours)
        assert [s.name for s in mine_layers] == [s.name.removeprefix("model.") for s in theirs_layers] == list(PATHS)
        for mine, theirs in zip(mine_layers, theirs_layers):
            theirs.name = mine.name
            same_fields(mine, theirs)
        theirs_model, mine_model = peft.get_model_status(pmodel), lorac.get_model_status(ours)
    same_fields(mine_model, theirs_model)
    if steps:
        assert "irregular" in repr(mine_model) or mine_model.active_adapters == ["b"]


def test_status_refuses_a_model_without_adapters():
    with pytest.raises(ValueError, match="has no adapter layer"):
        lorac.get_layer_status(lorac.Sequential(lorac.Linear(3, 2)))
    with pytest.raises(TypeError, match="must be a lorac.Module"):
        lorac.get_model_status(object())

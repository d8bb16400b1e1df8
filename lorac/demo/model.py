"""The MLP of the demo, built from lorac.Linear layers (r = 0: plain, r > 0: LoRA)."""

import numpy as np

from ..containers import Sequential
from ..layers import Linear, ReLU

IN_FEATURES = 64
CLASSES = 10


def build_mlp(hidden, r=0, lora_alpha=1.0, seed=0):
    """64 -> hidden -> hidden -> 10 with ReLUs; every Linear gets rank r (frozen base when r > 0)."""
    rng = np.random.default_rng(seed)
    return Sequential(
        Linear(IN_FEATURES, hidden, r=r, lora_alpha=lora_alpha, rng=rng), ReLU(),
        Linear(hidden, hidden, r=r, lora_alpha=lora_alpha, rng=rng), ReLU(),
        Linear(hidden, CLASSES, r=r, lora_alpha=lora_alpha, rng=rng),
    )


def lora_from_pretrained(pretrained_state, hidden, r, lora_alpha, seed):
    """A LoRA model of rank r carrying the pretrained weights, only its adapters trainable."""
    from ..utils import mark_only_lora_as_trainable

    model = build_mlp(hidden, r=r, lora_alpha=lora_alpha, seed=seed)
    result = model.load_state_dict(pretrained_state, strict=False)
    if result.unexpected_keys or any("lora_" not in k for k in result.missing_keys):
        raise RuntimeError(f"pretrained weights do not fit the LoRA model: {result}")
    mark_only_lora_as_trainable(model)
    return model

"""Trainable tokens on a model: PEFT's ``LoraConfig(trainable_token_indices=...)``.

``token_indices`` is a list of token ids for the layer named "embed_tokens"
(PEFT's default when the model does not name its input embeddings) or a
dict ``{layer name: ids}``; a name selects the modules whose path is it or
ends with ``.<name>``.  Each selected module must be a plain lorac.Embedding
(r = 0; PEFT refuses LoRA layers too) and becomes a
``lorac.layers.tokens.TrainableTokensEmbedding`` (layers/tokens.py).
"""

from ..layers.embedding import Embedding
from ..layers.tokens import TrainableTokensEmbedding, checked_token_indices
from .targets import parent_of

DEFAULT_LAYER = "embed_tokens"


def token_spec(token_indices, func):
    """{layer name: list of ids} of a list (the "embed_tokens" layer) or a dict."""
    if isinstance(token_indices, dict):
        spec = token_indices
    elif isinstance(token_indices, (list, tuple)):
        spec = {DEFAULT_LAYER: list(token_indices)}
    else:
        raise TypeError(f"{func}: trainable_token_indices must be a list of token ids or a dict {{layer name: "
                        f"ids}}, got {type(token_indices).__name__}")
    if not spec or not all(isinstance(name, str) and name for name in spec):
        raise TypeError(f"{func}: trainable_token_indices' layer names must be non-empty str, got {list(spec)}")
    return spec


def token_plan(model, token_indices, func, adapted=()):
    """[(path, layer, indices)] for add_trainable_tokens, everything checked; ``adapted``: paths a
    LoRA config also targets (refused, as PEFT)."""
    modules = dict(model.named_modules())
    plan = []
    for name, ids in token_spec(token_indices, func).items():
        paths = [p for p in modules if p and (p == name or p.endswith("." + name))]
        if not paths:
            embeddings = [p for p, m in modules.items() if isinstance(m, Embedding)]
            raise ValueError(f"{func}: trainable_token_indices names {name!r}, which matches no module; the "
                             f"model's Embedding layers are {embeddings}")
        for path in paths:
            layer = modules[path]
            if path in adapted or type(layer) is not Embedding or layer.r > 0:
                what = "a target of the LoRA config" if path in adapted else f"a {type(layer).__name__}" + (
                    f" with r = {layer.r}" if getattr(layer, "r", 0) else "")
                raise TypeError(f"{func}: trainable tokens go on a plain lorac.Embedding; {path!r} is {what} "
                                "(PEFT refuses this too)")
            plan.append((path, layer, checked_token_indices(ids, layer.num_embeddings, func)))
    return plan


def add_trainable_tokens(model, token_indices, func="add_trainable_tokens"):
    """Make the rows ``token_indices`` (module docstring) of the named Embedding layers trainable,
    starting at their current values; the rest of those layers is frozen.  Returns the model."""
    modules = dict(model.named_modules())
    for path, layer, indices in token_plan(model, token_indices, func):
        install_tokens(modules, path, layer, indices)
    return model


def install_tokens(modules, path, layer, token_indices, rows=None):
    """Put at ``path`` (``modules``: dict(model.named_modules())) the TrainableTokensEmbedding over
    ``layer``'s table (a plain Embedding, or one with trainable tokens, whose rows are dropped) with
    rows ``token_indices`` starting at ``rows`` (default: the table's); returns it."""
    base = layer.plain(merge=False) if isinstance(layer, TrainableTokensEmbedding) else layer
    new = TrainableTokensEmbedding.from_embedding(base, token_indices, rows)
    new.train(layer.training)
    parent, child = parent_of(modules, path)
    parent.add_module(child, new)
    modules[path] = new
    return new

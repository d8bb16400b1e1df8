"""Finding and rebuilding the LoRA layers of a lorac model.

Layer kinds lorac can give a PEFT-style adapter: ``lorac.Linear`` ("linear")
and ``lorac.Embedding`` ("embedding"), exactly those classes (a subclass may
change the forward, and ``MergedLinear`` has no PEFT counterpart).

Rebuilding a layer (``build_layer`` then ``swap_layer``) makes a new layer of
the same class and sizes with the requested r / lora_alpha / use_rslora that
holds the old layer's ``weight`` and ``bias`` Parameter objects (no copy; the
weight is frozen, as in every LoRA layer) and takes the old one's place in
its parent, with its train/eval mode.  Its cost is the adapter's
initialisation, O(r (in + out)); the base weight is never redrawn.
"""

import re

import numpy as np

from .. import init
from .._arrays import as_generator
from ..layers import Embedding, Linear
from ..layers._threading import forget_thread_state
from ..module import Parameter

KIND_OF_CLASS = {Linear: "linear", Embedding: "embedding"}


def layer_kind(module):
    """"linear", "embedding" or None (a module lorac cannot adapt)."""
    return KIND_OF_CLASS.get(type(module))


def layer_dims(module):
    """(in, out) of the adapter shapes: lora_A (r, in), lora_B (out, r)."""
    if type(module) is Embedding:
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def describe(module):
    kind = layer_kind(module)
    return type(module).__name__ if kind is None else f"lorac.{type(module).__name__}"


def compile_matcher(target_modules):
    """PEFT's target_modules rule as a predicate on module paths.

    A str is a regular expression that must match the whole path; a list (or
    other iterable) of str matches a path equal to an item or ending in
    ``"." + item``.
    """
    if isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression: {exc}") from None
        return lambda path: regex.fullmatch(path) is not None
    try:
        names = list(target_modules)
    except TypeError:
        raise TypeError("target_modules must be a regex str or a list of module names, got "
                        f"{type(target_modules).__name__}") from None
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad or not names:
        raise ValueError(f"target_modules must be a non-empty list of module names, got {names!r}")
    exact = set(names)
    suffixes = tuple("." + n for n in names)
    return lambda path: path in exact or path.endswith(suffixes)


def parent_of(modules, path):
    """(parent module, child name) of the module at dotted ``path`` (not the root);
    ``modules`` is ``dict(model.named_modules())``."""
    parent_path, _, name = path.rpartition(".")
    return modules[parent_path], name


def build_layer(old, r, lora_alpha, use_rslora, lora_dropout, rng):
    """A new layer like ``old`` (same class, sizes, layout, dtype, merge_weights,
    mode) with a fresh rank-r adapter; ``old`` is not touched.

    The new layer is a clone of ``old``'s instance state (not a constructor
    call, which would draw a base weight only to throw it away: O(in * out)
    per layer) with the LoRA state reset by ``LoRALayer._init_lora`` and new
    lora_A / lora_B initialised as the class's constructor does: Linear A
    kaiming-uniform, B zero; Embedding A zero, B N(0, 1), drawn from ``rng``
    (which then serves the layer's dropout), or from old's rng if None.  The base
    parameters are shared with ``old`` until ``swap_layer`` moves them.
    """
    cls = type(old)
    new = old._copy_sharing_contents(old._parameters.items())
    forget_thread_state(new)
    is_embedding = cls is Embedding
    new._init_lora(r, lora_alpha, 0.0 if is_embedding else lora_dropout, old.merge_weights, use_rslora)
    if rng is not None:
        new.rng = as_generator(rng)
    fin, fout = layer_dims(old)
    if is_embedding:
        a = init.zeros((r, fin), old.dtype)
        b = init.normal((fout, r), 1.0, new.rng, old.dtype)
    else:
        a = init.kaiming_uniform((r, fin), fin, new.rng, old.dtype)
        b = init.zeros((fout, r), old.dtype)
    new.lora_A = Parameter(a)
    new.lora_B = Parameter(b)
    return new


def swap_layer(modules, path, old, new, lora_A=None, lora_B=None):
    """Put ``new`` (from build_layer(old, ...)) at ``path`` in place of ``old``.

    ``modules`` is ``dict(model.named_modules())`` (the root under "").
    ``old`` is unmerged first (the shared weight Parameter then holds the base
    weight), the weight is frozen, ``lora_A`` / ``lora_B`` (if given) are
    copied into the new adapter, and ``new`` takes old's train/eval mode
    (merging if that is what eval() does for it).  Nothing here fails on
    validated input.
    """
    old.unmerge()
    weight = new.weight
    weight.requires_grad = False
    weight.grad = None
    if lora_A is not None:
        np.copyto(new.lora_A.data, lora_A, casting="same_kind")
        np.copyto(new.lora_B.data, lora_B, casting="same_kind")
    parent, name = parent_of(modules, path)
    parent.add_module(name, new)
    new.train(old.training)   # new.merged is False: eval() merges when merge_weights
    return new

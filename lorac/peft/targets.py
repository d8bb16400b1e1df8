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

import numpy as np

from .._arrays import as_generator
from ..layers import DoRAEmbedding, DoRALinear, Embedding, Linear
from ..layers._lora_init import check_init
from ..layers.adapters import DEFAULT
from ..layers._threading import forget_thread_state
from ..module import Parameter
from .select import compile_selector, expand_all_linear

KIND_OF_CLASS = {Linear: "linear", DoRALinear: "linear", Embedding: "embedding", DoRAEmbedding: "embedding"}


def layer_kind(module):
    """"linear", "embedding" or None (a module lorac cannot adapt)."""
    return KIND_OF_CLASS.get(type(module))


def config_selector(modules, config, func, target_modules=None):
    """The predicate path -> selected of a LoraConfig's target fields over ``modules``
    (``dict(model.named_modules())``), PEFT's "all-linear" expanded to the Linear layers;
    ``target_modules`` overrides the config's."""
    linear = [p for p, m in modules.items() if p and layer_kind(m) == "linear"]
    names = expand_all_linear(config.target_modules if target_modules is None else target_modules, linear, func,
                              config.layers_to_transform, config.layers_pattern)
    return compile_selector(names, config.exclude_modules, config.layers_to_transform, config.layers_pattern)


def layer_dims(module):
    """(in, out) of the adapter shapes: lora_A (r, in), lora_B (out, r)."""
    if layer_kind(module) == "embedding":
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def describe(module):
    kind = layer_kind(module)
    return type(module).__name__ if kind is None else f"lorac.{type(module).__name__}"


def parent_of(modules, path):
    """(parent module, child name) of the module at dotted ``path`` (not the root);
    ``modules`` is ``dict(model.named_modules())``."""
    parent_path, _, name = path.rpartition(".")
    return modules[parent_path], name


def build_layer(old, r, lora_alpha, use_rslora, lora_dropout, rng, init=None, use_dora=False, lora_bias=False):
    """(new layer, new base weight or None): a layer like ``old`` (same kind,
    sizes, layout, dtype, merge_weights, mode) with a fresh rank-r adapter --
    a DoRALinear / DoRAEmbedding with ``use_dora`` (its magnitude the row
    norms of the new base weight plus s B A, so the output is unchanged),
    else a Linear or an Embedding; ``old`` is not touched.

    The new layer is a clone of ``old``'s instance state (not a constructor
    call, which would draw a base weight only to throw it away: O(in * out)
    per layer) with the LoRA state reset by ``LoRALayer._init_lora``.
    lora_A / lora_B start as ``init`` says (a checked InitSpec of
    layers/_lora_init.py; None: 'kaiming', the class's constructor init:
    Linear A kaiming-uniform, B zero; Embedding A zero, B N(0, 1)), drawn
    from ``rng`` (which then serves the layer's dropout), or from old's rng if
    None.  The base parameters are shared with ``old`` until ``swap_layer``
    moves them; 'pissa' returns the residual base weight for swap_layer to
    write, None otherwise.  ``lora_bias`` (a Linear with a bias, init
    'kaiming' or 'random': the caller checks) adds PEFT's lora_bias,
    started as Linear(lora_bias=True) starts it.
    """
    kind = layer_kind(old)
    cls = {("embedding", False): Embedding, ("embedding", True): DoRAEmbedding,
           ("linear", False): Linear, ("linear", True): DoRALinear}[kind, bool(use_dora)]
    new = old._copy_sharing_contents(((k, v) for k, v in old._parameters.items() if not k.startswith("lora_")),
                                     cls)
    forget_thread_state(new)
    new.__dict__.pop("_dora_merge", None)
    dropout = 0.0 if kind == "embedding" else lora_dropout
    new._init_lora(r, lora_alpha, dropout, old.merge_weights, use_rslora)
    if rng is not None:
        new.rng = as_generator(rng)
    spec = check_init("kaiming") if init is None else init
    start = new._start_arrays(spec, r, new.scaling, new.rng, "inject_lora")
    new.lora_A = Parameter(start.lora_A)
    new.lora_B = Parameter(start.lora_B)
    if use_dora:
        norms = new.dora_row_norms(start.weight)
        new.lora_magnitude_vector = Parameter(norms.astype(new.dtype))
        new._dora_merge = None
    if lora_bias:
        new._register_lora_bias(DEFAULT, spec, r, new.rng)
    new._follow_init(DEFAULT, spec)
    return new, start.weight


def swap_layer(modules, path, old, new, lora_A=None, lora_B=None, weight=None, magnitude=None, lora_bias=None):
    """Put ``new`` (from build_layer(old, ...)) at ``path`` in place of ``old``.

    ``modules`` is ``dict(model.named_modules())`` (the root under "").
    ``old`` is unmerged first (the shared weight Parameter then holds the base
    weight), the weight is frozen, ``lora_A`` / ``lora_B`` (if given) are
    copied into the new adapter, ``lora_bias`` into its lora_bias, and
    ``magnitude`` into a DoRA layer's,
    ``weight`` (if given: build_layer's PiSSA residual) into the base
    weight, and ``new`` takes old's train/eval mode
    (merging if that is what eval() does for it).  Nothing here fails on
    validated input.
    """
    old.unmerge()
    base = new.weight
    base.requires_grad = False
    base.grad = None
    if weight is not None:
        np.copyto(base.data, weight)
    if lora_A is not None:
        np.copyto(new.lora_A.data, lora_A, casting="same_kind")
        np.copyto(new.lora_B.data, lora_B, casting="same_kind")
    if magnitude is not None:
        np.copyto(new.lora_magnitude_vector.data, magnitude, casting="same_kind")
    if lora_bias is not None:
        np.copyto(new.lora_bias.data, lora_bias, casting="same_kind")
    parent, name = parent_of(modules, path)
    parent.add_module(name, new)
    new.train(old.training)   # new.merged is False: eval() merges when merge_weights
    return new

"""Many adapters on one base model: named adapters, hot swap, merging,
weighted combinations and mixed batches (the model-level API).

Every LoRA layer (lorac.Linear, Embedding, MergedLinear) holds named
adapters (see lorac/layers/adapters.py); these functions apply to all of a
model's LoRA layers at once:

    lorac.add_adapter(model, "french", r=8, lora_alpha=16)
    lorac.set_adapter(model, "french")                 # or a list: summed
    lorac.save_adapter(model, "french.safetensors", "french")
    lorac.load_adapter(model, "german.safetensors", "french")   # hot swap, in place
    with lorac.disable_adapters(model): base = model(x)
    y = model(x, adapter_names=["default", "french", "__base__", ...])   # one per row

Mixed batches: ``model(x, adapter_names=[...])`` (one name per row of x's
first axis; ``"__base__"`` = no adapter) or ``model(x, adapter_ids=ids)``
(integers; id k is ``lorac.adapter_names(model)[k]``, the adapters in the
order they were added; -1 = no adapter).  ``Module.__call__`` resolves the
names once, puts the per-row ids in thread-local storage for the duration of
this one forward, and every LoRA layer reached by it runs the mixed-batch C
kernel (base GEMM once, then rows grouped per adapter).  The rows of an input
of any leading shape follow its first axis (x (B, T, in): ids (B,)).  A layer
lacking a row's adapter gives that row its base output.  Inference only:
training mode, merged adapters, unknown names / ids or a wrong length raise
before anything runs.  The call overrides ``set_adapter`` and
``disable_adapters`` for its rows.  Thread-safe: other threads' ordinary
forwards through the same layers are unaffected.
"""

import math
from collections import OrderedDict
from contextlib import ExitStack, contextmanager

import numpy as np

from . import checkpoint
from ._task_merge import PRUNING, SIGN_METHODS, merge_task_tensors
from ._arrays import as_generator, non_negative_int, probability, real_number
from .layers.adapters import BASE, DEFAULT, AdapterConfig, check_new_name, mixed_batch, names_list
from .layers._lora_init import BASE_CHANGING, check_init
from .layers._threading import forget_thread_state
from .layers.base import LoRALayer
from .layers.tokens import TrainableTokensEmbedding
from .module import IncompatibleKeys, Module, StateDictKeyError
from .utils import lora_state_dict

__all__ = ["adapter_names", "add_adapter", "set_adapter", "delete_adapter", "disable_adapters",
           "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "add_weighted_adapter",
           "load_adapter", "save_adapter"]

COMBINATIONS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_ties", "dare_ties_svd", "dare_linear",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")


# -- finding layers ------------------------------------------------------------
def _refuse_dora(layer, path, func, what):
    if layer.use_dora:
        raise ValueError(f"{func}: layer {path!r} is a {type(layer).__name__}, which holds one adapter; {what} is for "
                         "plain LoRA layers")



def adapter_layers(model):
    """[(path, layer)] of the LoRA layers of `model` that hold named adapters
    (lorac.Linear, Embedding, MergedLinear), `model` itself included ("")."""
    if not isinstance(model, Module):
        raise TypeError(f"expected a lorac.Module, got {type(model).__name__}")
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, LoRALayer) and m._named_adapters]


def adapter_names(model):
    """The adapter names of `model` in the order they were added (first seen
    over its layers): ``adapter_ids`` of a mixed batch index this tuple."""
    seen = OrderedDict()
    for _, layer in adapter_layers(model):
        for name in layer.adapter_names:
            seen.setdefault(name, None)
    return tuple(seen)


def _require_known(model, names, func):
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise ValueError(f"{func}: the model has no adapter {name!r}; it has {list(known)}")


# -- adding, choosing, deleting ---------------------------------------------------
def add_adapter(model, name, r, lora_alpha=1, lora_dropout=0.0, use_rslora=False, init="kaiming",
                target_modules=None, rng=None, init_std=None, *, exclude_modules=None, rank_pattern=None,
                alpha_pattern=None, layers_to_transform=None, layers_pattern=None, lora_bias=False):
    """Add adapter `name` (rank r, its own alpha / dropout / rsLoRA) to LoRA layers of `model`.

    target_modules: None -- every LoRA layer that already holds an adapter
    (the layers adapted so far) --, or PEFT's rule (a regex on the whole
    module path, or a list of names matching a path or its last components,
    or "all-linear": every Linear / MergedLinear layer), which may also pick
    plain layers (r = 0): their weight is then frozen.
    exclude_modules, rank_pattern, alpha_pattern, layers_to_transform,
    layers_pattern: PEFT's LoraConfig fields, as ``lorac.inject_lora``
    takes them (the last two need target_modules).
    Embedding layers get no dropout.  init, init_std, rng, lora_bias (PEFT's; every chosen
    layer must be a Linear with a bias): see ``Linear.add_adapter``.
    The adapter is not active until ``set_adapter``.  Everything is checked
    before any layer changes.  Returns the model."""
    check_new_name(name)
    r = non_negative_int(r, "r")
    lora_alpha = real_number(lora_alpha, "lora_alpha")
    lora_dropout = probability(lora_dropout, "lora_dropout")
    if r == 0:
        raise ValueError("add_adapter: r must be >= 1, got 0")
    if name == DEFAULT:
        raise ValueError(f"add_adapter: {DEFAULT!r} is the layers' constructor adapter; use another name "
                         "(or lorac.inject_lora for plain layers)")
    from .peft.select import compile_exclusion, compile_selector, expand_all_linear, per_layer_settings
    layers = adapter_layers(model)
    linear = [p for p, m in layers if p and m._adapter_geometry()[3] == "linear"]
    target_modules = expand_all_linear(target_modules, linear, "add_adapter", layers_to_transform, layers_pattern)
    if target_modules is None:
        if layers_to_transform is not None or layers_pattern:
            raise ValueError("add_adapter: layers_to_transform / layers_pattern need target_modules")
        excluded = compile_exclusion(exclude_modules)
        chosen = [(p, m) for p, m in layers if m.adapter_names and not excluded(p)]
        if not chosen:
            after = "" if exclude_modules is None else " (after exclude_modules)"
            raise ValueError(f"add_adapter: no LoRA layer of the model holds an adapter yet{after}; "
                             "give target_modules")
    else:
        selected = compile_selector(target_modules, exclude_modules, layers_to_transform, layers_pattern)
        chosen = [(p, m) for p, m in layers if p and selected(p) and m._adapter_capable()]
        if not chosen:
            raise ValueError(f"add_adapter: target_modules {target_modules!r} matched no LoRA layer; the "
                             f"model's are {[p for p, _ in layers][:20]}")
    settings = per_layer_settings([p for p, _ in chosen], r, lora_alpha, rank_pattern, alpha_pattern, "add_adapter")
    spec = check_init(init, init_std, "add_adapter")
    for path, layer in chosen:
        _refuse_dora(layer, path, "add_adapter", "adding a named adapter")
        if name in layer.adapter_names:
            raise ValueError(f"add_adapter: layer {path!r} already has an adapter {name!r}")
        if spec.name in BASE_CHANGING:
            layer._check_base_change_allowed(spec, f"add_adapter: layer {path!r}", others=layer.adapter_names)
        if lora_bias:
            layer._check_lora_bias_allowed(f"add_adapter: layer {path!r}", spec)
    gen = as_generator(rng) if rng is not None else None
    for (_, layer), (layer_r, layer_alpha) in zip(chosen, settings):
        dropout = 0.0 if layer._adapter_geometry()[3] == "embedding" else lora_dropout
        layer.add_adapter(name, layer_r, layer_alpha, dropout, use_rslora, spec, gen, lora_bias=lora_bias)
    return model


def set_adapter(model, adapter_names, inference_mode=False):
    """Make `adapter_names` (a name or a list: summed) the active adapters of
    every LoRA layer; a layer lacking some of them uses those it has.  As
    PEFT's, the active adapters train (unless ``inference_mode``) and the
    others are frozen."""
    names = names_list(adapter_names)
    _require_known(model, names, "set_adapter")
    if not isinstance(inference_mode, bool):
        raise TypeError(f"set_adapter: inference_mode must be a bool, got {type(inference_mode).__name__}")
    for _, layer in adapter_layers(model):
        layer.set_adapter([n for n in names if n in layer.adapter_names], inference_mode)
    return model


def delete_adapter(model, name):
    """Delete adapter `name` from every layer holding it (checked in all first:
    not "default", not active, not merged)."""
    _require_known(model, [name], "delete_adapter")
    holders = [(p, m) for p, m in adapter_layers(model) if name in m.adapter_names]
    for path, layer in holders:
        if name == DEFAULT or name in layer.active_adapters or name in layer.merged_adapters:
            try:
                layer.delete_adapter(name)  # raises the layer's explanation
            except ValueError as exc:
                raise ValueError(f"delete_adapter: layer {path!r}: {exc}") from None
    for _, layer in holders:
        layer.delete_adapter(name)
    return model


@contextmanager
def disable_adapters(model):
    """Context manager: every LoRA layer computes its base output (see
    ``Linear.disable_adapters`` for merged layers), and trainable token rows
    give way to the base rows."""
    with ExitStack() as stack:
        for _, layer in adapter_layers(model) + token_layers(model):
            stack.enter_context(layer.disable_adapters())
        yield model


def token_layers(model):
    """[(path, layer)] of the model's trainable-token layers (layers/tokens.py)."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, TrainableTokensEmbedding)]


# -- merging ------------------------------------------------------------------------
def merge_adapter(model, names=None, *, adapter_names=None, safe_merge=False):
    """Merge the named adapters (default: each layer's active ones) into the base weights;
    ``adapter_names`` and ``safe_merge`` as for merge_and_unload (PEFT's keywords)."""
    for _, layer, todo in _merge_plans(model, names, adapter_names, safe_merge, "merge_adapter")[1]:
        layer.merge(todo)
    return model


def unmerge_adapter(model):
    """Take every merged adapter out of the base weights."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model, safe_merge=False, names=None, *, adapter_names=None, progressbar=False):
    """Merge adapters into the base weights and return the plain model.

    names (or PEFT's keyword ``adapter_names``): the adapters to merge
    (default: each layer's active ones); those already merged stay merged.
    progressbar: a tqdm bar over the layers, as PEFT's.  Every LoRA layer is then replaced by the
    layer the constructor gives with r = 0 (trainable weight, no lora_*
    parameters) holding the merged weight, in place in its parent; the model
    is returned (the new layer when `model` itself is a LoRA layer).

    safe_merge: first compute every layer's merged weight on a copy and raise
    ValueError if any holds NaN or inf, before any base weight is touched.
    MoLoRALinear layers (input-dependent gates: nothing to merge) stay as they are.
    Trainable token rows are written into their embedding (safe_merge checks them too), which
    becomes a plain lorac.Embedding."""
    layers, plans = _merge_plans(model, names, adapter_names, safe_merge, "merge_and_unload")
    tokens = token_layers(model)
    if safe_merge:
        for path, layer in tokens:
            if not np.isfinite(layer.trainable_tokens_delta.data).all():
                raise ValueError(f"merge_and_unload(safe_merge=True): the trainable token rows of {path!r} hold "
                                 "NaN or inf; no weight was changed")
    from tqdm import tqdm
    for _, layer, todo in tqdm(plans, desc="Unloading and merging model", disable=not progressbar):
        if todo:
            layer.merge(todo)
    return _replace_modules(model, [(path, _plain_layer(layer)) for path, layer in layers]
                            + [(path, layer.plain(merge=True)) for path, layer in tokens])


def _merge_plans(model, names, adapter_names, safe_merge, func):
    """(adapter layers, [(path, layer, adapters to merge)]), everything checked: the names
    (``adapter_names`` is PEFT's keyword for ``names``), no layer inside disable_adapters(),
    and with safe_merge every merged weight and bias finite (computed on copies)."""
    if adapter_names is not None:
        if names is not None:
            raise TypeError(f"{func}: give names or adapter_names (PEFT's name for it), not both")
        names = adapter_names
    if names is not None:
        names = names_list(names, "names")
        _require_known(model, names, func)
    layers = adapter_layers(model)
    plans = []
    for path, layer in layers:
        if layer._adapters_disabled:
            raise RuntimeError(f"{func}: layer {path!r} is inside disable_adapters()")
        wanted = layer.active_adapters if names is None else [n for n in names if n in layer.adapter_names]
        plans.append((path, layer, tuple(n for n in wanted if n not in layer.merged_adapters)))
    if safe_merge:
        for path, layer, todo in plans:
            weight = layer.weight.data.copy()
            for name in todo:
                layer._apply_adapter_delta(weight, name, +1)
            bias = layer._parameters.get("bias")
            if bias is not None:
                bias = bias.data.copy()
                for name in todo:
                    layer._apply_bias_delta(name, +1, bias)
            if not np.isfinite(weight).all() or (bias is not None and not np.isfinite(bias).all()):
                raise ValueError(f"{func}(safe_merge=True): merging {list(todo)} into layer {path!r} "
                                 "gives non-finite weights (NaN or inf); no weight was changed")
    return layers, plans


def unload(model):
    """Remove every adapter without merging: unmerge, then replace each LoRA
    layer by the constructor's r = 0 layer holding the base weight (as
    merge_and_unload).  Returns the model (or the new layer)."""
    layers = adapter_layers(model)
    for path, layer in layers:
        if layer._adapters_disabled:
            raise RuntimeError(f"unload: layer {path!r} is inside disable_adapters()")
    for _, layer in layers:
        layer.unmerge()
    return _replace_modules(model, [(path, _plain_layer(layer)) for path, layer in layers]
                            + [(path, layer.plain(merge=False)) for path, layer in token_layers(model)])


def _replace_modules(model, replacements):
    """Put each (path, new module) of ``replacements`` in its parent's place; returns the root
    (the new module when the path is "": the model itself was replaced)."""
    modules = dict(model.named_modules())
    root = model
    for path, new in replacements:
        if not path:
            root = new
            continue
        parent_path, _, child = path.rpartition(".")
        modules[parent_path].add_module(child, new)
    return root


def _plain_layer(layer):
    """The layer the constructor gives with r = 0, holding `layer`'s (merged)
    weight and bias Parameters (no copy); `layer` is left as it is."""
    new = layer._copy_sharing_contents(((k, v) for k, v in layer._parameters.items() if not k.startswith("lora_")),
                                       layer._unloaded_class())
    new.__dict__.pop("_dora_merge", None)
    forget_thread_state(new)
    new._init_lora(0, 1, 0.0, layer.merge_weights, False)
    new.weight.requires_grad = True
    new.train(layer.training)  # r = 0: eval() only sets the merged flag
    return new


# -- weighted combinations ---------------------------------------------------------------
def add_weighted_adapter(model, names, weights, new_name, combination="cat", svd_rank=None, density=None,
                         majority_sign_method="total", rng=None, svd_clamp=None, *, combination_type=None,
                         svd_full_matrices=True, svd_driver=None):
    """Add adapter `new_name` combining adapters `names` with `weights`.

    In every layer holding some of them the target is the weighted delta
    sum_i w_i s_i B_i A_i over the adapters it holds (a missing adapter counts
    as zero there, as in a forward, and as PEFT does), each adapter's scaling
    s_i applied once (PEFT #3111 applies it twice for svd).
    The new adapter has scaling 1 (lora_alpha = its rank, no rsLoRA), the
    first adapter's dropout, and is not active until set_adapter.

    combination:
      "cat"    exact: A = [A_1; ...; A_n], B = [w_1 s_1 B_1, ..., w_n s_n B_n],
               rank sum r_i.
      "svd"    the best rank-k approximation of the exact weighted delta
               (k = svd_rank, default max r_i; exact when k >= sum r_i), from
               QR factors of B and A^T and an SVD of a small matrix: the
               (out, in) delta is never formed.  B = U_k S_k, A = V_k^T.
      "linear" equal ranks only: A = sum c_i A_i, B = sum sign(w_i s_i) c_i B_i
               with c_i = sqrt(|w_i s_i|).  Approximate: B A holds the wanted
               w_i s_i B_i A_i plus cross terms c_i c_j B_i A_j (i != j)
               (PEFT #3004); exact for a single adapter.
      "ties", "dare_ties", "dare_linear", "magnitude_prune"
               PEFT's task-vector merges (lorac/_task_merge.py) of the A's
               with weights sign(w_i s_i) c_i and of the B's with weights
               c_i, as PEFT does; equal ranks only.  ``density`` (required,
               in [0, 1], > 0 for DARE) is the fraction of entries each
               pruning keeps; ``majority_sign_method`` ("total" or
               "frequency") elects TIES's signs; ``rng`` (seed or Generator)
               draws DARE's masks.  Approximate, as "linear".
      "<one of those>_svd"
               the same merge of the deltas s_i B_i A_i (each formed, (og,
               in)) with weights w_i, then the best rank-k factors of the
               result (k as for "svd"): B = U_k S_k, A = V_k^T.
    combination_type: PEFT's keyword for ``combination`` (whose default,
    unlike PEFT's "svd", is the exact "cat").
    svd_clamp (the svd combinations; None: off), PEFT's: with hi the
    svd_clamp-quantile (in [0, 1]) of the entries of both factors together,
    clamp every entry of B and A to [-hi, hi].
    svd_full_matrices / svd_driver: PEFT's keywords for torch.linalg.svd.
    The truncated factors do not depend on full_matrices (a bool is
    accepted); a driver picks a cuSOLVER routine on CUDA, so lorac (CPU)
    takes None only, as torch does on the CPU.
    With a single name, the pruning kinds fall back to "linear", as PEFT's
    do.  MergedLinear layers combine group by group (a merge prunes the
    stack of a layer's groups as one tensor).  Checked before any change.
    Returns the model."""
    names = names_list(names, "names")
    if not names:
        raise ValueError("add_weighted_adapter: names must name at least one adapter")
    if combination_type is not None:
        if combination != "cat":
            raise TypeError("add_weighted_adapter: give combination or combination_type (PEFT's name for it), "
                            "not both")
        combination = combination_type
    try:
        weights = [real_number(w, "weights[i]") for w in weights]
    except TypeError:
        raise TypeError(f"add_weighted_adapter: weights must be a list of real numbers, got "
                        f"{type(weights).__name__}") from None
    if len(weights) != len(names):
        raise ValueError(f"add_weighted_adapter: {len(names)} names but {len(weights)} weights")
    check_new_name(new_name, "new_name")
    if combination not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination must be one of {COMBINATIONS}, got {combination!r}")
    if svd_rank is not None:
        svd_rank = non_negative_int(svd_rank, "svd_rank")
        if svd_rank == 0:
            raise ValueError("add_weighted_adapter: svd_rank must be >= 1, got 0")
    svd_clamp = clamp_option(svd_clamp, combination)
    if not isinstance(svd_full_matrices, (bool, np.bool_)):
        raise TypeError(f"add_weighted_adapter: svd_full_matrices must be True or False, got {svd_full_matrices!r}")
    if svd_driver is not None:
        raise ValueError(f"add_weighted_adapter: svd_driver={svd_driver!r} selects a cuSOLVER routine (CUDA); lorac "
                         "runs on the CPU, where torch takes none either: leave it None")
    combination, merge = combination_plan(combination, len(names), density, majority_sign_method, rng)
    _require_known(model, names, "add_weighted_adapter")
    if new_name in adapter_names(model):
        raise ValueError(f"add_weighted_adapter: the model already has an adapter {new_name!r}")

    plans = []
    for path, layer in adapter_layers(model):
        held = [(n, w) for n, w in zip(names, weights) if n in layer.adapter_names]
        if not held:
            continue
        _refuse_dora(layer, path, "add_weighted_adapter", "combining its adapter")
        biased = [n for n, _ in held if layer.lora_bias_parameter(n) is not None]
        if biased:
            raise ValueError(f"add_weighted_adapter: layer {path!r}: adapter {biased[0]!r} has a lora_bias; the "
                             "combinations take lora_A / lora_B only and would drop it")
        a, b = combined_factors(layer, [n for n, _ in held], [w for _, w in held], combination, svd_rank, path,
                                merge, svd_clamp)
        dropout = layer.adapter_config(held[0][0]).lora_dropout
        plans.append((layer, a, b, dropout))
    for layer, a, b, dropout in plans:
        rank = a.shape[0] // layer._adapter_geometry()[0]
        layer.add_adapter(new_name, rank, lora_alpha=rank, lora_dropout=dropout)
        layer._replace_adapter(new_name, a, b)
    return model


def combination_plan(combination, count, density=None, majority_sign_method="total", rng=None,
                     func="add_weighted_adapter"):
    """(combination, merge) for combining ``count`` adapters: the pruning kinds fall back to
    "linear" for a single adapter, as PEFT's do; merge is _merge_options' tuple or None.
    ValueError / TypeError for options that do not fit (add_weighted_adapter, lorac combine)."""
    merge = _merge_options(combination, density, majority_sign_method, rng, func)
    if merge is not None and count == 1:
        return "linear", None
    return combination, merge


def clamp_option(svd_clamp, combination, func="add_weighted_adapter"):
    """svd_clamp checked: None, or a quantile in [0, 1] with an svd combination."""
    if svd_clamp is None:
        return None
    svd_clamp = real_number(svd_clamp, "svd_clamp")
    if not 0.0 <= svd_clamp <= 1.0:
        raise ValueError(f"{func}: svd_clamp must be a quantile in [0, 1], got {svd_clamp}")
    if not combination.endswith("svd"):
        raise ValueError(f"{func}: svd_clamp applies to the svd combinations ('svd' and the '_svd' forms), "
                         f"not {combination!r}")
    return svd_clamp


def _merge_options(combination, density, majority_sign_method, rng, func):
    """(method, density, sign method, Generator) of a pruning combination, None for the others;
    ValueError / TypeError for options that do not fit."""
    method = combination[:-4] if combination.endswith("_svd") else combination
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"{func}: majority_sign_method must be one of {SIGN_METHODS}, got "
                         f"{majority_sign_method!r}")
    if method not in PRUNING:
        if density is not None:
            raise ValueError(f"{func}: density applies to the pruning combinations "
                             f"({', '.join(repr(c) for c in COMBINATIONS[3:])}), not {combination!r}")
        return None
    if density is None:
        raise ValueError(f"{func}(combination={combination!r}) needs density, the fraction of "
                         "entries each pruning keeps (in [0, 1])")
    density = real_number(density, "density")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"{func}: density must be in [0, 1], got {density}")
    if PRUNING[method] == "random" and density == 0:
        raise ValueError(f"{func}(combination={combination!r}): density must be > 0 (DARE "
                         "rescales the kept entries by 1 / density)")
    return method, density, majority_sign_method, as_generator(rng)


def combined_factors(layer, names, weights, combination, svd_rank, path, merge=None, clamp=None):
    """(A (groups * k, in), B (groups * og, k)) in float64 of the combined adapter;
    ``merge``: _merge_options' tuple for the pruning combinations; ``clamp``:
    clamp_option's quantile for the svd ones (each group clamped alone).  ``layer``
    is read through _adapter_geometry(), adapter_parameters(name) and
    _scaling_of(name) only (lorac combine passes file adapters that way)."""
    groups, fan_in, og, _ = layer._adapter_geometry()
    As, Bs, coefs = [], [], []
    for name, w in zip(names, weights):
        A, B = layer.adapter_parameters(name)
        As.append(A.data.astype(np.float64).reshape(groups, -1, fan_in))   # (E, r_i, in)
        Bs.append(B.data.astype(np.float64).reshape(groups, og, -1))       # (E, og, r_i)
        coefs.append(w * layer._scaling_of(name))
    if combination == "cat":
        a = np.concatenate(As, axis=1)
        b = np.concatenate([c * B for c, B in zip(coefs, Bs)], axis=2)
    elif combination == "linear" or (merge is not None and not combination.endswith("_svd")):
        ranks = sorted({A.shape[1] for A in As})
        if len(ranks) != 1:
            raise ValueError(f"add_weighted_adapter(combination={combination!r}): layer {path!r} has adapters of "
                             f"ranks {[A.shape[1] for A in As]}; {combination!r} needs equal ranks (use 'cat' "
                             "or 'svd')")
        roots = [math.sqrt(abs(c)) for c in coefs]
        if merge is None:
            a = sum(root * A for root, A in zip(roots, As))
            b = sum(math.copysign(root, c) * B for root, c, B in zip(roots, coefs, Bs))
        else:   # PEFT's signs: on the A's
            method, density, sign_method, rng = merge
            a = merge_task_tensors(method, As, [math.copysign(root, c) for root, c in zip(roots, coefs)],
                                   density, sign_method, rng)
            b = merge_task_tensors(method, Bs, roots, density, sign_method, rng)
    elif merge is not None:   # "<merge>_svd": merge the deltas, then factor
        method, density, sign_method, rng = merge
        k = svd_rank if svd_rank is not None else max(A.shape[1] for A in As)
        deltas = [layer._scaling_of(n) * np.matmul(B, A) for n, A, B in zip(names, As, Bs)]   # (E, og, in)
        delta = merge_task_tensors(method, deltas, weights, density, sign_method, rng)
        a = np.zeros((groups, k, fan_in))
        b = np.zeros((groups, og, k))
        for e in range(groups):
            b[e], a[e] = _truncated_factors(delta[e], k, clamp)
    else:
        k = svd_rank if svd_rank is not None else max(A.shape[1] for A in As)
        a_cat = np.concatenate(As, axis=1)
        b_cat = np.concatenate([c * B for c, B in zip(coefs, Bs)], axis=2)
        a = np.zeros((groups, k, fan_in))
        b = np.zeros((groups, og, k))
        for e in range(groups):
            b[e], a[e] = _truncated_product(b_cat[e], a_cat[e], k, clamp)
    return a.reshape(-1, fan_in), b.reshape(groups * og, -1)


def _truncated_factors(delta, k, clamp=None):
    """Best rank-k factors (B_k = U_k S_k (m, k), A_k = V_k^T (k, n)) of delta (m, n),
    clamped by clamp_factors when ``clamp`` is a quantile."""
    m, n = delta.shape
    out_b, out_a = np.zeros((m, k)), np.zeros((k, n))
    if min(m, n) == 0:
        return out_b, out_a
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    keep = min(k, s.size)
    out_b[:, :keep], out_a[:keep] = clamp_factors(u[:, :keep] * s[:keep], vt[:keep], clamp)
    return out_b, out_a


def _truncated_product(b, a, k, clamp=None):
    """Best rank-k factors (B_k (m, k), A_k (k, n)) of the product b (m, R) @ a (R, n):
    b = Qb Rb, a^T = Qa Ra, b a = Qb (Rb Ra^T) Qa^T, an SVD of the R x R middle;
    clamped as _truncated_factors."""
    m, n = b.shape[0], a.shape[1]
    out_b, out_a = np.zeros((m, k)), np.zeros((k, n))
    if min(m, n, a.shape[0]) == 0:
        return out_b, out_a
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    keep = min(k, s.size)
    out_b[:, :keep], out_a[:keep] = clamp_factors((qb @ u[:, :keep]) * s[:keep], vt[:keep] @ qa.T, clamp)
    return out_b, out_a


def clamp_factors(b, a, clamp):
    """(b, a) with every entry clamped to [-hi, hi], hi the ``clamp``-quantile (linear
    interpolation) of all entries of b and a together, as PEFT's svd_clamp; unchanged for
    None.  A negative hi (a low quantile) sets every entry to hi, as torch.clamp does."""
    if clamp is None or b.size + a.size == 0:
        return b, a
    hi = float(np.quantile(np.concatenate([b.ravel(), a.ravel()]), clamp))
    return np.minimum(np.maximum(b, -hi), hi), np.minimum(np.maximum(a, -hi), hi)


# -- files -----------------------------------------------------------------------------
def save_adapter(model, path, adapter_name=DEFAULT):
    """Write adapter `adapter_name` alone as a loralib-compatible file:
    ``lora_state_dict(model, adapter=adapter_name)`` (keys ``<layer>.lora_A``,
    ``<layer>.lora_B``) with safetensors metadata recording each layer's
    lora_alpha / use_rslora (lorac.peft.adapter's format; none for .npz), so
    ``load_adapter`` restores the scaling."""
    from .peft.adapter import Adapter, LayerAdapter
    state = lora_state_dict(model, adapter=adapter_name)
    records = Adapter()
    for lpath, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names:
            A, B = layer.adapter_parameters(adapter_name)
            config = layer.adapter_config(adapter_name)
            kind = layer._adapter_geometry()[3]
            records.layers[lpath] = LayerAdapter(A.data, B.data, kind=kind, lora_alpha=config.lora_alpha,
                                                 use_rslora=config.use_rslora,
                                                 fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)))
    npz = str(path).lower().endswith(".npz")
    checkpoint.save(state, path, None if npz else records.metadata())


def load_adapter(model, path, adapter_name, lora_alpha=None, use_rslora=None, strict=True):
    """Load a loralib-style adapter file into adapter `adapter_name` of `model`.

    The file holds ``<layer>.lora_A`` / ``<layer>.lora_B`` and maybe PEFT's
    ``<layer>.lora_bias``, which the adapter then has (and loses without
    one: the file's adapter replaces it whole) (what
    ``save_adapter`` or ``lora_state_dict(model, adapter=...)`` write, or a
    loralib checkpoint); ``path`` may also be a PEFT adapter folder (PEFT's
    ``load_adapter(folder, adapter_name)``), its ranks, alphas and rsLoRA
    taken from adapter_config.json.  Per layer: if it holds the adapter
    with the same shapes, the arrays are copied in place (hot swap: no reallocation; a
    merged adapter is unmerged with its old values and merged with the new
    ones, an unmerged one leaves the base weight alone); another rank gets new
    arrays; a layer without the adapter gets it (not active until
    set_adapter).

    lora_alpha / use_rslora: None takes the file's metadata, else the
    adapter's current values; a new adapter with no alpha anywhere is an error.
    strict: file keys for no LoRA layer (``unexpected_keys``) or layers
    holding the adapter that the file does not cover (``missing_keys``) raise
    StateDictKeyError; strict=False loads what matches.  Everything is checked
    before the model changes.  Returns IncompatibleKeys(missing, unexpected)."""
    from .peft.adapter import _parse_number
    if not isinstance(adapter_name, str):
        raise TypeError(f"load_adapter: adapter_name must be a str, got {type(adapter_name).__name__}")
    if adapter_name != DEFAULT:
        check_new_name(adapter_name, "adapter_name")
    if lora_alpha is not None:
        lora_alpha = real_number(lora_alpha, "lora_alpha")
    if use_rslora is not None and not isinstance(use_rslora, bool):
        raise TypeError(f"load_adapter: use_rslora must be a bool or None, got {type(use_rslora).__name__}")
    state, records, g_alpha, g_rslora = _adapter_file(path)

    layers = dict(adapter_layers(model))
    halves, biases, unexpected = {}, {}, []
    for key, value in state.items():
        lpath, _, param = key.rpartition(".")
        if param == "lora_magnitude_vector":
            raise ValueError(f"load_adapter: {path}: {key!r} is a DoRA magnitude: the file holds a DoRA adapter, "
                             "which named adapters cannot take; load it with model.load_state_dict(..., "
                             "strict=False) into DoRA layers (lorac.inject_lora(..., use_dora=True))")
        if param == "lora_bias" and lpath in layers:
            biases[lpath] = (key, np.asarray(value))
        elif param in ("lora_A", "lora_B") and lpath in layers:
            halves.setdefault(lpath, {})[param] = (key, np.asarray(value))
        else:
            unexpected.append(key)
    plans = []
    for lpath, pair in halves.items():
        layer = layers[lpath]
        _refuse_dora(layer, lpath, "load_adapter", "hot-swapping lora_A / lora_B without the magnitude")
        if len(pair) != 2:
            (key, _), = pair.values()
            raise ValueError(f"load_adapter: {path}: {key!r} has no matching lora_A/lora_B partner")
        (a_key, a), (b_key, b) = pair["lora_A"], pair["lora_B"]
        groups, fan_in, og, kind = layer._adapter_geometry()
        for key, arr in ((a_key, a), (b_key, b)):
            if arr.ndim != 2 or arr.dtype.kind != "f":
                raise ValueError(f"load_adapter: {path}: {key!r} must be a 2-D float array, got shape "
                                 f"{arr.shape} dtype {arr.dtype}")
        r = a.shape[0] // groups
        if r == 0 or a.shape != (groups * r, fan_in) or b.shape != (groups * og, r):
            raise ValueError(f"load_adapter: {path}: layer {lpath!r} ({type(layer).__name__}) needs lora_A "
                             f"(r * {groups}, {fan_in}) and lora_B ({groups * og}, r) with r >= 1; found "
                             f"{a.shape} and {b.shape}")
        has = adapter_name in layer.adapter_names
        if adapter_name == DEFAULT and not has:
            raise ValueError(f"load_adapter: layer {lpath!r} has no {DEFAULT!r} adapter (it was built with r = 0); "
                             "load into a named adapter, or lorac.inject_lora first")
        record = records.get(lpath, {})
        current = layer.adapter_config(adapter_name) if has else None
        alpha = lora_alpha if lora_alpha is not None else record.get("lora_alpha", g_alpha)
        alpha = current.lora_alpha if alpha is None and current is not None else alpha
        if alpha is None:
            raise ValueError(f"load_adapter: {path} does not record lora_alpha of layer {lpath!r} and the layer "
                             f"has no adapter {adapter_name!r} yet; give lora_alpha=")
        alpha = _parse_number(alpha, f"lora_layers[{lpath!r}].lora_alpha", path)
        rslora = use_rslora if use_rslora is not None else record.get("use_rslora", g_rslora)
        rslora = (current.use_rslora if current is not None else False) if rslora is None else bool(rslora)
        dropout = current.lora_dropout if current is not None else 0.0
        bias = _checked_lora_bias(layer, biases.pop(lpath, None), path)
        plans.append((layer, has, AdapterConfig(r, alpha, dropout, rslora), a, b, bias, record.get("mica")))
    if biases:
        key = next(iter(biases.values()))[0]
        raise ValueError(f"load_adapter: {path}: {key!r} has no lora_A / lora_B of its layer in the file")
    covered = {id(layer) for layer, *_ in plans}
    missing = [f"{p}.{n}" if p else n for p, layer in layers.items()
               if adapter_name in layer.adapter_names and id(layer) not in covered for n in ("lora_A", "lora_B")]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(repr(k) for k in missing))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(repr(k) for k in unexpected))
        raise StateDictKeyError(f"load_adapter({adapter_name!r}) from {path}: " + "; ".join(parts),
                                missing, unexpected)
    for layer, has, config, a, b, bias, mica in plans:
        if not has:
            layer.add_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora)
        layer._replace_adapter(adapter_name, a, b, config, lora_bias=bias)
        if mica is not None:   # a PEFT folder says whether lora_B trains (MiCA); a lorac file keeps the rule
            layer._follow_init(adapter_name, check_init("mica" if mica else "kaiming"))
    return IncompatibleKeys(missing, unexpected)


def _checked_lora_bias(layer, found, path):
    """The file's lora_bias (key, array) for ``layer`` checked: its array, or None without one."""
    if found is None:
        return None
    key, value = found
    layer._check_lora_bias_allowed(f"load_adapter: {path}: {key!r}")
    out = layer._adapter_geometry()[2]
    if value.shape != (out,) or value.dtype.kind != "f":
        raise ValueError(f"load_adapter: {path}: {key!r} must be a 1-D float array of the layer's {out} outputs, "
                         f"got shape {value.shape} dtype {value.dtype}")
    return value


def _adapter_file(path):
    """(state, per-layer records, file-wide lora_alpha, use_rslora) of a lorac / loralib adapter
    file (its metadata: lorac.peft.adapter's format) or of a PEFT adapter folder."""
    from .peft.adapter import _layer_records, _parse_bool, _parse_number
    from .peft.folder import is_peft_folder, read_peft_folder
    from .peft.keys import lorac_key
    if not is_peft_folder(path):
        meta = checkpoint.read_metadata(path)
        g_alpha = _parse_number(meta["lora_alpha"], "lora_alpha", path) if "lora_alpha" in meta else None
        g_rslora = _parse_bool(meta["use_rslora"], "use_rslora", path) if "use_rslora" in meta else None
        return checkpoint.load(path), _layer_records(meta, path), g_alpha, g_rslora
    adapter, _ = read_peft_folder(path)
    if adapter.tokens:
        raise ValueError(f"load_adapter: {path}: the folder also trains token rows of {sorted(adapter.tokens)} "
                         "(trainable_token_indices), which a named adapter cannot hold; load it with "
                         "lorac.load_peft_adapter")
    if adapter.extra:
        raise ValueError(f"load_adapter: {path}: the folder also holds {next(iter(adapter.extra))!r} (bias / "
                         "modules_to_save), which a named adapter cannot hold; load it with "
                         "lorac.load_peft_adapter")
    state, records = {}, {}
    for lpath, layer in adapter.layers.items():
        state[lorac_key(lpath, "lora_A")], state[lorac_key(lpath, "lora_B")] = layer.lora_A, layer.lora_B
        if layer.magnitude is not None:
            state[lorac_key(lpath, "lora_magnitude_vector")] = layer.magnitude
        if layer.lora_bias is not None:
            state[lorac_key(lpath, "lora_bias")] = layer.lora_bias
        records[lpath] = {"lora_alpha": layer.lora_alpha, "use_rslora": layer.use_rslora, "mica": layer.frozen_b}
    return state, records, None, None


# -- mixed batches ------------------------------------------------------------------------
def mixed_batch_call(model, args, kwargs):
    """``model(x, adapter_names=...)`` / ``model(x, adapter_ids=...)``: see the module doc."""
    names = kwargs.pop("adapter_names", None)
    ids = kwargs.pop("adapter_ids", None)
    func = f"{type(model).__name__}.__call__"
    if (names is None) == (ids is None):
        raise TypeError(f"{func}: give exactly one of adapter_names and adapter_ids")
    if not args:
        raise TypeError(f"{func}: a mixed batch needs the input as the first positional argument")
    for path, module in model.named_modules():
        if getattr(module, "_mixed_batch_unsupported", False):
            raise ValueError(f"{func}: mixed batches are not supported by {type(module).__name__} "
                             f"({path or 'the model'!r})")
    layers = adapter_layers(model)
    known = adapter_names(model)
    if names is not None:
        ids = _ids_from_names(names, known, func)
    else:
        ids = _checked_ids(ids, known, func)
    shape = np.shape(args[0])
    if len(shape) == 0 or shape[0] != ids.shape[0]:
        raise ValueError(f"{func}: {ids.shape[0]} adapter {'names' if names is not None else 'ids'} for an input "
                         f"of shape {tuple(shape)}; give one per row of the input's first axis")
    for path, layer in layers:
        if layer.training:
            name = path or type(layer).__name__
            raise RuntimeError(f"{func}: a mixed batch is for inference only, but layer {name!r} is in training "
                               "mode; call model.eval() first")
        if layer.merged_adapters:
            raise RuntimeError(f"{func}: layer {path or type(layer).__name__!r} has adapters "
                               f"{list(layer.merged_adapters)} merged into its weight; a mixed batch needs unmerged "
                               "adapters: call lorac.unmerge_adapter(model) (eval() merges when merge_weights=True)")
    tables = {}
    for _, layer in layers:
        local = {name: i for i, name in enumerate(layer.adapter_names)}
        tables[layer] = np.array([local.get(name, -1) for name in known] + [-1], dtype=np.intp)
    with mixed_batch(tables, ids):
        return model.forward(*args, **kwargs)


def _ids_from_names(names, known, func):
    if isinstance(names, str) or not hasattr(names, "__len__"):
        raise TypeError(f"{func}: adapter_names must be a list of str (one per row), got {type(names).__name__}")
    index = {name: i for i, name in enumerate(known)}
    index[BASE] = -1
    ids = np.empty(len(names), dtype=np.intp)
    for row, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{func}: adapter_names must be a list of str, got {type(name).__name__} at row {row}")
        if name not in index:
            raise ValueError(f"{func}: unknown adapter {name!r} at row {row}; the model has {list(known)} "
                             f"(or {BASE!r} for none)")
        ids[row] = index[name]
    return ids


def _checked_ids(ids, known, func):
    count = len(known)
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{func}: adapter_ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{func}: adapter_ids must be 1-D (one id per row), got shape {arr.shape}")
    bad = (arr < -1) | (arr >= count)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"{func}: adapter_ids must lie in [-1, {count}) (-1: no adapter; ids index the "
                         f"model's adapters {list(known)}), got {arr[row]} at row {row}")
    return arr.astype(np.intp)

"""EVA (Explained Variance Adaptation, Paischer et al. 2024): LoRA's lora_A
started from the principal directions of each layer's inputs, as PEFT's
``init_lora_weights="eva"``::

    config = lorac.LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights="eva",
                              eva_config=lorac.EvaConfig(rho=2.0))
    lorac.get_peft_model(model, config)            # lora_A kaiming, lora_B zero until ...
    lorac.initialize_lora_eva_weights(model, batches)

What it computes (PEFT 0.21's ``peft.tuners.lora.eva``, step for step):

- Every target Linear layer's inputs (a forward hook; the rows of x over its
  leading dimensions, or the rows a language-model mask selects) feed an
  incremental PCA (scikit-learn's ``IncrementalPCA``) of up to
  ``round(r * rho)`` components, r the layer's rank.  Layers that receive
  the same input in the first batch (q / k / v) share one PCA.
- The batches are cycled until, for each layer, the components its current
  rank needs have converged: the cosine similarity between consecutive
  steps is >= tau.
- The ranks are redistributed: the sum of the layers' ranks is a budget, and
  the largest explained-variance ratios over all layers take it (a layer
  gets at most round(r * rho)); rho = 1 keeps every rank.
- lora_A becomes the top components (divided by the square root of their
  singular values with ``whiten``), lora_B zero: the adapter starts as a
  no-op.  A layer whose rank changes from r to k gets lora_alpha * k / r
  with ``adjust_scaling_factors`` (the scaling stays as it was); a layer
  given rank 0 loses its adapter (it becomes the r = 0 layer over its frozen
  base weight).  The model's config then records target_modules,
  rank_pattern and alpha_pattern, which ``save_peft_adapter`` writes.

Where lorac differs from PEFT: the PCA uses the exact SVD in float64 (PEFT
the randomized ``svd_lowrank`` in float32); at most ``max_passes`` passes over
the data (PEFT cycles until convergence, however long); a layer takes at
most in_features components (PEFT raises); an ``eva_state_dict`` naming a
layer that is not an adapted Linear one is an error (PEFT skips it);
``gather_distributed_inputs`` is accepted and changes nothing (lorac runs in
one process); with ``whiten``, each layer's components are divided once
(PEFT 0.21 divides a PCA shared by q / k / v in place once per sharing
layer), and a component of singular value 0 is left as it is.  Batches may
be arrays, (x, labels) pairs or dicts of keyword arguments (see
``default_forward``).
"""

import hashlib
import math
import numbers
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace

import numpy as np

from ..adapters import _plain_layer, disable_adapters
from ..layers import DoRALinear, LoRALayer
from ..layers.adapters import DEFAULT
from ..module import Module
from .select import compile_patterns, pattern_value
from .subconfig import sub_config
from .targets import build_layer, config_selector, layer_kind, parent_of, swap_layer


@dataclass
class EvaConfig:
    """PEFT's EvaConfig: rho (>= 1) bounds a layer's rank at round(r * rho);
    tau in [0, 1] is the cosine similarity at which a component has
    converged; use_label_mask / label_mask_value drop the positions whose
    labels equal label_mask_value from the PCA (dict batches); whiten divides
    each component by the square root of its singular value;
    adjust_scaling_factors keeps lora_alpha / r when a rank changes."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self):
        for name in ("rho", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise TypeError(f"EvaConfig: {name} must be a finite real number, got {value!r}")
        if self.rho < 1.0:
            raise ValueError(f"EvaConfig: rho must be >= 1.0, got {self.rho!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig: tau must be between 0.0 and 1.0, got {self.tau!r}")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"EvaConfig: {name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.label_mask_value, bool) or not isinstance(self.label_mask_value, numbers.Integral):
            raise TypeError(f"EvaConfig: label_mask_value must be an integer, got {self.label_mask_value!r}")


# -- what a batch gives the PCA -------------------------------------------------------
def default_forward(model, inputs):
    """Run one batch: ``model(**inputs)`` for a dict, ``model(inputs[0])`` for a
    tuple or list (x, labels, ...), ``model(inputs)`` otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(inputs[0])
    return model(inputs)


def prepare_model_inputs_fn_language_modeling(model_input, peft_config):
    """For a dict batch (input_ids, attention_mask, labels): the (k, 2)
    positions that count -- attention_mask set and, with use_label_mask,
    labels != label_mask_value -- as PEFT's function of this name.  None
    (every row counts) for a batch that is not a dict."""
    if not isinstance(model_input, Mapping):
        return None
    if "input_ids" not in model_input:
        raise ValueError("EVA: a dict batch needs 'input_ids' for the language-modelling mask (or pass "
                         "prepare_model_inputs_fn=None to use every row)")
    ids = np.asarray(model_input["input_ids"])
    mask = np.asarray(model_input.get("attention_mask", np.ones(ids.shape, bool))).astype(bool)
    eva = peft_config.eva_config or EvaConfig()
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (np.asarray(model_input["labels"]) != eva.label_mask_value)
    return np.argwhere(mask)


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name):
    """A layer's PCA rows: its input's rows at the positions ``model_input`` (from
    prepare_model_inputs_fn_language_modeling) lists, or all of them
    (flattened over the leading dimensions) when it is None."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    x = np.asarray(x)
    if model_input is None:
        return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
    positions = np.asarray(model_input)
    if positions.ndim != 2 or positions.shape[1] >= x.ndim:
        raise ValueError(f"EVA: layer {layer_name!r}: the mask positions have shape {positions.shape}, which does "
                         f"not index the leading dimensions of its input of shape {x.shape}")
    return x[tuple(positions.T)]


def _flatten_rows(layer_input, model_input, layer_name):
    """PEFT's default when prepare_layer_inputs_fn is None: the input's rows over its leading dimensions."""
    return prepare_layer_inputs_fn_language_modeling(layer_input, None, layer_name)


def _layer_rows(prepare, args, model_input, name, in_features):
    """What ``prepare`` gives for one forward of layer ``name``, checked: (rows, in_features) float64."""
    rows = prepare(args, model_input, name)
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != in_features:
        raise ValueError(f"EVA: layer {name!r}: prepare_layer_inputs_fn must return a 2-D array of shape "
                         f"(rows, {in_features}), got shape {rows.shape}")
    if rows.dtype.kind not in "fiu":
        raise TypeError(f"EVA: layer {name!r}: its inputs must be real numbers, got dtype {rows.dtype}")
    rows = rows.astype(np.float64)
    if not np.isfinite(rows).all():
        raise ValueError(f"EVA: layer {name!r}: its inputs hold NaN or infinite values")
    return rows


class _InputPCA:
    """A forward hook: the incremental PCA of one layer's inputs and which of its
    components have converged (cosine similarity with the previous step >= tau)."""

    def __init__(self, name, in_features, n_components, tau, prepare, pca_class):
        self.name, self.in_features, self.n_components, self.tau = name, in_features, n_components, tau
        self.prepare = prepare
        self.pca = pca_class(n_components=n_components, copy=False)
        self.converged = np.zeros(n_components, bool)
        self.fitted = False
        self.model_input = None

    def __call__(self, module, args, output):
        rows = _layer_rows(self.prepare, args, self.model_input, self.name, self.in_features)
        if rows.shape[0] < self.n_components:   # PEFT skips such a batch too
            return
        previous = self.pca.components_.copy() if self.fitted else None
        self.pca.partial_fit(rows)
        self.fitted = True
        if previous is not None:
            now = self.pca.components_
            norms = np.maximum(np.linalg.norm(now, axis=1) * np.linalg.norm(previous, axis=1), 1e-8)
            self.converged = np.einsum("ij,ij->i", now, previous) / norms >= self.tau


class _InputDigest:
    """A forward hook: a digest of the first input a layer sees (layers with equal inputs share a PCA)."""

    def __init__(self, name, in_features, prepare):
        self.name, self.in_features, self.prepare = name, in_features, prepare
        self.model_input = None
        self.digest = None

    def __call__(self, module, args, output):
        if self.digest is None:
            rows = _layer_rows(self.prepare, args, self.model_input, self.name, self.in_features)
            self.digest = (rows.shape, hashlib.sha256(rows.tobytes()).digest())


# -- get_eva_state_dict ------------------------------------------------------------------
def get_eva_state_dict(model, dataloader, peft_config=None, forward_fn=default_forward,
                       prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling, adapter_name=DEFAULT,
                       gather_distributed_inputs=True, show_progress_bar=True, max_passes=20):
    """{layer path: lora_A (k, in_features)} for each EVA target of ``model``
    (module docstring), k its redistributed rank (0 possible).

    The targets: the adapted Linear layers (lorac.Linear, DoRALinear) of a
    model from ``get_peft_model`` (their adapters are off during the
    passes), else the Linear layers ``peft_config.target_modules`` selects.
    peft_config: a lorac.LoraConfig; by default ``model.peft_config[adapter_name]``.
    dataloader: the batches (re-iterable, or an iterator, which is read into
    a list).  forward_fn(model, batch) runs one batch.
    prepare_model_inputs_fn(batch, peft_config) -> model_input, given to
    prepare_layer_inputs_fn(layer_args, model_input, layer_name) -> (rows,
    in_features) array; either None: the batch itself / the input's rows.
    prepare_layer_inputs_fn may also be a dict {layer path: function}.
    The model runs in eval mode (its mode comes back afterwards).
    RuntimeError if some layer has not converged after max_passes passes.
    """
    func = "get_eva_state_dict"
    if not isinstance(model, Module):
        raise TypeError(f"{func}: model must be a lorac.Module, got {type(model).__name__}")
    config = _config(model, peft_config, adapter_name, func)
    eva = config.eva_config or EvaConfig()
    pca_class = _incremental_pca(func)
    batches = _batches(dataloader, func)
    if isinstance(max_passes, bool) or not isinstance(max_passes, numbers.Integral) or max_passes < 1:
        raise ValueError(f"{func}: max_passes must be an integer >= 1, got {max_passes!r}")
    if forward_fn is None or not callable(forward_fn):
        raise TypeError(f"{func}: forward_fn must be a function (model, batch), got {forward_fn!r}")
    targets = _targets(model, config, hasattr(model, "peft_config"), func)
    prepares = _layer_input_fns(prepare_layer_inputs_fn, targets, func)
    ranks = _target_ranks(targets, config)
    rho = eva.rho
    if rho > 1000:   # PEFT's cap for unusually high rho
        rho = min(rho, max(max(p.data.shape) for p in model.parameters()) // config.r)
    max_components = {path: min(round(ranks[path] * rho), layer.in_features) for path, layer in targets}
    budget = sum(ranks.values())

    def model_input(batch):
        return batch if prepare_model_inputs_fn is None else prepare_model_inputs_fn(batch, config)

    handles = {}
    with disable_adapters(model):
        training = model.training
        model.eval()
        try:
            shared = _equal_inputs(model, targets, prepares, batches[0], model_input(batches[0]), forward_fn, func)
            for members in shared.values():
                for path in members:
                    max_components[path] = max(max_components[m] for m in members)
            owner_of = {path: members[0] for members in shared.values() for path in members[1:]}
            pcas = {path: _InputPCA(path, layer.in_features, max_components[path], eva.tau, prepares[path],
                                    pca_class)
                    for path, layer in targets if path not in owner_of}
            for path, pca in pcas.items():
                handles[path] = model.get_submodule(path).register_forward_hook(pca)
            layer_owner = {**{path: path for path in pcas}, **owner_of}
            ranks_now = _run_until_converged(model, batches, pcas, handles, layer_owner, owner_of, budget,
                                             max_components, model_input, forward_fn, max_passes,
                                             show_progress_bar, func)
        finally:
            for handle in handles.values():   # those the loop put back on, too
                handle.remove()
            model.train(training)
    state = {}
    for path, layer in targets:
        pca = pcas[layer_owner[path]]
        rank = ranks_now[path]
        components = pca.pca.components_[:rank].copy()
        if eva.whiten:
            singular = pca.pca.singular_values_[:rank]
            components /= np.sqrt(np.where(singular > 0, singular, 1.0))[:, None]
        state[path] = components.astype(layer.dtype)
    return state


def _run_until_converged(model, batches, pcas, handles, layer_owner, owner_of, budget, max_components,
                         model_input, forward_fn, max_passes, show_progress_bar, func):
    """PEFT's loop: batches cycle; a layer's hook comes off once the components its
    current rank needs have converged (and back on if the rank grows); the
    ranks are redistributed after every batch.  Returns {path: rank}."""
    from tqdm.auto import tqdm

    done = {path: False for path in pcas}
    ranks = dict(max_components)
    with tqdm(total=None, disable=not show_progress_bar, leave=False, desc="EVA") as bar:
        for _ in range(max_passes):
            for batch in batches:
                for path, pca in pcas.items():
                    converged = bool(np.all(pca.converged[:ranks[path]]))
                    if not done[path] and converged:
                        handles.pop(path).remove()
                        done[path] = True
                        continue
                    if done[path] and not converged:
                        handles[path] = model.get_submodule(path).register_forward_hook(pca)
                        done[path] = False
                finished = sum(done.values()) + sum(done[owner] for owner in owner_of.values())
                bar.set_description(f"EVA: {finished}/{len(layer_owner)} layers have converged")
                if all(done.values()):
                    return ranks
                given = model_input(batch)
                for pca in pcas.values():
                    pca.model_input = given
                forward_fn(model, batch)
                bar.update()
                if all(pca.fitted for pca in pcas.values()):
                    ranks = _rank_distribution(pcas, layer_owner, owner_of, budget, max_components)
    late = [path for path, flag in done.items() if not flag]
    unfitted = [path for path in late if not pcas[path].fitted]
    detail = (f"; {unfitted} never saw a batch of at least as many rows as their components "
              f"({max_components[unfitted[0]]} for {unfitted[0]!r})" if unfitted else "")
    raise RuntimeError(f"{func}: the PCA of layers {late} has not converged (tau) after {max_passes} passes over the "
                       f"{len(batches)} batches{detail}; give more data, a lower tau or a larger max_passes")


def _rank_distribution(pcas, layer_owner, owner_of, budget, max_components):
    """PEFT's redistribution: the ``budget`` largest explained-variance ratios over all
    layers (each layer its first max_components); a layer sharing another's PCA
    never gets more than it.  Ties go to the earlier layer (stable order)."""
    keys, ratios = [], []
    for path, owner in layer_owner.items():
        values = pcas[owner].pca.explained_variance_ratio_[:max_components[path]]
        keys += [path] * len(values)
        ratios.extend(values)
    order = np.argsort(-np.asarray(ratios), kind="stable")
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {path: counts.get(path, 0) for path in layer_owner}
    for path, owner in owner_of.items():
        if ranks[owner] < ranks[path]:
            ranks[owner], ranks[path] = ranks[path], ranks[owner]
    return ranks


def _equal_inputs(model, targets, prepares, batch, given, forward_fn, func):
    """{digest: [paths]} of the layers whose prepared inputs in the first batch are equal (groups of >= 2)."""
    digests = {path: _InputDigest(path, layer.in_features, prepares[path]) for path, layer in targets}
    with ExitStack() as stack:
        for path, layer in targets:
            digests[path].model_input = given
            stack.enter_context(layer.register_forward_hook(digests[path]))
        forward_fn(model, batch)
    silent = [path for path, digest in digests.items() if digest.digest is None]
    if silent:
        raise ValueError(f"{func}: layers {silent} received no input when forward_fn ran the first batch; "
                         "EVA needs every target layer on the forward path")
    groups = {}
    for path, digest in digests.items():
        groups.setdefault(digest.digest, []).append(path)
    return {key: paths for key, paths in groups.items() if len(paths) > 1}


# -- the pieces --------------------------------------------------------------------------
def _incremental_pca(func):
    try:
        from sklearn.decomposition import IncrementalPCA
    except ImportError:
        raise ImportError(f"{func}: EVA uses scikit-learn's IncrementalPCA; install it with "
                          "pip install 'lorac[eva]'") from None
    return IncrementalPCA


def _config(model, peft_config, adapter_name, func):
    from .peft_model import LoraConfig

    if peft_config is None:
        configs = getattr(model, "peft_config", None)
        if not isinstance(configs, dict):
            raise ValueError(f"{func}: peft_config is required when the model does not come from "
                             "lorac.get_peft_model (it has no peft_config)")
        if adapter_name not in configs:
            raise ValueError(f"{func}: the model has no adapter {adapter_name!r} in its peft_config "
                             f"(it has {sorted(configs)})")
        peft_config = configs[adapter_name]
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"{func}: peft_config must be a lorac.LoraConfig, got {type(peft_config).__name__}")
    return replace(peft_config, eva_config=sub_config(peft_config.eva_config, EvaConfig, "eva_config", func))


def _batches(dataloader, func):
    if isinstance(dataloader, Iterator):
        dataloader = list(dataloader)
    try:
        empty = len(dataloader) == 0
    except TypeError:
        dataloader = list(dataloader)
        empty = not dataloader
    if empty:
        raise ValueError(f"{func}: dataloader is empty; EVA needs at least one batch")
    return dataloader


def _targets(model, config, from_peft_model, func):
    """[(path, layer)] of the layers EVA initialises, in model order."""
    modules = dict(model.named_modules())
    if from_peft_model:
        targets = [(p, m) for p, m in modules.items() if layer_kind(m) == "linear" and m.r > 0]
        what = "adapted Linear layers"
    else:
        selected = config_selector(modules, config, func, config.target_modules or ".*")
        targets = [(p, m) for p, m in modules.items() if layer_kind(m) == "linear" and selected(p)]
        what = f"Linear layers matching target_modules={config.target_modules!r}"
    if not targets:
        raise ValueError(f"{func}: the model has no {what}; EVA has nothing to initialise")
    return targets


def _target_ranks(targets, config):
    """{path: r}: the layer's own rank when it has an adapter, else the config's (rank_pattern)."""
    patterns = compile_patterns(config.rank_pattern or None, "rank_pattern")
    return {path: layer.r if layer.r > 0 else pattern_value(patterns, path, config.r) for path, layer in targets}


def _layer_input_fns(prepare_layer_inputs_fn, targets, func):
    paths = [path for path, _ in targets]
    if isinstance(prepare_layer_inputs_fn, Mapping):
        unknown = sorted(set(prepare_layer_inputs_fn) - set(paths))
        if unknown:
            raise ValueError(f"{func}: prepare_layer_inputs_fn names layers that are not EVA targets: {unknown}")
        fns = {path: prepare_layer_inputs_fn.get(path) for path in paths}
    else:
        fns = dict.fromkeys(paths, prepare_layer_inputs_fn)
    for path, fn in fns.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{func}: prepare_layer_inputs_fn for {path!r} must be a function, got {fn!r}")
    return {path: _flatten_rows if fn is None else fn for path, fn in fns.items()}


# -- initialize_lora_eva_weights -----------------------------------------------------------
def initialize_lora_eva_weights(model, dataloader=None, eva_state_dict=None, forward_fn=default_forward,
                                prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
                                adapter_name=DEFAULT, gather_distributed_inputs=True, show_progress_bar=True,
                                max_passes=20):
    """Start the adapters of a ``get_peft_model(..., LoraConfig(init_lora_weights="eva"))``
    model from EVA (module docstring): from ``eva_state_dict`` if given, else
    from get_eva_state_dict(model, dataloader, ...) (same arguments).

    Every entry is checked before the model changes.  Adapted layers EVA
    does not cover (Embedding, MergedLinear) keep their start, with a
    warning, as PEFT.  Returns the model."""
    func = "initialize_lora_eva_weights"
    if not isinstance(model, Module):
        raise TypeError(f"{func}: model must be a lorac.Module, got {type(model).__name__}")
    config = _config(model, None, adapter_name, func)
    if not (isinstance(config.init_lora_weights, str) and config.init_lora_weights == "eva"):
        raise ValueError(f"{func}: the model's LoraConfig has init_lora_weights={config.init_lora_weights!r}; "
                         "EVA needs init_lora_weights='eva'")
    adapted = [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALayer) and m.r > 0]
    several = [path for path, m in adapted if len(getattr(m, "active_adapters", ())) > 1]
    if several:
        raise ValueError(f"{func}: layers {several} have several active adapters; EVA starts one adapter")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError(f"{func}: give a dataloader (or an eva_state_dict from get_eva_state_dict)")
        eva_state_dict = get_eva_state_dict(model, dataloader, config, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar, max_passes)
    plan = _checked_state_dict(eva_state_dict, adapted, func)
    eva = config.eva_config or EvaConfig()
    modules = dict(model.named_modules())
    targets, missing, rank_pattern, alpha_pattern = [], [], {}, {}
    for path, layer in adapted:
        rank, alpha = layer.r, layer.lora_alpha
        if path not in plan:
            missing.append(path)
        else:
            lora_a = plan[path]
            new_rank = lora_a.shape[0]
            if new_rank == 0:
                _drop_adapter(modules, path, layer)
                continue
            if new_rank != rank and eva.adjust_scaling_factors:
                alpha = alpha * new_rank / rank
            _start_adapter(modules, path, layer, lora_a, alpha)
            rank = new_rank
            targets.append(path)
        if rank != config.r:
            rank_pattern[path] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    model.peft_config[adapter_name] = replace(config, target_modules=targets + missing, rank_pattern=rank_pattern,
                                              alpha_pattern=alpha_pattern)
    if missing:
        warnings.warn(f"{func}: layers {missing} keep their initialisation: EVA starts Linear layers only "
                      "(PEFT leaves Embedding layers to init_lora_weights=True likewise)", RuntimeWarning,
                      stacklevel=2)
    return model


def _checked_state_dict(eva_state_dict, adapted, func):
    """{path: float64 (k, in_features) array} after checking every entry against the model."""
    if not isinstance(eva_state_dict, Mapping):
        raise TypeError(f"{func}: eva_state_dict must be a dict {{layer path: lora_A}}, got "
                        f"{type(eva_state_dict).__name__}")
    layers = dict(adapted)
    plan = {}
    for path, value in eva_state_dict.items():
        layer = layers.get(path)
        if layer is None or layer_kind(layer) != "linear":
            what = "is not an adapted layer of the model" if layer is None else \
                f"is a {type(layer).__name__}; EVA starts Linear layers only"
            raise ValueError(f"{func}: eva_state_dict[{path!r}]: {path!r} {what}")
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if array.ndim != 2 or array.shape[1] != layer.in_features or array.dtype.kind not in "fiu":
            raise ValueError(f"{func}: eva_state_dict[{path!r}] must be a real (k, {layer.in_features}) array "
                             f"(k rows of lora_A), got shape {array.shape} and dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError(f"{func}: eva_state_dict[{path!r}] holds NaN or infinite values")
        if array.shape[0] == 0 and path == "":
            raise ValueError(f"{func}: eva_state_dict gives the model itself (a single layer) rank 0; it cannot "
                             "drop its own adapter")
        plan[path] = array.astype(np.float64)
    return plan


def _start_adapter(modules, path, layer, lora_a, alpha):
    """Layer ``path`` takes lora_A = lora_a; a new rank (or alpha) gives it a new adapter with lora_B = 0
    (PEFT's update_layer), the same rank keeps its lora_B (PEFT copies lora_A only)."""
    trainable = (layer.lora_A.requires_grad, layer.lora_B.requires_grad)
    if lora_a.shape[0] == layer.r and alpha == layer.lora_alpha:
        merged = layer.merged
        layer.unmerge()
        np.copyto(layer.lora_A.data, lora_a, casting="unsafe")
        layer.lora_A.grad = None
        layer._changed()
        if merged:
            layer.merge()
        return
    layer.unmerge()   # build_layer reads the base weight (DoRA's norms)
    lora_bias = layer.lora_bias_parameter(DEFAULT)
    new, _ = build_layer(layer, lora_a.shape[0], alpha, layer.use_rslora, layer.lora_dropout, None,
                         use_dora=isinstance(layer, DoRALinear), lora_bias=lora_bias is not None)
    zeros = np.zeros((layer.out_features, lora_a.shape[0]), layer.dtype)
    swap_layer(modules, path, layer, new, lora_A=lora_a.astype(layer.dtype), lora_B=zeros,
               lora_bias=None if lora_bias is None else lora_bias.data)
    new.lora_A.requires_grad, new.lora_B.requires_grad = trainable
    if lora_bias is not None:
        new.lora_bias_parameter(DEFAULT).requires_grad = lora_bias.requires_grad


def _drop_adapter(modules, path, layer):
    """Rank 0: the layer becomes the r = 0 layer over its base weight, frozen (PEFT's base layer)."""
    layer.unmerge()
    plain = _plain_layer(layer)
    plain.weight.requires_grad = False
    parent, name = parent_of(modules, path)
    parent.add_module(name, plain)

"""A whole model's LoRA adapter from a fully fine-tuned model and its base.

``extract_adapter(finetuned, base, r)`` runs ``extract_lora`` on every 2-D
``<path>.weight`` whose value changed and returns an ``ExtractedAdapter``:
its ``state_dict()`` has loralib's keys ``<path>.lora_A`` (r, in) and
``<path>.lora_B`` (out, r), ready for ``model.load_state_dict(sd,
strict=False)`` on a model whose layers have ``r`` and ``lora_alpha``; its
``metadata()`` records each layer's scaling and layout for ``lorac.save``
(so ``lorac merge BASE ADAPTER`` rebuilds the fine-tuned weights); its
``layers`` give the per-layer error report.

Layout of each weight: a ``lorac.Embedding`` (or a path listed in
``embeddings``) is stored (num_embeddings, embedding_dim), the transpose of
its adapter's delta, like loralib's; a ``lorac.Linear`` says with its
``fan_in_fan_out``; otherwise ``fan_in_fan_out`` (default False: torch's
(out, in)) decides.  Models are consulted only when given as lorac
Modules; with state dicts pass ``fan_in_fan_out`` / ``embeddings``.
``lorac.MergedLinear`` weights are skipped (their fused adapter shape is
not a plain LoRA pair).

With ``lora_bias`` (PEFT's use case for its lora_bias: LoRA weights
extracted from fully fine-tuned parameters), an extracted Linear layer
whose ``<path>.bias`` changed also gets ``<path>.lora_bias = (b_finetuned -
b_base) / scaling``, which ``Linear(lora_bias=True)`` and ``lorac merge``
add back exactly.
"""

import fnmatch
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..layers import Embedding, MergedLinear
from .._arrays import as_generator
from ._checks import as_matrix, integer, positive_number
from ._sources import split_key, state_of
from .extract import default_alpha, extract_lora


@dataclass(eq=False)
class ExtractedAdapter:
    """What ``extract_adapter`` found.

    - ``layers``: {module path: ExtractedLoRA}, the per-layer adapters and
      their error report (``relative_error``, ``energy``, ...);
    - ``kinds``: {module path: "linear" | "embedding"};
    - ``extra``: {key: array}, changed tensors copied whole (``copy_changed``);
    - ``lora_biases``: {module path: (out,) array}, the extracted layers'
      lora_bias (``lora_bias``): their bias change over their scaling;
    - ``skipped``: {key: reason} for tensors that differ (or exist on one
      side only) but were not extracted;
    - ``unchanged``: keys whose values are identical in both models.
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    layers: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    lora_biases: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    unchanged: list = field(default_factory=list)

    def state_dict(self):
        """OrderedDict: ``<path>.lora_A``, ``<path>.lora_B`` (and ``<path>.lora_bias``) per layer,
        then the copied tensors."""
        out = OrderedDict()
        for path, layer in self.layers.items():
            out.update(layer.state_dict(path))
            if path in self.lora_biases:
                out[f"{path}.lora_bias" if path else "lora_bias"] = self.lora_biases[path]
        out.update(self.extra)
        return out

    def metadata(self):
        """safetensors metadata recording every layer's kind, lora_alpha, rsLoRA and layout
        (lorac.peft.adapter's format, read by ``lorac merge`` / ``convert`` / ``info``)."""
        from ..peft.adapter import Adapter, LayerAdapter

        layers = {}
        for path, layer in self.layers.items():
            kind = self.kinds[path]
            layers[path] = LayerAdapter(layer.lora_A, layer.lora_B, kind=kind, lora_alpha=layer.lora_alpha,
                                        use_rslora=layer.use_rslora,
                                        fan_in_fan_out=layer.fan_in_fan_out and kind == "linear")
        return Adapter(layers=layers).metadata()

    @property
    def relative_error(self):
        """sqrt(sum of squared layer errors / sum of squared delta norms) over the extracted layers."""
        num = sum(layer.error ** 2 for layer in self.layers.values())
        den = sum(layer.delta_norm ** 2 for layer in self.layers.values())
        return float(np.sqrt(num / den)) if den > 0 else 0.0


def _patterns(value, name, func):
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"{func}: {name} must be a str or a list of str patterns, got "
                        f"{type(value).__name__}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{func}: {name} must hold str patterns, got {type(p).__name__} {p!r}")
    return patterns


def _selected(path, include, exclude):
    if include is not None and not any(fnmatch.fnmatchcase(path, p) for p in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(path, p) for p in exclude))


def _refuse_adapters(state, name, func):
    for key in state:
        if split_key(key)[1] in ("lora_A", "lora_B"):
            raise ValueError(f"{func}: {name} holds LoRA tensors ({key!r}); expected plain weights -- merge "
                             "the adapters into the weights first (lorac merge)")


def _layout(path, modules, fan_in_fan_out, embeddings):
    """("linear" | "embedding", stored transposed?) or None for a MergedLinear."""
    module = modules.get(path)
    if path in embeddings or type(module) is Embedding:
        return "embedding", True
    if isinstance(module, MergedLinear):
        return None
    if fan_in_fan_out is not None:
        return "linear", bool(fan_in_fan_out)
    return "linear", bool(getattr(module, "fan_in_fan_out", False))


def extract_adapter(finetuned, base, r, lora_alpha=None, *, include=None, exclude=None, fan_in_fan_out=None,
                    embeddings=(), use_rslora=False, copy_changed=False, randomized=False, niter=2,
                    oversample=10, rng=None, progress=None, lora_bias=False):
    """Extract a rank-r LoRA adapter from a fully fine-tuned model (module docstring).

    finetuned, base: lorac Modules or state dicts ({key: array}).  r >= 1;
    lora_alpha > 0, default r (scaling 1).  include / exclude: fnmatch
    patterns (a str or a list) on the module path (``"blocks.*.attn"``) --
    a layer is extracted when it matches some ``include`` (default: all)
    and no ``exclude``.  fan_in_fan_out: None (ask the model, else False),
    True or False for every non-embedding layer.  embeddings: module paths
    whose weights are embeddings.  copy_changed: also put changed tensors
    that are not 2-D weights (biases, norms) into the state dict, whole.
    lora_bias: an extracted Linear layer's changed bias becomes its
    lora_bias (module docstring) instead of being copied or skipped.
    randomized / niter / oversample / rng: ``low_rank_approx``'s options.
    progress: a callable wrapping the list of layer paths being extracted
    (e.g. ``tqdm.tqdm``).  Everything is checked before any SVD runs; the
    inputs are never modified.
    """
    func = "extract_adapter"
    ft_state, ft_model = state_of(finetuned, "finetuned", func)
    base_state, base_model = state_of(base, "base", func)
    r = integer(r, "r", func, minimum=1)
    use_rslora = bool(use_rslora)
    alpha = default_alpha(r, use_rslora) if lora_alpha is None else positive_number(lora_alpha, "lora_alpha", func)
    include = _patterns(include, "include", func)
    exclude = _patterns(exclude, "exclude", func)
    embeddings = set(_patterns(embeddings, "embeddings", func) or ())
    niter = integer(niter, "niter", func)
    oversample = integer(oversample, "oversample", func)
    rng = as_generator(rng, f"{func}: rng")   # one generator for all layers
    if progress is not None and not callable(progress):
        raise TypeError(f"{func}: progress must be None or a callable wrapping an iterable (e.g. tqdm.tqdm), "
                        f"got {type(progress).__name__}")
    _refuse_adapters(ft_state, "finetuned", func)
    _refuse_adapters(base_state, "base", func)
    modules = {}
    for model in (base_model, ft_model):
        if model is not None:
            modules.update(model.named_modules())

    result = ExtractedAdapter(r=r, lora_alpha=alpha, use_rslora=use_rslora)
    work, changed = [], {}   # changed: {key: (new, why not extracted)}, decided once the layers are known
    for key, new in ft_state.items():
        path, param = split_key(key)
        if not _selected(path, include, exclude):
            continue
        if key not in base_state:
            result.skipped[key] = "only in the fine-tuned model"
            continue
        old = base_state[key]
        if new.shape != old.shape:
            result.skipped[key] = f"shapes differ: {tuple(old.shape)} in base, {tuple(new.shape)} fine-tuned"
            continue
        if np.array_equal(new, old):
            result.unchanged.append(key)
            continue
        is_weight = param == "weight" and new.ndim == 2 and new.dtype.kind == "f" and old.dtype.kind == "f"
        layout = _layout(path, modules, fan_in_fan_out, embeddings) if is_weight else None
        if layout is None:   # changed, but no plain LoRA pair can carry it (a bias: maybe a lora_bias)
            changed[key] = (new, "a MergedLinear weight (fused adapters are not extracted)" if is_weight else
                            "changed, but not a 2-D float weight")
            continue
        as_matrix(new, f"finetuned[{key!r}]", func)   # finite values, checked before any SVD
        as_matrix(old, f"base[{key!r}]", func)
        work.append((path, key, layout))
    for key in base_state:
        if key not in ft_state and _selected(split_key(key)[0], include, exclude):
            result.skipped[key] = "only in the base model"
    outputs = {path: ft_state[key].shape[1 if transposed else 0]   # extracted Linear layers' out
               for path, key, (kind, transposed) in work if kind == "linear"}
    biased = {}   # path -> bias key carried as the layer's lora_bias
    for key, (new, reason) in changed.items():
        path, param = split_key(key)
        if lora_bias and param == "bias" and path in outputs and new.shape == (outputs[path],) \
                and new.dtype.kind == "f" and base_state[key].dtype.kind == "f":
            biased[path] = key
        elif copy_changed:
            result.extra[key] = np.array(new, copy=True)
        else:
            result.skipped[key] = reason + "; copy_changed=True keeps it whole"

    paths = [item[0] for item in work]
    by_path = {item[0]: item for item in work}
    for path in (progress(paths) if progress is not None else paths):
        _, key, (kind, transposed) = by_path[path]
        result.layers[path] = extract_lora(ft_state[key], base_state[key], r, lora_alpha=alpha,
                                           fan_in_fan_out=transposed, use_rslora=use_rslora,
                                           randomized=randomized, niter=niter, oversample=oversample, rng=rng)
        result.kinds[path] = kind
    for path, key in biased.items():
        layer = result.layers[path]
        change = ft_state[key].astype(np.float64) - base_state[key].astype(np.float64)
        result.lora_biases[path] = (change / layer.scaling).astype(layer.lora_B.dtype)
    return result

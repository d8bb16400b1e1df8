"""PEFT state-dict keys <-> lorac (module path, parameter) pairs.

A PEFT LoRA adapter file names its tensors after the ``PeftModel`` that saved
them, with the adapter name removed (PEFT does that on save)::

    base_model.model.<path>.lora_A.weight        Linear, (r, in)           -> <path>.lora_A
    base_model.model.<path>.lora_B.weight        Linear, (out, r)          -> <path>.lora_B
    base_model.model.<path>.lora_embedding_A     Embedding, (r, num_emb)   -> <path>.lora_A
    base_model.model.<path>.lora_embedding_B     Embedding, (dim, r)       -> <path>.lora_B
    base_model.model.<path>.base_layer.<param>   bias="all"/"lora_only"    -> <path>.<param>
    base_model.model.<path>.modules_to_save.<p>  modules_to_save (+ bias)  -> <path>.<p>
    base_model.model.<path>.<param>              modules_to_save           -> <path>.<param>
    base_model.model.<path>.original_module.<p>  untrained copy            -> ignored

The adapter name may also appear (older files, or a state dict taken from a
live PeftModel): ``lora_A.<name>.weight``, ``lora_embedding_A.<name>``,
``modules_to_save.<name>.<param>``; ``name`` must be ``default`` or the
adapter name asked for.  Keys without the ``base_model.model.`` prefix are
taken as module paths as they are.  lorac's and loralib's own keys are the
right-hand column, so both LoRA kinds share lorac's ``lora_A``/``lora_B``
names (loralib's Embedding stores the same shapes as PEFT's).

DoRA's magnitude, ``base_model.model.<path>.lora_magnitude_vector`` (also
with ``.weight`` or ``.<name>[.weight]`` after it), maps to
``<path>.lora_magnitude_vector`` with kind "dora".  PEFT's ``lora_bias``,
``base_model.model.<path>.lora_B[.<name>].bias`` (out,), maps to
``<path>.lora_bias`` with kind "lora_bias".  ``lora_A.bias``, which PEFT
never writes, is refused by ``parse_key``.  Trainable tokens,
``base_model.model.<path>.token_adapter.trainable_tokens_delta`` (k, dim)
(also with ``.<name>`` after it), map to ``<path>.trainable_tokens_delta``
with kind "tokens"; the wrapper's other tensors (``token_indices``,
``trainable_tokens_original``) are ignored.
"""

from collections import namedtuple

PREFIX = "base_model.model."

# kind: "linear" or "embedding" for adapter tensors, None for other parameters
# (biases, modules_to_save); param: "lora_A", "lora_B" or the parameter name;
# ignored: True for keys deliberately skipped (original_module copies).
ParsedKey = namedtuple("ParsedKey", ["path", "param", "kind", "ignored"])

_LORA_LINEAR = {"lora_A": "lora_A", "lora_B": "lora_B"}
_LORA_EMBEDDING = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}


class UnsupportedKeyError(ValueError):
    """A key that belongs to a PEFT feature lorac cannot honour (a bias on lora_A)."""


def _join(tokens):
    return ".".join(tokens)


def parse_key(key, adapter_names=("default",)):
    """Map one PEFT adapter key to a ParsedKey, or None if it has no known form.

    ``adapter_names``: the names allowed to appear inside keys.  Raises
    UnsupportedKeyError for a bias on lora_A.
    """
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    tokens = body.split(".")
    if any(not t for t in tokens):
        return None
    if "lora_magnitude_vector" in tokens:
        at = tokens.index("lora_magnitude_vector")
        rest = tokens[at + 1:]
        if rest and rest[0] in adapter_names:
            rest = rest[1:]
        if at == 0 or rest not in ([], ["weight"]):
            return None
        return ParsedKey(_join(tokens[:at]), "lora_magnitude_vector", "dora", False)
    if "token_adapter" in tokens:
        at = tokens.index("token_adapter")
        rest = tokens[at + 1:]
        if at == 0 or not rest:
            return None
        if rest[0] != "trainable_tokens_delta":
            return ParsedKey(_join(tokens[:at]), rest[0], None, True)
        if rest[1:] not in ([],) and not (len(rest) == 2 and rest[1] in adapter_names):
            return None
        return ParsedKey(_join(tokens[:at]), "trainable_tokens_delta", "tokens", False)
    if "original_module" in tokens:
        return ParsedKey(_join(tokens[:tokens.index("original_module")]), tokens[-1], None, True)

    # <path>.lora_A[.<name>].weight   (and lora_B's .bias: lora_bias)
    for width in (2, 3):
        if len(tokens) > width and tokens[-width] in _LORA_LINEAR:
            if width == 3 and tokens[-2] not in adapter_names:
                continue
            if tokens[-1] == "bias" and tokens[-width] == "lora_B":
                return ParsedKey(_join(tokens[:-width]), "lora_bias", "lora_bias", False)
            if tokens[-1] == "bias":
                raise UnsupportedKeyError(f"{key!r} is a bias on lora_A, which PEFT's lora_bias does not make; "
                                          "lorac's adapters have none")
            if tokens[-1] == "weight":
                return ParsedKey(_join(tokens[:-width]), _LORA_LINEAR[tokens[-width]], "linear", False)
    # <path>.lora_embedding_A[.<name>]
    for width in (1, 2):
        if len(tokens) > width and tokens[-width] in _LORA_EMBEDDING:
            if width == 2 and tokens[-1] not in adapter_names:
                continue
            return ParsedKey(_join(tokens[:-width]), _LORA_EMBEDDING[tokens[-width]], "embedding", False)
    if any(t.startswith("lora_") for t in tokens):
        return None  # some other LoRA tensor (a newer PEFT variant): not ours to guess
    # <path>.base_layer.<param> / <path>.modules_to_save[.<name>].<param> / <path>.<param>
    if len(tokens) >= 3 and tokens[-2] == "base_layer":
        return ParsedKey(_join(tokens[:-2]), tokens[-1], None, False)
    if "modules_to_save" in tokens:
        at = tokens.index("modules_to_save")
        rest = tokens[at + 1:]
        if len(rest) >= 2 and rest[0] in adapter_names:
            rest = rest[1:]
        if at == 0 or not rest:
            return None
        tokens = tokens[:at] + rest
    if len(tokens) < 2:
        return None
    return ParsedKey(_join(tokens[:-1]), tokens[-1], None, False)


def peft_key(path, param, kind):
    """The key PEFT's save_pretrained writes for lorac's ``<path>.<param>``.

    kind "linear"/"embedding" for lora_A/lora_B; None for a base parameter of
    a LoRA layer (written as ``base_layer.<param>``, which PEFT loads back).
    """
    if param == "lora_bias":
        return f"{PREFIX}{path}.lora_B.bias"
    if param in ("lora_A", "lora_B"):
        if kind == "embedding":
            return f"{PREFIX}{path}.lora_embedding_{param[-1]}"
        return f"{PREFIX}{path}.{param}.weight"
    return f"{PREFIX}{path}.base_layer.{param}"


def peft_magnitude_key(path):
    """The key PEFT's save_pretrained writes for a DoRA layer's magnitude vector."""
    return f"{PREFIX}{path}.lora_magnitude_vector"


def peft_tokens_key(path):
    """The key PEFT's save_pretrained writes for a layer's trainable token rows."""
    return f"{PREFIX}{path}.token_adapter.trainable_tokens_delta"


def peft_module_key(path, param):
    """The key PEFT's save_pretrained writes for ``<path>.<param>`` of a module
    that is not a LoRA layer (a modules_to_save tensor, or a bias under
    bias="all")."""
    return f"{PREFIX}{path}.{param}"


def lorac_key(path, param):
    """lorac's / loralib's state-dict key."""
    return f"{path}.{param}" if path else param

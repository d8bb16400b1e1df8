"""Checkpoint files: save and load state dicts as NumPy arrays, never torch.

- ``save(state_dict, path, metadata=None)``: the format follows the suffix:
  ``.npz`` writes NumPy .npz; ``.safetensors`` -- and any other or missing
  suffix -- writes safetensors, the default.  Values may be ndarrays,
  ``lorac.Parameter``s (anything whose ``.data`` is an ndarray) or anything
  ``np.asarray`` accepts, of dtype bool, (u)int8..64 or float16/32/64; keys
  must be str.  Arrays are written C-contiguous, little-endian.  ``metadata``
  (a dict of str -> str, else TypeError) is stored in the safetensors header;
  it is refused (ValueError) for .npz.  The write is atomic: an interrupted
  save leaves the previous file untouched.
- ``load(path)``: the format is found from the content, not the name
  (``detect_format``).  Reads safetensors, .npz and ``torch.save`` zip files
  (.pt/.pth/.bin) without importing torch and without running any code from
  the file.  Returns ``{name: ndarray}``; float16 and bfloat16 come back as
  float32.  0-d and empty arrays are supported.
- ``read_metadata(path)``: the safetensors header metadata, ``{}`` for other
  formats.
- ``detect_format(path)``: ``'safetensors'``, ``'npz'``, ``'torch_zip'`` or
  ``'torch_legacy'`` (old pickle-only torch files, which ``load`` refuses).

A malformed, truncated, hostile or unsupported file raises CheckpointError
(a ValueError) whose message begins with the path; a file that cannot be
opened raises the usual OSError.  Details per format are in the docstrings
of ``safetensors_format``, ``npz_format`` and ``torch_format``.
"""

import os

from . import npz_format, safetensors_format, torch_format
from ._common import CheckpointError, to_arrays
from .detect import detect_format, sniff

__all__ = ["CheckpointError", "detect_format", "load", "read_metadata", "save"]

_READERS = {
    "safetensors": safetensors_format.load,
    "npz": npz_format.load,
    "torch_zip": torch_format.load,
    "torch_legacy": torch_format.load_legacy,
}


def save(state_dict, path, metadata=None):
    """Write ``state_dict`` to ``path`` atomically (.npz by suffix, else safetensors)."""
    arrays = to_arrays(state_dict)
    if os.fsdecode(path).lower().endswith(".npz"):
        npz_format.save(arrays, path, metadata)
    else:
        safetensors_format.save(arrays, path, metadata)


def load(path):
    """Read a checkpoint file into a dict of name -> numpy array."""
    with open(path, "rb") as fh:
        return _READERS[sniff(fh, path)](fh, path)


def read_metadata(path):
    """The metadata dict (str -> str) of a safetensors file; ``{}`` otherwise."""
    with open(path, "rb") as fh:
        if sniff(fh, path) != "safetensors":
            return {}
        return safetensors_format.read_metadata(fh, path)

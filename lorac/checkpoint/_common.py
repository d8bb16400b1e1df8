"""Pieces shared by every format: the error class and the dtype policy.

dtype policy (the same for every format):

- ``save`` accepts bool, int8/16/32/64, uint8/16/32/64, float16/32/64 arrays
  and writes them C-contiguous in little-endian byte order.  Anything else
  (object, str, complex, datetime, structured, float128) is refused with
  TypeError naming the key.
- ``load`` returns arrays of those dtypes, C-contiguous, writable, native byte
  order, except that half precision (float16 and bfloat16) is returned as
  float32: lorac computes in float32/float64, and the conversion is exact.
"""

import os
import zipfile
from collections.abc import Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file is malformed, truncated, hostile or unsupported.

    The message always begins with the file's path.  Errors of the file
    system itself (missing file, no permission) are left as OSError.
    """


def error(path, message):
    """A CheckpointError whose message is ``"<path>: <message>"``."""
    return CheckpointError(f"{os.fspath(path)}: {message}")


def short_repr(value, limit=80):
    """repr() of a (possibly hostile) key, cut to ``limit`` characters."""
    text = repr(value) if isinstance(value, (str, int)) else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


SUPPORTED_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.bool_, np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.uint16, np.uint32, np.uint64,
        np.float16, np.float32, np.float64,
    )
)


def _native(dtype):
    return dtype.newbyteorder("=")


def is_supported(dtype):
    """True for the dtypes listed in the module docstring (any byte order)."""
    return _native(np.dtype(dtype)) in SUPPORTED_DTYPES


def bfloat16_to_float32(raw):
    """uint16 array holding bfloat16 bit patterns -> float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def finish(array):
    """Apply the load policy to a freshly read array of a supported dtype."""
    if array.dtype.kind == "b":
        # A bool byte that is not 0/1 (possible in a file) becomes True.
        return np.array(array.view(np.uint8) != 0, order="C")
    target = _native(array.dtype)
    if target == np.float16:
        target = np.dtype(np.float32)
    out = np.asarray(array, dtype=target, order="C")
    return out if out.flags.writeable else out.copy()


def to_arrays(state_dict):
    """Validate a state dict for saving; returns ``{name: ndarray}``.

    Values may be ndarrays, objects whose ``.data`` is an ndarray (a
    ``lorac.Parameter``) or anything ``np.asarray`` accepts.  Keys must be str.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of str to arrays, got {type(state_dict).__name__}")
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {type(key).__name__} {short_repr(key)}")
        if isinstance(value, np.ndarray):
            array = value
        elif isinstance(getattr(value, "data", None), np.ndarray):
            array = value.data
        else:
            try:
                array = np.asarray(value)
            except Exception as exc:
                raise TypeError(f"state_dict[{key!r}]: cannot convert "
                                f"{type(value).__name__} to an array: {exc}") from exc
        if not is_supported(array.dtype):
            raise TypeError(
                f"state_dict[{key!r}]: dtype {array.dtype} is not supported; expected one of "
                "bool, int8..int64, uint8..uint64, float16, float32, float64")
        arrays[key] = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    return arrays


def zip_members(archive, path):
    """``archive.infolist()`` after two consistency checks zipfile skips.

    Neither numpy nor torch writes member comments, and the member count in
    the end-of-central-directory record must match what was parsed: without
    these, a corrupted comment length or directory size makes zipfile drop
    members silently.
    """
    infos = archive.infolist()
    for info in infos:
        if info.comment:
            raise error(path, f"zip member {short_repr(info.filename)} has a comment; "
                              "the central directory is corrupt")
    end_record = getattr(zipfile, "_EndRecData", None)  # private, in CPython 3.9-3.14
    if end_record is not None:
        record = end_record(archive.fp)
        if record is not None and record[zipfile._ECD_ENTRIES_TOTAL] != len(infos):
            raise error(path, f"zip directory declares {record[zipfile._ECD_ENTRIES_TOTAL]} "
                              f"members but holds {len(infos)}")
    return infos

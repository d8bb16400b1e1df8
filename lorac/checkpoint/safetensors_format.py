"""safetensors files, read and written by the ``safetensors`` package.

Accepted on load: tensors of dtype BOOL, U8, I8, U16, I16, U32, I32, U64,
I64, F16, BF16, F32, F64 (F16 and BF16 come back as float32).  Refused with
CheckpointError: other dtypes (F8_*, C64, ...), and any header or layout that
the safetensors parser rejects (bad length, bad JSON, offsets past the end,
gaps, overlaps, sizes that do not match the shape).  The header length is
checked against the file size before the file is read, and the whole file is
read only once it is known to be plausible.

Metadata is the header's ``__metadata__``: a dict of str to str.  Saving
refuses non-str keys or values with TypeError (nothing is JSON-encoded
behind your back), and refuses a tensor named ``__metadata__`` (reserved).
"""

import os
import struct
from collections.abc import Mapping

import numpy as np

from ._common import bfloat16_to_float32, error, finish
from .atomic import atomic_write

# safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000

_DTYPES = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2",
    "U32": "<u4", "I32": "<i4", "U64": "<u8", "I64": "<i8",
    "F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8",
}


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("reading or writing .safetensors files needs the "
                          "'safetensors' package (pip install safetensors)") from exc
    return safetensors


def _reraise(path, exc, what):
    # safetensors is Rust: a panic arrives as pyo3's PanicException, which
    # derives from BaseException; turn everything but interrupts into ours.
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise exc
    raise error(path, f"invalid safetensors file ({what}): {exc}") from exc


def _check_header_length(fh, path):
    size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    head = fh.read(8)
    if len(head) < 8:
        raise error(path, "invalid safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise error(path, f"invalid safetensors file: header length {n} does not fit "
                          f"a file of {size} bytes")
    fh.seek(0)
    return size


def load(fh, path):
    """Read the open safetensors file ``fh`` into ``{name: ndarray}``."""
    st = _safetensors()
    size = _check_header_length(fh, path)
    data = fh.read(size + 1)
    if len(data) != size:
        raise error(path, "file changed size while being read")
    try:
        items = st.deserialize(data)
    except BaseException as exc:
        _reraise(path, exc, "header")
    del data
    result = {}
    for name, info in items:
        code = info["dtype"]
        if code not in _DTYPES:
            raise error(path, f"tensor {name!r} has unsupported dtype {code}")
        raw = np.frombuffer(info["data"], dtype=_DTYPES[code])
        shape = tuple(info["shape"])
        if raw.size != int(np.prod(shape, dtype=object)):
            raise error(path, f"tensor {name!r}: {raw.size} elements for shape {shape}")
        array = raw.reshape(shape)
        if code == "BF16":
            array = bfloat16_to_float32(array)
        result[name] = finish(array)
    return result


def read_metadata(fh, path):
    """The ``__metadata__`` dict of the open safetensors file (``{}`` if none)."""
    st = _safetensors()
    _check_header_length(fh, path)
    try:
        with st.safe_open(os.fspath(path), framework="np") as f:
            metadata = f.metadata()
    except BaseException as exc:
        _reraise(path, exc, "header")
    return dict(metadata or {})


def check_metadata(metadata):
    """None or a mapping of str to str -> a plain dict (TypeError otherwise)."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("metadata must be a dict of str to str; got "
                            f"{type(key).__name__} key {key!r} with "
                            f"{type(value).__name__} value (encode it, e.g. with json.dumps)")
    return dict(metadata)


def _write(f, arrays, metadata):
    f.write(_safetensors().numpy.save(arrays, metadata=metadata))


def save(arrays, path, metadata=None):
    """Write ``{name: C-contiguous little-endian ndarray}`` atomically.

    The file is built in memory first (one extra copy of the data).
    """
    metadata = check_metadata(metadata)
    if "__metadata__" in arrays:
        raise ValueError("'__metadata__' is reserved by safetensors and cannot name a tensor")
    with atomic_write(path) as f:
        _write(f, arrays, metadata)

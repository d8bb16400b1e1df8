"""NumPy ``.npz`` files (a zip of ``.npy`` members).

Saving writes an uncompressed zip, one ``<name>.npy`` per array, exactly as
``np.savez`` does (numpy's own ``zipfile`` + ``np.lib.format.write_array``
steps, called directly because ``np.savez(f, **arrays)`` cannot take arrays
named ``file`` or ``allow_pickle``).  Metadata is not supported in .npz.

Loading accepts stored or deflated members (``np.savez_compressed``) holding
arrays of the supported dtypes, and refuses with CheckpointError:
object arrays (nothing is ever unpickled: ``allow_pickle=False``), other
dtypes, members not named ``*.npy`` or named twice, other compression
methods, and any member whose sizes do not add up.  Every ``.npy`` header is
read and checked (shape x itemsize + header == member size; member inside
the file; a deflated member cannot claim more than deflate's maximum
1032:1 ratio) before any array memory is allocated.
"""

import math
import os
import zipfile

import numpy as np

from ._common import CheckpointError, error, finish, is_supported, zip_members
from .atomic import atomic_write

_MAX_DEFLATE_RATIO = 1032


def _check_member(info, file_size, path):
    name = info.filename
    if info.compress_type == zipfile.ZIP_STORED:
        ok = info.compress_size == info.file_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        ok = info.file_size <= _MAX_DEFLATE_RATIO * info.compress_size + 1024
    else:
        raise error(path, f"member {name!r} uses unsupported compression {info.compress_type}")
    if not ok or info.header_offset + info.compress_size > file_size:
        raise error(path, f"member {name!r} declares sizes that do not fit the file")


def _read_header(fp, info, path):
    """Parse one member's .npy header; return (shape, dtype) once checked."""
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(fp)
    else:
        raise error(path, f"member {info.filename!r}: unsupported .npy version {version}")
    if dtype.hasobject:
        raise error(path, f"member {info.filename!r} is an object array; refused "
                          "(loading it would unpickle code)")
    if not is_supported(dtype):
        raise error(path, f"member {info.filename!r} has unsupported dtype {dtype}")
    expected = fp.tell() + math.prod(shape) * dtype.itemsize
    if expected != info.file_size:
        raise error(path, f"member {info.filename!r}: shape {shape} of {dtype} needs "
                          f"{expected} bytes but the member holds {info.file_size}")
    return shape, dtype


def _load(fh, path):
    file_size = os.fstat(fh.fileno()).st_size
    result = {}
    with zipfile.ZipFile(fh) as archive:
        for info in zip_members(archive, path):
            name = info.filename
            if not name.endswith(".npy"):
                raise error(path, f"member {name!r} is not a .npy file")
            if name[:-4] in result:
                raise error(path, f"member {name!r} appears twice")
            _check_member(info, file_size, path)
            with archive.open(info) as fp:
                shape, dtype = _read_header(fp, info, path)
            with archive.open(info) as fp:
                array = np.lib.format.read_array(fp, allow_pickle=False)
            if array.shape != shape or array.dtype != dtype:
                raise error(path, f"member {name!r} changed while being read")
            result[name[:-4]] = finish(array)
    return result


def load(fh, path):
    """Read the open .npz file ``fh`` into ``{name: ndarray}``."""
    try:
        return _load(fh, path)
    except CheckpointError:
        raise
    except Exception as exc:  # BadZipFile, ValueError, EOFError, OSError, ...
        raise error(path, f"invalid .npz file: {type(exc).__name__}: {exc}") from exc


def _write(f, arrays, metadata):
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def save(arrays, path, metadata=None):
    """Write ``{name: ndarray}`` atomically as an uncompressed .npz file."""
    if metadata:
        raise ValueError("metadata can only be stored in .safetensors files, not .npz")
    for name in arrays:
        if "\0" in name:
            raise ValueError(f"array name {name!r} contains a NUL character; .npz cannot store it")
    with atomic_write(path) as f:
        _write(f, arrays, None)

"""Read PyTorch ``torch.save`` checkpoints (.pt/.pth/.bin) without torch.

Layout read (torch >= 1.6): a zip holding ``<prefix>/data.pkl`` (the pickled
object), ``<prefix>/data/<key>`` (the raw bytes of each storage, stored
uncompressed) and optionally ``<prefix>/byteorder`` (``little`` or ``big``;
when absent the data is taken as little-endian).  Older non-zip files
(``torch_legacy``) are refused with a hint to re-save them.

Safety -- loading never runs code from the file:

- ``data.pkl`` is first scanned opcode by opcode (``pickletools``), which
  checks every length against the real data and refuses forbidden ``GLOBAL``
  names before anything is unpickled; then it is unpickled by a restricted
  Unpickler whose ``find_class`` knows only the globals below, each mapped to
  a harmless stand-in defined here (never the torch object), made afresh for
  every load and refusing pickle's BUILD opcode, so one file cannot alter
  how another is read:
  ``torch._utils._rebuild_tensor``, ``_rebuild_tensor_v2``,
  ``_rebuild_tensor_v3``, ``_rebuild_parameter``,
  ``_rebuild_parameter_with_state``; ``collections.OrderedDict`` (a dict
  that drops pickled attributes such as torch's ``_metadata``); the storage
  classes ``torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}
  Storage`` and ``torch.storage.UntypedStorage``; and ``torch.uint16``,
  ``torch.uint32``, ``torch.uint64`` (the only dtypes torch 2.13 pickles by
  name: they lack a storage class, so it writes ``_rebuild_tensor_v3``).
  Any other global -- ``os.system``, ``posix.system``, ``builtins.eval``,
  ``subprocess.Popen``, complex or float8 storages -- raises CheckpointError
  naming it.
- Limits: ``data.pkl`` at most ``MAX_PICKLE_BYTES``; every record read must
  be stored uncompressed and lie inside the file; a storage's declared size
  (numel x itemsize) must equal its record's size; a tensor's offset, sizes
  and strides must be non-negative ints and address only elements inside its
  storage; and all tensors together may not exceed twice the file size plus
  ``EXTRA_OUTPUT_BYTES`` (shared or expanded views are legal, but a small
  file may not expand into an enormous one).

Result: dtypes float32, float64, int8/16/32/64, uint8/16/32/64 and bool are
kept; float16 and bfloat16 are converted to float32 (exactly).  Every tensor
is an independent C-contiguous copy (views of one storage are materialised).
The unpickled object must be a dict (or OrderedDict) of str -> tensor; a
dict whose only key is ``'state_dict'`` or ``'model'`` holding such a dict
is unwrapped.  Anything else -- including non-tensor values such as an
``epoch`` int or a nested optimizer state -- is refused with CheckpointError
describing what was found, so nothing is dropped silently.
"""

import io
import math
import os
import pickle
import pickletools
import zipfile

import numpy as np

from ._common import (CheckpointError, bfloat16_to_float32, error, finish, short_repr,
                      zip_members)
from .detect import torch_data_pkl

MAX_PICKLE_BYTES = 64 << 20
EXTRA_OUTPUT_BYTES = 256 << 20
MAX_NDIM = 64

# torch dtype name -> little-endian numpy dtype of its elements
_ELEMENTS = {
    "float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<u2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "|i1",
    "uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "|b1",
}
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
# dtypes torch 2.x pickles as ``torch.<name>`` (with _rebuild_tensor_v3 and an
# UntypedStorage) because they have no storage class; the others never appear.
_DTYPE_GLOBALS = ("uint16", "uint32", "uint64")
_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
               "_rebuild_parameter", "_rebuild_parameter_with_state")


class _StandIn:
    """Base of the stand-ins: pickle's BUILD opcode may not modify them."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TypeError(f"a pickle tried to modify a {type(self).__name__}")


class _DType(_StandIn):
    """Stand-in for ``torch.<dtype>``: the name of an element type."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def numpy(self, byteorder):
        return np.dtype(_ELEMENTS[self.name]).newbyteorder("<" if byteorder == "little" else ">")


class _StorageType(_StandIn):
    """Stand-in for a torch storage class; ``element`` is None when untyped."""

    __slots__ = ("name", "element")

    def __init__(self, name, element):
        self.name, self.element = name, element


class _Storage(_StandIn):
    """A storage read from the zip: a flat read-only array (bytes if untyped)."""

    __slots__ = ("flat", "element")

    def __init__(self, flat, element):
        self.flat, self.element = flat, element


class _Callable(_StandIn):
    """Stand-in for an allowed function or class: calls ``func``, nothing else."""

    __slots__ = ("func",)

    def __init__(self, func):
        self.func = func

    def __call__(self, *args):
        return self.func(*args)


class _OrderedDict(dict):
    """What ``collections.OrderedDict()`` builds; pickled attributes are dropped."""

    def __setstate__(self, state):
        pass


_OrderedDict.__name__ = _OrderedDict.__qualname__ = "OrderedDict"  # for messages


def _stand_ins(unpickler):
    """(module, name) -> a fresh stand-in, made anew for every load so that
    nothing a file does to one can reach another load."""
    table = {("collections", "OrderedDict"): _Callable(_OrderedDict),
             ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None)}
    dtypes = {n: _DType(n) for n in _ELEMENTS}
    table.update({("torch", n): dtypes[n] for n in _DTYPE_GLOBALS})
    table.update({("torch", n): _StorageType(n, dtypes[e]) for n, e in _STORAGES.items()})
    table.update({("torch._utils", n): _Callable(getattr(unpickler, n)) for n in _REBUILDERS})
    return table


ALLOWED_GLOBALS = frozenset(
    [("collections", "OrderedDict"), ("torch.storage", "UntypedStorage")]
    + [("torch", n) for n in _DTYPE_GLOBALS + tuple(_STORAGES)]
    + [("torch._utils", n) for n in _REBUILDERS])


def _refuse_global(path, module, name):
    full = short_repr(f"{module}.{name}", 200)
    hint = " (a tensor type lorac does not read)" if module.startswith("torch") else ""
    return error(path, f"refused global {full}{hint} in data.pkl: loading never runs code "
                       "from a file; only tensors, storages and OrderedDict are allowed")


class _Unpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl into numpy arrays, allowing nothing else."""

    def __init__(self, data, reader):
        super().__init__(io.BytesIO(data))
        self._reader = reader
        self._storages = {}
        self._output_bytes = 0
        self._globals = _stand_ins(self)

    def find_class(self, module, name):
        if (module, name) in self._globals:
            return self._globals[module, name]
        raise _refuse_global(self._reader.path, module, name)

    def persistent_load(self, pid):
        path = self._reader.path
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise error(path, f"unsupported persistent id of type {type(pid).__name__}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) \
                or type(numel) is not int or numel < 0:
            raise error(path, "malformed storage reference in data.pkl")
        if key in self._storages:
            known_type, known_numel, storage = self._storages[key]
            if known_type is not stype or known_numel != numel:
                raise error(path, f"storage {short_repr(key)} is referenced with two types or sizes")
            return storage
        raw = self._reader.record("data/" + key)
        element = stype.element
        dtype = np.dtype(np.uint8) if element is None else element.numpy(self._reader.byteorder)
        if numel * dtype.itemsize != len(raw):
            raise error(path, f"storage {short_repr(key)} declares {numel} x {dtype.itemsize} "
                              f"bytes but its record holds {len(raw)}")
        storage = _Storage(np.frombuffer(raw, dtype=dtype), element)
        self._storages[key] = (stype, numel, storage)
        return storage

    # -- stand-ins for torch._utils --------------------------------------------

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._tensor(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride,
                           requires_grad=False, backward_hooks=None, metadata=None):
        return self._tensor(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride,
                           requires_grad, backward_hooks, dtype, metadata=None):
        if not isinstance(dtype, _DType):
            raise error(self._reader.path, "_rebuild_tensor_v3 without a dtype")
        return self._tensor(storage, storage_offset, size, stride, dtype)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks, state=None):
        if not isinstance(data, np.ndarray):
            raise error(self._reader.path, "a Parameter that does not wrap a tensor")
        return data

    _rebuild_parameter_with_state = _rebuild_parameter

    # -- building arrays ------------------------------------------------------

    def _tensor(self, storage, offset, size, stride, dtype):
        path = self._reader.path
        if not isinstance(storage, _Storage):
            raise error(path, "a tensor whose storage is not a storage")
        flat, element = storage.flat, storage.element
        if dtype is not None and element is None:  # untyped bytes + dtype (v3)
            target = dtype.numpy(self._reader.byteorder)
            if flat.size % target.itemsize:
                raise error(path, f"storage of {flat.size} bytes is not a whole number "
                                  f"of {dtype.name} elements")
            flat, element = flat.view(target), dtype
        elif element is None or (dtype is not None and dtype.name != element.name):
            raise error(path, "a tensor whose dtype does not match its storage")
        array = self._strided_copy(flat, offset, size, stride)
        if element.name == "bfloat16":
            array = bfloat16_to_float32(array)
        return finish(array)

    def _strided_copy(self, flat, offset, size, stride):
        """Validate offset/size/stride against ``flat`` and copy the view."""
        path = self._reader.path
        if not (isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) <= MAX_NDIM):
            raise error(path, "tensor size/stride are not tuples of equal length <= 64")
        if not all(type(v) is int and v >= 0 for v in (offset,) + size + stride):
            raise error(path, f"tensor offset/size/stride must be non-negative ints, got "
                              f"offset={short_repr(offset)}, size={size!r:.200}, "
                              f"stride={stride!r:.200}")
        count = math.prod(size)
        nbytes = count * flat.itemsize
        if self._output_bytes + nbytes > self._reader.output_budget:
            raise error(path, f"tensors would expand to more than "
                              f"{self._reader.output_budget} bytes")
        self._output_bytes += nbytes
        if count == 0:
            return np.zeros(size, dtype=flat.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise error(path, f"tensor (offset {offset}, size {size}, stride {stride}) reads "
                              f"element {last} of a storage of {flat.size}")
        strides = tuple(0 if n == 1 else s * flat.itemsize for n, s in zip(size, stride))
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=strides, writeable=False)
        return np.array(view, order="C")


class _ZipReader:
    """Checked access to the records of one torch zip archive."""

    def __init__(self, archive, path, file_size):
        self.archive, self.path, self.file_size = archive, path, file_size
        self.records = {info.filename: info for info in zip_members(archive, path)}
        found = torch_data_pkl(self.records)
        if len(found) != 1:
            raise error(path, f"expected one data.pkl record, found {len(found)}")
        self.prefix = found[0][: -len("data.pkl")]
        self.output_budget = 2 * file_size + EXTRA_OUTPUT_BYTES
        self.byteorder = "little"
        if self.prefix + "byteorder" in self.records:
            self.byteorder = self.record("byteorder", limit=16).decode("ascii", "replace")
            if self.byteorder not in ("little", "big"):
                raise error(path, f"unknown byteorder record {self.byteorder!r}")

    def record(self, name, limit=None):
        info = self.records.get(self.prefix + name)
        if info is None:
            raise error(self.path, f"missing record {short_repr(self.prefix + name)}")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise error(self.path, f"record {short_repr(info.filename)} is compressed; "
                                   "torch stores records uncompressed")
        if info.header_offset + info.file_size > self.file_size:
            raise error(self.path, f"record {short_repr(info.filename)} claims "
                                   f"{info.file_size} bytes, past the end of the file")
        if limit is not None and info.file_size > limit:
            raise error(self.path, f"record {short_repr(info.filename)} is larger than "
                                   f"the limit of {limit} bytes")
        return self.archive.read(info)


def _scan(data, path):
    """Walk every opcode (checks lengths); refuse forbidden GLOBAL/INST early."""
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("GLOBAL", "INST"):
            module, _, name = arg.partition(" ")
            if (module, name) not in ALLOWED_GLOBALS:
                raise _refuse_global(path, module, name)


def _as_state_dict(obj, path):
    if not isinstance(obj, dict):
        raise error(path, f"the checkpoint holds an object of type {type(obj).__name__}, "
                          "expected a dict of name -> tensor")
    if len(obj) == 1:
        ((key, value),) = obj.items()
        if key in ("state_dict", "model") and isinstance(value, dict):
            obj = value
    for key, value in obj.items():
        if not isinstance(key, str):
            raise error(path, f"key {short_repr(key)} is not a str")
        if not isinstance(value, np.ndarray):
            keys = ", ".join(short_repr(k, 40) for k in list(obj)[:10])
            raise error(path, f"entry {short_repr(key)} has type {type(value).__name__}, not "
                              "a tensor; only a flat dict of name -> tensor (optionally as the "
                              "only entry 'state_dict' or 'model') can be loaded. Keys found: "
                              f"{keys}{', ...' if len(obj) > 10 else ''}")
    return dict(obj)


def _load(fh, path):
    file_size = os.fstat(fh.fileno()).st_size
    with zipfile.ZipFile(fh) as archive:
        reader = _ZipReader(archive, path, file_size)
        data = reader.record("data.pkl", limit=MAX_PICKLE_BYTES)
        _scan(data, path)
        obj = _Unpickler(data, reader).load()
    return _as_state_dict(obj, path)


def load(fh, path):
    """Read the open torch zip checkpoint ``fh`` into ``{name: ndarray}``."""
    try:
        return _load(fh, path)
    except CheckpointError:
        raise
    except Exception as exc:  # BadZipFile, UnpicklingError, EOFError, TypeError, ...
        raise error(path, f"invalid torch checkpoint: {type(exc).__name__}: {exc}") from exc


def load_legacy(fh, path):
    """Pre-1.6 torch files are a bare pickle stream: refused, never unpickled."""
    raise error(path, "this is a legacy (pre-zip) torch.save file or a bare pickle, which "
                      "lorac does not read; re-save it with torch >= 1.6: "
                      "torch.save(torch.load(old, weights_only=True), new, "
                      "_use_new_zipfile_serialization=True)")

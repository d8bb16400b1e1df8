"""Recognise a checkpoint's format from its content; the file name is ignored.

- zip archive (starts ``PK\\x03\\x04``, or ``PK\\x05\\x06`` when empty):
  ``'torch_zip'`` if it holds a ``data.pkl`` record (at the top or in one
  top-level folder, as ``torch.save`` writes), ``'npz'`` if every member is a
  ``.npy`` file, otherwise refused.
- ``'safetensors'``: the first 8 bytes are a little-endian u64 header length
  N with ``0 < N <= file size - 8`` and byte 8 is ``{``.
- ``'torch_legacy'``: a bare pickle (``0x80`` then protocol 2..5), which is
  what ``torch.save`` wrote before PyTorch 1.6.
- anything else raises CheckpointError("unrecognised checkpoint format").
"""

import os
import struct
import zipfile

from ._common import error

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def torch_data_pkl(names):
    """The ``data.pkl`` member names of a torch zip (``prefix/data.pkl``)."""
    return [n for n in names
            if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]


def sniff(fh, path):
    """Format of the open binary file ``fh``; leaves it positioned at 0."""
    size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    head = fh.read(9)
    fh.seek(0)
    if head[:4] in _ZIP_MAGICS:
        try:
            with zipfile.ZipFile(fh) as archive:
                names = archive.namelist()
        except Exception as exc:
            raise error(path, f"corrupt zip archive: {exc}") from exc
        finally:
            fh.seek(0)
        if torch_data_pkl(names):
            return "torch_zip"
        if all(n.endswith(".npy") for n in names):
            return "npz"
        raise error(path, "zip archive that is neither a torch checkpoint (no data.pkl) "
                          "nor an .npz file (members other than .npy)")
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8:
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch_legacy"
    raise error(path, "unrecognised checkpoint format (expected safetensors, .npz or a "
                      "torch.save zip file)")


def detect_format(path):
    """Return ``'safetensors'``, ``'npz'``, ``'torch_zip'`` or ``'torch_legacy'``.

    Raises CheckpointError for other content and OSError if the file cannot be
    opened.
    """
    with open(path, "rb") as fh:
        return sniff(fh, path)

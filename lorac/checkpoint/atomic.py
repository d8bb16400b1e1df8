"""Atomic file replacement: an interrupted save never harms the old file.

``with atomic_write(path) as f: f.write(...)`` writes to a new temporary file
in the same folder (so the rename stays on one file system), then flushes,
``os.fsync``s and ``os.replace``s it over ``path`` and finally fsyncs the
folder (best effort: not every platform can open a folder).  If anything
raises inside the block -- including KeyboardInterrupt -- the temporary file
is removed and ``path`` is left exactly as it was.  The new file gets the old
file's permission bits, or the usual ``0o666 & ~umask`` for a new file.
"""

import contextlib
import os
import secrets
import stat

_OPEN_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL
               | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))


def _create_temp(path):
    """Create and open a new, unique temporary file next to ``path``."""
    folder, base = os.path.split(os.path.abspath(path))
    for _ in range(100):
        name = os.path.join(folder, f".{base[:100]}.{secrets.token_hex(6)}.tmp")
        try:
            return name, os.open(name, _OPEN_FLAGS, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path):
    """Context manager yielding a binary file object that replaces ``path``."""
    path = os.fspath(path)
    if os.path.isdir(path):  # else the error would come only after the whole file is written
        raise IsADirectoryError(f"cannot save to {path!r}: it is a folder; give a file name")
    temp, fd = _create_temp(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temp, stat.S_IMODE(os.stat(path).st_mode))
        with os.fdopen(fd, "wb") as f:
            fd = None
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))

"""BLAS runtime: which OpenBLAS lorac uses and how many threads it runs."""

import importlib.machinery
import os
import sys

try:
    from . import _C
except ImportError as error:  # lorac/ without its built extension, e.g. the source tree on sys.path
    _here = os.path.dirname(os.path.abspath(__file__))
    if any(os.path.exists(os.path.join(_here, "_C" + suffix))
           for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        raise  # built for this Python but failed to load: the loader's own message says why
    raise ImportError(f"lorac's C extension lorac._C is not built for this Python in {_here}: the source "
                      "tree on sys.path (as the working directory?) shadows an installed lorac; install it "
                      "(pip install .) and import it from another directory, or build in place for "
                      "development (python setup.py build_ext --inplace)") from error


def blas_info():
    """dict: name (how the build found OpenBLAS), config, corename, num_threads, num_procs."""
    return _C.blas_info()


def get_num_threads():
    """Number of threads OpenBLAS uses for lorac's kernels."""
    return _C.get_num_threads()


def set_num_threads(n):
    """Set the number of OpenBLAS threads (1 <= n <= 4096)."""
    _C.set_num_threads(n)


def show_config(file=None):
    """Print lorac's version, the BLAS in use and its thread count."""
    from . import __version__
    import numpy as np

    info = blas_info()
    lines = [
        f"lorac {__version__}",
        f"  BLAS:        {info['name']}",
        f"  BLAS config: {info['config']}",
        f"  CPU kernels: {info['corename']}",
        f"  threads:     {info['num_threads']} (of {info['num_procs']} processors)",
        f"  numpy:       {np.__version__}",
        f"  python:      {sys.version.split()[0]}",
    ]
    print("\n".join(lines), file=file)

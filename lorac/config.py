"""BLAS runtime: which OpenBLAS lorac uses and how many threads it runs."""

import sys

from . import _C


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

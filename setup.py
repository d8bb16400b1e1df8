"""Build lorac._C: the C kernels (csrc/) and their CPython/NumPy binding.

BLAS selection (environment variable LORAC_BLAS):

* unset or ``scipy-openblas32`` (default): compile against the OpenBLAS of the
  ``scipy-openblas32`` wheel, a build requirement.  Its symbols carry the
  ``scipy_`` prefix.  The shared library is copied next to the extension inside
  the installed ``lorac`` package and found through an rpath of ``$ORIGIN``, so
  the installed package needs no ``scipy-openblas32`` at run time.
* ``system``: compile against a system OpenBLAS found with pkg-config
  (``openblas``, or ``cblas``), e.g. Debian's ``libopenblas-dev``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = "csrc"


def _pkg_config(*args):
    return subprocess.check_output(["pkg-config", *args], text=True).split()


def _system_blas():
    for name in ("openblas", "cblas"):
        try:
            cflags = _pkg_config("--cflags", name)
            libs = _pkg_config("--libs", name)
        except (OSError, subprocess.CalledProcessError):
            continue
        include_dirs = [f[2:] for f in cflags if f.startswith("-I")]
        library_dirs = [f[2:] for f in libs if f.startswith("-L")]
        libraries = [f[2:] for f in libs if f.startswith("-l")]
        return {
            "include_dirs": include_dirs,
            "library_dirs": library_dirs,
            "libraries": libraries,
            "define_macros": [("LORAC_BLAS_NAME", f'"system {name} (pkg-config)"')],
            "extra_link_args": [f"-Wl,-rpath,{d}" for d in library_dirs],
            "bundled_library": None,
        }
    sys.exit(
        "LORAC_BLAS=system: no OpenBLAS found with pkg-config (tried 'openblas', "
        "'cblas'). Install it, e.g. `apt-get install libopenblas-dev pkg-config`."
    )


def _wheel_blas():
    try:
        import scipy_openblas32 as sob
    except ImportError:
        sys.exit(
            "lorac needs the build requirement 'scipy-openblas32' "
            "(pip installs it automatically from pyproject.toml), or set LORAC_BLAS=system."
        )
    lib_dir = sob.get_lib_dir()
    return {
        "include_dirs": [sob.get_include_dir()],
        "library_dirs": [lib_dir],
        "libraries": [sob.get_library()],
        "define_macros": [
            ("LORAC_BLAS_SCIPY_PREFIX", "1"),
            ("LORAC_BLAS_NAME", f'"scipy-openblas32 {sob.__version__} (bundled)"'),
        ],
        "extra_link_args": ["-Wl,-rpath,$ORIGIN"],
        "bundled_library": os.path.join(lib_dir, sob.get_library(fullname=True)),
    }


def _blas_config():
    choice = os.environ.get("LORAC_BLAS", "scipy-openblas32").strip().lower()
    if choice in ("", "default", "scipy-openblas32", "scipy_openblas32", "wheel"):
        return _wheel_blas()
    if choice == "system":
        return _system_blas()
    sys.exit(f"LORAC_BLAS must be 'scipy-openblas32' (default) or 'system', got {choice!r}")


BLAS = _blas_config()
SANITIZE = os.environ.get("LORAC_SANITIZE", "").strip()
# -fno-math-errno: lorac never reads errno, and without it sqrt() blocks vectorisation.
COMPILE_ARGS = ["-std=c11", "-O3", "-fno-math-errno", "-Wall", "-Wextra", "-fvisibility=hidden"]
LINK_ARGS = list(BLAS["extra_link_args"])
if SANITIZE:
    COMPILE_ARGS += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]
    LINK_ARGS += [f"-fsanitize={SANITIZE}"]


class BuildExtBundlingBlas(build_ext):
    """build_ext that also copies the bundled OpenBLAS next to lorac/_C*.so."""

    def run(self):
        super().run()
        lib = BLAS["bundled_library"]
        if not lib:
            return
        for ext in self.extensions:
            target_dir = Path(self.get_ext_fullpath(ext.name)).parent
            target = target_dir / Path(lib).name
            if not target.exists() or target.stat().st_size != Path(lib).stat().st_size:
                shutil.copy2(lib, target)


sources = sorted(str(p.relative_to(HERE)) for p in (HERE / CSRC).glob("*.c"))

ext = Extension(
    "lorac._C",
    sources=sources,
    include_dirs=[CSRC, numpy.get_include(), *BLAS["include_dirs"]],
    library_dirs=BLAS["library_dirs"],
    libraries=BLAS["libraries"],
    define_macros=[
        ("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
        *BLAS["define_macros"],
    ],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=LINK_ARGS,
    depends=sorted(str(p.relative_to(HERE)) for p in (HERE / CSRC).glob("*.h")),
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtBundlingBlas},
    package_data={"lorac": ["*.so", "*.so.*"]},
)

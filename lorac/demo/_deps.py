"""The demo's optional dependencies (the ``demo`` extra), imported lazily."""

import importlib

INSTALL_HINT = "pip install 'lorac[demo]'  (scikit-learn, matplotlib, tqdm)"


class MissingDependency(ImportError):
    """An optional package the demo needs is not installed."""


def require(module, package=None):
    """import_module(module), or MissingDependency saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(f"lorac demo needs the package {package or module!r} ({exc}); "
                                f"install the demo extra: {INSTALL_HINT}") from None

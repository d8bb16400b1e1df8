import os
import sys

import numpy as np
import pytest

# Test helpers (reference.py) import as plain modules from this folder.
sys.path.insert(0, os.path.dirname(__file__))

try:  # hypothesis profiles: `pytest --hypothesis-profile=long` for thousands of examples
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=300, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=5000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


DTYPES = [np.float32, np.float64]


@pytest.fixture
def child_env():
    """Environment for a child Python that must import the same lorac as this
    process (installed, or the source tree in development).  Run the child with
    cwd set to a temporary folder, never the repository root, whose unbuilt
    lorac/ would shadow the installed package."""
    import lorac

    root = os.path.dirname(os.path.dirname(os.path.abspath(lorac.__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))

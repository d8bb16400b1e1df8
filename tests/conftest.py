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

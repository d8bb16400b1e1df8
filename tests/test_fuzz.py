"""Runs the fuzz harness (tests/fuzz/fuzz_lorac.py) for a time budget (issue 7).

The harness runs in a subprocess so that a crash of the interpreter (a
segfault in C code) is seen as a non-zero exit status, not as a dead test
runner.  Budget: env LORAC_FUZZ_SECONDS (default 60).  Engine: atheris when
installed (the test extra), else a random driver; under the sanitizers
(LORAC_UNDER_SANITIZER) always the random driver, so the ASan-instrumented
build sees the same hostile inputs.  Longer local runs:

    LORAC_FUZZ_SECONDS=3600 python -m pytest tests/test_fuzz.py
    python tests/fuzz/fuzz_lorac.py --seconds 3600 -- corpus/
"""

import os
import subprocess
import sys

import pytest

import lorac

HARNESS = os.path.join(os.path.dirname(__file__), "fuzz", "fuzz_lorac.py")
SECONDS = float(os.environ.get("LORAC_FUZZ_SECONDS", "60"))


def _run(workdir, seconds, engine, *extra):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(lorac.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if env.get("LORAC_UNDER_SANITIZER"):  # no RLIMIT_AS under ASan: cap single allocations instead
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":allocator_may_return_null=1:max_allocation_size_mb=2048"
    return subprocess.run([sys.executable, HARNESS, "--seconds", str(seconds), "--engine", engine,
                           "--workdir", str(workdir), *extra],
                          env=env, capture_output=True, text=True, timeout=seconds * 3 + 120, cwd=workdir)


def _engines():
    if os.environ.get("LORAC_UNDER_SANITIZER"):  # libFuzzer and a preloaded ASan runtime do not mix
        return ["random"]
    try:
        import atheris  # noqa: F401
        return ["random", "atheris"]
    except ImportError:
        return ["random"]


@pytest.mark.parametrize("engine", _engines())
def test_a_finding_fails_the_run(engine, tmp_path):
    proc = _run(tmp_path, 5, engine, "--self-test")
    assert proc.returncode != 0
    assert "self-test finding" in proc.stdout + proc.stderr


def test_fuzz_harness_finds_nothing(tmp_path):
    engine = "random" if os.environ.get("LORAC_UNDER_SANITIZER") else os.environ.get("LORAC_FUZZ_ENGINE", "auto")
    proc = _run(tmp_path, SECONDS, engine)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"fuzz harness exited with {proc.returncode}:\n{tail}"
    assert "fuzz_lorac: engine=" in proc.stdout, tail

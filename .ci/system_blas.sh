#!/usr/bin/env bash
# Build lorac against the system OpenBLAS (LORAC_BLAS=system) in a fresh virtual
# environment and run the core tests.  Not part of .ci/run (CI tests the default
# bundled build); run it locally after `apt-get install libopenblas-dev pkg-config`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
LORAC_BLAS=system pip install ".[test]"
# from another directory: the source tree's lorac/ (no built _C) would shadow the installed package
(cd "$(mktemp -d)" && python -c "import lorac; lorac.show_config()") | tee /dev/stderr | grep "system" > /dev/null  # not -q: an early exit would SIGPIPE tee
pytest tests/test_linear_kernels.py tests/test_linear_layer.py tests/test_linear_bad_input.py tests/test_module.py

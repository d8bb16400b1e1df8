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
# -P: not the source tree in the working directory (it has no built _C) but the installed package
python -P -c "import lorac; lorac.show_config()" | tee /dev/stderr | grep -q "system"
pytest tests/test_linear_kernels.py tests/test_linear_layer.py tests/test_linear_bad_input.py tests/test_module.py

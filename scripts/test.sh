#!/usr/bin/env bash
# Runs the test suite on a fresh machine: creates .venv with Python 3.11 if it is missing,
# installs the pinned requirements, then runs pytest on TEST_WORKERS worker processes (default 2,
# one per core of the CI machine; each test file stays on one worker). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@" tests

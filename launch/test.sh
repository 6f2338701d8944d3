#!/usr/bin/env bash
# The whole test suite (CPU, tiny configs), in .venv (created and installed on first use).
# Exits non-zero on any failure, and when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
exec "${VENV:-.venv}/bin/python" -m pytest -q tests "$@"

#!/usr/bin/env bash
# The whole test suite (CPU, tiny configs). Exits non-zero on any failure or when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q tests "$@"

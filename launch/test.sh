#!/usr/bin/env bash
# The whole test suite (CPU, tiny configs), in .venv (created and installed on first use).
# Exits non-zero on any failure, and when no test ran. Test files run in one worker process per core, at most 4
# (pytest-xdist): the suite is bound by single-threaded XLA compiles. PYTEST_WORKERS=0 runs them in this process.
# One persistent XLA compilation cache per run (removed afterwards) is shared by the workers and the processes
# the tests start: the same programs compile in several files, and again in every CLI subprocess.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
cores=$(nproc)
workers="${PYTEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
cache="$(mktemp -d "${TMPDIR:-/tmp}/dreamvideo_jax_xla_cache.XXXXXX")"
trap 'rm -rf "$cache"' EXIT
JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$cache}" \
  "${VENV:-.venv}/bin/python" -m pytest -q -n "$workers" --dist loadfile tests "$@"

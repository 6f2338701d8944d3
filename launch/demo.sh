#!/usr/bin/env bash
# The moving-shapes demo on CPU, in .venv (created and installed on first use). Extra flags go to the demo,
# e.g. bash launch/demo.sh --workdir=runs/demo2
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh runtime
exec "${VENV:-.venv}/bin/python" -m dreamvideo_jax.demo "$@"

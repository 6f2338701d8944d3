#!/usr/bin/env bash
# Creates (or reuses) a virtualenv and installs the pinned requirements.
# Usage: bash launch/setup.sh [VENV_DIR=.venv] [runtime|test]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
kind="${2:-runtime}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
if [ "$kind" = test ]; then
  python -m pip install -q -r requirements-test.txt
else
  python -m pip install -q -r requirements.txt
fi
python -m pip install -q --no-deps -r requirements-nodeps.txt
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, 'devices', jax.devices())"

#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs the pinned requirements; does nothing when they are already installed.
# Usage: bash launch/setup.sh [runtime|test]
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-runtime}"
venv="${VENV:-.venv}"
case "$kind" in
  runtime) reqs=(requirements.txt requirements-nodeps.txt) ;;
  test) reqs=(requirements.txt requirements-test.txt requirements-nodeps.txt) ;;
  *) echo "setup.sh: unknown kind '$kind' (use runtime or test)" >&2; exit 2 ;;
esac
stamp="$venv/.installed-$kind"
want=$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if [ "$kind" = test ]; then
  "$venv/bin/python" -m pip install -q -r requirements-test.txt
else
  "$venv/bin/python" -m pip install -q -r requirements.txt
fi
"$venv/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
if [ "$kind" = test ]; then
  # The Kinetics-400 label names ship in torchvision's wheel, which cannot be installed beside torch 2.13:
  # keep the wheel file for the I3D test to read.
  "$venv/bin/python" -m pip download -q --no-deps torchvision==0.29.1 -d "$venv/test-assets/torchvision_wheel"
fi
"$venv/bin/python" -c "import jax, flax; print('installed: jax', jax.__version__, 'flax', flax.__version__)"
echo "$want" > "$stamp"

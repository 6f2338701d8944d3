#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs this project into it (editable, with the pinned requirements);
# does nothing when that is already done for the same pins.
# Usage: bash launch/setup.sh [runtime|test|tpu|cuda]
#   runtime  pip install -e .           test  pip install -e ".[test]" (+ test assets)
#   tpu      pip install -e ".[tpu]"    cuda  pip install -e ".[cuda]"
# each followed by requirements-nodeps.txt with --no-deps (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-runtime}"
venv="${VENV:-.venv}"
case "$kind" in
  runtime) extra="" ;;
  test|tpu|cuda) extra="[$kind]" ;;
  *) echo "setup.sh: unknown kind '$kind' (use runtime, test, tpu or cuda)" >&2; exit 2 ;;
esac
reqs=(pyproject.toml requirements.txt requirements-nodeps.txt)
[ -z "$extra" ] || reqs+=("requirements-$kind.txt")
stamp="$venv/.installed-$kind"
want=$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".$extra"
"$venv/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
if [ "$kind" = test ]; then
  # The Kinetics-400 label names ship in torchvision's wheel, which cannot be installed beside torch 2.13:
  # keep the wheel file for the I3D test to read.
  "$venv/bin/python" -m pip download -q --no-deps torchvision==0.29.1 -d "$venv/test-assets/torchvision_wheel"
fi
"$venv/bin/python" -c "import jax, flax; print('installed: jax', jax.__version__, 'flax', flax.__version__)"
echo "$want" > "$stamp"

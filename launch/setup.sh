#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs this project into it (editable, with the pinned requirements);
# does nothing when that is already done for the same pins.
# Usage: bash launch/setup.sh [runtime|test|tpu|cuda]
#   runtime  pip install -e .           test  pip install -e ".[test]" (+ test assets)
#   tpu      pip install -e ".[tpu]"    cuda  pip install -e ".[cuda]"
# each followed by requirements-nodeps.txt with --no-deps (see pyproject.toml).
# An up-to-date `test` install also counts as a `runtime` one (the same pins plus the test extras), so
# `launch/demo.sh` in the venv `launch/test.sh` made installs nothing.
# DREAMVIDEO_NO_INSTALL=1: exit 1 instead of installing when the venv is not up to date (tests, CI checks).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-runtime}"
venv="${VENV:-.venv}"
case "$kind" in
  runtime) extra="" ;;
  test|tpu|cuda) extra="[$kind]" ;;
  *) echo "setup.sh: unknown kind '$kind' (use runtime, test, tpu or cuda)" >&2; exit 2 ;;
esac
base_reqs=(pyproject.toml requirements.txt requirements-nodeps.txt)
pins() {  # the stamp of an install of kind $1: a hash of the files that decide what it installs
  local files=("${base_reqs[@]}")
  [ "$1" = runtime ] || files+=("requirements-$1.txt")
  cat "${files[@]}" | sha256sum | cut -d' ' -f1
}
installed() { [ -f "$venv/.installed-$1" ] && [ "$(cat "$venv/.installed-$1")" = "$(pins "$1")" ]; }
stamp="$venv/.installed-$kind"
want=$(pins "$kind")
if installed "$kind" || { [ "$kind" = runtime ] && installed test; }; then
  exit 0
fi
if [ "${DREAMVIDEO_NO_INSTALL:-0}" = 1 ]; then
  echo "setup.sh: $venv has no up-to-date '$kind' install and DREAMVIDEO_NO_INSTALL=1: not installing" >&2
  exit 1
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

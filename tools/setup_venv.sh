#!/usr/bin/env bash
# Create a virtual environment with Pivotal installed (editable) and its test dependencies.
#   bash tools/setup_venv.sh                 -> .venv/        current libraries
#   bash tools/setup_venv.sh --a1111 DIR     -> DIR/          the A1111 v1.10.1 pins
#   bash tools/setup_venv.sh --forge DIR     -> DIR/          Forge's pins (gradio 4.40, pydantic 2)
# Safe to re-run: an existing environment is updated in place.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=current
if [ "${1:-}" = "--a1111" ]; then flavour=a1111; shift; elif [ "${1:-}" = "--forge" ]; then flavour=forge; shift; fi
venv=${1:-.venv}
if [ "$flavour" = current ]; then open_clip="open_clip_torch"; else open_clip="open_clip_torch==2.20.0"; fi

python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install --upgrade pip
# torch first and alone: the CPU build 2.13.0 is the one this machine has locally; anything
# that pulled another torch would download several GB of CUDA wheels.
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -r "requirements/$flavour.txt"
"${pip[@]}" install --no-deps -r requirements/fixtures.txt "$open_clip"
"${pip[@]}" install --no-deps -e .
echo "ready: $venv ($flavour) — run the tests with: $venv/bin/python -m pytest"

#!/usr/bin/env bash
# Create .venv and install finetune with its test tools; a no-op when pyproject.toml has not changed.
# Needs Python >= 3.10 with venv and pip; everything else comes from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FINETUNE_VENV:-.venv}
stamp="$VENV/.finetune-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if [ "$(uname -m)" = "x86_64" ] && [ "$(uname -s)" = "Linux" ]; then
  # torch and torchvision must come as a matching pair: these two are known to import together here.
  "$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
echo "setup: installing finetune and its dependencies into $VENV" >&2
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"

#!/usr/bin/env bash
# The README's test command: set up (first run only), then the default test suite (slow tests excluded;
# run them with: scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

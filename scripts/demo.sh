#!/usr/bin/env bash
# Set up poolscope in .venv and run the demo: a local server, saturated pools, the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[demo]'
exec .venv/bin/python -m poolscope.demo "$@"

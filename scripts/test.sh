#!/usr/bin/env bash
# Install everything the tests need (system packages as root, Python packages in .venv)
# and run the whole test suite. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    command -v prometheus >/dev/null || need+=(prometheus)
    command -v promtool >/dev/null || need+=(prometheus)
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
        # the package starts a service we do not want; tests start their own server
        (service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"

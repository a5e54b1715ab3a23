#!/usr/bin/env bash
# Install everything the tests need (system packages as root, Python packages in .venv)
# and run the whole test suite, then the version matrix (noxfile.py). This is the README's
# test command and what CI runs. Arguments select tests (pytest's) and skip the matrix.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
        # the packages start services we do not want; tests and benchmarks start their own
        (service prometheus stop; service nginx stop; pkill -x prometheus; pkill -x nginx; true) >/dev/null 2>&1
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pytest "$@"
# the version matrix (noxfile.py) runs with the whole suite, not with a selection of tests
if [ $# -eq 0 ]; then
    .venv/bin/nox -s matrix
fi

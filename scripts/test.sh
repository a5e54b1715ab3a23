#!/usr/bin/env bash
# Install everything the tests need (system packages as root, Python packages in .venv)
# and run the whole test suite, then the version matrix (noxfile.py). This is the README's
# test command and what CI runs. Arguments select tests (pytest's) and skip the matrix and the
# libraries' own suites.
# It starts and stops only its own processes: the tests run nginx and Prometheus themselves,
# on free ports, and stop them by their own handles.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
    command -v valgrind >/dev/null || need+=(valgrind)
    if [ ${#need[@]} -gt 0 ]; then
        # Debian's policy-rc.d convention: exit 101 keeps the packages from starting their
        # services, so there is nothing to stop afterwards. One already there is left alone.
        policy=/usr/sbin/policy-rc.d
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
            trap 'rm -f "$policy"' EXIT
        fi
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
        if [ -n "$(trap -p EXIT)" ]; then rm -f "$policy"; trap - EXIT; fi
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pytest "$@"
# the version matrix (noxfile.py) and the libraries' own suites with and without poolscope
# (scripts/peer_suites.py, loopback-only, which needs root) run with the whole suite, not
# with a selection of tests
if [ $# -eq 0 ]; then
    .venv/bin/nox -s matrix urllib3-future curl_cffi httpx-socks
    if [ "$(id -u)" = 0 ]; then
        .venv/bin/python scripts/peer_suites.py
    else
        echo "scripts/peer_suites.py skipped: its loopback-only network namespace needs root"
    fi
fi

"""The benchmark keeps working: one short round of every library, case and mode, and the memory
cases at a small scale. Nothing here is about speed; the figures are in docs/performance.md."""

import os
import subprocess
import sys

import pytest

from conftest import require_tool

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run.py")


def test_benchmark_smoke():
    require_tool("nginx")
    result = subprocess.run([sys.executable, BENCH, "--smoke"], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "**" in line]
    # 6 libraries x 2 cases x 4 modes, less pycurl's official (there is none)
    assert len(rows) == 46, result.stdout


def test_memory_smoke():
    require_tool("nginx")
    result = subprocess.run([sys.executable, BENCH, "--memory", "--smoke"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "20,000 sequential requests" in result.stdout
    assert "144 origins" in result.stdout


@pytest.mark.parametrize("hooks_only", [[], ["--hooks-only"]], ids=["full", "hooks-only"])
def test_inprocess_smoke(hooks_only):
    require_tool("nginx")
    script = os.path.join(os.path.dirname(BENCH), "inprocess.py")
    result = subprocess.run([sys.executable, script, "urllib3", "sequential", "--rounds", "2",
                             "--requests", "50", *hooks_only], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    label = "urllib3 sequential (hooks only):" if hooks_only else "urllib3 sequential:"
    assert label in result.stdout and "failed requests 0" in result.stdout


def test_hooks_smoke():
    require_tool("nginx")
    script = os.path.join(os.path.dirname(BENCH), "hooks.py")
    result = subprocess.run([sys.executable, script, "--rounds", "2", "--cycles", "200",
                             "--best-of", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines()
            if line.startswith("| ") and "**" in line]
    assert rows == ["urllib3", "httpx", "aiohttp", "pycurl", "pycurl-multi"], result.stdout


@pytest.mark.parametrize("library", ["urllib3", "httpx2-async"])
def test_instructions_smoke(library):
    require_tool("nginx")
    require_tool("valgrind")
    if library == "httpx2-async":
        pytest.importorskip("httpx2")
    script = os.path.join(os.path.dirname(BENCH), "instructions.py")
    rounds = 2 if library == "urllib3" else 1  # rounds give the ratios' range
    result = subprocess.run([sys.executable, script, "--libraries", library, "--cases",
                             "sequential", "--scale", "0.01", "--rounds", str(rounds)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines()
            if line.startswith("| ") and "**" in line]
    assert [row[1:4] for row in rows] == [[f" {library} ", " sequential ", " default "]], \
        result.stdout
    assert int(rows[0][4].replace(",", "")) > 0, result.stdout  # instructions per request
    assert bool(rows[0][9].strip()) == (rounds > 1), result.stdout


def test_instructions_rounds_below_one_is_a_clear_error():
    script = os.path.join(os.path.dirname(BENCH), "instructions.py")
    result = subprocess.run([sys.executable, script, "--rounds", "0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "--rounds must be at least 1" in result.stderr and "Traceback" not in result.stderr


def test_waits_smoke():
    """Each case's figure is positive. (Over 20 operations, the cheapest case read -214 once:
    a run's own noise, divided by too few operations.)"""
    require_tool("valgrind")
    script = os.path.join(os.path.dirname(BENCH), "waits.py")
    result = subprocess.run([sys.executable, script, "--operations", "200"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines()
            if line.startswith("| ") and line[2:4] in ("re", "wa")]
    assert [row[1].strip() for row in rows] == ["record"] * 3 + ["wait"] * 3, result.stdout
    assert all(int(row[3].replace(",", "")) > 0 for row in rows), result.stdout

"""Run the HTTP libraries' own test suites with and without poolscope; fail on any test whose
outcome differs.

For each library, at the version installed in ``.venv``: its source distribution from PyPI
(which ships its tests), a virtual environment of its own under ``.peer/`` with the library at
that version, its test requirements and poolscope, then the same selection of tests run
three ways:

- ``bare``: without poolscope;
- ``instrumented``: ``poolscope.instrument()`` before the library is imported (the pytest
  plugin ``tests/peers/poolscope_peer.py``), metrics collected after every test;
- ``strict``: the same, each test under a recording parent span (so poolscope's spans are
  made) and ``POOLSCOPE_STRICT=true`` (poolscope's own failures raise).

A test whose outcome differs from the bare run is run alone three times each way. It is a
difference when alone it shows an outcome it never shows bare alone, or when both instrumented
runs agree against the bare run and that outcome is not one the test shows bare alone (a
difference may show only in a whole run, where tests share a process); otherwise it is a flake
of the suite (a test whose outcome varies bare), and is listed. A test the suite marks xfail
(not strict) that passes in one run and fails in another is no difference either: both are its
outcomes by its own mark (it is listed too).

Every run is in a network namespace of its own with nothing but loopback (``unshare -n``, so
it needs root): the suites' servers are on 127.0.0.1, and a test that reaches for another
address (the internet, a black-hole address for a timeout) fails at once in every run, so it
is no difference.

    .venv/bin/python scripts/peer_suites.py              # every library, the pool-related files
    .venv/bin/python scripts/peer_suites.py pycurl --full  # one library, its whole suite

``scripts/test.sh`` runs it after the version matrix. What each selection leaves out, and why,
is in ``SUITES`` below and in docs/libraries.md.
"""

import argparse
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".peer"
PLUGIN_DIR = ROOT / "tests" / "peers"

# dist: the PyPI project; tests: its test folder; install: what its tests need ("group:NAME"
# for a PEP 735 dependency group of its pyproject.toml, else requirement strings); files: the
# pool-related part run by default (None: all of it); args: pytest options every run takes.
SUITES = {
    "pycurl": dict(
        dist="pycurl", tests="tests", install=["group:test"],
        files=[f"tests/{name}" for name in (
            "multi_test.py", "multi_memory_mgmt_test.py", "multi_callback_test.py",
            "multi_socket_test.py", "test_multi_notify.py", "test_async_multi.py",
            "share_test.py", "test_memory_mgmt_close_matrix.py", "memory_mgmt_test.py",
            "subclass_test.py", "test_subclass_finalize.py", "weakref_test.py",
            "duphandle_test.py", "reset_test.py", "getinfo_test.py", "info_test.py",
            "prereq_cb_test.py", "sockopt_cb_test.py", "open_socket_cb_test.py",
            "close_socket_cb_test.py", "setopt_test.py", "setopt_lifecycle_test.py",
            "test_write_cb_memoryview.py", "perform_test.py", "curl_object_test.py",
            "context_manager_test.py", "test_connect_only_send_recv.py", "test_websocket.py",
            "test_websocket_callback.py")],
        # reload_test reloads pycurl, which undoes any replacement of its classes (documented)
        args=["-m", "not online", "-p", "no:randomly", "--deselect",
              "tests/reload_test.py"]),
    "urllib3": dict(
        dist="urllib3", tests="test", install=["group:test", "trustme", "cryptography"],
        files=["test/test_connectionpool.py", "test/test_poolmanager.py",
               "test/test_queue_monkeypatch.py", "test/test_connection.py",
               "test/with_dummyserver/test_connectionpool.py",
               "test/with_dummyserver/test_poolmanager.py",
               "test/with_dummyserver/test_socketlevel.py"],
        args=[]),
    "requests": dict(
        dist="requests", tests="tests",
        install=["pytest-httpbin", "pytest-mock", "trustme", "werkzeug"],
        files=["tests/test_requests.py", "tests/test_lowlevel.py"], args=[]),
    "httpcore": dict(
        dist="httpcore", tests="tests",
        install=["pytest-httpbin", "trio", "anyio[trio]", "h2", "socksio", "pytest-trio"],
        files=None, args=[]),
    "httpx": dict(
        dist="httpx", tests="tests",
        install=["trio", "anyio[trio]", "h2", "socksio", "uvicorn", "trustme", "chardet",
                 "brotli", "zstandard", "rich", "click", "pygments"],
        files=None, args=[]),
    "aiohttp": dict(
        dist="aiohttp", tests="tests",
        # requirements/test-common-base.in and test.in, less mypy, pytest-codspeed and
        # python-on-whales (Docker, for the autobahn tests that are not run by default)
        install=["freezegun", "proxy.py", "pytest-cov", "pytest-mock", "trustme", "blockbuster",
                 "coverage", "isal", "zlib-ng", "re-assert", "pytest-xdist"],
        files=["tests/test_connector.py", "tests/test_client_session.py",
               "tests/test_client_functional.py", "tests/test_client_proto.py",
               "tests/test_client_request.py", "tests/test_client_response.py"],
        # its addopts but for xdist and coverage
        args=["-o", "addopts=", "-m", "not dev_mode and not autobahn and not internal"]),
    # niquests' pool; installed as urllib3 in its venv, as niquests installs it. Not in .venv
    # (it would replace urllib3 there): the version is the newest tested, pinned here
    "urllib3-future": dict(
        dist="urllib3-future", version="2.25.904", tests="test", install=["group:dev"],
        files=[f"test/{tree}{name}" for tree in ("", "asynchronous/") for name in (
            "test_traffic_police.py", "test_connectionpool.py", "test_poolmanager.py")] + [
            f"test/with_dummyserver/{tree}{name}" for tree in ("", "asynchronous/")
            for name in ("test_connectionpool.py", "test_poolmanager.py", "test_socketlevel.py")],
        args=["-p", "no:randomly", "-o", "asyncio_default_fixture_loop_scope=function"]),
    # niquests itself, over urllib3-future pinned as above; most of its async and multiplexed
    # tests need its Docker proxy (traefik) and skip in every run; its addopts but for doctests
    "niquests": dict(
        dist="niquests", version="3.21.2", tests="tests",
        install=["pytest<=7.4.4", "pytest-httpbin>=2,<3", "pytest-asyncio>=0.21.1,<1.0",
                 "httpbin==0.10.2", "trustme", "werkzeug>=2.2.3,<=3.0.2", "cryptography<46",
                 "aiofiles>=22,<26", "urllib3-future[socks]==2.25.904"],
        files=["tests/test_requests.py", "tests/test_lowlevel.py", "tests/test_testserver.py",
               "tests/test_hooks.py", "tests/test_async.py", "tests/test_multiplexed.py"],
        args=["-p", "no:randomly", "-o", "addopts="]),
    # its sdist builds libcurl when pip asks it for metadata (it downloads curl-impersonate):
    # the archive is fetched as a file; its test extra, listed; its uncompiled package in the
    # source tree is moved aside, so the tests import the installed one
    "curl_cffi": dict(
        dist="curl_cffi", tests="tests", sdist="direct", shadows="curl_cffi",
        install=["jsonpath-ng>=1.7,<2", "charset_normalizer>=3.3.2,<4", "cryptography",
                 "litestar>=2.19,<3", "httpx<1", "proxy.py>=2.4.3,<3", "pytest<9",
                 "pytest-asyncio>=0.23.6,<1", "pytest-trio>=0.8,<1", "python-multipart<1",
                 "trio<1", "trustme>=1.1,<2", "uvicorn<1", "websockets>=14",
                 "typing_extensions"],
        files=["tests/unittest/test_async_session.py", "tests/unittest/test_async.py",
               "tests/unittest/test_curl.py", "tests/unittest/test_requests.py",
               "tests/unittest/test_share.py", "tests/unittest/test_websockets.py",
               "tests/unittest/test_sync_websockets.py",
               "tests/unittest/test_async_websockets.py"],
        args=["-p", "no:randomly"]),
}
RUNS = {
    "bare": ({}, False),
    "instrumented": ({}, True),
    "strict": ({"POOLSCOPE_STRICT": "true", "POOLSCOPE_PEER_SPAN": "true"}, True),
}
OUTCOMES = ("failure", "error", "skipped")
# a test the suite marks xfail (not strict) may pass or fail, by its own mark; one that does
# either in every run is no difference (niquests' iter_lines reentrancy test does both bare,
# as the server's chunks arrive)
EITHER_WAY = {"passed", "xfail"}
RUN_LIMIT = 600  # seconds; no run takes 3 minutes here, so one this long has hung
LOOPBACK_ONLY = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def sh(*cmd, cwd=None, env=None, quiet=True):
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, text=True,
                          stdout=subprocess.DEVNULL if quiet else None)


def prepare(name, spec):
    """The suite's source and its environment: (source folder, python)."""
    try:
        version = importlib.metadata.version(spec["dist"])
    except importlib.metadata.PackageNotFoundError:
        version = spec["version"]
    base = WORK / f"{name}-{version}"
    src, venv = base / "src", base / "venv"
    python = venv / "bin" / "python"
    ready = base / "ready"
    if ready.exists() and ready.read_text() == repr(spec["install"]):
        return src, python, version
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    if spec.get("sdist") == "direct":
        _fetch_sdist(spec["dist"], version, base)
    else:
        sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           "-d", str(base), f"{spec['dist']}=={version}")
    archive = next(p for p in base.iterdir() if p.name.endswith((".tar.gz", ".zip")))
    with tarfile.open(archive) as tar:
        tar.extractall(base, filter="data") if hasattr(tarfile, "data_filter") else \
            tar.extractall(base)
    next(p for p in base.iterdir() if p.is_dir()).rename(src)
    if spec.get("shadows"):
        (src / spec["shadows"]).rename(src / f"{spec['shadows']}.source")
    sh(sys.executable, "-m", "venv", str(venv))
    sh(str(python), "-m", "pip", "install", "-q", "--upgrade", "pip")
    groups = [f"--group={src / 'pyproject.toml'}:{i[6:]}" for i in spec["install"]
              if i.startswith("group:")]
    plain = [i for i in spec["install"] if not i.startswith("group:")]
    sh(str(python), "-m", "pip", "install", "-q", "pytest", "pytest-timeout", *groups, *plain)
    # last, so that nothing the tests require moves the library off the version under test
    sh(str(python), "-m", "pip", "install", "-q", "-e", str(ROOT), f"{spec['dist']}=={version}")
    ready.write_text(repr(spec["install"]))
    return src, python, version


def _fetch_sdist(dist, version, into):
    """The source archive of ``dist`` ``version`` from PyPI's simple index, as a file (nothing
    built)."""
    project = re.sub(r"[-_.]+", "-", dist).lower()
    with urllib.request.urlopen(f"https://pypi.org/simple/{project}/", timeout=60) as r:
        page = r.read().decode()
    name = f"{dist}-{version}.tar.gz"
    [url] = {u for u in re.findall(r'href="([^"#]+)', page) if u.endswith("/" + name)}
    with urllib.request.urlopen(url, timeout=300) as r:
        (into / name).write_bytes(r.read())


def run(name, spec, src, python, run_name, selection, report):
    """The outcomes of one run (see :func:`outcomes`), or None if it hung: then its processes
    are killed."""
    env_extra, plugin = RUNS[run_name]
    env = {**os.environ, **env_extra, "PYTHONPATH": str(PLUGIN_DIR) if plugin else ""}
    env.pop("POOLSCOPE_STRICT", None) if "POOLSCOPE_STRICT" not in env_extra else None
    cmd = [*LOOPBACK_ONLY, str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "120",
           f"--junitxml={report}", *spec["args"], *(["-p", "poolscope_peer"] if plugin else []),
           *selection]
    report.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=RUN_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    return outcomes(report)


def outcomes(report):
    """{test id: outcome} from a junit report: passed, failure, error, skipped or xfail."""
    found = {}
    for case in ET.parse(report).iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        kinds = [("xfail" if child.get("type") == "pytest.xfail" else child.tag)
                 for child in case if child.tag in OUTCOMES]
        found[key] = kinds[0] if kinds else "passed"
    return found


def node_id(src, key):
    """A pytest node id for a junit ``classname::name``."""
    classname, name = key.split("::", 1)
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = Path(*parts[:cut]).with_suffix(".py")
        if (src / path).exists():
            return "::".join([str(path), *parts[cut:], name])
    return key


def check(name, full):
    spec = SUITES[name]
    started = time.monotonic()
    src, python, version = prepare(name, spec)
    selection = [] if full or spec["files"] is None else spec["files"]
    results, differences = {}, []
    for run_name in RUNS:
        found = run(name, spec, src, python, run_name, selection, src.parent / f"{run_name}.xml")
        if found is None:
            differences.append(f"the {run_name} run hung: no outcome after {RUN_LIMIT} s")
        results[run_name] = found or {}
    bare = results["bare"]
    counts = {k: sum(1 for v in bare.values() if v == k) for k in ("passed", *OUTCOMES, "xfail")}
    for key in sorted(set(results["instrumented"]) | set(results["strict"])):
        differ = [r for r in ("instrumented", "strict") if results[r].get(key, bare.get(key))
                  != bare.get(key)]
        if not differ:
            continue
        node = node_id(src, key)
        if {results[r].get(key) for r in RUNS} <= EITHER_WAY:
            print(f"  {name}: {node}: " + ", ".join(f"{r} {results[r].get(key)}" for r in RUNS)
                  + ": the suite marks it xfail, and both are its outcomes")
            continue
        again = {}
        for rerun in ("bare", *differ[:1]):
            report = src.parent / f"rerun-{rerun}.xml"
            again[rerun] = set()
            for _ in range(3):
                found = run(name, spec, src, python, rerun, [node], report)
                again[rerun].update(found.values() if found is not None else ["hung"])
        if len(differ) == 2 and results["instrumented"].get(key) == results["strict"].get(key):
            # the same outcome in both instrumented runs: a difference (one that may show only
            # in a whole run), unless the test does the same bare when run alone
            different = results["instrumented"].get(key) not in again["bare"]
        else:
            different = not again[differ[0]] <= again["bare"]
        seen = ", ".join(f"{r} {results[r].get(key)}" for r in differ)
        alone = "; alone 3 times: " + ", ".join(f"{r} {sorted(v)}" for r, v in again.items())
        if different:
            differences.append(f"{node}: bare {bare.get(key)}, {seen}{alone}")
        else:
            print(f"  {name}: {node}: bare {bare.get(key)}, {seen}{alone}: a flake")
    print(f"{name} {version}: {len(bare)} tests ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
          f"{'selection: ' + ' '.join(selection) if selection else 'the whole suite'}; "
          f"{len(differences)} differences; {time.monotonic() - started:.0f} s")
    for line in differences:
        print(f"  DIFFERENT {line}")
    return not differences


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="*", metavar="LIBRARY",
                        help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--full", action="store_true", help="each library's whole suite")
    args = parser.parse_args(argv)
    unknown = [name for name in args.libraries if name not in SUITES]
    if unknown:
        parser.error(f"no suite for {', '.join(unknown)}: choose from {', '.join(SUITES)}")
    if subprocess.run([*LOOPBACK_ONLY, "true"], capture_output=True).returncode != 0:
        parser.error("the suites run in a loopback-only network namespace: that needs root, "
                     "unshare (util-linux) and ip (iproute2)")
    ok = [check(name, args.full) for name in args.libraries or SUITES]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())

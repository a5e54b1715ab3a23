"""The version matrix: poolscope's library tests on the oldest supported versions of every
library (with wrapt 1.x and the oldest OpenTelemetry), on the newest libraries with wrapt 1.x,
and the httpx2 tests on the oldest httpx2. The main test run covers the newest of everything
with wrapt 2.x. The ``urllib3-future`` sessions install urllib3-future (its oldest supported
and its newest) over urllib3, as niquests installs it, for its own tests
(``tests/test_urllib3_future.py``) and the shared scenarios on niquests and urllib3-future.
The ``curl_cffi`` session runs curl_cffi's tests and the shared scenarios on its oldest
supported version (the main run has the newest). The ``httpx-socks`` session runs the tests of
httpx-socks' transports, with the httpx it allows.

Run: ``nox -s matrix urllib3-future curl_cffi httpx-socks`` (``scripts/test.sh`` does, after the
main run).
Pins are read from the oldest/newest lines below; the supported ranges are in ``src/poolscope/_package.py``.
"""

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

LIBRARY_TESTS = ["tests/test_pools.py", "tests/test_urllib3.py", "tests/test_httpx.py",
                 "tests/test_sdks.py",
                 "tests/test_aiohttp.py", "tests/test_pycurl.py", "tests/test_api.py",
                 "tests/test_ordering.py", "tests/test_faults.py", "tests/test_spans.py",
                 "tests/test_leaks.py", "tests/test_stress.py", "tests/test_http2.py",
                 "tests/test_setup_phases.py", "tests/test_proxies.py"]
INSTRUMENTATIONS = ["opentelemetry-instrumentation-httpx", "opentelemetry-instrumentation-urllib3",
                    "opentelemetry-instrumentation-requests",
                    "opentelemetry-instrumentation-aiohttp-client"]
OLDEST = ["urllib3==1.26.0", "requests==2.26.0", "httpx==0.25.2", "httpcore==1.0.3",
          "aiohttp==3.10.11", "pycurl==7.46.0", "wrapt==1.14.1", "opentelemetry-api==1.30.0",
          "opentelemetry-sdk==1.30.0", *(f"{name}==0.51b0" for name in INSTRUMENTATIONS)]
NEWEST_WRAPT1 = ["urllib3", "requests", "httpx", "httpcore", "httpx2", "httpcore2",
                 "openai[aiohttp]", "anthropic", "aiohttp", "pycurl", "wrapt<2",
                 "opentelemetry-api", "opentelemetry-sdk", *INSTRUMENTATIONS]


# httpcore 1.0.3 and httpcore2 need h11s of their own (< 0.15 and >= 0.16): the oldest httpx2
# has a session of its own, with the newest of the rest, for the tests that concern it
OLDEST_HTTPX2 = ["httpx2==2.0.0", "httpcore2==2.0.0",
                 *(p for p in NEWEST_WRAPT1 if not p.startswith(("httpx2", "httpcore2", "openai",
                                                                 "anthropic")))]


@nox.session(python="3.11")
@nox.parametrize("pins", [OLDEST, NEWEST_WRAPT1, OLDEST_HTTPX2],
                 ids=["oldest", "newest-wrapt1", "oldest-httpx2"])
def matrix(session, pins):
    session.install("--upgrade", "-e", ".", "pytest", "pytest-timeout", "h2", "trustme", *pins)
    session.run("python", "-c", "import importlib.metadata as m\n"
                "def v(d):\n"
                "    try:\n"
                "        return m.version(d)\n"
                "    except m.PackageNotFoundError:\n"
                "        return 'absent'\n"
                "print(*(f'{d} {v(d)}' for d in ('urllib3', 'requests', 'httpx', 'httpcore', "
                "'httpx2', 'httpcore2', 'aiohttp', 'pycurl', 'wrapt', 'opentelemetry-sdk')), "
                "sep=', ')")
    only = ["-k", "httpx2"] if pins is OLDEST_HTTPX2 else []
    session.run("python", "-m", "pytest", "-q", *LIBRARY_TESTS, *only, *session.posargs)


# urllib3-future installs itself as urllib3 (over urllib3's files, urllib3's metadata left
# installed), as niquests' dependency does: the shared scenarios then run on niquests and on
# urllib3-future through its urllib3 API, beside the other libraries' newest versions
FUTURE_TESTS = ["tests/test_urllib3_future.py", "tests/test_pools.py", "tests/test_faults.py",
                "tests/test_stress.py", "tests/test_ordering.py", "tests/test_spans.py",
                "tests/test_setup_phases.py", "tests/test_proxies.py"]


# Before 2.25.904 urllib3-future can lose a connection when a pool timeout races its hand-over
# to a waiting thread: the pool then hangs, with or without poolscope, so the chaos test (whose
# requests time out in the pool) runs on the oldest for niquests only, which sets no pool timeout
UNSOUND_BEFORE_2_25_904 = ["--deselect", "tests/test_stress.py::test_figures_stay_exact_under_chaos"
                           "[urllib3-future]"]


@nox.session(python="3.11", name="urllib3-future")
@nox.parametrize("future", ["urllib3-future==2.20.900", "urllib3-future"], ids=["oldest", "newest"])
def urllib3_future(session, future):
    session.install("--upgrade", "-e", ".[test]", "niquests", "wsproto")
    session.install("--force-reinstall", "--no-deps", future)
    session.run("python", "-c", "import urllib3, niquests; print('urllib3 (urllib3-future)', "
                "urllib3.__version__, 'niquests', niquests.__version__)")
    session.run("python", "-m", "pytest", "-q", *FUTURE_TESTS, "-k", "future or niquests",
                *(UNSOUND_BEFORE_2_25_904 if "==" in future else []), *session.posargs)


# httpx-socks (a pool subclass with connections of its own) pins httpx below 0.29: its tests
# run with the httpx it allows, not in the main environment, which keeps the newest httpx
@nox.session(python="3.11", name="httpx-socks")
def httpx_socks(session):
    session.install("--upgrade", "-e", ".[test]", "httpx-socks")
    session.run("python", "-m", "pytest", "-q", "tests/test_httpx.py", "tests/test_proxies.py",
                "-k", "subclass or httpx-", *session.posargs)


@nox.session(python="3.11", name="curl_cffi")
def curl_cffi(session):
    session.install("--upgrade", "-e", ".[test]", "curl_cffi==0.13.0")
    session.run("python", "-c", "import curl_cffi; print('curl_cffi', curl_cffi.__version__, "
                "curl_cffi.__curl_version__)")
    session.run("python", "-m", "pytest", "-q", "tests/test_curl_cffi.py", *FUTURE_TESTS[1:],
                "-k", "curl_cffi", *session.posargs)

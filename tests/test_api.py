"""The public API: lazy, idempotent, version-gated patching that restores the very same objects."""

import gc
import json
import os
import logging
import subprocess
import sys
import textwrap
import time
import types
from importlib.metadata import entry_points

import aiohttp.client_proto
import aiohttp.connector
import httpcore
import pycurl
import pytest
import urllib3

import poolscope
from poolscope import _config, _instrument, _recorder
from poolscope._package import SUPPORTED
from drivers import httpx2
from poolscope.demo.server import DemoServer

PATCHED = [
    (urllib3.connectionpool.HTTPConnectionPool, ("__init__", "_new_conn", "close")),
    (urllib3.connection.HTTPConnection, ("connect", "close")),
    (httpcore.ConnectionPool, ("__init__", "close", "create_connection")),
    (httpcore.AsyncConnectionPool, ("__init__", "aclose")),
    (httpcore.HTTPConnection, ("_connect", "close")),
    (httpcore._sync.connection_pool.PoolRequest, ("assign_to_connection", "clear_connection")),
    (httpcore._sync.connection_pool, ("Event",)),
    (httpcore._async.connection_pool, ("AsyncEvent",)),
    (aiohttp.connector.BaseConnector, ("__init__", "_wait_for_available_connection", "_close")),
    (aiohttp.connector, ("ceil_timeout",)),
    (aiohttp.connector.TCPConnector, ("_create_connection",)),
    (aiohttp.client_proto.ResponseHandler, ("close", "connection_lost")),
]
if httpx2 is not None:
    import httpcore2
    PATCHED += [
        (httpcore2.ConnectionPool, ("__init__", "close", "create_connection")),
        (httpcore2.AsyncConnectionPool, ("__init__", "aclose")),
        (httpcore2.HTTPConnection, ("_connect", "close")),
        (httpcore2._sync.connection_pool.PoolRequest, ("assign_to_connection", "clear_connection")),
    ]
REPLACED = [(pycurl, ("Curl", "CurlMulti"))] + (
    [(pycurl.async_multi, ("CurlMulti",))] if hasattr(pycurl, "async_multi") else [])


def snapshot():
    return {(cls, name): vars(cls).get(name) for cls, names in PATCHED + REPLACED
            for name in names}


def run(code, **env):
    """Run ``code`` in a fresh interpreter; return its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=60, env={**_env(), **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _env():
    import os
    return {k: v for k, v in os.environ.items() if not k.startswith("POOLSCOPE_")}


def test_uninstrument_restores_the_very_same_objects():
    before = snapshot()
    callbacks = list(gc.callbacks)
    for _ in range(2):
        poolscope.instrument()
        poolscope.instrument()  # idempotent
        try:
            during = snapshot()
            assert all(during[k] is not before[k] for k in before)
            assert _recorder._gc_phase in gc.callbacks
            # wrapped once, around the original (a name only inherited is shadowed, then removed)
            assert all(during[k].__wrapped__ is before[k]
                       for k in before
                       if not isinstance(k[0], types.ModuleType)
                       and before[k] is not None)
            assert all(issubclass(during[(pycurl, n)], before[(pycurl, n)]) for n in REPLACED[0][1])
            # a class-level default the pool's queue reads, added and taken away again
            assert vars(urllib3.connection.HTTPConnection)["_poolscope"] is None
        finally:
            poolscope.uninstrument()
        after = snapshot()
        assert all(after[k] is before[k] for k in before)
        assert "_poolscope" not in vars(urllib3.connection.HTTPConnection)
        assert gc.callbacks == callbacks


@pytest.mark.parametrize("library", ["urllib3", "httpx"])
def test_instrumented_again_on_the_same_meter_provider(library, server):
    """instrument(), uninstrument(), instrument() again with one MeterProvider: the second
    instrumentation's figures are the ones collected, exact (OpenTelemetry hands back the
    instruments made first, with their callbacks)."""
    from conftest import Metrics
    m = Metrics()
    for requests in (3, 2):
        poolscope.instrument(meter_provider=m.provider)
        try:
            if library == "urllib3":
                pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
                statuses = [pool.request("GET", "/").status for _ in range(requests)]
            else:
                pool = httpcore.ConnectionPool()
                statuses = [pool.request("GET", server.url + "/").status for _ in range(requests)]
            data = m.read()
            lib = {"poolscope__library": library}
            assert statuses == [200] * requests
            assert m.value(data, "poolscope.connection.acquisitions", **lib) == requests
            assert m.value(data, "poolscope.connection.created", **lib) == 1
            assert m.value(data, "http.client.open_connections", **lib) == 1
            assert m.value(data, "poolscope.pool.count", **lib) == 1
            pool.close()
        finally:
            poolscope.uninstrument()
    assert server.accepted == 2
    m.provider.shutdown()


@pytest.mark.parametrize("order", ["instrument, set, instrument", "instrument twice, set"])
def test_instrumented_again_before_the_global_meter_provider_is_set(order):
    """The same with the global meter provider, set between or after the instrumentations:
    each meter OpenTelemetry gives before it is set is a new stand-in for it."""
    out = run(f"""
        import urllib3, poolscope
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from poolscope.demo.server import DemoServer
        reader = InMemoryMetricReader()
        poolscope.instrument()
        poolscope.uninstrument()
        if {order!r} == "instrument, set, instrument":
            metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
            poolscope.instrument()
        else:
            poolscope.instrument()
            metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        with DemoServer() as server:
            pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
            statuses = [pool.request("GET", "/").status for _ in range(3)]
            for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
                if m.name == "poolscope.connection.acquisitions":
                    print(sum(p.value for p in m.data.data_points))
            print(statuses, server.accepted)
    """)
    assert out.splitlines() == ["3", "[200, 200, 200] 1"]


def test_patching_is_lazy_and_happens_at_import():
    out = run("""
        import sys, poolscope
        poolscope.instrument()
        print(*(m in sys.modules for m in ("urllib3", "httpx", "httpcore", "httpcore2", "aiohttp",
                                           "pycurl")))
        import requests, httpx, httpcore, aiohttp, pycurl
        try:
            import httpcore2
        except ImportError:  # the oldest pins of the version matrix
            httpcore2 = httpcore
        from urllib3.connectionpool import HTTPConnectionPool
        print(type(vars(HTTPConnectionPool)["_new_conn"]).__name__,
              type(vars(httpcore.ConnectionPool)["close"]).__name__,
              type(vars(httpcore2.ConnectionPool)["close"]).__name__,
              hasattr(vars(aiohttp.connector.BaseConnector)["_close"], "__wrapped__"),
              pycurl.Curl.__module__)
    """)
    assert out.split() == ["False"] * 6 + ["function", "function", "function", "True",
                                          "poolscope.adapters.pycurl"]


def test_instrument_after_import_and_clients_made_before():
    """A pool made before instrument() is picked up at its first new connection."""
    out = run("""
        import urllib3, poolscope
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from poolscope.demo.server import DemoServer
        with DemoServer() as server:
            pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
            reader = InMemoryMetricReader()
            poolscope.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
            for _ in range(2):
                pool.request("GET", "/")
            for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
                if m.name == "poolscope.connection.created":
                    print(sum(p.value for p in m.data.data_points))
    """)
    assert out.split() == ["1"]


def test_unsupported_version_is_skipped_with_one_line(monkeypatch, caplog):
    monkeypatch.setitem(SUPPORTED, "urllib3", {**SUPPORTED["urllib3"], "minimum": "99"})
    before = snapshot()
    with caplog.at_level(logging.WARNING, logger="poolscope"):
        poolscope.instrument()
    try:
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "urllib3" in lines[0] and "not supported" in lines[0]
        assert vars(urllib3.connectionpool.HTTPConnectionPool)["_new_conn"] is \
            before[(urllib3.connectionpool.HTTPConnectionPool, "_new_conn")]
    finally:
        poolscope.uninstrument()


def test_unknown_library_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown libraries nope"):
        poolscope.instrument(libraries=["nope"])


def test_only_named_libraries():
    poolscope.instrument(libraries=["httpx"])
    try:
        assert type(vars(urllib3.connectionpool.HTTPConnectionPool)["_new_conn"]).__name__ \
            == "function"
        assert vars(httpcore.ConnectionPool)["close"].__wrapped__ is not None
    finally:
        poolscope.uninstrument()


def test_internal_failure_never_reaches_the_application(metrics, server, monkeypatch, caplog):
    monkeypatch.setattr(_config, "strict", False)
    monkeypatch.setattr(_config, "_reported", set())
    recorder = _instrument.current_recorder()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(recorder, "acquired", broken)
    monkeypatch.setattr(recorder, "conn_created", broken)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
    with caplog.at_level(logging.WARNING, logger="poolscope"):
        assert [pool.request("GET", "/").status for _ in range(3)] == [200] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "poolscope: internal error in urllib3:HTTPConnection.connect ignored; "
        "the application is not affected"]
    pool.close()


def test_origins_beyond_the_cap_fold_into_other(monkeypatch):
    from conftest import Metrics
    monkeypatch.setenv("POOLSCOPE_MAX_ORIGINS", "2")
    m = Metrics()
    poolscope.instrument(meter_provider=m.provider)
    try:
        with DemoServer() as a, DemoServer() as b, DemoServer() as c:
            for srv in (a, b, c):
                urllib3.HTTPConnectionPool("127.0.0.1", srv.port).request("GET", "/")
        data = m.read()
        addresses = sorted((a["server.address"], a.get("server.port")) for a, _ in
                           data["poolscope.connection.created"])
        assert addresses == sorted([("127.0.0.1", a.port), ("127.0.0.1", b.port), ("_other", None)])
    finally:
        poolscope.uninstrument()


def test_detailed_timings(monkeypatch, server):
    from conftest import Metrics
    monkeypatch.setenv("POOLSCOPE_DETAILED_TIMINGS", "true")
    m = Metrics()
    poolscope.instrument(meter_provider=m.provider)
    try:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
        for _ in range(3):
            pool.request("GET", "/delay/0.05")
        data = m.read()
        assert m.histogram(data, "poolscope.connection.use_time")[0] == 3
        assert 0.15 <= m.histogram(data, "poolscope.connection.use_time")[1] < 0.5
        assert m.histogram(data, "poolscope.connection.idle_time")[0] == 2
        pool.close()
    finally:
        poolscope.uninstrument()


def test_bad_setting_is_one_clear_line_and_the_default(monkeypatch, caplog):
    monkeypatch.setenv("POOLSCOPE_MAX_ORIGINS", "lots")
    with caplog.at_level(logging.ERROR, logger="poolscope"):
        poolscope.instrument()
    try:
        assert [r.getMessage() for r in caplog.records] == [
            "poolscope: POOLSCOPE_MAX_ORIGINS='lots' is not a whole number; using 1000"]
        assert _instrument.current_recorder().max_origins == 1000
    finally:
        poolscope.uninstrument()


def test_registered_as_an_opentelemetry_instrumentor():
    [ep] = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.name == "poolscope"]
    instrumentor = ep.load()()
    instrumentor.instrument()
    try:
        assert _instrument.current_recorder() is not None
    finally:
        instrumentor.uninstrument()
    assert _instrument.current_recorder() is None


def test_a_forked_child_counts_its_own_pools_not_its_parents():
    """The parent made 3 requests; the child 2 on a new pool and 1 on the inherited one."""
    out = run("""
        import json, os, urllib3, poolscope
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from poolscope.demo.server import DemoServer

        NAMES = ("poolscope.connection.acquisitions", "poolscope.connection.created",
                 "poolscope.pool.count", "http.client.open_connections")

        def counts():
            found = {}
            for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
                for p in m.data.data_points if m.name in NAMES else ():
                    key = m.name + "".join(f",{v}" for k, v in sorted(p.attributes.items())
                                           if k in ("http.connection.state",
                                                    "poolscope.connection.reused"))
                    found[key] = found.get(key, 0) + p.value
            return found

        reader = InMemoryMetricReader()
        poolscope.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
        with DemoServer() as server:
            pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
            for _ in range(3):
                pool.request("GET", "/")
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    own = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
                    for _ in range(2):
                        own.request("GET", "/")
                    pool.request("GET", "/")
                    os.write(write, json.dumps(counts()).encode())
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            child = json.loads(os.read(read, 65536))
            print(json.dumps({"parent": counts(), "child": child}))
    """)
    figures = json.loads(out)
    assert figures["child"] == {
        "poolscope.connection.acquisitions,False": 1, "poolscope.connection.acquisitions,True": 2,
        "poolscope.connection.created": 1, "poolscope.pool.count": 2,
        "http.client.open_connections,active": 0, "http.client.open_connections,idle": 2}
    assert figures["parent"] == {
        "poolscope.connection.acquisitions,False": 1, "poolscope.connection.acquisitions,True": 2,
        "poolscope.connection.created": 1, "poolscope.pool.count": 1,
        "http.client.open_connections,active": 0, "http.client.open_connections,idle": 1}


def test_an_uncovered_client_installed_beside_is_one_line(tmp_path):
    """requestx and httplib2 installed (their distributions' metadata on the path): one line
    at start-up names both; the covered libraries are patched as ever."""
    for name, version in (("requestx", "0.4.0"), ("httplib2", "0.31.0")):
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    result = subprocess.run(
        [sys.executable, "-c", "import logging, poolscope; logging.basicConfig(); "
         "poolscope.instrument(); import urllib3.connectionpool as c; "
         "print(type(vars(c.HTTPConnectionPool)['_new_conn']).__name__)"],
        capture_output=True, text=True, timeout=60,
        env={**_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{_env().get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["function"]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "httplib2 0.31.0, requestx 0.4.0 installed, not observed" in lines[0]


def test_saturation_time_never_goes_backwards_when_an_event_lands_after_a_collection():
    """A saturation ends at the time its event read the clock; a collection between that read
    and the event's bookkeeping (another thread, the GIL switching) has counted past it. The
    counter reports its high-water mark instead of going back (seen once under chaos)."""
    from conftest import Metrics
    from poolscope._recorder import Recorder

    metrics = Metrics()
    recorder = Recorder(meter_provider=metrics.provider)
    owner = urllib3.HTTPConnectionPool("127.0.0.1")  # no request: only its identity is used
    pool = recorder.pool_opened("urllib3", owner, max_connections=1, serialized=True)
    conn = recorder.conn_created(pool)
    recorder.acquired(conn, span=None)
    recorder.conn_opened(conn)  # in use: the pool of 1 is saturated

    def saturated():
        return metrics.value(metrics.read(), "poolscope.pool.saturation_time")
    ended_at = time.monotonic()  # the release reads the clock ...
    time.sleep(0.01)
    before = saturated()  # ... a collection runs ...
    recorder._shift(pool, -1, ended_at)  # ... and the release's bookkeeping lands
    assert pool.saturated < before  # what was counted up to the release itself
    assert saturated() >= before
    recorder.close()

"""Patch ordering, each case in a fresh interpreter, for every adapter: the library imported
before or after ``instrument()``, instrumenting twice, ``uninstrument()`` putting back the very
same objects, instrumenting again, and a client made before instrumenting."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from drivers import curl_cffi_requests, httpx2, niquests

# urllib3-future's sync and async twins (installed as urllib3)
NIQUESTS_MODULES = ["urllib3.connectionpool", "urllib3.connection", "urllib3.util.traffic_police",
                    "urllib3._async.connectionpool", "urllib3._async.connection",
                    "urllib3.util._async.traffic_police"]
# Per library: imports, a client, one request (returns the status), and closing the client.
CLIENTS = {
    "urllib3": dict(modules=["urllib3", "urllib3.connectionpool", "urllib3.connection",
                             "urllib3._collections"],
                    make="import urllib3\nclient = urllib3.HTTPConnectionPool('127.0.0.1', PORT)",
                    get="client.request('GET', path).status",
                    close="client.close()"),
    "requests": dict(modules=["urllib3.connectionpool", "urllib3.connection"], library="urllib3",
                     make="import requests\nclient = requests.Session()",
                     get="client.get(URL + path).status_code",
                     close="client.close()"),
    "httpx": dict(modules=["httpcore._sync.connection_pool", "httpcore._sync.connection",
                           "httpcore._async.connection_pool", "httpcore._async.connection"],
                  make="import httpx\nclient = httpx.Client()",
                  get="client.get(URL + path).status_code",
                  close="client.close()"),
    **({} if httpx2 is None else {"httpx2": dict(modules=["httpcore2._sync.connection_pool", "httpcore2._sync.connection",
                            "httpcore2._async.connection_pool", "httpcore2._async.connection"],
                   make="import httpx2\nclient = httpx2.Client()",
                   get="client.get(URL + path).status_code",
                   close="client.close()")}),
    # niquests on urllib3-future installed as urllib3 (the version matrix's urllib3-future session)
    **({} if niquests is None else {"niquests": dict(
        modules=NIQUESTS_MODULES,
        library="urllib3-future", make="import niquests\nclient = niquests.Session()",
        get="client.get(URL + path).status_code", close="client.close()"), "niquests-async": dict(
        modules=NIQUESTS_MODULES, library="urllib3-future", top="niquests",
        make=textwrap.dedent("""\
            import asyncio, niquests
            loop = asyncio.new_event_loop()
            async def _get(path):
                return (await client.get(URL + path)).status_code
            client = niquests.AsyncSession()"""),
        get="loop.run_until_complete(_get(path))",
        close="loop.run_until_complete(client.close())")}),
    **({} if curl_cffi_requests is None else {"curl_cffi": dict(
        modules=["curl_cffi.curl", "curl_cffi.aio", "curl_cffi.requests.session"],
        make="import curl_cffi.requests\nclient = curl_cffi.requests.Session()",
        get="client.get(URL + path).status_code", close="client.close()")}),
    "aiohttp": dict(modules=["aiohttp.connector", "aiohttp.client_proto"],
                    make=textwrap.dedent("""\
                        import asyncio, aiohttp
                        loop = asyncio.new_event_loop()
                        async def _make():
                            return aiohttp.ClientSession()
                        async def _get(path):
                            async with client.get(URL + path) as r:
                                await r.read()
                                return r.status
                        client = loop.run_until_complete(_make())"""),
                    get="loop.run_until_complete(_get(path))",
                    close="loop.run_until_complete(client.close())"),
    "pycurl": dict(modules=["pycurl"],
                   make=textwrap.dedent("""\
                       import pycurl
                       client = pycurl.Curl()
                       def _get(path):
                           client.setopt(pycurl.URL, URL + path)
                           client.setopt(pycurl.WRITEFUNCTION, lambda data: None)
                           client.perform()
                           return client.getinfo(pycurl.RESPONSE_CODE)"""),
                   get="_get(path)",
                   close="client.close()"),
}

SCRIPT = """
import importlib, json, sys, types
import poolscope
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from poolscope.demo.server import DemoServer

MODULES = {modules!r}
out = {{}}

def snapshot():
    \"\"\"Every attribute of the library's modules and of their classes, as objects.\"\"\"
    found = {{}}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, value in list(vars(module).items()):
            found[(name, attr)] = value
            if isinstance(value, type) and value.__module__.startswith(name.split(".")[0]):
                for key, member in list(vars(value).items()):
                    found[(name, attr, key)] = member
    return found

def ours():
    \"\"\"The attributes that are poolscope's objects.\"\"\"
    def is_ours(v):
        code = getattr(v, "__code__", None)
        return str(getattr(v, "__module__", "")).startswith("poolscope") or (
            code is not None and "poolscope" in code.co_filename)
    return sorted(".".join(k) for k, v in snapshot().items() if is_ours(v))

def instrumented():
    reader = InMemoryMetricReader()
    poolscope.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    return reader

def counts(reader):
    found = {{}}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name in ("poolscope.connection.created", "poolscope.connection.acquisitions",
                              "poolscope.pool.count"):
                    found[m.name] = sum(p.value for p in m.data.data_points)
    return found

with DemoServer() as server:
    PORT, URL = server.port, server.url
    if {order!r} == "client-first":
{make}
        status = [{get} for path in ["/"]]
        reader = instrumented()
        status += [{get} for path in ["/", "/close", "/", "/"]]
        out["statuses"] = status
        out["counts"] = counts(reader)
        {close}
    else:
        if {order!r} == "import-first":
            import {top}
            before = snapshot()
        reader = instrumented()
        poolscope.instrument()  # a second call changes nothing
{make}
        out["statuses"] = [{get} for path in ["/", "/", "/"]]
        out["counts"] = counts(reader)
        out["patched"] = len(ours())
        {close}
        if {order!r} == "instrument-first":
            before = None
        poolscope.uninstrument()
        out["left"] = ours()
        if before is not None:
            after = snapshot()
            out["changed"] = sorted(".".join(k) for k in before if after.get(k) is not before[k])
        reader = instrumented()
{make}
        out["again"] = [{get} for path in ["/", "/"]]
        out["again_counts"] = counts(reader)
        {close}
        poolscope.uninstrument()
print(json.dumps(out))
"""


def run(library, order):
    spec = CLIENTS[library]
    indent = lambda code: textwrap.indent(code, " " * 8)  # noqa: E731
    script = SCRIPT.format(modules=spec["modules"], order=order, top=spec.get("top", library),
                           make=indent(spec["make"]),
                           get=spec["get"], close=spec["close"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOLSCOPE_", "OTEL_"))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env={**env, "POOLSCOPE_STRICT": "true"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("order", ["import-first", "instrument-first"])
@pytest.mark.parametrize("library", sorted(CLIENTS))
def test_instrument_uninstrument_and_again(library, order):
    out = run(library, order)
    assert out["statuses"] == [200] * 3
    # one pool, one connection made, three acquisitions: instrumenting twice wraps once
    assert out["counts"] == {"poolscope.connection.created": 1,
                             "poolscope.connection.acquisitions": 3, "poolscope.pool.count": 1}
    assert out["patched"] > 0
    assert out["left"] == []
    assert out.get("changed", []) == []
    assert out["again"] == [200] * 2
    assert out["again_counts"] == {"poolscope.connection.created": 1,
                                   "poolscope.connection.acquisitions": 2,
                                   "poolscope.pool.count": 1}


# What a client made before instrument() reports (docs/libraries.md): pools and handles are
# picked up at their next new connection, except a pycurl handle, whose class was the original.
BEFORE = {"urllib3": 1, "requests": 1, "httpx": 1, "httpx2": 1, "aiohttp": 1, "pycurl": 0,
          "niquests": 1, "niquests-async": 1, "curl_cffi": 1}


@pytest.mark.parametrize("library", sorted(CLIENTS))
def test_client_made_before_instrumenting(library):
    """Its connection from before is not counted; the one opened after ``/close`` is."""
    out = run(library, "client-first")
    assert out["statuses"] == [200] * 5
    created = BEFORE[library]
    expected = {"poolscope.connection.created": created,
                "poolscope.connection.acquisitions": 2 * created,
                "poolscope.pool.count": created}
    assert out["counts"] == ({} if created == 0 else expected)

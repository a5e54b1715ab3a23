"""No credentials, URL paths or query strings reach an attribute, a span, a log line or the
report, whatever the library; the Prometheus endpoint listens on 127.0.0.1 unless told."""

import asyncio
import logging
import socket
import subprocess
import sys

import aiohttp
import httpx
import pycurl
import pytest
import requests
import urllib3
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import poolscope
from poolscope import _instrument, _recorder, report
from conftest import Metrics
from drivers import httpx2
from test_launcher import LAUNCHER, clean_env, free_port

SECRETS = ("hunter2", "alice", "private", "X-Amz-Signature", "c2lnbmF0dXJl", "tok3n")
PATHS = ["/private/a?X-Amz-Signature=c2lnbmF0dXJl&token=tok3n", "/close?token=tok3n",
         "/drop?X-Amz-Signature=c2lnbmF0dXJl", "/delay/0.3?token=tok3n"]


def urllib3_get(base, paths):
    pool = urllib3.PoolManager(maxsize=1, block=True, retries=False)
    for path in paths:
        yield lambda p=path: pool.request("GET", base + p, timeout=5,
                                          pool_timeout=0.05).status


def requests_get(base, paths):
    session = requests.Session()
    for path in paths:
        yield lambda p=path: session.get(base + p, timeout=5).status_code


def httpx_get(base, paths, module=httpx):
    client = module.Client(limits=module.Limits(max_connections=1),
                           timeout=module.Timeout(5, pool=0.05))
    for path in paths:
        yield lambda p=path: client.get(base + p).status_code


def httpx2_get(base, paths):
    return httpx_get(base, paths, httpx2)


def aiohttp_get(base, paths):
    async def get(path):
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1),
                timeout=aiohttp.ClientTimeout(total=5, connect=0.05)) as session:
            async def one(p):
                async with session.get(base + p) as response:
                    await response.read()
            # two at once through a limit of 1, the second times out waiting
            await asyncio.gather(one(path), one("/delay/0.3?token=tok3n"))
    for path in paths:
        yield lambda p=path: asyncio.run(get(p))


def pycurl_get(base, paths):
    for path in paths:
        def get(p=path):
            curl = pycurl.Curl()
            curl.setopt(pycurl.URL, base + p)
            curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
            try:
                curl.perform()
            finally:
                curl.close()
        yield get


CLIENTS = {"urllib3": urllib3_get, "requests": requests_get, "httpx": httpx_get,
           **({"httpx2": httpx2_get} if httpx2 else {}),
           "aiohttp": aiohttp_get, "pycurl": pycurl_get}


def everything_said(metrics, spans, records, text):
    said = [text, *(r.getMessage() for r in records)]
    data = metrics.reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                said += [repr(dict(p.attributes)) for p in metric.data.data_points]
    for span in spans:
        said += [span.name, repr(dict(span.attributes)), span.status.description or ""]
        said += [f"{e.name} {dict(e.attributes)}" for e in span.events]
    return "\n".join(said)


@pytest.mark.parametrize("library", sorted(CLIENTS))
def test_no_credentials_paths_or_queries_anywhere(library, server, monkeypatch, caplog):
    monkeypatch.setenv("POOLSCOPE_LEAK_WARNINGS", "true")
    monkeypatch.setenv("POOLSCOPE_LEAK_SECONDS", "0.1")
    monkeypatch.setenv("POOLSCOPE_DETAILED_TIMINGS", "true")
    metrics, spans = Metrics(), InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(spans))
    poolscope.instrument(meter_provider=metrics.provider, tracer_provider=tracers)
    base = f"http://alice:hunter2@127.0.0.1:{server.port}"
    try:
        with caplog.at_level(logging.DEBUG, logger="poolscope"):
            for request in CLIENTS[library](base, PATHS):
                with tracers.get_tracer("app").start_as_current_span("app request"):
                    try:
                        request()
                    except Exception:
                        pass  # the dropped socket, the pool timeout
            with socket.socket() as closed:
                closed.bind(("127.0.0.1", 0))
                nowhere = f"http://alice:hunter2@127.0.0.1:{closed.getsockname()[1]}"
            for request in CLIENTS[library](nowhere, PATHS[:1]):  # a connection refused
                with tracers.get_tracer("app").start_as_current_span("app request"):
                    with pytest.raises(Exception):
                        request()
            recorder = _instrument.current_recorder()
            text = report.render(metrics.reader.get_metrics_data(), recorder.scopes())
    finally:
        poolscope.uninstrument()
    said = everything_said(metrics, spans.get_finished_spans(), caplog.records, text)
    assert "127.0.0.1" in said and str(server.port) in said  # the origin is there
    leaked = [s for s in SECRETS if s in said]
    assert leaked == [], said


def test_error_messages_on_spans_lose_user_info_paths_and_queries():
    spans = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(spans))
    recorder = _recorder.Recorder(Metrics().provider, tracers)
    owner = type("Pool", (), {})()
    pool = recorder.pool_opened("urllib3", owner, 1, origin=("http", "127.0.0.1", 80))
    error = TimeoutError("no connection to http://alice:hunter2@127.0.0.1:80/private/a?"
                         "X-Amz-Signature=c2lnbmF0dXJl in time, url: /private?token=tok3n")
    with tracers.get_tracer("app").start_as_current_span("app request"):
        wait = recorder.wait_started(pool)
        recorder.wait_ended(wait, _recorder.TIMED_OUT, error)
        setup = recorder.setup_started(recorder.conn_created(pool))
        recorder.setup_ended(setup, error)
    events = [dict(e.attributes) for span in spans.get_finished_spans() for e in span.events]
    assert events == [{"exception.type": "TimeoutError",
                       "exception.message": "no connection to http://127.0.0.1:80 in time, "
                                            "url: /…"}] * 2


@pytest.mark.parametrize("host, listening", [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_prometheus_listens_on_loopback_unless_told(host, listening, tmp_path):
    port = free_port()
    app = tmp_path / "app.py"
    app.write_text("import sys\nprint('up', flush=True)\nsys.stdin.readline()\n")
    env = clean_env(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
                    **({"OTEL_EXPORTER_PROMETHEUS_HOST": host} if host else {}))
    proc = subprocess.Popen([LAUNCHER, sys.executable, str(app)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert listeners(port) == [listening]
    finally:
        proc.communicate("\n", timeout=30)


def listeners(port):
    """The addresses listening on TCP ``port`` (IPv4), from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    found = []
    for row in rows:
        address, local_port = row[1].split(":")
        if row[3] == "0A" and int(local_port, 16) == port:
            found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found

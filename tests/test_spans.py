"""Spans beside OpenTelemetry's official HTTP instrumentations: waits and set-ups under requests."""

import contextlib
import io
import time

import pycurl
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode

from drivers import DRIVERS

WAIT, SETUP = "HTTP wait_for_connection", "HTTP connection_setup"
OFFICIAL = [HTTPXClientInstrumentor, URLLib3Instrumentor, AioHttpClientInstrumentor]


@pytest.fixture
def official(traced):
    instrumentors = [cls() for cls in OFFICIAL]
    for instrumentor in instrumentors:
        instrumentor.instrument(tracer_provider=traced.tracer_provider)
    yield traced
    for instrumentor in instrumentors:
        instrumentor.uninstrument()


def seconds(span):
    return (span.end_time - span.start_time) / 1e9


def parent_of(span, spans):
    [parent] = [s for s in spans if s.context.span_id == span.parent.span_id]
    return parent


def app_spans(official, flavor):
    """Request spans for a client no OpenTelemetry instrumentation covers: the application's."""
    return {"tracer": official.tracer_provider.get_tracer("app")} \
        if flavor.startswith(("httpx2", "curl_cffi", "niquests-async")) else {}


@pytest.mark.parametrize("flavor", [f for f in ("urllib3", "urllib3-future", "niquests",
                                               "niquests-async", "httpx-sync", "httpx-async",
                                               "httpx2-sync", "httpx2-async", "aiohttp",
                                               "curl_cffi")
                                    if f in DRIVERS])
def test_the_requests_that_waited_have_a_wait_span_under_their_own_span(official, server, flavor):
    """Limit 2, 300 ms: two requests hold both connections; once the server has both, four
    more come (``later`` seconds after the first, or after, as their threads start): waits
    that begin then and end 0.3, 0.3, 0.6 and 0.6 s after the first, under four request spans,
    each begun with the pool's 2 connections active."""
    with DRIVERS[flavor](server, limit=2, **app_spans(official, flavor)) as driver:
        start, start_ns = time.monotonic(), time.time_ns()
        holding = [driver.submit("/delay/0.3") for _ in range(2)]
        while server.received < 2 and time.monotonic() < start + 5:
            time.sleep(0.002)
        later = time.monotonic() - start
        assert driver.get_all(["/delay/0.3"] * 4) == [200] * 4
        assert [h.result(5) for h in holding] == [200] * 2
    spans = official.finished()
    requests = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(requests) == 6
    waits = official.finished(WAIT)
    assert len(waits) == 4
    began = [(w.start_time - start_ns) / 1e9 for w in waits]
    ended = sorted((w.end_time - start_ns) / 1e9 for w in waits)
    assert all(later - 0.005 <= b < 0.25 for b in began), (began, later)
    assert all(0.25 <= e <= 0.45 for e in ended[:2]), (ended, later)
    assert all(0.55 <= e <= 0.75 for e in ended[2:]), (ended, later)
    parents = [parent_of(w, spans) for w in waits]
    assert all(p.kind == SpanKind.CLIENT for p in parents)
    assert len({p.context.span_id for p in parents}) == 4  # each under its own request
    for wait, parent in zip(waits, parents):
        assert wait.context.trace_id == parent.context.trace_id
        assert wait.attributes["poolscope.pool.max"] == 2
        assert wait.attributes["poolscope.pool.active"] == 2
        assert wait.attributes["server.port"] == server.port
        assert wait.attributes["poolscope.library"] == driver.library
        assert parent.attributes["poolscope.connection.wait_time"] == \
            pytest.approx(seconds(wait), abs=0.02)
    assert all(w.attributes["poolscope.wait.outcome"] == "granted" for w in waits)
    setups = official.finished(SETUP)
    assert len(setups) == 2
    assert all(parent_of(s, spans).kind == SpanKind.CLIENT for s in setups)
    assert all(s.attributes["network.peer.address"] == "127.0.0.1" for s in setups)
    reused = sorted(r.attributes["poolscope.connection.reused"] for r in requests)
    assert reused == [False, False, True, True, True, True]
    # every request links to the set-up of the connection that served it: a new connection's
    # request to its own child, a reuse to one of the two
    setup_ids = {s.context.span_id: s for s in setups}
    for request in requests:
        [link] = request.links
        setup = setup_ids[link.context.span_id]
        assert link.context.trace_id == setup.context.trace_id
        assert (setup.parent.span_id == request.context.span_id) == \
            (not request.attributes["poolscope.connection.reused"])


@pytest.mark.parametrize("flavor", [f for f in ("urllib3", "urllib3-future", "httpx-sync",
                                               "httpx2-sync", "aiohttp")
                                    if f in DRIVERS])
def test_a_pool_timeout_is_one_wait_span_with_error(official, server, flavor):
    with DRIVERS[flavor](server, limit=1, pool_timeout=0.2, **app_spans(official, flavor)) \
            as driver:
        held = driver.submit("/delay/0.6")
        time.sleep(0.1)
        with pytest.raises(Exception):
            driver.get("/")
        assert held.result(5) == 200
    [wait] = official.finished(WAIT)
    assert wait.status.status_code == StatusCode.ERROR
    assert [e.name for e in wait.events] == ["exception"]
    assert 0.15 <= seconds(wait) <= 0.4
    assert parent_of(wait, official.finished()).kind == SpanKind.CLIENT


@pytest.mark.parametrize("flavor", ["urllib3", "httpx-async", "aiohttp", "pycurl"] +
                         (["curl_cffi"] if "curl_cffi" in DRIVERS else []))
def test_no_spans_without_a_recording_parent(traced, server, flavor):
    with DRIVERS[flavor](server, limit=2) as driver:
        assert driver.get_all(["/delay/0.2"] * 4) == [200] * 4
    assert traced.finished() == []
    assert traced.value(traced.read(), "poolscope.connection.wait_time") == 2


def test_pycurl_multi_waits_under_the_span_that_added_each_transfer(traced, server):
    tracer = traced.tracer_provider.get_tracer("app")
    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, 2)
    handles, parents, spans = [], {}, []
    for i in range(6):  # each request's span stays open until its transfer is done
        span = tracer.start_span(f"request {i}")
        spans.append(span)
        with trace.use_span(span):
            curl = pycurl.Curl()
            curl.setopt(pycurl.URL, server.url + "/delay/0.3")
            curl.setopt(pycurl.WRITEDATA, io.BytesIO())
            multi.add_handle(curl)
            handles.append(curl)
            parents[span.get_span_context().span_id] = i
    done = 0
    while done < 6:
        multi.perform()
        more = True
        while more:
            more, ok, failed = multi.info_read()
            done += len(ok) + len(failed)
        multi.select(0.05)
    for curl in handles:
        multi.remove_handle(curl)
        curl.close()
    multi.close()
    for span in spans:
        span.end()
    waits = traced.finished(WAIT)
    assert len(waits) == 4
    assert sorted(parents[w.parent.span_id] for w in waits) == [2, 3, 4, 5]
    durations = sorted(seconds(w) for w in waits)
    assert all(0.25 <= d <= 0.45 for d in durations[:2]) and \
        all(0.55 <= d <= 0.75 for d in durations[2:]), durations
    setups = traced.finished(SETUP)
    assert sorted(parents[s.parent.span_id] for s in setups) == [0, 1]
    # each request links to one of the two set-ups: its own child for the first two
    setup_ids = {s.context.span_id: s for s in setups}
    for span in traced.finished():
        if span.name.startswith("request "):
            [link] = span.links
            assert link.context.span_id in setup_ids
            assert (setup_ids[link.context.span_id].parent.span_id == span.context.span_id) \
                == (span.name in ("request 0", "request 1"))


def test_a_close_on_the_requests_path_is_an_event_on_its_span(official, server):
    """keepalive_expiry 0.2 s: the second request, 0.4 s later, finds the connection expired."""
    import httpx

    with httpx.Client(limits=httpx.Limits(keepalive_expiry=0.2)) as client:
        client.get(server.url + "/")
        time.sleep(0.4)
        client.get(server.url + "/")
    first, second = [s for s in official.finished() if s.kind == SpanKind.CLIENT]
    assert first.events == ()
    [event] = second.events
    assert event.name == "poolscope.connection.closed"
    assert event.attributes["poolscope.close.reason"] == "keepalive_expired"
    assert [s.attributes["poolscope.connection.reused"] for s in (first, second)] == [False, False]


def test_requests_session_waits_under_the_requests_span(official, server):
    import threading

    import requests
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    RequestsInstrumentor().instrument(tracer_provider=official.tracer_provider)
    try:
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2, pool_block=True))
        threads = [threading.Thread(target=session.get, args=(server.url + "/delay/0.3",))
                   for _ in range(6)]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        session.close()
    finally:
        RequestsInstrumentor().uninstrument()
    spans = official.finished()
    waits = official.finished(WAIT)
    assert len(waits) == 4
    parents = {parent_of(w, spans).context.span_id for w in waits}
    assert len(parents) == 4
    assert all(parent_of(w, spans).kind == SpanKind.CLIENT for w in waits)


def test_the_span_check_agrees_with_the_public_api(monkeypatch):
    """Every request checks for a recording span by reading OpenTelemetry's context variable
    directly; that must give what ``get_current_span().is_recording()`` gives, and under another
    runtime context poolscope must use the public API."""
    from opentelemetry import context as otel_context

    from poolscope import _spans

    direct = _spans._context_reader()
    with monkeypatch.context() as patched:
        patched.setattr(otel_context, "_RUNTIME_CONTEXT", object())
        public = _spans._context_reader()
    assert public is otel_context.get_current and direct is not public
    tracer = TracerProvider().get_tracer("test")
    recording = tracer.start_span("recording")
    ended = tracer.start_span("ended")
    ended.end()
    in_context = trace.set_span_in_context(recording)
    cases = [(None, None, None), (trace.INVALID_SPAN, None, None), (ended, None, None),
             (recording, None, recording), (None, in_context, recording),
             (recording, otel_context.Context(), None)]
    for reader in (direct, public):
        monkeypatch.setattr(_spans, "current_context", reader)
        for current, context, expected in cases:
            with trace.use_span(current) if current else contextlib.nullcontext():
                span = trace.get_current_span(context)
                assert (span if span.is_recording() else None) is expected
                assert _spans.recording_span(context) is expected


class OtherSpan(trace.NonRecordingSpan):
    """A recording span of another tracing implementation: only the API's methods."""

    def __init__(self, context):
        super().__init__(context)
        self.links = []

    def is_recording(self):
        return True

    def add_link(self, context, attributes=None):
        self.links.append((context, attributes))


def test_a_request_links_to_its_connections_setup_through_any_spans_api(traced, server):
    """The SDK's spans take the connection's Link as built; a span of another implementation
    gets it through the API's ``add_link``. Either way, what a reader sees is what ``add_link``
    would have made."""
    import urllib3

    tracer = traced.tracer_provider.get_tracer("app")
    with urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=1) as pool:
        with tracer.start_as_current_span("first"):
            assert pool.request("GET", "/").status == 200
        with tracer.start_as_current_span("second"):
            assert pool.request("GET", "/").status == 200
        other = OtherSpan(trace.SpanContext(1, 2, is_remote=False))
        with trace.use_span(other):
            assert pool.request("GET", "/").status == 200
    assert server.accepted == 1
    [setup] = traced.finished(SETUP)
    first, second = (traced.finished(name)[0] for name in ("first", "second"))
    assert setup.parent.span_id == first.context.span_id
    expected = TracerProvider().get_tracer("x").start_span("expected")
    expected.add_link(setup.context)
    for span in (first, second):
        [link] = span.links
        assert link.context == setup.context
        assert dict(link.attributes) == {} and link.dropped_attributes == 0
        assert type(link.attributes) is type(expected.links[0].attributes)
    assert other.links == [(setup.context, None)]


def test_a_failed_tls_handshake_ends_its_setup_span(traced, server):
    """HTTPS to a plain-HTTP server: the handshake fails and the socket is closed before the
    set-up ends (``getpeername()`` raises); the span still ends, with the error."""
    import urllib3
    tracer = traced.tracer_provider.get_tracer("test")
    with urllib3.PoolManager(retries=False) as http, tracer.start_as_current_span("request"):
        with pytest.raises(urllib3.exceptions.SSLError):
            http.request("GET", server.url.replace("http://", "https://") + "/")
    setups = traced.finished(SETUP)
    assert len(setups) == 1
    assert setups[0].status.status_code == StatusCode.ERROR
    assert "network.peer.address" not in setups[0].attributes


def test_a_unix_socket_connection_has_no_peer_address(traced, tmp_path):
    """aiohttp over a Unix socket: the set-up span ends without a made-up peer address."""
    import asyncio

    import aiohttp
    from aiohttp import web

    async def hello(request):
        return web.Response(text="ok")

    async def main():
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        path = str(tmp_path / "server.sock")
        await web.UnixSite(runner, path).start()
        tracer = traced.tracer_provider.get_tracer("test")
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as session:
                with tracer.start_as_current_span("request"):
                    async with session.get("http://localhost/") as response:
                        assert await response.text() == "ok"
        finally:
            await runner.cleanup()

    asyncio.run(main())
    setups = traced.finished(SETUP)
    assert len(setups) == 1 and setups[0].end_time is not None
    assert "network.peer.address" not in setups[0].attributes

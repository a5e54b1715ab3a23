"""Set-up phases: a TLS server that holds every handshake 200 ms. Each library's new
connection splits into the phases it lets be told apart, the TLS handshake as long as the
server's books say it was, and each phase is a child span of the connection's set-up span."""

import asyncio
import socket
import threading
import time

import aiohttp
import httpx
import pytest
import urllib3

from drivers import URLLIB3_FUTURE, curl_cffi_requests, curl_statuses, httpx2, niquests
from poolscope.demo.server import DemoServer
from test_spans import SETUP, parent_of, seconds
from tlsserver import TLSServer

HELD = 0.2
PHASE = "poolscope.connection.setup_phase_time"
SPANS = {"dns": "DNS lookup", "connect": "socket connect", "tls": "TLS handshake"}


def _urllib3(server):
    with urllib3.PoolManager(ca_certs=str(server.cafile)) as http:
        return [http.request("GET", server.url + "/").status for _ in range(2)]


def _httpx_sync(module):
    def run(server):
        with module.Client(verify=server.client_context) as client:
            return [client.get(server.url + "/").status_code for _ in range(2)]
    return run


def _httpx_async(module):
    def run(server):
        async def main():
            async with module.AsyncClient(verify=server.client_context) as client:
                return [(await client.get(server.url + "/")).status_code for _ in range(2)]
        return asyncio.run(main())
    return run


def _aiohttp(server):
    async def main():
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=server.client_context)) as session:
            statuses = []
            for _ in range(2):
                async with session.get(server.url + "/") as response:
                    await response.read()
                    statuses.append(response.status)
            return statuses
    return asyncio.run(main())


def _pycurl(server):
    return curl_statuses(server.url + "/", 2, CAINFO=str(server.cafile))


def _niquests(server):
    with niquests.Session(retries=False) as session:
        return [session.get(server.url + "/", verify=str(server.cafile)).status_code
                for _ in range(2)]


def _niquests_async(server):
    async def run():
        async with niquests.AsyncSession(retries=False) as session:
            return [(await session.get(server.url + "/", verify=str(server.cafile))).status_code
                    for _ in range(2)]
    return asyncio.run(run())


def _curl_cffi(server):
    with curl_cffi_requests.Session(verify=str(server.cafile)) as session:
        return [session.get(server.url + "/").status_code for _ in range(2)]


# the phases each library lets be told apart (its fork of urllib3 has none: its connect is
# one call into its own backends)
CLIENTS = {
    "urllib3": (_urllib3, set() if URLLIB3_FUTURE else {"connect", "tls"}),
    "httpx-sync": (_httpx_sync(httpx), {"connect", "tls"}),
    "httpx-async": (_httpx_async(httpx), {"connect", "tls"}),
    "aiohttp": (_aiohttp, {"dns"}),
    "pycurl": (_pycurl, {"dns", "connect", "tls"}),
}
if httpx2 is not None:
    CLIENTS.update({"httpx2-sync": (_httpx_sync(httpx2), {"connect", "tls"}),
                    "httpx2-async": (_httpx_async(httpx2), {"connect", "tls"})})
if niquests is not None:
    CLIENTS.update({"niquests": (_niquests, set()), "niquests-async": (_niquests_async, set())})
if curl_cffi_requests is not None:
    CLIENTS["curl_cffi"] = (_curl_cffi, {"dns", "connect", "tls"})


@pytest.mark.parametrize("client", CLIENTS)
def test_a_connection_set_up_splits_into_its_phases(traced, tmp_path, client):
    run, expected = CLIENTS[client]
    tracer = traced.tracer_provider.get_tracer("app")
    with TLSServer(HELD, tmp_path / "ca.pem") as server:
        with tracer.start_as_current_span("app"):
            assert run(server) == [200, 200]
    [(taken, done)] = server.handshakes  # one connection, reused by the second request
    assert server.accepted == 1
    held = done - taken  # the handshake as the server saw it, from taking the connection

    data = traced.read()
    phases = {a["poolscope.setup.phase"]: p for a, p in data.get(PHASE, [])}
    assert set(phases) == expected
    assert all(p.count == 1 for p in phases.values())
    assert all(a["server.port"] == server.port for a, _ in data.get(PHASE, []))
    if "tls" in phases:
        assert phases["tls"].sum >= HELD
        assert phases["tls"].sum == pytest.approx(held, abs=0.05)
    for quick in ("dns", "connect"):  # 127.0.0.1
        if quick in phases:
            assert phases[quick].sum < 0.05
    [(_, create)] = data["poolscope.connection.create_time"]
    assert create.count == 1
    # create_time runs from the socket's opening (libcurl: after name resolution)
    timed = sum(p.sum for name, p in phases.items() if name != "dns")
    assert timed <= create.sum + 0.002
    if "tls" in phases:  # the phases are the set-up, but for poolscope's own steps
        assert timed >= create.sum - 0.005

    spans = traced.finished()
    [setup] = traced.finished(SETUP)
    children = [s for s in spans if s.name in SPANS.values()]
    assert sorted(s.name for s in children) == sorted(SPANS[p] for p in expected)
    for span in children:
        assert parent_of(span, spans) is setup
        [phase] = [p for name, p in phases.items() if SPANS[name] == span.name]
        assert seconds(span) == pytest.approx(phase.sum, abs=0.002)
        assert span.attributes["server.port"] == server.port
    # in order, within their set-up (libcurl's DNS lookup comes just before it: here, a
    # fraction of a millisecond)
    children.sort(key=lambda s: s.start_time)
    assert [s.name for s in children] == [SPANS[p] for p in ("dns", "connect", "tls")
                                          if p in expected]
    for earlier, later in zip(children, children[1:]):
        assert earlier.end_time <= later.start_time + 2_000_000
    assert all(setup.start_time - 2_000_000 <= s.start_time and
               s.end_time <= setup.end_time + 2_000_000 for s in children)


def test_the_report_shows_the_phases_and_advises_reuse_when_handshakes_dominate(traced):
    """4 requests, a client each: 4 connections, each held 200 ms in its handshake."""
    from poolscope import report
    from poolscope._instrument import current_recorder
    with TLSServer(HELD) as server:
        for _ in range(4):
            with httpx.Client(verify=server.client_context) as client:
                assert client.get(server.url + "/").status_code == 200
    assert len(server.handshakes) == 4
    held = sorted(round((done - taken) * 1000) for taken, done in server.handshakes)
    text = report.render(traced.reader.get_metrics_data(), current_recorder().scopes())
    lines = text.splitlines()
    [setup] = [line for line in lines if line.startswith("  set-up: ")]
    tls = int(setup.split("tls ")[1].split(" ms")[0])
    assert held[0] - 50 <= tls <= held[-1] + 50, (held, text)
    assert "connect " in setup and "dns" not in setup, text
    assert (f"advice: 4 of 4 requests opened a new connection, whose TLS handshake took {tls} "
            "ms on average") in text, text


def _retrying_urllib3(url):
    with urllib3.PoolManager(retries=urllib3.Retry(connect=5, backoff_factor=0.2)) as http:
        return http.request("GET", url).status


def _retrying_httpx(module, asynchronous):
    def run(url):
        if not asynchronous:
            with module.Client(transport=module.HTTPTransport(retries=5)) as client:
                return client.get(url).status_code

        async def main():
            async with module.AsyncClient(transport=module.AsyncHTTPTransport(retries=5)) as client:
                return (await client.get(url)).status_code
        return asyncio.run(main())
    return run


RETRYING = {"urllib3": _retrying_urllib3, "httpx-sync": _retrying_httpx(httpx, False),
            "httpx-async": _retrying_httpx(httpx, True)}
if httpx2 is not None:
    RETRYING.update({"httpx2-sync": _retrying_httpx(httpx2, False),
                     "httpx2-async": _retrying_httpx(httpx2, True)})


@pytest.mark.parametrize("client", RETRYING)
def test_refused_connects_retried_are_no_set_up_time(traced, client):
    """Nothing listens on the port for 0.3 s: the library's connect retries (httpcore's
    transport ``retries``, urllib3's ``Retry(connect=...)``) are refused, back off, and the
    attempt made once the server listens connects. The request waited for the server, but the
    connection's set-up (``create_time``, its set-up span) is that attempt's alone: no longer
    than from the server's listening on to the response. The refused attempts were no
    connections (one created: the server's one); each has a set-up span of its own, ended in
    error before the attempt that connected."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = {}

    def listen():
        started["at"] = time.monotonic()
        started["server"] = DemoServer(port=port).__enter__()

    starter = threading.Timer(0.3, listen)
    starter.start()
    try:
        with traced.tracer_provider.get_tracer("app").start_as_current_span("app"):
            assert RETRYING[client](f"http://127.0.0.1:{port}/") == 200
        answered = time.monotonic()
    finally:
        starter.join()
        started["server"].__exit__(None, None, None)
    assert started["server"].accepted == 1
    data = traced.read()
    assert traced.served(data) == (1, 1, 0)
    count, total = traced.histogram(data, "poolscope.connection.create_time")
    assert count == 1 and total <= answered - started["at"]
    connects, connecting = traced.histogram(data, PHASE, poolscope__setup__phase="connect")
    assert connects == ("connect" in CLIENTS[client][1]) and connecting <= total
    spans = traced.finished(SETUP)
    [setup] = [s for s in spans if s.status.is_ok]
    assert seconds(setup) == pytest.approx(total, abs=0.002)
    refused = [s for s in spans if s is not setup]  # the first, at least, was before the server
    assert refused and all(s.end_time <= setup.start_time and s.events[0].name == "exception"
                           for s in refused)

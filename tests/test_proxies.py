"""Through a proxy (``tests/tunnelproxy.py``: an HTTP ``CONNECT`` tunnel, or SOCKS5) to the
TLS test server, which holds each handshake 200 ms, or to the plain demo server: each
library's pooled connection is the one through the proxy. It is created once (the proxy's
tunnels, the server's handshakes), reused by the next requests (the server's answers), counted
under the target's origin, idle at the end; its set-up time runs from its first step towards
the proxy through the TLS handshake with the target, so it is at least as long as the server
held that handshake."""

import asyncio
import contextlib
import inspect
import io
import logging
import socket
import sys
import time

import aiohttp
import httpx
import pycurl
import pytest
import urllib3
from opentelemetry.trace import StatusCode

from conftest import Traced, instrumented
from drivers import URLLIB3_FUTURE, curl_cffi_requests, curl_statuses, httpx2, niquests
from poolscope.demo.server import DemoServer
from test_spans import SETUP
from tlsserver import TLSServer
from tunnelproxy import TunnelProxy

HELD = 0.2
CONNECT = 5.0  # each client's connect timeout, seconds
# what each library needs to speak SOCKS5
SOCKS = {"urllib3": "python_socks" if URLLIB3_FUTURE else "socks", "requests": "socks",
         "niquests": "python_socks", "httpx": "socksio", "httpx2": "socksio",
         "aiohttp": "aiohttp_socks"}


def _urllib3(url, proxy, cafile):
    options = {"ca_certs": cafile, "retries": False,
               "timeout": urllib3.Timeout(connect=CONNECT, read=10)}
    if proxy is None:
        http = urllib3.PoolManager(**options)
    elif proxy.startswith("socks"):
        from urllib3.contrib.socks import SOCKSProxyManager
        http = SOCKSProxyManager(proxy, **options)
    else:
        http = urllib3.ProxyManager(proxy, **options)
    with http:
        return [http.request("GET", url).status for _ in range(3)]


def _requests_like(module):
    def run(url, proxy, cafile):
        with module.Session() as session:
            return [session.get(url, proxies={"http": proxy, "https": proxy},
                                verify=cafile or True, timeout=(CONNECT, 10)).status_code
                    for _ in range(3)]
    return run


def _httpx_sync(module):
    def run(url, proxy, cafile):
        with module.Client(verify=_context(cafile), timeout=_timeout(module),
                           **_proxy(module, proxy)) as client:
            return [client.get(url).status_code for _ in range(3)]
    return run


def _httpx_async(module):
    def run(url, proxy, cafile):
        async def main():
            async with module.AsyncClient(verify=_context(cafile), timeout=_timeout(module),
                                          **_proxy(module, proxy)) as client:
                return [(await client.get(url)).status_code for _ in range(3)]
        return asyncio.run(main())
    return run


def _httpx_socks(flavor):
    """httpx-socks' transport (a pool of httpcore's, its connections of its own), for SOCKS5
    and for an HTTP tunnel."""
    def run(url, proxy, cafile):
        httpx_socks = pytest.importorskip("httpx_socks")
        if flavor == "sync":
            with httpx.Client(transport=httpx_socks.SyncProxyTransport.from_url(
                    proxy, verify=_context(cafile)), timeout=_timeout(httpx)) as client:
                return [client.get(url).status_code for _ in range(3)]

        async def main():
            async with httpx.AsyncClient(transport=httpx_socks.AsyncProxyTransport.from_url(
                    proxy, verify=_context(cafile)), timeout=_timeout(httpx)) as client:
                return [(await client.get(url)).status_code for _ in range(3)]
        return asyncio.run(main())
    return run


def _timeout(module):
    return module.Timeout(10, connect=CONNECT)


def _proxy(module, proxy):
    """httpx's proxy argument (``proxies`` before httpx 0.26)."""
    return {"proxy" if "proxy" in inspect.signature(module.Client).parameters
            else "proxies": proxy}


def _aiohttp(url, proxy, cafile):
    """Through aiohttp's own proxy support, or for SOCKS aiohttp-socks' connector."""
    context = _context(cafile)  # one: aiohttp pools connections by their SSL context

    async def main():
        if proxy is not None and proxy.startswith("socks"):
            from aiohttp_socks import ProxyConnector
            options, via = {"connector": ProxyConnector.from_url(proxy)}, None
        else:
            options, via = {}, proxy
        timeout = aiohttp.ClientTimeout(total=20, sock_connect=CONNECT)
        async with aiohttp.ClientSession(timeout=timeout, **options) as session:
            statuses = []
            for _ in range(3):
                async with session.get(url, proxy=via, ssl=context) as response:
                    await response.read()
                    statuses.append(response.status)
            return statuses
    return asyncio.run(main())


def _context(cafile):
    import ssl
    return ssl.create_default_context(cafile=cafile) if cafile else True


def _pycurl(url, proxy, cafile):
    return curl_statuses(url, 3, **_curl_options(proxy, cafile))


def _pycurl_multi(url, proxy, cafile):
    """Transfers one after another in a multi (where poolscope sets ``PREREQFUNCTION``)."""
    multi, curl, statuses = pycurl.CurlMulti(), pycurl.Curl(), []
    try:
        for _ in range(3):
            curl.setopt(pycurl.URL, url)
            curl.setopt(pycurl.WRITEDATA, io.BytesIO())
            for name, value in _curl_options(proxy, cafile).items():
                curl.setopt(getattr(pycurl, name), value)
            multi.add_handle(curl)
            while multi.perform()[1]:
                # libcurl's descriptors may miss a step of a proxy's handshake, whose wait the
                # application's loop would then add to the set-up: 10 ms at most here
                multi.select(0.01)
            _, _, failed = multi.info_read()
            multi.remove_handle(curl)
            if failed:
                raise pycurl.error(*failed[0][1:])
            statuses.append(curl.getinfo(pycurl.RESPONSE_CODE))
        return statuses
    finally:
        curl.close()
        multi.close()


def _curl_options(proxy, cafile):
    return {"CONNECTTIMEOUT_MS": int(CONNECT * 1000), **({"PROXY": proxy} if proxy else {}),
            **({"CAINFO": cafile} if cafile else {})}


def _curl_cffi(url, proxy, cafile):
    with curl_cffi_requests.Session(verify=cafile or True, proxy=proxy) as session:
        return [session.get(url, timeout=(CONNECT, 10)).status_code for _ in range(3)]


CLIENTS = {"urllib3-future" if URLLIB3_FUTURE else "urllib3": ("urllib3", _urllib3),
           "httpx-sync": ("httpx", _httpx_sync(httpx)),
           "httpx-async": ("httpx", _httpx_async(httpx)),
           "httpx-socks-sync": ("httpx", _httpx_socks("sync")),
           "httpx-socks-async": ("httpx", _httpx_socks("async")), "aiohttp": ("aiohttp", _aiohttp),
           "pycurl": ("pycurl", _pycurl), "pycurl-multi": ("pycurl", _pycurl_multi)}
if httpx2 is not None:
    CLIENTS.update({"httpx2-sync": ("httpx2", _httpx_sync(httpx2)),
                    "httpx2-async": ("httpx2", _httpx_async(httpx2))})
if niquests is not None:
    CLIENTS["niquests"] = ("niquests", _requests_like(niquests))
else:
    import requests
    CLIENTS["requests"] = ("requests", _requests_like(requests))
if curl_cffi_requests is not None:
    CLIENTS["curl_cffi"] = ("curl_cffi", _curl_cffi)


@pytest.mark.parametrize("via, scheme", [("connect", "https"), ("socks5", "https"),
                                         ("socks5", "http")])
@pytest.mark.parametrize("client", CLIENTS)
def test_a_connection_through_a_proxy(traced, tmp_path, client, via, scheme):
    family, run = CLIENTS[client]
    if via == "socks5":
        if SOCKS.get(family):
            pytest.importorskip(SOCKS[family])
    server_cls = TLSServer if scheme == "https" else DemoServer
    with server_cls(*(HELD, tmp_path / "ca.pem") if scheme == "https" else ()) as server, \
            TunnelProxy() as proxy:
        cafile = str(server.cafile) if scheme == "https" else None
        with traced.tracer_provider.get_tracer("app").start_as_current_span("app"):
            assert run(server.url + "/", proxy.url if via == "connect" else proxy.socks_url,
                       cafile) == [200] * 3
    assert proxy.targets == [f"127.0.0.1:{server.port}"]
    assert (server.accepted, server.answered) == (1, 3)
    data = traced.read()
    target = {"url__scheme": scheme, "server__address": "127.0.0.1", "server__port": server.port}
    assert traced.served(data, **target) == (1, 1, 2)
    assert traced.value(data, "http.client.open_connections", http__connection__state="active",
                        **target) == 0
    count, seconds = traced.histogram(data, "poolscope.connection.create_time", **target)
    assert count == 1
    [setup] = traced.finished(SETUP)  # the set-up span, as long
    assert (setup.end_time - setup.start_time) / 1e9 == pytest.approx(seconds, abs=0.002)
    if scheme == "https":
        [(taken, done)] = server.handshakes
        assert HELD <= seconds == pytest.approx(done - taken, abs=0.05)
    else:
        assert 0 < seconds < HELD


# where a connection fails to open: nothing listens at the first hop (proxy or server), or at
# the target behind the proxy; the first hop never answers (its connect times out); or the
# target's certificate is not trusted. A forward proxy (plain HTTP through an HTTP proxy)
# answers for a target it cannot reach: no set-up failure there
FAILURES = [("direct", "http", "first hop"), ("http-proxy", "http", "first hop"),
            ("http-proxy", "https", "first hop"), ("socks5", "https", "first hop"),
            ("http-proxy", "https", "target"), ("socks5", "http", "target"),
            ("socks5", "https", "target"), ("direct", "http", "silent"),
            ("http-proxy", "https", "silent"), ("socks5", "https", "silent"),
            ("direct", "https", "untrusted"), ("http-proxy", "https", "untrusted"),
            ("socks5", "https", "untrusted")]


@contextlib.contextmanager
def _silent():
    """The port of a listening socket whose backlog is full: Linux drops the SYNs of any
    further connect, which then times out."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        yield listener.getsockname()[1]


@pytest.mark.parametrize("via, scheme, fails", FAILURES)
@pytest.mark.parametrize("client", CLIENTS)
def test_a_connection_that_fails_to_open_ends_its_set_up_span_in_error(traced, monkeypatch,
                                                                       client, via, scheme,
                                                                       fails):
    """Nothing listens where the connection goes (a socket bound there, never listening),
    nothing answers there (its connect times out), or the server's certificate is from a CA
    the client does not trust: the application's request raises, through a proxy too. Its one
    attempt is one set-up span, ended in error with the exception, as long as the connect
    timeout where that ended it; and no connection counts: none created, acquired or open. The
    proxy handled that one attempt: refused by the target, or one tunnel to the server, which
    answered nothing."""
    family, run = CLIENTS[client]
    if via == "direct" and client.startswith("httpx-socks"):
        pytest.skip("httpx-socks' transport always goes through its proxy")
    if via == "socks5" and SOCKS.get(family):
        pytest.importorskip(SOCKS[family])
    if fails == "silent":  # the one case that waits for the connect timeout
        monkeypatch.setattr(sys.modules[__name__], "CONNECT", 0.3)
    with _silent() as silent, socket.socket() as closed, TunnelProxy() as proxy, \
            TLSServer(0) as server:
        closed.bind(("127.0.0.1", 0))
        nowhere = silent if fails == "silent" else closed.getsockname()[1]
        proxy_port = proxy.server_address[1]
        target = server.port if fails == "untrusted" else nowhere
        if fails in ("first hop", "silent") and via != "direct":
            target, proxy_port = 9, nowhere  # the target is never reached
        hop = None if via == "direct" else \
            f"{'http' if via == 'http-proxy' else 'socks5'}://127.0.0.1:{proxy_port}"
        with traced.tracer_provider.get_tracer("app").start_as_current_span("app"):
            with pytest.raises(Exception) as raised:
                run(f"{scheme}://127.0.0.1:{target}/", hop, None)
        assert server.answered == 0
    assert (proxy.refused, proxy.tunnels) == {"target": (1, 0), "untrusted": (
        0, int(via != "direct"))}.get(fails, (0, 0)), repr(raised.value)
    [setup] = traced.finished(SETUP)
    assert setup.status.status_code == StatusCode.ERROR
    assert [event.name for event in setup.events] == ["exception"]
    if fails == "silent":  # libcurl's connect timeout runs from the name lookup, its span not
        lookup = 0.05 if family in ("pycurl", "curl_cffi") else 0
        assert CONNECT - lookup <= (setup.end_time - setup.start_time) / 1e9 < CONNECT + 0.25
    data = traced.read()
    assert traced.served(data) in ((None, None, None), (0, 0, 0))
    assert traced.value(data, "http.client.open_connections") in (None, 0)


@pytest.mark.parametrize("module", [httpx] + ([httpx2] if httpx2 is not None else []),
                         ids=lambda module: module.__name__)
def test_a_tunnel_whose_handshake_failed_holds_its_slot_as_the_pool_does(monkeypatch, caplog,
                                                                         module):
    """httpcore keeps a tunnel whose TLS handshake with the target failed in its pool, active,
    for good (encode/httpcore#1023): with one connection allowed, the next request waits for
    the pool until it times out. poolscope shows what the pool holds, read from the pool's own
    list: that many connections active, and a wait that timed out if it held one; the set-up
    span ends in error, and the leak warning says that the connection never opened."""
    monkeypatch.setenv("POOLSCOPE_LEAK_WARNINGS", "true")
    monkeypatch.setenv("POOLSCOPE_LEAK_SECONDS", "0.2")
    with instrumented(Traced) as traced, TunnelProxy() as proxy, TLSServer(0) as server, \
            caplog.at_level(logging.WARNING, logger="poolscope"):
        client = module.Client(limits=module.Limits(max_connections=1),
                               timeout=module.Timeout(5, pool=0.2), **_proxy(module, proxy.url))
        url = f"https://127.0.0.1:{server.port}/"
        pool = client._transport_for_url(module.URL(url))._pool
        with traced.tracer_provider.get_tracer("app").start_as_current_span("app"):
            with pytest.raises(module.ConnectError):
                client.get(url)
            held = sum(1 for connection in pool.connections if not connection.is_closed())
            with pytest.raises(module.PoolTimeout if held else module.ConnectError):
                client.get(url)
        time.sleep(0.3)  # the leak watch looks every 0.05 s
        data = traced.read()
        client.close()
    assert proxy.tunnels == 2 - held and server.answered == 0
    assert (traced.value(data, "http.client.open_connections",
                         http__connection__state="active") or 0) == held
    assert (traced.value(data, "poolscope.connection.timeouts") or 0) == held
    assert [span.status.status_code for span in traced.finished(SETUP)] == \
        [StatusCode.ERROR] * (2 - held)
    assert [record.getMessage().endswith("encode/httpcore#1023)") for record in caplog.records
            if "held for" in record.getMessage()] == [True] * held

"""Through a proxy (``tests/tunnelproxy.py``: an HTTP ``CONNECT`` tunnel, or SOCKS5) to the
TLS test server, which holds each handshake 200 ms, or to the plain demo server: each
library's pooled connection is the one through the proxy. It is created once (the proxy's
tunnels, the server's handshakes), reused by the next requests (the server's answers), counted
under the target's origin, idle at the end; its set-up time runs from its first step towards
the proxy through the TLS handshake with the target, so it is at least as long as the server
held that handshake."""

import asyncio
import inspect

import aiohttp
import httpx
import pytest
import urllib3

from drivers import URLLIB3_FUTURE, curl_cffi_requests, curl_statuses, httpx2, niquests
from poolscope.demo.server import DemoServer
from test_spans import SETUP
from tlsserver import TLSServer
from tunnelproxy import TunnelProxy

HELD = 0.2
# what each library needs to speak SOCKS5
SOCKS = {"urllib3": "python_socks" if URLLIB3_FUTURE else "socks", "requests": "socks",
         "niquests": "python_socks", "httpx": "socksio", "httpx2": "socksio",
         "aiohttp": "aiohttp_socks"}


def _urllib3(url, proxy, cafile):
    if proxy.startswith("socks"):
        from urllib3.contrib.socks import SOCKSProxyManager as manager
    else:
        manager = urllib3.ProxyManager
    with manager(proxy, ca_certs=cafile) as http:
        return [http.request("GET", url).status for _ in range(3)]


def _requests_like(module):
    def run(url, proxy, cafile):
        with module.Session() as session:
            return [session.get(url, proxies={"http": proxy, "https": proxy},
                                verify=cafile or True).status_code for _ in range(3)]
    return run


def _httpx_sync(module):
    def run(url, proxy, cafile):
        with module.Client(verify=_context(cafile), **_proxy(module, proxy)) as client:
            return [client.get(url).status_code for _ in range(3)]
    return run


def _httpx_async(module):
    def run(url, proxy, cafile):
        async def main():
            async with module.AsyncClient(verify=_context(cafile),
                                          **_proxy(module, proxy)) as client:
                return [(await client.get(url)).status_code for _ in range(3)]
        return asyncio.run(main())
    return run


def _proxy(module, proxy):
    """httpx's proxy argument (``proxies`` before httpx 0.26)."""
    return {"proxy" if "proxy" in inspect.signature(module.Client).parameters
            else "proxies": proxy}


def _aiohttp(url, proxy, cafile):
    """Through aiohttp's own proxy support, or for SOCKS aiohttp-socks' connector."""
    context = _context(cafile)  # one: aiohttp pools connections by their SSL context

    async def main():
        if proxy.startswith("socks"):
            from aiohttp_socks import ProxyConnector
            options, via = {"connector": ProxyConnector.from_url(proxy)}, None
        else:
            options, via = {}, proxy
        async with aiohttp.ClientSession(**options) as session:
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
    return curl_statuses(url, 3, PROXY=proxy, **({"CAINFO": cafile} if cafile else {}))


def _curl_cffi(url, proxy, cafile):
    with curl_cffi_requests.Session(verify=cafile or True, proxy=proxy) as session:
        return [session.get(url).status_code for _ in range(3)]


CLIENTS = {"urllib3-future" if URLLIB3_FUTURE else "urllib3": ("urllib3", _urllib3),
           "httpx-sync": ("httpx", _httpx_sync(httpx)),
           "httpx-async": ("httpx", _httpx_async(httpx)), "aiohttp": ("aiohttp", _aiohttp),
           "pycurl": ("pycurl", _pycurl)}
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

"""httpx and httpx2 behaviour: keep-alive expiry, the idle limit, limits, proxy pools,
cancellation."""

import asyncio
import inspect
import sys
import threading
import time

import httpx
import pytest

from poolscope.demo.server import DemoServer

from conftest import instrumented
from drivers import DRIVERS, httpx2

MODULES = pytest.mark.parametrize("httpx", [m for m in (httpx, httpx2) if m],
                                  ids=lambda m: m.__name__)


@pytest.fixture(params=[name for name in DRIVERS if name.startswith("httpx")])
def driver(request):
    made = []

    def make(*args, **kwargs):
        made.append(DRIVERS[request.param](*args, **kwargs))
        return made[-1]
    yield make
    for d in made:
        d.close()


def test_keepalive_expiry(metrics, server, driver):
    d = driver(server, keepalive_expiry=0.2)
    assert d.get("/") == 200
    time.sleep(0.35)
    assert d.get("/") == 200
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.closed",
                         poolscope__close__reason="keepalive_expired") == 1
    assert metrics.value(data, "poolscope.connection.closed") == 1
    assert metrics.value(data, "poolscope.connection.created") == 2
    assert metrics.value(data, "poolscope.connection.acquisitions",
                         poolscope__connection__reused=True) == 0
    count, total = metrics.histogram(data, "http.client.connection.duration")
    assert count == 1 and 0.2 <= total <= 0.6


def test_idle_limit(metrics, server, driver):
    """max_keepalive_connections=1: of 3 connections, 2 are closed as they go idle."""
    d = driver(server, limit=10, max_keepalive_connections=1)
    assert d.get_all(["/delay/0.2"] * 3) == [200] * 3
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.created") == 3
    assert metrics.value(data, "poolscope.connection.closed",
                         poolscope__close__reason="idle_limit") == 2
    assert metrics.value(data, "poolscope.connection.closed") == 2
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="idle") == 1
    assert metrics.value(data, "poolscope.connection.max") == 10
    assert metrics.value(data, "poolscope.connection.idle.max") == 1


@MODULES
def test_unlimited_pool_reports_no_max_and_never_saturates(metrics, server, httpx):
    client = httpx.Client(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
    assert client.get(server.url + "/").status_code == 200
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.max") is None
    assert metrics.value(data, "poolscope.pool.count") == 1
    assert metrics.value(data, "poolscope.pool.saturation_time") is None
    client.close()


@MODULES
def test_forward_proxy_pool(metrics, server, httpx):
    """Through an HTTP proxy the pool's connections go to the proxy; origins stay the targets."""
    keyword = "proxy" if "proxy" in inspect.signature(httpx.Client).parameters else "proxies"
    client = httpx.Client(**{keyword: server.url})
    for _ in range(3):
        assert client.get("http://example.test:8080/").status_code == 200
    data = metrics.read()
    target = {"server__address": "example.test", "server__port": 8080}
    assert metrics.value(data, "poolscope.connection.created", **target) == 1
    assert metrics.value(data, "poolscope.connection.acquisitions",
                         poolscope__connection__reused=True, **target) == 2
    assert metrics.value(data, "http.client.open_connections", http__connection__state="idle",
                         **target) == 1
    assert metrics.histogram(data, "poolscope.connection.create_time", **target)[0] == 1
    assert server.accepted == 1
    client.close()


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_a_pool_subclass_making_connections_of_its_own(metrics, server, flavor):
    """httpx-socks' transport: a subclass of httpcore's pool whose ``create_connection`` makes
    connections of its own class, which set up through SOCKS5 in their own code (defined
    outside httpcore, so poolscope observes their ``create_connection`` and ``close`` as
    subclasses). Three requests: one connection, the proxy's tunnel and the one the server
    accepted, acquired three times; closed with the client. Its set-up, in its own code, is
    timed (``tests/test_proxies.py`` checks how long)."""
    httpx_socks = pytest.importorskip("httpx_socks")
    from tunnelproxy import TunnelProxy

    async def run_async(url):
        transport = httpx_socks.AsyncProxyTransport.from_url(proxy.socks_url)
        async with httpx.AsyncClient(transport=transport) as client:
            return [(await client.get(url)).status_code for _ in range(3)], metrics.read()

    with TunnelProxy() as proxy:
        if flavor == "sync":
            with httpx.Client(transport=httpx_socks.SyncProxyTransport.from_url(
                    proxy.socks_url)) as client:
                statuses = [client.get(server.url + "/").status_code for _ in range(3)]
                data = metrics.read()
        else:
            statuses, data = asyncio.run(run_async(server.url + "/"))
    assert statuses == [200] * 3 and proxy.tunnels == server.accepted == 1
    assert metrics.served(data) == (1, 1, 2)
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="idle") == 1
    assert metrics.histogram(data, "poolscope.connection.create_time")[0] == 1
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.closed",
                         poolscope__close__reason="pool_closed") == 1
    assert metrics.value(data, "http.client.open_connections") == 0


@MODULES
def test_pool_closing_a_connection_under_a_request_is_an_error(metrics, server, httpx):
    """httpcore 1.0.9's pool can close a connection a request is still reading from
    (encode/httpcore#1110, a race between threads); here the close is made directly, as the
    pool's pass makes it. The request fails, so the close reason is ``error``, not the
    ``idle_limit`` the pool believed."""
    client = httpx.Client()
    with client.stream("GET", server.url + "/bytes/10000000") as response:
        connection, = client._transport._pool.connections
        connection.close()
        with pytest.raises(httpx.HTTPError):
            response.read()
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.closed", poolscope__close__reason="error") == 1
    assert metrics.value(data, "poolscope.connection.closed") == 1
    assert metrics.value(data, "http.client.open_connections", http__connection__state="active") == 0
    assert metrics.value(data, "http.client.open_connections", http__connection__state="idle") == 0
    client.close()


@MODULES
def test_a_request_cancelled_as_a_new_connection_is_made_for_it(metrics, server, httpx):
    """Limit 1: B waits; A's ``Connection: close`` response ends, so the pool makes a new
    connection for B, and B is cancelled before it runs. httpcore keeps that connection, never
    connected, and its slot (encode/httpcore#1093); httpcore2 2.6+ drops it. poolscope counts
    what each pool holds."""

    async def main():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
            async with client.stream("GET", server.url + "/close") as first:
                waiting = asyncio.ensure_future(client.get(server.url + "/"))
                await asyncio.sleep(0.1)
                await first.aread()
            waiting.cancel()  # the pool has just given it a new connection
            with pytest.raises(asyncio.CancelledError):
                await waiting
            pool = client._transport._pool
            data = metrics.read()
            held = (len(pool.connections) - sum(c.is_idle() for c in pool.connections),
                    sum(c.is_idle() for c in pool.connections))
            assert (metrics.value(data, "http.client.open_connections",
                                  http__connection__state="active"),
                    metrics.value(data, "http.client.open_connections",
                                  http__connection__state="idle")) == held
            assert not metrics.value(data, "poolscope.connection.pending_requests")
            assert metrics.value(data, "poolscope.connection.created") == 1 == server.accepted
            return held

    assert asyncio.run(main()) in ((0, 0), (1, 0))


@MODULES
def test_a_client_kept_across_event_loops(metrics, server, httpx):
    """An ``AsyncClient`` kept across ``asyncio.run`` calls (a common mistake), limit 2, four
    requests per run. In each later run the two connections the last loop left idle fail with
    ``RuntimeError('Event loop is closed')`` as soon as a request takes one, and httpcore has
    handed each to the queued requests too: those find it closed, wait on, and get a new
    connection each. Every request took one connection; the server accepted the new ones. So
    12 acquisitions, 6 new; the 4 connections closed served 12 requests less the 2 that the
    last run's new ones did."""
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=2))
    loop_closed = "RuntimeError('Event loop is closed')"

    async def run():
        got = await asyncio.gather(*[client.get(server.url + "/") for _ in range(4)],
                                   return_exceptions=True)
        return sorted(str(getattr(r, "status_code", None) or repr(r)) for r in got)

    assert [asyncio.run(run()) for _ in range(3)] == (
        [["200"] * 4] + [["200", "200", loop_closed, loop_closed]] * 2)
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.created") == 6 == server.accepted
    assert metrics.value(data, "poolscope.connection.acquisitions",
                         poolscope__connection__reused=False) == 6
    assert metrics.value(data, "poolscope.connection.acquisitions",
                         poolscope__connection__reused=True) == 6
    assert metrics.value(data, "poolscope.connection.closed") == 4
    assert metrics.value(data, "poolscope.connection.closed",
                         poolscope__close__reason="error") == 4
    assert metrics.histogram(data, "poolscope.connection.requests") == (4, 10)
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="idle") == 2


@MODULES
def test_requests_whose_bodies_fail_while_others_queue(metrics, server, httpx):
    """Limit 1, six threads at a time, every third request's body failing (an upload whose
    generator raises) after its headers went out: httpx closes the connection, and the
    requests queued behind it, handed the same connection, may find it closed and wait on for
    a new one. Every request reached the server on the one connection it took: acquisitions
    are the requests the server received, new ones the sockets it accepted, and once the
    client is closed the connections served them all."""
    client = httpx.Client(limits=httpx.Limits(max_connections=1))

    def body():
        yield b"x"
        raise ValueError("the application's body failed")

    seen = []

    def request(i):
        try:
            if i % 3:
                seen.append(client.get(server.url + "/delay/0.05").status_code)
            else:
                client.post(server.url + "/", content=body())
        except ValueError:
            seen.append("failed")

    for _ in range(20):
        threads = [threading.Thread(target=request, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    client.close()
    assert sorted(seen, key=str) == [200] * 80 + ["failed"] * 40
    deadline = time.monotonic() + 5
    while server.received < 120 and time.monotonic() < deadline:
        time.sleep(0.01)
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.created") == server.accepted
    assert metrics.value(data, "poolscope.connection.acquisitions",
                         poolscope__connection__reused=False) == server.accepted
    assert metrics.value(data, "poolscope.connection.acquisitions") == server.received == 120
    assert metrics.histogram(data, "poolscope.connection.requests") == (server.accepted, 120)
    assert metrics.value(data, "poolscope.connection.closed",
                         poolscope__close__reason="error") == 40


def _check_handed(metrics, server, pool, done, midway):
    """The figures after H, handed the connection first, found D had taken it (see below)."""
    assert done == ["D", "H"]
    assert midway == [(1, 1, 1, 1)]  # queued and busy, by httpcore and by poolscope, while D ran
    assert pool.connections[0]._connection._request_count == 3
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.acquisitions") == 3
    assert metrics.value(data, "poolscope.connection.created") == 1 == server.accepted
    assert metrics.value(data, "poolscope.connection.waits",
                         poolscope__wait__outcome="granted") == 1
    count, total = metrics.histogram(data, "poolscope.connection.wait_time")
    assert count == 1 and total >= 0.35  # H waited for A, then for D
    assert not metrics.value(data, "poolscope.connection.pending_requests")
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="active") == 0


def _midway(metrics, pool):
    data = metrics.read()
    return (sum(r.is_queued() for r in pool._requests),
            metrics.value(data, "poolscope.connection.pending_requests"),
            sum(not c.is_idle() for c in pool.connections),
            metrics.value(data, "http.client.open_connections", http__connection__state="active"))


def test_a_request_handed_a_connection_another_holds_takes_it_first():
    """Limit 1: H waits. A's response ends and the pool hands the connection to H; before H's
    thread runs, D starts in A's thread, is handed the same connection and takes it (a switch
    interval of a second keeps the GIL with D until it waits on the server). H finds it taken
    and waits on until D is done. poolscope counts D's acquisition when D takes the connection,
    and H's when H does; while D runs, H is pending. (httpcore2 2.16 no longer hands a
    connection handed to one request to another.)

    On a busy machine the operating system can still run H's thread first: the application
    then sees H before D, and the scenario is run again, with a new pipeline and server (up
    to five times). A request that fails fails the test at once."""
    switch = sys.getswitchinterval()
    for _ in range(5):
        with instrumented() as metrics, DemoServer() as server, \
                httpx.Client(limits=httpx.Limits(max_connections=1)) as client:
            pool, done, midway, failed = client._transport._pool, [], [], []

            def get(name, path):
                try:
                    assert client.get(server.url + path).status_code == 200
                    done.append(name)
                except BaseException as exc:
                    failed.append(exc)

            first = client.send(client.build_request("GET", server.url + "/"), stream=True)
            held = threading.Thread(target=get, args=("H", "/"))
            held.start()
            time.sleep(0.1)
            checked = threading.Timer(0.15, lambda: midway.append(_midway(metrics, pool)))
            checked.start()
            sys.setswitchinterval(1.0)
            try:
                first.read()  # the pool hands the connection to H
                get("D", "/delay/0.3")
            finally:
                sys.setswitchinterval(switch)
            held.join()
            checked.join()
            assert not failed
            if done == ["H", "D"]:
                continue  # H's thread ran first: not this scenario
            _check_handed(metrics, server, pool, done, midway)
            return
    pytest.fail("H's thread ran before D in every attempt")


def test_a_request_handed_a_connection_another_holds_takes_it_first_async(metrics, server):
    """As above, in one event loop: D starts in A's task, and the lock httpcore takes around a
    connection's set-up lets H run only once D has the connection."""

    async def main():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
            pool, done, midway = client._transport._pool, [], []

            async def get(name, path):
                assert (await client.get(server.url + path)).status_code == 200
                done.append(name)

            async def check():
                await asyncio.sleep(0.15)
                midway.append(_midway(metrics, pool))

            async with client.stream("GET", server.url + "/") as first:
                held = asyncio.ensure_future(get("H", "/"))
                await asyncio.sleep(0.1)
                await first.aread()  # the pool hands the connection to H, which has not run
            checked = asyncio.ensure_future(check())
            await get("D", "/delay/0.3")
            await held
            await checked
            _check_handed(metrics, server, pool, done, midway)

    asyncio.run(main())


@pytest.mark.parametrize("scheme", ["http", "ws"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_websocket_is_no_leak_and_closes_as_upgraded(metrics, mode, scheme):
    """httpx-ws takes a connection out of HTTP (``101 Switching Protocols``) for a WebSocket:
    active while held (0.3 s), but not in ``oldest_active_age``; it closes with the WebSocket
    as ``upgraded``, not ``error``, as the server saw: an ``http://`` URL upgrades the idle
    connection and the next request opens a new one; a ``ws://`` URL, another origin to
    httpcore, opens its own, the next request reuses the first, and its origin's scheme is
    ``http`` all the same."""
    httpx_ws = pytest.importorskip("httpx_ws")
    from wsserver import WebSocketServer

    lib = {"poolscope__library": "httpx"}

    def held():
        time.sleep(0.3)
        data = metrics.read()
        return (metrics.value(data, "http.client.open_connections",
                              http__connection__state="active", **lib),
                metrics.value(data, "poolscope.connection.oldest_active_age", **lib))

    async def held_async(url, ws_url):
        async with httpx.AsyncClient() as client:
            assert (await client.get(url + "/")).status_code == 200
            async with httpx_ws.aconnect_ws(ws_url + "/ws", client) as ws:
                await ws.send_text("hi")
                assert await ws.receive_text() == "hi"
                during = held()
            assert (await client.get(url + "/")).status_code == 200
        return during

    with WebSocketServer() as server:
        ws_url = server.url.replace("http", scheme, 1)
        if mode == "async":
            during = asyncio.run(held_async(server.url, ws_url))
        else:
            with httpx.Client() as client:
                assert client.get(server.url + "/").status_code == 200
                with httpx_ws.connect_ws(ws_url + "/ws", client) as ws:
                    ws.send_text("hi")
                    assert ws.receive_text() == "hi"
                    during = held()
                assert client.get(server.url + "/").status_code == 200
        data = metrics.read()
        assert during == (1, 0)
        assert len(server.peers) == 2
        assert metrics.value(data, "poolscope.connection.created", **lib) == len(server.peers)
        assert metrics.value(data, "poolscope.connection.acquisitions",
                             poolscope__connection__reused=True, **lib) == 1
        assert {a["url.scheme"] for a, _ in data["poolscope.connection.created"]} == {"http"}
        assert metrics.value(data, "poolscope.connection.closed",
                             poolscope__close__reason="upgraded", **lib) == 1
        assert metrics.value(data, "poolscope.connection.closed",
                             poolscope__close__reason="error", **lib) in (None, 0)

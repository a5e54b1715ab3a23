"""aiohttp specifics: keep-alive expiry both ways, limit_per_host, force_close, cancellation."""

import asyncio
import time
from unittest import mock

import aiohttp
import pytest

from conftest import reached
from poolscope import _config
from poolscope.adapters import aiohttp as aiohttp_adapter

LIB = {"poolscope__library": "aiohttp"}


def run(scenario, **connector):
    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector)) as session:
            return await scenario(session)
    return asyncio.run(main())


async def fetch(session, url):
    async with session.get(url) as response:
        await response.read()
        return response.status


def test_keepalive_expiry_found_on_reuse_and_by_cleanup(metrics, server):
    async def scenario(session):
        await fetch(session, server.url + "/")
        time.sleep(0.4)  # block the loop: the next request's _get finds it expired first
        await fetch(session, server.url + "/")
        await asyncio.sleep(0.6)  # now the connector's periodic clean-up expires the second
        return metrics.read()

    data = run(scenario, keepalive_timeout=0.3)
    v = lambda name, **a: metrics.value(data, name, **LIB, **a)  # noqa: E731
    assert v("poolscope.connection.closed", poolscope__close__reason="keepalive_expired") == 2
    assert v("poolscope.connection.closed") == 2
    assert v("poolscope.connection.created") == 2
    assert v("http.client.open_connections") == 0
    assert server.accepted == 2


def test_limit_per_host_is_a_pool_per_origin(metrics, server):
    """limit_per_host=1, no total limit: three 0.3 s requests at once queue behind each other."""
    async def scenario(session):
        statuses = await asyncio.gather(*(fetch(session, server.url + "/delay/0.3")
                                          for _ in range(3)))
        return statuses, metrics.read()

    start = time.monotonic()
    statuses, data = run(scenario, limit=0, limit_per_host=1)
    elapsed = time.monotonic() - start
    assert statuses == [200] * 3
    count, total = metrics.histogram(data, "poolscope.connection.wait_time", **LIB)
    assert count == 2 and 0.85 <= total <= sum(reached(server, start, 1))  # 0.3 + 0.6
    origin = dict(LIB, server__address="127.0.0.1", server__port=server.port)
    assert metrics.value(data, "poolscope.connection.max", **origin) == 1
    assert metrics.value(data, "poolscope.connection.max", **LIB) == 1  # no total limit
    assert 0.8 <= metrics.value(data, "poolscope.pool.saturation_time", **origin) <= elapsed
    assert metrics.value(data, "poolscope.connection.created", **LIB) == 1
    assert metrics.value(data, "poolscope.pool.count", **LIB) == 2  # the connector and its host


def test_force_close_keeps_no_idle_connection(metrics, server):
    async def scenario(session):
        for _ in range(3):
            await fetch(session, server.url + "/")
        return metrics.read()

    data = run(scenario, force_close=True)
    v = lambda name, **a: metrics.value(data, name, **LIB, **a)  # noqa: E731
    assert v("poolscope.connection.created") == 3
    assert v("poolscope.connection.closed", poolscope__close__reason="idle_limit") == 3
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 0
    assert v("poolscope.connection.idle.max") == 0
    assert v("http.client.open_connections") == 0


@pytest.mark.parametrize("cancel_after", [0.1, 0.4], ids=["waiting", "holding"])
def test_cancelled_request_leaves_no_count(metrics, server, cancel_after):
    """limit=1: A holds the connection for 0.3 s; B queues behind it and is cancelled either
    while it waits (0.1 s) or while it holds the connection for its own 0.3 s (0.4 s)."""
    async def scenario(session):
        a = asyncio.create_task(fetch(session, server.url + "/delay/0.3"))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(fetch(session, server.url + "/delay/0.3"))
        await asyncio.sleep(cancel_after)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert await a == 200
        await asyncio.sleep(0.05)
        return metrics.read()

    data = run(scenario, limit=1)
    v = lambda name, **a: metrics.value(data, name, **LIB, **a)  # noqa: E731
    assert v("poolscope.connection.pending_requests") == 0
    assert v("http.client.open_connections", http__connection__state="active") == 0
    assert v("poolscope.connection.timeouts") == 0
    waited, _ = metrics.histogram(data, "poolscope.connection.wait_time", **LIB)
    if cancel_after == 0.1:  # an abandoned wait is no wait_time and no timeout
        assert waited == 0
        assert v("poolscope.connection.acquisitions") == 1
        assert v("http.client.open_connections", http__connection__state="idle") == 1
    else:  # B got A's connection after 0.3 s, and its cancellation broke it
        assert waited == 1
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 1
        assert v("poolscope.connection.closed", poolscope__close__reason="error") == 1
        assert v("http.client.open_connections") == 0


def test_hooks_assume_no_more_of_their_arguments_than_aiohttp(metrics):
    """Under POOLSCOPE_STRICT (as every test here), poolscope's own failure would raise: calls
    aiohttp's own tests make with stand-ins reach aiohttp, which answers as it would."""
    from aiohttp.client import ClientTimeout

    async def main():
        connector = aiohttp.BaseConnector(limit=1)
        with pytest.raises(NotImplementedError):  # the abstract set-up, given no request
            await connector._create_connection(object(), [], object())

        class Request:  # a key that is not a ConnectionKey
            connection_key = "key"

        connector._acquired.add(object())  # the one slot taken: connect() waits
        waiting = asyncio.ensure_future(connector.connect(Request(), None, ClientTimeout()))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        connector._acquired.clear()
        await connector.close()

    asyncio.run(main())
    data = metrics.read()
    assert not metrics.value(data, "poolscope.connection.pending_requests")
    assert not metrics.value(data, "poolscope.connection.timeouts")
    assert metrics.value(data, "poolscope.connection.max") == 0  # the connector closed


def test_a_mock_protocol_released_is_no_connection_of_poolscope(metrics, monkeypatch):
    """aiohttp's own tests release ``Mock`` protocols through the connector's acquired set; a
    mock's ``_poolscope`` is a mock too, which poolscope must leave alone (strict: its own
    failures raise)."""
    monkeypatch.setattr(_config, "strict", True)
    acquired = aiohttp_adapter._AcquiredSet()
    proto = mock.Mock()
    acquired.add(proto)
    acquired.discard(proto)
    assert not acquired


@pytest.mark.parametrize("closer", ["client", "server"])
def test_a_websocket_holds_its_pool_slot_but_is_no_leak(metrics, closer):
    """A WebSocket (``ws_connect``) takes its connection out of HTTP and holds it, as aiohttp's
    limit counts it, until it closes: a request sent meanwhile through a pool of 1 waits for
    it. It is active, but neither ``oldest_active_age`` nor the report takes it for a leak,
    and its close, by either side, is ``upgraded``; the next request opens a new connection."""
    from poolscope import report
    from poolscope._instrument import current_recorder
    from wsserver import WebSocketServer

    held = 0.4

    async def main(url):
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            assert await fetch(session, url + "/") == 200
            ws = await session.ws_connect(url + "/ws")
            await ws.send_str("hi")
            assert (await ws.receive_str()) == "hi"
            started = time.monotonic()
            waiting = asyncio.ensure_future(fetch(session, url + "/"))
            await asyncio.sleep(held)
            data = metrics.read()
            text = report.render(metrics.reader.get_metrics_data(), current_recorder().scopes(),
                                 leak_after=held / 2)
            assert len(connector._acquired) == 1 and not waiting.done()
            assert metrics.value(data, "http.client.open_connections",
                                 http__connection__state="active", **LIB) == 1
            assert metrics.value(data, "poolscope.connection.pending_requests", **LIB) == 1
            assert metrics.value(data, "poolscope.connection.oldest_active_age", **LIB) == 0
            assert "has been held" not in text, text
            if closer == "client":
                await ws.close()
            else:
                await ws.send_str("bye")
                assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
            assert await waiting == 200 and time.monotonic() - started >= held
    with WebSocketServer() as server:
        asyncio.run(main(server.url))
    data = metrics.read()
    assert len(server.peers) == 2
    assert metrics.value(data, "poolscope.connection.created", **LIB) == len(server.peers)
    assert metrics.value(data, "poolscope.connection.closed", poolscope__close__reason="upgraded",
                         **LIB) == 1
    assert metrics.value(data, "poolscope.connection.closed", poolscope__close__reason="error",
                         **LIB) in (None, 0)
    assert metrics.value(data, "poolscope.connection.waits", poolscope__wait__outcome="granted",
                         **LIB) == 1

"""httpx-only behaviour: keep-alive expiry, the idle limit, limits, proxy pools."""

import inspect
import time

import httpx
import pytest

from drivers import AsyncHttpxDriver, HttpxDriver


@pytest.fixture(params=[HttpxDriver, AsyncHttpxDriver], ids=["sync", "async"])
def driver(request):
    made = []

    def make(*args, **kwargs):
        made.append(request.param(*args, **kwargs))
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


def test_unlimited_pool_reports_no_max_and_never_saturates(metrics, server):
    client = httpx.Client(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
    assert client.get(server.url + "/").status_code == 200
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.max") is None
    assert metrics.value(data, "poolscope.pool.count") == 1
    assert metrics.value(data, "poolscope.pool.saturation_time") is None
    client.close()


def test_forward_proxy_pool(metrics, server):
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
    assert server.accepted == 1
    client.close()


def test_pool_closing_a_connection_under_a_request_is_an_error(metrics, server):
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

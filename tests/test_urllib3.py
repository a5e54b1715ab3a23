"""urllib3-only behaviour: pool_full discards, PoolManager eviction, requests, block=False."""

import logging
import socket
import threading
import time

import pytest
import requests
import urllib3

from conftest import reached
from drivers import Urllib3Driver
from poolscope import report
from poolscope._instrument import current_recorder
from unixserver import UnixSocketServer
from poolscope.demo.server import DemoServer


def v(metrics, name, **attrs):
    return metrics.value(metrics.read(), name, poolscope__library="urllib3", **attrs)


def test_pool_full_discards_connections(metrics, server, caplog):
    """block=False, maxsize 1, 3 at once: 3 connections, 2 discarded as the pool is full."""
    d = Urllib3Driver(server, limit=1, block=False)
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        assert d.get_all(["/delay/0.2"] * 3) == [200] * 3
    assert sum("Connection pool is full" in r.getMessage() for r in caplog.records) == 2
    data = metrics.read()
    val = lambda name, **a: metrics.value(data, name, poolscope__library="urllib3", **a)  # noqa: E731
    assert val("poolscope.connection.created") == 3
    assert val("poolscope.connection.closed", poolscope__close__reason="pool_full") == 2
    assert val("poolscope.connection.closed") == 2
    assert val("http.client.open_connections", http__connection__state="idle") == 1
    assert val("http.client.open_connections", http__connection__state="active") == 0
    assert metrics.histogram(data, "poolscope.connection.wait_time")[0] == 0
    assert val("poolscope.connection.max") == 1
    assert val("poolscope.pool.saturation_time") > 0.15
    d.close()


def test_a_discarded_connection_ends_its_request_hold(detailed, server, caplog):
    """block=False, maxsize 1, 3 at once: the two connections the full pool discards close as
    their requests give them back, and those requests' holds end there: 3 holds of at least
    the server's 0.2 s."""
    d = Urllib3Driver(server, limit=1, block=False)
    with caplog.at_level(logging.ERROR, logger="urllib3.connectionpool"):
        assert d.get_all(["/delay/0.2"] * 3) == [200] * 3
    data = detailed.read()
    count, total = detailed.histogram(data, "poolscope.connection.use_time")
    assert count == 3 and total >= 0.6
    closed = detailed.value(data, "poolscope.connection.closed", poolscope__close__reason="pool_full")
    assert closed == 2
    d.close()


def test_pool_manager_eviction(metrics):
    """num_pools=1: a request to a second origin evicts the first origin's pool."""
    with DemoServer() as a, DemoServer() as b:
        manager = urllib3.PoolManager(num_pools=1, retries=False)
        assert manager.request("GET", a.url + "/").status == 200
        assert manager.request("GET", b.url + "/").status == 200
        data = metrics.read()
        for srv, closed, pools in ((a, 1, 0), (b, None, 1)):
            val = lambda name, **x: metrics.value(data, name, server__port=srv.port, **x)  # noqa: E731
            assert val("poolscope.connection.closed", poolscope__close__reason="evicted") == closed
            assert val("poolscope.pool.count") == pools
            assert val("poolscope.connection.created") == 1
        manager.clear()


def test_requests_session_with_blocking_pool(metrics, server):
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=2,
                                                           pool_block=True))
    results = []

    def get():
        results.append(session.get(server.url + "/delay/0.3").status_code)

    threads = [threading.Thread(target=get) for _ in range(6)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    data = metrics.read()
    count, total = metrics.histogram(data, "poolscope.connection.wait_time")
    assert count == 4 and 1.75 <= total <= sum(reached(server, start, 2))
    assert metrics.value(data, "poolscope.connection.created") == 2
    assert metrics.value(data, "http.client.open_connections", http__connection__state="idle") == 2
    session.close()
    assert v(metrics, "poolscope.connection.closed", poolscope__close__reason="pool_closed") == 2


@pytest.mark.parametrize("retries", [3, 0], ids=["urllib3-retries", "requests-default"])
def test_a_stale_failure_is_told_retried_or_not(metrics, retries):
    """A server that resets a request on a connection idle 0.2 s: with urllib3's retries the
    request goes again on a new connection; requests' default (no read retries) shows the
    error. One stale failure either way, retried as the application saw."""
    with DemoServer(stale_after=0.2) as server, requests.Session() as session:
        session.mount("http://", requests.adapters.HTTPAdapter(
            max_retries=urllib3.Retry(retries) if retries else 0))
        assert session.get(server.url).status_code == 200
        time.sleep(0.3)
        try:
            seen = session.get(server.url).status_code
        except requests.ConnectionError:
            seen = "error"
        data = metrics.read()
        stale = {a["poolscope.request.retried"]: p.value
                 for a, p in data["poolscope.connection.stale_failures"]
                 if a["server.port"] == server.port}
        assert (seen, stale, server.reset) == ((200, {True: 1}, 1) if retries else
                                               ("error", {False: 1}, 1))


def test_unread_streamed_response_is_an_error_close(metrics, server):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, retries=False)
    response = pool.request("GET", "/delay/0", preload_content=False)
    assert v(metrics, "http.client.open_connections", http__connection__state="active") == 1
    assert v(metrics, "poolscope.connection.oldest_active_age") > 0
    response.close()
    response.release_conn()
    assert v(metrics, "poolscope.connection.closed", poolscope__close__reason="error") == 1
    assert v(metrics, "http.client.open_connections") == 0
    pool.close()


def test_a_response_given_back_unread_is_an_error_close_not_a_server_close(metrics, server):
    """``release_conn()`` before a 1 MB body's end puts the connection back with the rest
    unread; urllib3 takes the readable socket for a dropped one as it hands it out next, and
    opens another. The server (no keep-alive limit, no ``Connection: close``) closed nothing:
    the close is the abandoned response's (``error``), as when the response is closed."""
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=1, retries=False)
    response = pool.request("GET", "/bytes/1000000", preload_content=False)
    assert len(response.read(1024)) == 1024
    response.release_conn()
    assert pool.request("GET", "/").status == 200
    assert (server.accepted, server.answered) == (2, 2)
    assert v(metrics, "poolscope.connection.created") == 2
    assert v(metrics, "poolscope.connection.closed", poolscope__close__reason="error") == 1
    assert v(metrics, "poolscope.connection.closed", poolscope__close__reason="server_closed") \
        in (None, 0)
    acquired = v(metrics, "poolscope.connection.acquisitions")
    text = report.render(metrics.reader.get_metrics_data(), current_recorder().scopes())
    assert "1 connections were closed because a request on them failed or its response was " \
        "closed before its end" in text, text
    assert "closed by the server" not in text, text
    pool.close()
    assert server.wait_closed(2) == [1, 1] and acquired == 2


def test_a_queue_class_patched_late_still_reaches_new_pools(metrics, server, monkeypatch):
    """urllib3 2.8 looks ``queue.LifoQueue`` up as each pool is made (for gevent and others
    patching late); the pool gets that class, and its waits are still seen."""
    import queue

    class LateQueue(queue.LifoQueue):
        pass

    monkeypatch.setattr(queue, "LifoQueue", LateQueue)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=1, block=True)
    if getattr(urllib3.connectionpool, "_DEFAULT_QUEUE_CLASS", None) is not None:
        assert isinstance(pool.pool, LateQueue)
    threads = [threading.Thread(target=pool.request, args=("GET", "/delay/0.2"))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    data = metrics.read()
    assert metrics.histogram(data, "poolscope.connection.wait_time")[0] == 2
    assert metrics.value(data, "poolscope.connection.created") == 1 == server.accepted
    pool.close()


@pytest.mark.parametrize("queue_class", ["stdlib", "compiled"])
def test_a_collected_pool_still_has_urllib3_drain_its_queue(metrics, server, monkeypatch,
                                                             queue_class):
    """urllib3 closes a garbage-collected pool's connections by draining its queue; the queue
    poolscope observes is the one drained (a compiled queue class, gevent's, cannot take an
    observed subclass in place and is replaced)."""
    import gc

    if queue_class == "compiled":
        if getattr(urllib3.connectionpool, "_DEFAULT_QUEUE_CLASS", None) is None:
            pytest.skip("urllib3 before 2.8 takes its queue class at import")
        import queue

        gevent = pytest.importorskip("gevent.queue", reason="gevent is in the main run's pins")
        monkeypatch.setattr(queue, "LifoQueue", gevent.LifoQueue)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=2)
    assert pool.request("GET", "/").status == 200
    held = pool.pool
    assert held.qsize() == 2
    del pool
    gc.collect()
    # urllib3 2.x drains it (1.26 leaves a collected pool's queue as it was)
    drains = hasattr(urllib3.connectionpool, "_close_pool_connections")
    assert held.qsize() == (0 if drains else 2)
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.closed",
                         poolscope__close__reason="pool_closed") == 1


def test_a_connection_used_without_a_pool_leaves_the_callers_locals_alone(metrics, server):
    """A connection opened outside any pool is looked up among the pool methods that may be
    opening it, without reading the caller's frame: its locals are freed when it drops them
    (before Python 3.13, reading a frame's locals keeps them alive until it returns)."""
    import gc
    import weakref

    class Held:
        pass

    conn = urllib3.connection.HTTPConnection("127.0.0.1", server.port)
    held = Held()
    gone = weakref.ref(held)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    gc.disable()
    try:
        del held
        assert gone() is None
    finally:
        gc.enable()
    conn.close()
    assert server.accepted == 1
    assert v(metrics, "poolscope.connection.created") in (None, 0)  # no pool: not observed


def test_the_docker_sdk_over_a_unix_socket(traced, tmp_path):
    """The real docker SDK (``APIClient``) against a Unix socket server: its urllib3 pool makes
    its own connection class, whose ``connect`` opens the Unix socket itself (as
    requests-unixsocket's does) and was defined before poolscope was on. Three pings: one
    connection, the one the server accepted, acquired three times, the server's answers."""
    docker = pytest.importorskip("docker")
    with UnixSocketServer(tmp_path / "docker.sock") as daemon:
        client = docker.APIClient(base_url="unix://" + daemon.path, version="1.41")
        with traced.tracer_provider.get_tracer("app").start_as_current_span("app"):
            for _ in range(3):
                client.ping()
        client.close()
    assert (daemon.accepted, daemon.answered) == (1, 3)
    data = traced.read()
    assert traced.served(data) == (1, 1, 2)
    assert traced.histogram(data, "poolscope.connection.create_time")[0] == 1
    assert len(traced.finished("HTTP connection_setup")) == 1


def test_a_connection_subclass_made_later_with_a_connect_of_its_own(traced, server):
    """A connection subclass defined after poolscope is on, whose ``connect`` calls urllib3's
    and then tunes the socket: its connections are observed once each (one set-up, one set-up
    span), as the server accepted them."""
    class Tuned(urllib3.connection.HTTPConnection):
        def connect(self):
            super().connect()
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    class TunedPool(urllib3.HTTPConnectionPool):
        ConnectionCls = Tuned

    with TunedPool("127.0.0.1", server.port, maxsize=2) as pool:
        with traced.tracer_provider.get_tracer("app").start_as_current_span("app"):
            statuses = [pool.request("GET", "/").status for _ in range(3)]
            statuses += [pool.request("GET", path).status for path in ("/close", "/")]
    assert statuses == [200] * 5 and server.accepted == 2
    data = traced.read()
    assert traced.value(data, "poolscope.connection.created") == 2
    assert traced.value(data, "poolscope.connection.acquisitions") == 5
    assert traced.histogram(data, "poolscope.connection.create_time")[0] == 2
    assert len(traced.finished("HTTP connection_setup")) == 2

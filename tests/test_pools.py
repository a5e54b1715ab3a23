"""Scenarios with known answers, run on every client flavor against a real local server."""

import collections
import socket
import time
import types

import pytest

from conftest import buckets, reached
from drivers import DRIVERS
from poolscope.demo.server import DemoServer

OPEN = "http.client.open_connections"
WAIT = "poolscope.connection.wait_time"
ACQ = "poolscope.connection.acquisitions"
WAITS = "poolscope.connection.waits"


@pytest.fixture(params=sorted(DRIVERS))
def make(request, server):
    drivers = []

    def factory(srv=server, **kw):
        d = DRIVERS[request.param](srv, **kw)
        drivers.append(d)
        return d
    yield factory
    for d in drivers:
        d.close()


def figures(metrics, lib):
    data = metrics.read()

    def v(name, **attrs):
        return metrics.value(data, name, poolscope__library=lib, **attrs)
    return data, v


def outcomes(data, library):
    """{outcome: count} of the ended waits, none left out."""
    return {a["poolscope.wait.outcome"]: p.value for a, p in data.get(WAITS, [])
            if a["poolscope.library"] == library and p.value}


def test_saturation_six_requests_limit_two(metrics, make, server):
    """6 at once, limit 2, 300 ms server: waves at 0, 0.3, 0.6 s; 4 waits of at least 0.3,
    0.3, 0.6, 0.6. Each wait ends before its request reaches the server, so the server's clock
    bounds it from above (a loaded machine stretches the waves)."""
    d = make(limit=2)
    start = time.monotonic()
    assert d.get_all(["/delay/0.3"] * 6) == [200] * 6
    elapsed = time.monotonic() - start
    arrived = reached(server, start, 2)
    data, v = figures(metrics, d.library)
    count, total = metrics.histogram(data, WAIT, poolscope__library=d.library)
    assert count == 4
    assert 1.75 <= total <= sum(arrived)
    [(_, point)] = [(a, p) for a, p in data[WAIT] if a["poolscope.library"] == d.library]
    assert set(buckets(point)) <= {0.5, 1.0, 2.5}
    under_half = buckets(point).get(0.5, 0)
    assert sum(a <= 0.5 for a in arrived) <= under_half <= 2  # the last wave waited 0.6 s
    assert sum(a <= 1.0 for a in arrived) <= under_half + buckets(point).get(1.0, 0)
    assert v("poolscope.connection.created") == 2
    assert server.accepted == 2
    assert v(ACQ, poolscope__connection__reused=False) == 2
    assert v(ACQ, poolscope__connection__reused=True) == 4
    assert v(OPEN, http__connection__state="idle") == 2
    assert v(OPEN, http__connection__state="active") == 0
    assert v("poolscope.connection.pending_requests") == 0
    assert v("poolscope.connection.timeouts") == 0
    assert outcomes(data, d.library) == {"granted": 4}
    assert v("poolscope.connection.max") == 2
    assert v("poolscope.pool.count") == 1
    assert 0.85 <= v("poolscope.pool.saturation_time") <= elapsed
    assert v("poolscope.connection.oldest_pending_age") == 0
    assert v("poolscope.connection.oldest_active_age") == 0


def test_sequential_requests_reuse_one_connection(metrics, make):
    d = make()
    for _ in range(3):
        assert d.get("/") == 200
    data, v = figures(metrics, d.library)
    assert v("poolscope.connection.created") == 1
    assert metrics.histogram(data, "poolscope.connection.create_time",
                             poolscope__library=d.library)[0] == 1
    assert v(ACQ, poolscope__connection__reused=False) == 1
    assert v(ACQ, poolscope__connection__reused=True) == 2
    assert metrics.histogram(data, WAIT, poolscope__library=d.library) == (0, 0)
    # the server speaks HTTP/1.1, and the version is known once the connection has answered
    assert v(OPEN, http__connection__state="idle") == 1
    assert v(OPEN, http__connection__state="idle", network__protocol__version="1.1") == 1
    assert v("poolscope.pool.saturation_time") in (None, 0)


def test_pool_timeout(metrics, make):
    """Limit 1 held for 0.6 s; a second request with a 0.2 s pool timeout gives up."""
    d = make(limit=1, pool_timeout=0.2)
    held = d.submit("/delay/0.6")
    time.sleep(0.15)
    with pytest.raises(Exception) as info:
        d.get("/")
    assert type(info.value).__name__ in ("PoolTimeout", "EmptyPoolError", "ConnectionTimeoutError", "error")
    assert held.result(5) == 200
    data, v = figures(metrics, d.library)
    assert v("poolscope.connection.timeouts") == 1
    assert outcomes(data, d.library) == {"timed_out": 1}
    assert metrics.histogram(data, WAIT, poolscope__library=d.library)[0] == 0
    assert v("poolscope.connection.pending_requests") == 0
    assert v(OPEN, http__connection__state="active") == 0
    assert v(OPEN, http__connection__state="idle") == 1


def test_a_cancelled_wait_is_counted_as_cancelled(metrics, make, server):
    """Limit 1 held for 0.5 s; B and C queue behind it, B is cancelled at 0.2 s: one wait
    cancelled, one granted (C's), no timeout. The application saw B cancelled and the server
    never saw it."""
    d = make(limit=1)
    if not d.can_cancel:
        pytest.skip("a blocking request cannot be cancelled while it waits")
    held = d.submit("/delay/0.5")
    time.sleep(0.1)
    cancelled, granted = d.submit("/"), d.submit("/")
    time.sleep(0.1)
    assert cancelled.cancel()
    assert (held.result(5), granted.result(5)) == (200, 200)
    data, v = figures(metrics, d.library)
    assert outcomes(data, d.library) == {"cancelled": 1, "granted": 1}
    assert metrics.histogram(data, WAIT, poolscope__library=d.library)[0] == 1
    assert v("poolscope.connection.timeouts") == 0
    assert v("poolscope.connection.pending_requests") == 0
    assert server.answered == 2


def test_requests_per_connection_are_recorded_at_its_close(metrics, make, server):
    """Three requests then one answered ``Connection: close`` on one connection; two more on a
    second, closed with the client: 4 and 2, as the server counted them."""
    d = make()
    for path in ["/", "/", "/", "/close", "/", "/"]:
        assert d.get(path) == 200
    d.close()
    server.wait_closed(2)
    assert sorted(server.per_connection) == [2, 4]
    data = metrics.read()
    [point] = [p for a, p in data["poolscope.connection.requests"]
               if a["poolscope.library"] == d.library]
    assert (point.count, point.sum) == (2, 6)
    assert buckets(point) == {2: 1, 5: 1}
    assert metrics.histogram(data, "http.client.connection.duration", poolscope__library=d.library,
                             network__protocol__version="1.1")[0] == 2


def test_responses_without_a_body_or_in_chunks_give_their_connection_back(metrics, make, server):
    """204 and 304 answers end with their headers, a chunked one with its last chunk: each gives
    its connection back as it ends. 12 at once on a limit of 2: every request an acquisition,
    every connection the server accepted a new one, none left active, and each connection's
    requests as the server answered them."""
    d = make(limit=2)
    paths = ["/status/204", "/status/304", "/chunked/5000", "/delay/0.05"] * 3
    assert d.get_all(paths) == [204, 304, 200, 200] * 3
    data, v = figures(metrics, d.library)
    assert v(ACQ) == server.received == 12
    assert v(ACQ, poolscope__connection__reused=False) == server.accepted
    assert v("poolscope.connection.created") == server.accepted
    assert v(OPEN, http__connection__state="active") == 0
    assert v(OPEN, http__connection__state="idle") == server.accepted
    d.close()
    assert sum(server.wait_closed(server.accepted)) == 12
    data = metrics.read()
    [point] = [p for a, p in data["poolscope.connection.requests"]
               if a["poolscope.library"] == d.library]
    assert (point.count, point.sum) == (server.accepted, 12)
    bounds = list(point.explicit_bounds) + [float("inf")]
    assert buckets(point) == collections.Counter(
        next(b for b in bounds if n <= b) for n in server.per_connection)


def test_detailed_timings_one_use_time_a_request_one_idle_time_a_reuse(detailed, make, server):
    """With detailed timings, 16 requests at once on a limit of 2, some answered
    ``Connection: close``: each request's hold of its connection is one ``use_time``, ended as it
    gives the connection back, open or closed, and each reuse one ``idle_time``, however the
    library hands connections out (httpcore hands an idle one to every queued request). Holds never
    overlap beyond the limit, and each lasts at least the server's delay."""
    d = make(limit=2)
    paths = ["/delay/0.05", "/close", "/status/204", "/delay/0.05"] * 4
    start = time.monotonic()
    assert d.get_all(paths) == [200, 200, 204, 200] * 4
    elapsed = time.monotonic() - start
    data, v = figures(detailed, d.library)
    assert v(ACQ) == server.received == 16
    used, held = detailed.histogram(data, "poolscope.connection.use_time",
                                    poolscope__library=d.library)
    assert used == 16
    assert 8 * 0.05 <= held <= 2 * elapsed
    idle, _ = detailed.histogram(data, "poolscope.connection.idle_time",
                                 poolscope__library=d.library)
    assert idle == v(ACQ, poolscope__connection__reused=True) == 16 - server.accepted


# whether each library sends a request again after its reused connection failed stale: the test
# drivers' urllib3 and urllib3-future pools (and niquests') have retries off; aiohttp retries
# an idempotent request once
RETRIES_STALE = {"urllib3": False, "httpx": False, "httpx2": False, "aiohttp": True,
                 "urllib3-future": False}


def test_a_request_on_a_connection_the_server_dropped_is_a_stale_failure(metrics, make):
    """The server resets the next request on a connection idle 0.2 s, unanswered. A request
    after 0.3 s fails on its reused connection; the library sends it again on a new one, or
    the application sees the error."""
    with DemoServer(stale_after=0.2) as server:
        d = make(server)
        if d.library not in RETRIES_STALE:
            pytest.skip(f"{d.library}: stale failures are not observed")
        retried = RETRIES_STALE[d.library]
        assert d.get("/") == 200
        time.sleep(0.3)
        [outcome] = d.get_all(["/"])
        data, v = figures(metrics, d.library)
        assert server.reset == 1
        assert (outcome == 200) is retried, outcome
        stale = {a["poolscope.request.retried"]: p.value
                 for a, p in data.get("poolscope.connection.stale_failures", [])
                 if a["poolscope.library"] == d.library and p.value}
        assert stale == {retried: 1}
        assert v("poolscope.connection.created") == server.accepted == (2 if retried else 1)


def test_connection_close_response(metrics, make):
    d = make()
    assert d.get("/close") == 200
    _, v = figures(metrics, d.library)
    assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") == 1
    assert v("poolscope.connection.closed") == 1
    assert v("poolscope.connection.created") == 1
    assert v(OPEN) == 0


def test_failed_request_closes_with_error(metrics, make, server):
    """The server drops the socket unanswered; aiohttp retries an idempotent request once."""
    d = make()
    with pytest.raises(Exception):
        d.get("/drop")
    attempts = 2 if d.library == "aiohttp" else 1
    assert server.accepted == attempts
    _, v = figures(metrics, d.library)
    assert v("poolscope.connection.closed", poolscope__close__reason="error") == attempts
    assert v("poolscope.connection.closed") == attempts
    assert v("poolscope.connection.created") == attempts
    assert v(ACQ) == attempts
    assert v(OPEN) == 0


def test_refused_connection_is_never_counted_open(metrics, make):
    """Nothing listens on the port: a slot was taken, no connection was ever open, and no
    request had one (no acquisition, as in ``created``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    d = make(types.SimpleNamespace(port=port, url=f"http://127.0.0.1:{port}"))
    for _ in range(2):
        with pytest.raises(Exception):
            d.get("/")
    _, v = figures(metrics, d.library)
    assert v("poolscope.connection.created") in (0, None)
    assert v(ACQ) in (0, None)
    assert v("poolscope.connection.closed") in (0, None)
    assert v(OPEN, http__connection__state="active") in (0, None)
    assert v(OPEN, http__connection__state="idle") in (0, None)


def test_server_drops_idle_connection(metrics, make, short_keepalive_server):
    """The server closes idle keep-alive connections after 0.3 s; the next request finds it."""
    d = make(short_keepalive_server)
    assert d.get("/") == 200
    time.sleep(0.6)
    assert d.get("/") == 200
    _, v = figures(metrics, d.library)
    assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") == 1
    assert v("poolscope.connection.closed") == 1
    assert v("poolscope.connection.created") == 2
    assert v(ACQ, poolscope__connection__reused=False) == 2
    assert v(OPEN, http__connection__state="idle") == 1


def test_closing_the_pool(metrics, make):
    d = make()
    assert d.get_all(["/delay/0.1"] * 2) == [200, 200]
    d.close()
    _, v = figures(metrics, d.library)
    assert v("poolscope.connection.closed", poolscope__close__reason="pool_closed") == 2
    assert v("poolscope.connection.closed") == 2
    assert v(OPEN) == 0
    assert v("poolscope.pool.count") == 0
    assert v("poolscope.connection.max") == 0


def test_oldest_active_and_pending_ages(metrics, make):
    """Limit 1: A holds the connection for 1 s; B queues 0.1 s later. At 0.6 s A has held it
    at least since its request reached the server and at most since it was submitted, and B
    has waited about 0.5 s, no longer than since it was submitted (measured: a loaded machine
    may take a while to collect); once both are done, both ages read 0."""
    d = make(limit=1)
    submitted = time.monotonic()
    held = d.submit("/delay/1.0")
    time.sleep(0.1)
    queued_from = time.monotonic()
    queued = d.submit("/")
    time.sleep(0.5)
    collected_from = time.monotonic()
    _, v = figures(metrics, d.library)
    read_by = time.monotonic()
    age = v("poolscope.connection.oldest_active_age")
    assert collected_from - d.server.arrivals[0] <= age <= read_by - submitted
    assert 0.4 <= v("poolscope.connection.oldest_pending_age") <= read_by - queued_from
    assert v("poolscope.connection.pending_requests") == 1
    assert held.result(5) == 200 and queued.result(5) == 200
    _, v = figures(metrics, d.library)
    assert v("poolscope.connection.oldest_active_age") == 0
    assert v("poolscope.connection.oldest_pending_age") == 0

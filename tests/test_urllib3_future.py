"""urllib3-future and niquests on it, as installed with niquests: urllib3-future's files in
place of urllib3's (``import urllib3`` gives it; urllib3's metadata may stay installed), its
own ``urllib3_future`` beside. The version matrix's ``urllib3-future`` session runs these
tests, and the shared scenarios on the ``urllib3-future`` and ``niquests`` flavors; where
``import urllib3`` gives urllib3 they are skipped.
"""

import functools
import logging
import threading
import time

import pytest

import poolscope
from conftest import Metrics, reached
from drivers import URLLIB3_FUTURE, _in_threads
from poolscope.demo.server import DemoServer
from test_launcher import six_requests_limit_two

pytestmark = pytest.mark.skipif(not URLLIB3_FUTURE, reason="`import urllib3` gives urllib3 here "
                                "(the version matrix's urllib3-future session runs these tests)")



def test_six_requests_limit_two_in_the_report_and_on_the_prometheus_endpoint(server):
    """Issue 21's scenario, with no code change: a niquests Session limited to 2 connections
    (blocking), 6 requests at once to a 300 ms endpoint. 4 wait: 2 for one service time, 2 for
    two, so at least 1.8 s in all; 2 connections created, the ones the server accepted."""
    report = six_requests_limit_two("niquests_session.py", "urllib3-future")
    assert "raise HTTPAdapter(pool_maxsize=...)" in report


def test_six_requests_limit_two_against_the_applications_own_figures(metrics, server):
    """The same scenario in process: each wait is no longer than what its request took beyond
    the 300 ms the server spent on it, and the pool's own books agree at the end."""
    import niquests

    session = niquests.Session()
    session.mount("http://", niquests.adapters.HTTPAdapter(pool_maxsize=2, pool_block=True))
    took = []

    def get():
        start = time.monotonic()
        assert session.get(server.url + "/delay/0.3").status_code == 200
        took.append(time.monotonic() - start)
    threads = [threading.Thread(target=get) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = metrics.read()
    count, total = metrics.histogram(data, "poolscope.connection.wait_time")
    assert count == 4
    assert 1.8 <= total <= sum(sorted(took)[2:]) - 4 * 0.3
    assert metrics.value(data, "poolscope.connection.created") == server.accepted == 2
    assert metrics.value(data, "poolscope.connection.acquisitions") == server.answered == 6
    [pool] = session.adapters["http://"].poolmanager.pools._registry.values()
    police = pool.pool
    assert (len(police._registry), len(police._container), len(police._cursor)) == (2, 2, 0)
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="idle") == 2
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="active") == 0
    assert metrics.value(data, "poolscope.connection.pending_requests") == 0
    session.close()


def closes(metrics):
    return {a["poolscope.close.reason"]: p.value
            for a, p in metrics.read().get("poolscope.connection.closed", []) if p.value}


def test_keepalive_delay_expiry(metrics, server):
    """urllib3-future counts a connection older than its ``keepalive_delay`` dropped and
    replaces it."""
    import urllib3

    manager = urllib3.PoolManager(keepalive_delay=0.5)
    assert manager.request("GET", server.url + "/").status == 200
    time.sleep(0.8)
    assert manager.request("GET", server.url + "/").status == 200
    assert closes(metrics) == {"keepalive_expired": 1}
    assert metrics.value(metrics.read(), "poolscope.connection.created") == server.accepted == 2
    manager.clear()


def test_the_idle_watcher_closing_a_connection_the_server_dropped(metrics, short_keepalive_server):
    """urllib3-future's own background thread peeks at idle connections and closes one the
    server has dropped, with no request in flight: ``server_closed``, the pool left empty."""
    import urllib3

    server = short_keepalive_server
    manager = urllib3.PoolManager(background_watch_delay=0.05)
    assert manager.request("GET", server.url + "/").status == 200
    [pool] = manager.pools._registry.values()
    [conn] = pool.pool._registry.values()
    deadline = time.monotonic() + 3
    while (pool.pool._registry or conn.sock is not None) and time.monotonic() < deadline:
        time.sleep(0.02)  # until the watcher's close has returned
    assert (len(pool.pool._registry), conn.sock) == (0, None)  # the library's own books
    assert closes(metrics) == {"server_closed": 1}
    data = metrics.read()
    assert metrics.value(data, "http.client.open_connections") == 0
    assert metrics.value(data, "poolscope.connection.created") == server.accepted == 1
    manager.clear()


def test_a_pool_the_manager_drops_for_another_is_evicted(metrics, server):
    """``PoolManager(num_pools=1)``, two origins: the first pool makes room for the second."""
    import urllib3_future

    from poolscope.demo.server import DemoServer

    with DemoServer() as other:
        manager = urllib3_future.PoolManager(num_pools=1)
        assert manager.request("GET", server.url + "/").status == 200
        assert manager.request("GET", other.url + "/").status == 200
        assert closes(metrics) == {"evicted": 1}
        data = metrics.read()
        assert metrics.value(data, "poolscope.pool.count") == 1
        assert metrics.value(data, "http.client.open_connections") == 1
        manager.clear()
    assert closes(metrics) == {"evicted": 1, "pool_closed": 1}


def test_both_module_trees_are_observed_and_restored(server, caplog):
    """``urllib3`` (urllib3-future's copy) and ``urllib3_future`` are two sets of classes: both
    are observed, as urllib3-future, and ``uninstrument()`` puts back the very objects."""
    import urllib3
    import urllib3_future

    def members():
        found = {}
        for root in (urllib3, urllib3_future):
            for cls in (root.connectionpool.HTTPConnectionPool, root.connection.HTTPConnection,
                        root.connection.HTTPSConnection,
                        root.util.traffic_police.TrafficPolice):
                found.update({(root.__name__, cls.__name__, k): v for k, v in vars(cls).items()})
        return found

    before = members()
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="poolscope"):
        poolscope.instrument(meter_provider=metrics.provider)
        try:
            changed = {k for k, v in members().items() if before.get(k) is not v}
            statuses = [root.PoolManager().request("GET", server.url + "/").status
                        for root in (urllib3, urllib3_future)]
            data = metrics.read()
        finally:
            poolscope.uninstrument()
    assert {root for root, *_ in changed} == {"urllib3", "urllib3_future"}
    assert statuses == [200, 200] and server.accepted == 2
    assert metrics.value(data, "poolscope.connection.created",
                         poolscope__library="urllib3-future") == 2
    assert members() == before and all(members()[k] is v for k, v in before.items())
    assert [r.getMessage() for r in caplog.records if r.name == "poolscope"] == []


def test_a_response_never_closed_is_a_held_connection(metrics, server):
    """niquests ``stream=True`` keeps the connection until the response is closed."""
    import niquests

    session = niquests.Session()
    response = session.get(server.url + "/bytes/100000", stream=True)
    time.sleep(0.3)
    data = metrics.read()
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="active") == 1
    assert metrics.value(data, "poolscope.connection.oldest_active_age") >= 0.3
    response.close()
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.oldest_active_age") == 0
    session.close()


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_a_response_closed_before_its_end_is_an_error_close(metrics, server, flavor):
    """niquests ``stream=True``, 1 KB of a 1 MB body read, the response closed: urllib3-future
    aborts the stream, which over HTTP/1.1 closes the connection. The server (no keep-alive
    limit, no ``Connection: close``) closed nothing: the close is ``error``, as in the other
    libraries, and the next request opens a second connection."""
    import asyncio

    import niquests
    url = server.url + "/bytes/1000000"
    if flavor == "sync":
        with niquests.Session() as session:
            with session.get(url, stream=True) as response:
                assert len(next(response.iter_content(1024))) == 1024
            assert session.get(server.url + "/").status_code == 200
            before_close = closes(metrics)
    else:
        async def main():
            async with niquests.AsyncSession() as session:
                response = await session.get(url, stream=True)
                async with response:
                    assert len(await response.raw.read(1024)) == 1024
                assert (await session.get(server.url + "/")).status_code == 200
                return closes(metrics)
        before_close = asyncio.run(main())
    assert (server.accepted, server.answered) == (2, 2)
    assert before_close == {"error": 1}
    assert metrics.value(metrics.read(), "poolscope.connection.created") == 2
    assert server.wait_closed(2) == [1, 1]


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_a_websocket_is_no_leak_and_closes_as_upgraded(metrics, flavor):
    """niquests' WebSocket extension (``ws://``, with wsproto): urllib3-future hands the
    connection to the extension after the ``101``. It is active while held (0.3 s), but not in
    ``oldest_active_age``, and its close is ``upgraded``, not ``server_closed``; the other
    connections close with the session, as many as the server saw."""
    pytest.importorskip("wsproto")
    import asyncio

    import niquests
    from wsserver import WebSocketServer

    def held():
        data = metrics.read()
        return (metrics.value(data, "http.client.open_connections",
                              http__connection__state="active"),
                metrics.value(data, "poolscope.connection.oldest_active_age"))

    async def run_async(url):
        async with niquests.AsyncSession() as session:
            assert (await session.get(url + "/")).status_code == 200
            response = await session.get(url.replace("http", "ws", 1) + "/ws")
            assert response.status_code == 101
            await response.extension.send_payload("hi")
            assert await response.extension.next_payload() == "hi"
            await asyncio.sleep(0.3)
            during = held()
            await response.extension.close()
            assert (await session.get(url + "/")).status_code == 200
            return during

    with WebSocketServer() as server:
        if flavor == "async":
            during = asyncio.run(run_async(server.url))
        else:
            with niquests.Session() as session:
                assert session.get(server.url + "/").status_code == 200
                response = session.get(server.url.replace("http", "ws", 1) + "/ws")
                assert response.status_code == 101
                response.extension.send_payload("hi")
                assert response.extension.next_payload() == "hi"
                time.sleep(0.3)
                during = held()
                response.extension.close()
                assert session.get(server.url + "/").status_code == 200
        data = metrics.read()
        assert during == (1, 0)
        assert metrics.value(data, "poolscope.connection.created") == len(server.peers)
        assert closes(metrics) == {"upgraded": 1, "pool_closed": len(server.peers) - 1}


def library_idle(session, url):
    """urllib3-future's own word on each connection of ``session``'s pools for ``url``."""
    pools = session.get_adapter(url).poolmanager.pools._container.values()
    return [conn.is_idle for pool in pools for conn in pool.pool._registry.values()]


# the HTTP/2 test server's certificate is not verified
unverified = pytest.mark.filterwarnings("ignore:Unverified HTTPS request")


@unverified
def test_threads_sharing_an_http2_connection_give_it_back_idle(metrics):
    """Six threads on one niquests session over HTTP/2 (a pool of one connection, the server's
    limit two streams): the requests go out on the one connection, several at once, and each
    gives it back as its response is read. Once all are answered the connection is idle (it
    stayed active forever when two threads gave it back with a response still to read)."""
    import niquests
    from h2server import H2Server

    with H2Server(max_streams=2, delay=0.2) as h2, niquests.Session(
            disable_http3=True, pool_maxsize=1) as session:
        answers = _in_threads(lambda _: session.get(h2.url + "/slow", verify=False),
                              list(range(6)))
        assert [(a.status_code, a.http_version) for a in answers] == [(200, 20)] * 6
        assert h2.accepted == 1 and h2.peak_streams == 2 and len(h2.served) == 6
        data = metrics.read()
        assert metrics.value(data, "poolscope.connection.created") == h2.accepted
        assert sum(p.value for _, p in data["poolscope.connection.acquisitions"]) == 6
        assert metrics.value(data, "http.client.open_connections",
                             http__connection__state="active") == 0
        assert metrics.value(data, "http.client.open_connections",
                             http__connection__state="idle", network__protocol__version="2") == 1
        assert metrics.value(data, "poolscope.connection.oldest_active_age") == 0
        assert metrics.value(data, "poolscope.connection.active_streams") == 0
        assert metrics.value(data, "poolscope.connection.max_streams") == h2.max_streams
    assert closes(metrics) == {"pool_closed": 1}


@unverified
def test_http2_connections_the_server_ends_with_goaway(metrics):
    """The server ends each HTTP/2 connection with ``GOAWAY`` after 3 answers, as nginx does
    after ``keepalive_requests``: 7 requests one after another on a niquests session take 3
    connections, and the server closed 2 of them."""
    import niquests
    from h2server import H2Server

    with H2Server(max_requests=3) as h2, niquests.Session(disable_http3=True) as session:
        answers = [session.get(h2.url + "/", verify=False) for _ in range(7)]
        assert [(a.status_code, a.http_version) for a in answers] == [(200, 20)] * 7
        assert h2.accepted == 3 and h2.served_on == [1, 1, 1, 2, 2, 2, 3]
        assert metrics.served(metrics.read()) == (3, 3, 4)
        assert closes(metrics) == {"server_closed": 2}
    assert closes(metrics) == {"server_closed": 2, "pool_closed": 1}


def multiplexing(protocol, delay, max_streams):
    """The HTTP/2 test server (``max_streams`` a connection) or the HTTP/3 one, the niquests
    session options that speak only that protocol to it, a request's ``verify`` that trusts it
    (HTTP/2's certificate is not verified), and the ``http_version`` of its responses."""
    if protocol == "h2":
        from h2server import H2Server
        return H2Server(max_streams=max_streams, delay=delay), {"disable_http3": True}, False, 20
    pytest.importorskip("qh3")
    from h3server import H3Server
    h3 = H3Server(delay=delay)
    return h3, {"disable_http1": True, "disable_http2": True}, h3.ca_file, 30


def sessions(flavor, metrics, server, options, each, **session):
    """What ``each(session)`` returns on a niquests ``Session`` (``flavor`` "threads") or
    ``AsyncSession`` ("tasks", ``each`` a coroutine function), with the pool's connections'
    ``is_idle`` and a collection as it returns, the session closed after."""
    import asyncio

    import niquests

    def after(session, result):
        return result, library_idle(session, server.url), metrics.read()
    if flavor == "threads":
        with niquests.Session(**session, **options) as open_session:
            return after(open_session, each(open_session))

    async def run():
        async with niquests.AsyncSession(**session, **options) as open_session:
            return after(open_session, await each(open_session))
    return asyncio.run(run())


@unverified
@pytest.mark.filterwarnings("ignore:The TLS verification changed")  # niquests' own, see below
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("protocol", ["h2", "h3"])
@pytest.mark.parametrize("flavor", ["threads", "tasks"])
def test_many_callers_on_multiplexed_connections_leave_them_idle(metrics, flavor, protocol, seed):
    """Twelve threads (or tasks of an ``AsyncSession``), three requests each, slow and quick at
    random, on a pool of two HTTP/2 connections of three streams, or two HTTP/3 connections:
    every request is one acquisition (the server's answers), every connection one the server
    accepted, and once all are answered none is active, as urllib3-future's books (``is_idle``)
    say too. (niquests warns, as ever, when a thread's first request sets up the TLS of a
    connection another thread is using.)"""
    import asyncio
    import random

    rng = random.Random(seed)
    paths = [[rng.choice(["/slow", "/"]) for _ in range(3)] for _ in range(12)]
    server, options, verify, version = multiplexing(protocol, delay=0.05, max_streams=3)

    def answered(answers):
        return [(a.status_code, a.http_version) for a in answers]

    def threads(session):
        return _in_threads(lambda mine: answered(
            [session.get(server.url + path, verify=verify) for path in mine]), paths)

    async def tasks(session):
        async def mine(caller_paths):
            return answered([await session.get(server.url + path, verify=verify)
                             for path in caller_paths])
        return await asyncio.gather(*(mine(p) for p in paths))

    with server:
        answers, idle, data = sessions(flavor, metrics, server, options,
                                       threads if flavor == "threads" else tasks, pool_maxsize=2)
        assert answers == [[(200, version)] * 3] * 12 and not server.errors
    assert len(server.served) == 36
    assert idle == [True] * server.accepted
    assert sum(p.value for _, p in data["poolscope.connection.acquisitions"]) == 36
    assert metrics.value(data, "poolscope.connection.created") == server.accepted
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="active") == 0
    assert metrics.value(data, "http.client.open_connections", http__connection__state="idle",
                         network__protocol__version=protocol[1]) == server.accepted
    assert closes(metrics) == {"pool_closed": server.accepted}


@unverified
@pytest.mark.parametrize("protocol", ["h2", "h3"])
@pytest.mark.parametrize("flavor", ["threads", "tasks"])
def test_requests_sent_ahead_keep_a_multiplexed_connection_active_until_read(metrics, flavor,
                                                                            protocol):
    """niquests' ``multiplexed=True`` (``Session`` or ``AsyncSession``): requests sent on
    HTTP/2 or HTTP/3 and their responses read later (``gather``). The connection is in use
    while a response is still to come or to be read, as urllib3-future's own books say
    (``is_idle``), and idle once all are read. On HTTP/2 the streams are counted too (HTTP/3's
    are not observed)."""
    server, options, verify, version = multiplexing(protocol, delay=0.3, max_streams=2)

    def threads(session):
        answers = [session.get(server.url + "/slow", verify=verify) for _ in range(2)]
        sent = metrics.read(), library_idle(session, server.url)
        session.gather()
        return answers, sent

    async def tasks(session):
        answers = [await session.get(server.url + "/slow", verify=verify) for _ in range(2)]
        sent = metrics.read(), library_idle(session, server.url)
        await session.gather()
        return answers, sent

    with server:
        (answers, (sent, idle_when_sent)), idle_when_read, read = sessions(
            flavor, metrics, server, options, threads if flavor == "threads" else tasks,
            pool_maxsize=1, multiplexed=True)
    assert [(a.status_code, a.http_version) for a in answers] == [(200, version)] * 2
    assert server.accepted == 1 and len(server.served) == 2
    assert idle_when_sent == [False] and idle_when_read == [True]
    limit = getattr(server, "max_streams", None)
    for data, active, streams in ((sent, 1, 2), (read, 0, 0)):  # 2 sent, not yet read
        assert metrics.value(data, "http.client.open_connections",
                             http__connection__state="active") == active
        assert metrics.value(data, "http.client.open_connections",
                             http__connection__state="idle") == 1 - active
        assert metrics.value(data, "poolscope.connection.active_streams") == \
            (streams if limit else None)
        assert metrics.value(data, "poolscope.connection.max_streams") == limit
    assert sum(p.value for _, p in read["poolscope.connection.acquisitions"]) == 2
    assert closes(metrics) == {"pool_closed": 1}


@unverified
@pytest.mark.parametrize("scheme, second", [("http", "refused"), ("http", "listening"),
                                            ("https", "listening")])
@pytest.mark.parametrize("flavor", ["threads", "tasks"])
def test_happy_eyeballs_counts_the_connection_that_won_the_race(metrics, flavor, scheme, second):
    """niquests' ``happy_eyeballs=True`` with a name of two addresses (127.0.0.2 and 127.0.0.1,
    through urllib3-future's in-memory resolver): it races a connection to each in threads (or
    tasks) of its own, keeps the first established and closes the others (refused, or accepted
    and never used). One connection is the pool's: created once with its set-up time (none was
    counted: the race's ``connect`` runs where no pool is known), acquired by the three
    requests, the connection urllib3-future keeps and the server that answered them."""
    import contextlib

    from tlsserver import TLSServer

    server_cls = DemoServer if scheme == "http" else functools.partial(TLSServer, 0)
    resolver = "in-memory://default?hosts=race.test:127.0.0.2,race.test:127.0.0.1"

    def threads(session):
        return [session.get(url, verify=False).status_code for _ in range(3)]

    async def tasks(session):
        return [(await session.get(url, verify=False)).status_code for _ in range(3)]

    with server_cls() as first, contextlib.ExitStack() as stack:
        servers = [first]
        if second == "listening":
            servers.append(stack.enter_context(server_cls(port=first.port, host="127.0.0.2")))
        url = f"{scheme}://race.test:{first.port}/"
        answers, idle, data = sessions(flavor, metrics, first, {}, threads if flavor == "threads"
                                       else tasks, happy_eyeballs=True, resolver=resolver)
        deadline = time.monotonic() + 5  # the session closed: the servers' ends close too
        while (sum(n for s in servers for n in s.per_connection) < 3
               and time.monotonic() < deadline):
            time.sleep(0.01)
    assert answers == [200] * 3 and idle == [True]
    # one connection carried the requests, whatever else the race opened
    assert [n for s in servers for n in s.per_connection if n] == [3]
    assert metrics.served(data) == (1, 1, 2)
    assert metrics.histogram(data, "poolscope.connection.create_time")[0] == 1
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="idle") == 1
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="active") == 0
    assert closes(metrics) == {"pool_closed": 1}


@pytest.mark.parametrize("libraries, observed", [(["urllib3-future"], True), (["urllib3"], True),
                                                 (["httpx"], False)])
def test_either_name_selects_the_copy_niquests_uses(server, libraries, observed):
    import niquests

    metrics = Metrics()
    poolscope.instrument(meter_provider=metrics.provider, libraries=libraries)
    try:
        with niquests.Session() as session:
            assert session.get(server.url + "/").status_code == 200
        created = metrics.value(metrics.read(), "poolscope.connection.created")
    finally:
        poolscope.uninstrument()
    assert created == (1 if observed else None)


def test_a_version_outside_the_range_is_one_line_for_both_trees(monkeypatch, caplog):
    import urllib3.connectionpool
    import urllib3_future.connectionpool

    assert urllib3.connectionpool is not urllib3_future.connectionpool  # two trees, two hooks

    from poolscope import _package

    monkeypatch.setitem(_package.SUPPORTED, "urllib3-future",
                        {**_package.SUPPORTED["urllib3-future"], "minimum": "9"})
    before = dict(vars(urllib3_future.util.traffic_police.TrafficPolice))
    with caplog.at_level(logging.WARNING, logger="poolscope"):
        poolscope.instrument(meter_provider=Metrics().provider)
        try:
            patched = dict(vars(urllib3_future.util.traffic_police.TrafficPolice)) != before
        finally:
            poolscope.uninstrument()
    lines = [r.getMessage() for r in caplog.records if r.name == "poolscope"]
    assert len(lines) == 1 and "urllib3-future" in lines[0] and "not supported" in lines[0], lines
    assert not patched


def test_an_async_session_against_its_own_books(metrics, server):
    """niquests' ``AsyncSession`` (urllib3-future's async pools), limited to 2 connections
    (blocking), 6 requests at once to a 300 ms endpoint: 4 wait, 2 for one service time and 2
    for two; 2 connections, the ones the server accepted; 6 acquisitions, its answers; and the
    async police's own books (two connections, both available, no task holding one) agree."""
    import asyncio

    import niquests

    async def run():
        session = niquests.AsyncSession()
        session.mount("http://", niquests.adapters.AsyncHTTPAdapter(pool_maxsize=2,
                                                                    pool_block=True))
        answers = await asyncio.gather(*(session.get(server.url + "/delay/0.3")
                                         for _ in range(6)))
        [pool] = session.adapters["http://"].poolmanager.pools._registry.values()
        police = pool.pool
        books = (len(police._registry), len(police._container), len(police._cursors))
        data = metrics.read()
        await session.close()
        return [a.status_code for a in answers], books, data

    start = time.monotonic()
    statuses, books, data = asyncio.run(run())
    assert statuses == [200] * 6 and books == (2, 2, 0)
    count, total = metrics.histogram(data, "poolscope.connection.wait_time")
    assert count == 4 and 1.8 <= total <= sum(reached(server, start, 2))
    assert metrics.value(data, "poolscope.connection.created") == server.accepted == 2
    assert metrics.value(data, "poolscope.connection.acquisitions") == server.answered == 6
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="idle") == 2
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="active") == 0
    assert metrics.value(data, "poolscope.connection.pending_requests") == 0
    assert closes(metrics) == {"pool_closed": 2}


def test_an_async_pool_timeout(metrics, server):
    """urllib3-future's ``AsyncHTTPConnectionPool``, limit 1 held 0.6 s; a request giving up
    after 0.2 s: one timeout, its wait ended ``timed_out``, nothing left pending. (Before
    2.25.904 the police then hands the held connection to the timed-out waiter, which is gone:
    the pool's close leaves it open; so nothing is asserted after it.)"""
    import asyncio

    import urllib3_future

    async def run():
        pool = urllib3_future.AsyncHTTPConnectionPool("127.0.0.1", server.port, maxsize=1,
                                                      block=True, retries=False)
        held = asyncio.ensure_future(pool.request("GET", "/delay/0.6"))
        await asyncio.sleep(0.15)
        with pytest.raises(urllib3_future.exceptions.EmptyPoolError):
            await pool.request("GET", "/", pool_timeout=0.2)
        assert (await held).status == 200
        data = metrics.read()
        await pool.close()
        return data

    data = asyncio.run(run())
    assert metrics.value(data, "poolscope.connection.timeouts") == 1
    assert {a["poolscope.wait.outcome"]: p.value
            for a, p in data["poolscope.connection.waits"] if p.value} == {"timed_out": 1}
    assert metrics.value(data, "poolscope.connection.pending_requests") == 0
    assert metrics.value(data, "poolscope.connection.created") == server.accepted == 1


def test_async_keepalive_eviction_and_a_held_stream(metrics, server):
    """urllib3-future's ``AsyncPoolManager`` and niquests' ``AsyncSession``, each figure as
    its sync twin's above: a connection past ``keepalive_delay`` replaced; a pool the manager
    drops for another origin's ``evicted``; a streamed response holding its connection until
    closed."""
    import asyncio

    import niquests
    import urllib3_future

    from poolscope.demo.server import DemoServer

    def value(name, **attrs):
        return metrics.value(metrics.read(), name, **attrs)

    async def run(other):
        manager = urllib3_future.AsyncPoolManager(keepalive_delay=0.5, num_pools=1)
        assert (await manager.request("GET", server.url + "/")).status == 200
        await asyncio.sleep(0.8)
        assert (await manager.request("GET", server.url + "/")).status == 200
        assert closes(metrics) == {"keepalive_expired": 1}
        assert value("poolscope.connection.created") == server.accepted == 2
        assert (await manager.request("GET", other.url + "/")).status == 200
        assert closes(metrics) == {"keepalive_expired": 1, "evicted": 1}
        await manager.clear()
        assert closes(metrics) == {"keepalive_expired": 1, "evicted": 1, "pool_closed": 1}

        session = niquests.AsyncSession()
        response = await session.get(server.url + "/bytes/100000", stream=True)
        await asyncio.sleep(0.3)
        assert value("http.client.open_connections", http__connection__state="active") == 1
        assert value("poolscope.connection.oldest_active_age") >= 0.3
        await response.close()
        assert value("http.client.open_connections", http__connection__state="active") == 0
        assert value("poolscope.connection.oldest_active_age") == 0
        await session.close()

    with DemoServer() as other:
        asyncio.run(run(other))
    assert other.accepted == 1


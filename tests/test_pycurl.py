"""pycurl specifics: one reused easy handle, MAXAGE_CONN, FORBID_REUSE, a share, chained callbacks."""

import functools
import os
import threading
import time

import pycurl
import pytest
from poolscope.demo.server import DemoServer
from unixserver import UnixSocketServer

LIB = {"poolscope__library": "pycurl"}


def fetch(curl, url):
    curl.setopt(pycurl.URL, url)
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
    curl.perform()
    return curl.getinfo(pycurl.RESPONSE_CODE)


def figures(metrics):
    data = metrics.read()
    return data, lambda name, **a: metrics.value(data, name, **LIB, **a)


def test_one_reused_handle(metrics, server):
    curl = pycurl.Curl()
    assert [fetch(curl, server.url + "/") for _ in range(3)] == [200] * 3
    data, v = figures(metrics)
    assert v("poolscope.connection.created") == 1
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 1
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 2
    assert metrics.histogram(data, "poolscope.connection.create_time", **LIB)[0] == 1
    assert v("http.client.open_connections", http__connection__state="idle") == 1
    assert v("poolscope.pool.count") == 1
    curl.close()
    _, v = figures(metrics)
    assert v("poolscope.connection.closed", poolscope__close__reason="pool_closed") == 1
    assert v("http.client.open_connections") == 0
    assert v("poolscope.pool.count") == 0
    assert server.accepted == 1


def test_maxage_conn_expiry(metrics, server):
    curl = pycurl.Curl()
    curl.setopt(pycurl.MAXAGE_CONN, 1)
    fetch(curl, server.url + "/")
    time.sleep(1.3)
    fetch(curl, server.url + "/")
    _, v = figures(metrics)
    assert v("poolscope.connection.closed", poolscope__close__reason="keepalive_expired") == 1
    assert v("poolscope.connection.created") == 2
    assert v("http.client.open_connections") == 1
    assert server.accepted == 2
    curl.close()


def test_forbid_reuse_closes_each_connection(metrics, server):
    curl = pycurl.Curl()
    curl.setopt(pycurl.FORBID_REUSE, 1)
    for _ in range(3):
        fetch(curl, server.url + "/")
    _, v = figures(metrics)
    assert v("poolscope.connection.created") == 3
    assert v("poolscope.connection.closed", poolscope__close__reason="idle_limit") == 3
    assert v("http.client.open_connections") == 0
    curl.close()


def test_share_handle_shares_connections(metrics, server):
    share = pycurl.CurlShare()
    share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_CONNECT)
    first, second = pycurl.Curl(), pycurl.Curl()
    for curl in (first, second):
        curl.setopt(pycurl.SHARE, share)
        fetch(curl, server.url + "/")
    _, v = figures(metrics)
    assert v("poolscope.connection.created") == 1
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 1
    assert v("poolscope.pool.count") == 1
    assert server.accepted == 1
    for curl in (first, second):
        curl.close()
    share.close()


def test_application_callbacks_still_run(metrics, server):
    calls = {"prereq": 0, "sockopt": 0, "closesocket": 0, "debug": 0}

    def prereq(*args):
        calls["prereq"] += 1
        return pycurl.PREREQFUNC_OK

    def sockopt(fd, purpose):
        calls["sockopt"] += 1
        return pycurl.SOCKOPT_OK

    def closesocket(fd):
        calls["closesocket"] += 1
        os.close(fd)
        return 0

    def debug(kind, message):
        calls["debug"] += 1

    curl = pycurl.Curl()
    curl.setopt(pycurl.PREREQFUNCTION, prereq)
    curl.setopt(pycurl.SOCKOPTFUNCTION, sockopt)
    curl.setopt(pycurl.CLOSESOCKETFUNCTION, closesocket)
    curl.setopt(pycurl.VERBOSE, 1)
    curl.setopt(pycurl.DEBUGFUNCTION, debug)
    for _ in range(3):
        fetch(curl, server.url + "/")
    curl.close()
    assert calls["prereq"] == 3 and calls["sockopt"] == 1 and calls["closesocket"] == 1
    assert calls["debug"] > 0
    _, v = figures(metrics)
    assert v("poolscope.connection.acquisitions") == 3
    assert v("poolscope.connection.created") == 1


def test_a_class_taken_before_instrumenting_is_not_observed(server):
    import poolscope
    from conftest import Metrics

    early = pycurl.Curl
    metrics = Metrics()
    poolscope.instrument(meter_provider=metrics.provider)
    try:
        assert pycurl.Curl is not early
        fetch(early(), server.url + "/")
        assert metrics.value(metrics.read(), "poolscope.connection.acquisitions", **LIB) is None
        fetch(pycurl.Curl(), server.url + "/")
        assert metrics.value(metrics.read(), "poolscope.connection.acquisitions", **LIB) == 1
    finally:
        poolscope.uninstrument()
    assert pycurl.Curl is early


@pytest.mark.parametrize("timeout_ms", [200])
def test_multi_queue_timeout(metrics, server, timeout_ms):
    """M_MAX_TOTAL_CONNECTIONS=1 held for 0.6 s; a second transfer's connect timeout expires queued."""
    from drivers import PycurlDriver

    with PycurlDriver(server, limit=1, pool_timeout=timeout_ms / 1000) as driver:
        held = driver.submit("/delay/0.6")
        time.sleep(0.1)
        with pytest.raises(pycurl.error) as info:
            driver.get("/")
        assert info.value.args[0] == pycurl.E_OPERATION_TIMEDOUT
        assert held.result(5) == 200
    data, v = figures(metrics)
    assert v("poolscope.connection.timeouts") == 1
    assert metrics.histogram(data, "poolscope.connection.wait_time", **LIB)[0] == 0
    assert v("poolscope.connection.created") == 1


# -- transparency: pycurl behaves as it does without poolscope ----------------------------

def test_a_connect_timeout_out_of_the_queue_is_not_a_pool_timeout(metrics):
    """A limited multi lets the transfer out at once; it opens a socket and times out in the
    TLS handshake (the listener never answers): a connect timeout, not a wait for the pool."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    opened = []
    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, 1)
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, f"https://127.0.0.1:{listener.getsockname()[1]}/")
    curl.setopt(pycurl.CONNECTTIMEOUT_MS, 200)
    curl.setopt(pycurl.SOCKOPTFUNCTION, lambda fd, purpose: opened.append(fd) or 0)
    multi.add_handle(curl)
    errors = []
    while not errors:
        multi.perform()
        _, _, failed = multi.info_read()
        errors += [errno for _, errno, _ in failed]
        multi.select(0.01)
    assert errors == [pycurl.E_OPERATION_TIMEDOUT] and len(opened) == 1  # what the app saw
    multi.remove_handle(curl)
    _, v = figures(metrics)
    assert not v("poolscope.connection.timeouts")
    assert v("poolscope.connection.pending_requests") == 0
    assert v("http.client.open_connections", http__connection__state="active") in (None, 0)
    curl.close()
    multi.close()
    listener.close()


def test_arguments_reach_pycurl_unchanged(metrics):
    curl = pycurl.Curl()
    if hasattr(pycurl, "async_multi"):  # pycurl 7.49's keyword
        curl.setopt(pycurl.WRITEFUNCTION, lambda data: None, use_memoryview=True)
    with pytest.raises(TypeError):  # pycurl's own check, not an AttributeError of poolscope's
        curl.setopt(pycurl.URL, 1)
    with pytest.raises(TypeError):
        curl.setopt(pycurl.PREREQFUNCTION, "not callable")
    with pytest.raises(TypeError):
        pycurl.Curl(1)
    with pytest.raises(TypeError):
        pycurl.CurlMulti(1)
    curl.close()


@pytest.mark.skipif(not hasattr(pycurl, "async_multi"), reason="pycurl 7.49's arguments")
def test_constructor_arguments_keep_their_effect(metrics, server):
    multi = pycurl.CurlMulti(close_handles=True)
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, server.url + "/")
    multi.add_handle(curl)
    multi.close()
    assert curl.closed
    with pytest.raises(TypeError):
        pycurl.CurlMulti(close_handles=True, other=1)
    share = pycurl.CurlShare(detach_on_close=False)
    held = pycurl.Curl()
    held.setopt(pycurl.SHARE, share)
    with pytest.raises(pycurl.error):
        share.close()  # still in use by a handle
    held.close()
    share.close()


def test_a_dropped_handle_closes_its_sockets_at_once(metrics, server):
    """No reference cycle through poolscope: dropping a handle frees it (and its connection)
    with no garbage collection, as without poolscope."""
    import gc
    import weakref
    gc.disable()
    try:
        curl = pycurl.Curl()
        assert fetch(curl, server.url + "/") == 200
        gone = weakref.ref(curl)
        del curl
        assert gone() is None
        multi = pycurl.CurlMulti()
        easy = pycurl.Curl()
        multi.add_handle(easy)
        multi.remove_handle(easy)
        gone_multi = weakref.ref(multi)
        del multi
        assert gone_multi() is None
    finally:
        gc.enable()
    _, v = figures(metrics)
    assert v("poolscope.connection.closed", poolscope__close__reason="pool_closed") == 1
    assert v("http.client.open_connections") in (None, 0)


@pytest.mark.skipif(not hasattr(pycurl, "CONN_ID"), reason="pycurl 7.49's CONN_ID")
def test_reading_libcurl_after_a_close_is_unchanged(metrics, server):
    """A connection closed with its transfer, new or reused: CONN_ID still reads as the
    application's own (libcurl forgets it once ACTIVESOCKET is read for a connection gone)."""
    curl = pycurl.Curl()
    assert fetch(curl, server.url + "/close") == 200
    assert curl.getinfo(pycurl.CONN_ID) == 0
    assert fetch(curl, server.url + "/") == 200
    assert fetch(curl, server.url + "/close") == 200
    assert curl.getinfo(pycurl.CONN_ID) == 1
    _, v = figures(metrics)
    assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") == 2
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 1
    curl.close()


def test_a_duplicate_handle_is_observed_as_its_own(metrics, server):
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, server.url + "/")
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
    dup = curl.duphandle()
    for handle in (curl, dup):
        handle.perform()
    _, v = figures(metrics)
    assert v("poolscope.connection.created") == 2 == server.accepted  # two handles, two caches
    assert v("poolscope.pool.count") == 2
    assert v("http.client.open_connections", http__connection__state="idle") == 2
    for handle in (curl, dup):
        handle.close()
    _, v = figures(metrics)
    assert v("poolscope.connection.closed", poolscope__close__reason="pool_closed") == 2


def test_closing_a_handle_in_a_multi_and_removing_it_after(metrics, server):
    multi = pycurl.CurlMulti()
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, server.url + "/delay/0.5")
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
    multi.add_handle(curl)
    deadline = time.monotonic() + 5
    while server.accepted == 0 and time.monotonic() < deadline:
        multi.perform()
        multi.select(0.01)
    curl.close()  # mid-transfer: pycurl takes it out of the multi
    multi.remove_handle(curl)
    _, v = figures(metrics)
    assert v("http.client.open_connections", http__connection__state="active") in (None, 0)
    multi.close()


@pytest.mark.skipif(not hasattr(pycurl, "async_multi"), reason="pycurl 7.49's AsyncCurlMulti")
def test_async_curl_multi_is_observed(metrics, server):
    import asyncio

    async def main():
        async with pycurl.AsyncCurlMulti() as multi:
            multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, 2)
            curls = []
            for _ in range(6):
                curl = pycurl.Curl()
                curl.setopt(pycurl.URL, server.url + "/delay/0.2")
                curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
                curls.append(curl)
            await asyncio.gather(*(multi.perform(curl) for curl in curls))
            _, v = figures(metrics)
            assert v("poolscope.connection.created") == 2 == server.accepted
            assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 4
            assert v("http.client.open_connections", http__connection__state="active") == 0
            assert v("http.client.open_connections", http__connection__state="idle") == 2
            assert v("poolscope.connection.pending_requests") == 0
            for curl in curls:
                curl.close()

    asyncio.run(main())


def test_info_read_inside_the_multis_callback(metrics, server):
    """pycurl refuses getinfo inside a multi's callback: the transfer is finished later."""
    if not hasattr(pycurl, "M_NOTIFYFUNCTION"):
        pytest.skip("libcurl without M_NOTIFYFUNCTION")
    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, 1)
    done = []
    multi.setopt(pycurl.M_NOTIFYFUNCTION, lambda *args: done.extend(multi.info_read()[1]))
    multi.notify_enable(pycurl.M_NOTIFY_INFO_READ)
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, server.url + "/")
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
    multi.add_handle(curl)
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        multi.perform()
        multi.select(0.01)
    assert done == [curl]
    multi.remove_handle(curl)
    _, v = figures(metrics)
    assert v("poolscope.connection.created") == 1 == server.accepted
    assert v("http.client.open_connections", http__connection__state="idle") == 1
    curl.close()
    multi.close()


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "with-prereq"])
def test_a_handle_performing_alone_counts_what_the_servers_saw(metrics, alone):
    """A handle that performs on its own is observed from perform and getinfo (no
    PREREQFUNCTION); with the application's PREREQFUNCTION, poolscope's is chained on every
    transfer. Both count exactly what the servers saw."""
    with DemoServer(idle_timeout=1.0) as a, DemoServer() as b:
        curl = pycurl.Curl()
        if not alone:
            calls = []
            curl.setopt(pycurl.PREREQFUNCTION, lambda *args: calls.append(args) or 0)
        for url in (a.url + "/", a.url + "/", b.url + "/", a.url + "/", a.url + "/close",
                    a.url + "/", b.url + "/"):
            assert fetch(curl, url) == 200
        time.sleep(1.4)
        assert fetch(curl, a.url + "/") == 200
        with DemoServer() as gone:
            refused = gone.url + "/"
        with pytest.raises(pycurl.error):
            fetch(curl, refused)
        assert fetch(curl, b.url + "/") == 200
        _, v = figures(metrics)
        origin = lambda s: {"server__port": s.port}  # noqa: E731
        assert v("poolscope.connection.created", **origin(a)) == a.accepted == 3
        assert v("poolscope.connection.created", **origin(b)) == b.accepted == 1
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 4
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True,
                 **origin(a)) == 3
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True,
                 **origin(b)) == 2
        assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") == 2
        assert v("http.client.open_connections", http__connection__state="idle") == 2
        assert v("http.client.open_connections", http__connection__state="active") == 0
        assert a.answered + b.answered == 9
        if not alone:
            assert len(calls) == 9
        curl.close()
        data, v = figures(metrics)
        assert v("poolscope.connection.closed", poolscope__close__reason="pool_closed") == 2
        assert v("http.client.open_connections") == 0
        # the requests on each connection, as poolscope and the servers counted them
        deadline = time.monotonic() + 5
        while len(a.per_connection) + len(b.per_connection) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        [(_, point)] = [(at, p) for at, p in data["poolscope.connection.requests"]
                        if at["server.port"] == a.port]
        assert sorted(a.per_connection) == [1, 1, 4]
        assert point.count == 3 and point.sum == 6
        [(_, point)] = [(at, p) for at, p in data["poolscope.connection.requests"]
                        if at["server.port"] == b.port]
        assert b.per_connection == [3] and point.count == 1 and point.sum == 3


@pytest.fixture(params=["tcp", "unix"])
def origin(request, server, tmp_path):
    """(the server, its base URL, the options a handle needs to reach it): the test server, or
    the same on a Unix socket (``UNIX_SOCKET_PATH``), whose connections libcurl names by the
    socket's path alone."""
    if request.param == "tcp":
        yield server, server.url, {}
        return
    with UnixSocketServer(tmp_path / "s.sock") as unix:
        yield unix, "http://localhost", {pycurl.UNIX_SOCKET_PATH: unix.path}


@pytest.mark.parametrize("prereq", [False, True], ids=["alone", "prereq"])
def test_a_handle_with_two_connections_to_one_origin(metrics, origin, prereq):
    """FRESH_CONNECT leaves two connections to one origin in the handle's cache, and libcurl
    then reuses the first, not the last: which one a transfer had is libcurl's to tell (over
    a Unix socket it names neither: poolscope takes the first idle one, as libcurl does).
    ``prereq``: with ``FOLLOWLOCATION``, poolscope's ``PREREQFUNCTION`` tells each
    transfer's connection; without, the transfer's end does."""
    server, url, options = origin
    curl = pycurl.Curl()
    for option, value in {**options, pycurl.FOLLOWLOCATION: prereq}.items():
        curl.setopt(option, value)
    assert fetch(curl, url + "/") == 200
    curl.setopt(pycurl.FRESH_CONNECT, 1)
    assert fetch(curl, url + "/") == 200
    curl.setopt(pycurl.FRESH_CONNECT, 0)
    assert fetch(curl, url + "/close") == 200  # on the first, which the server closes
    assert fetch(curl, url + "/") == 200  # on the second, the one left
    _, v = figures(metrics)
    assert v("poolscope.connection.created") == server.accepted == 2
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 2
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 2
    assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") == 1
    assert v("http.client.open_connections", http__connection__state="idle") == 1
    curl.close()
    data, _ = figures(metrics)
    server.wait_closed(2)
    assert server.per_connection == [2, 2]
    [(_, point)] = data["poolscope.connection.requests"]
    assert point.count == 2 and point.sum == 4


@pytest.mark.parametrize("where", ["handle", "multi"])
def test_a_full_cache_closes_its_oldest_idle_connection(metrics, where):
    """``MAXCONNECTS`` 1 (a multi's ``M_MAXCONNECTS`` 1), two origins in turn: each transfer
    on a new connection leaves two in a cache of one, and libcurl closes the oldest idle one
    as the transfer ends. The pool keeps too few idle connections: ``idle_limit``, at once,
    not ``server_closed``: the servers, which close nothing themselves, saw each connection
    serve one request and close."""
    with DemoServer() as a, DemoServer() as b:
        curl = pycurl.Curl()
        if where == "multi":
            multi = pycurl.CurlMulti()
            multi.setopt(pycurl.M_MAXCONNECTS, 1)

            def get(url):
                curl.setopt(pycurl.URL, url)
                curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
                multi.add_handle(curl)
                while multi.perform()[1]:
                    multi.select(0.1)
                assert multi.info_read()[2] == []
                multi.remove_handle(curl)
                return curl.getinfo(pycurl.RESPONSE_CODE)
        else:
            curl.setopt(pycurl.MAXCONNECTS, 1)
            get = functools.partial(fetch, curl)
        for server in (a, b, a):
            assert get(server.url + "/") == 200
            _, v = figures(metrics)
            assert v("http.client.open_connections") == 1
        assert v("poolscope.connection.created") == a.accepted + b.accepted == 3
        assert v("poolscope.connection.closed", poolscope__close__reason="idle_limit") == 2
        assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") is None
        assert a.wait_closed(1) == [1] and b.wait_closed(1) == [1]
        curl.close()
        if where == "multi":
            multi.close()


def test_a_multi_over_a_unix_socket(metrics, tmp_path):
    """3 transfers at once in a multi over a Unix socket, twice: 3 connections, each reused
    once; then one the server closes, on one of them: the one closed has served 3, as the
    server saw it."""
    def at_once(multi, path, n):
        handles = []
        for _ in range(n):
            curl = pycurl.Curl()
            curl.setopt(pycurl.URL, "http://localhost" + path)
            curl.setopt(pycurl.UNIX_SOCKET_PATH, server.path)
            curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
            multi.add_handle(curl)
            handles.append(curl)
        while multi.perform()[1]:
            multi.select(0.1)
        assert len(multi.info_read()[1]) == n
        statuses = [curl.getinfo(pycurl.RESPONSE_CODE) for curl in handles]
        for curl in handles:
            multi.remove_handle(curl)
            curl.close()
        return statuses

    with UnixSocketServer(tmp_path / "s.sock") as server:
        multi = pycurl.CurlMulti()
        assert at_once(multi, "/delay/0.2", 3) + at_once(multi, "/delay/0.2", 3) == [200] * 6
        _, v = figures(metrics)
        assert v("poolscope.connection.created") == server.accepted == 3
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 3
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 3
        assert v("http.client.open_connections", http__connection__state="idle") == 3
        assert at_once(multi, "/close", 1) == [200]
        data, v = figures(metrics)
        assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") == 1
        [(_, point)] = data["poolscope.connection.requests"]
        assert (point.count, point.sum) == (1, 3)
        multi.close()
        server.wait_closed(3)
    data, v = figures(metrics)
    assert sorted(server.per_connection) == [2, 2, 3]
    [(_, point)] = data["poolscope.connection.requests"]
    assert (point.count, point.sum) == (3, 7)
    assert v("poolscope.connection.closed", poolscope__close__reason="pool_closed") == 2


def test_a_file_transfer_between_two_requests_uses_no_connection(metrics, server, tmp_path):
    """A ``file:`` transfer opens no socket and leaves the handle's one connection open, as a
    reuse would: it is not one."""
    path = tmp_path / "local"
    path.write_bytes(b"local")
    curl = pycurl.Curl()
    assert fetch(curl, server.url + "/") == 200
    assert fetch(curl, path.as_uri()) == 0
    assert fetch(curl, server.url + "/") == 200
    _, v = figures(metrics)
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 1
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 1
    assert server.answered == 2 and server.accepted == 1
    curl.close()


def test_a_closed_connections_descriptor_taken_at_once_by_another_file(metrics, server):
    """The server closes the reused connection, and before ``perform`` returns another file
    has its descriptor number (here the application's CLOSESOCKETFUNCTION opens one; in a busy
    process any thread may): an open descriptor is not the connection, libcurl tells."""
    taken = []

    def closesocket(fd):
        os.close(fd)
        other = os.open(os.devnull, os.O_RDONLY)
        if other != fd:
            os.dup2(other, fd)
            os.close(other)
        taken.append(fd)
        return 0

    curl = pycurl.Curl()
    curl.setopt(pycurl.CLOSESOCKETFUNCTION, closesocket)
    try:
        assert fetch(curl, server.url + "/") == 200
        fd = curl.getinfo(pycurl.ACTIVESOCKET)
        assert fetch(curl, server.url + "/close") == 200
        assert taken == [fd] and os.get_blocking(fd)  # the connection's number, open
        _, v = figures(metrics)
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 1
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 1
        assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") == 1
        assert v("http.client.open_connections") == 0
        assert server.accepted == 1 and server.answered == 2
    finally:
        curl.close()
        for fd in taken:
            os.close(fd)


def test_a_transfer_performing_alone_shows_active_while_under_way(metrics, server):
    """Without PREREQFUNCTION the transfer's connection is known when it ends; while it is
    under way, a collection reads the connection it holds as active from perform's start."""
    curl = pycurl.Curl()
    assert fetch(curl, server.url + "/") == 200
    curl.setopt(pycurl.URL, server.url + "/delay/1.0")
    worker = threading.Thread(target=curl.perform)
    started = time.monotonic()
    worker.start()
    time.sleep(0.5)
    _, v = figures(metrics)
    read_by = time.monotonic()
    assert v("http.client.open_connections", http__connection__state="active") == 1
    assert v("http.client.open_connections", http__connection__state="idle") == 0
    assert 0.4 <= v("poolscope.connection.oldest_active_age") <= read_by - started
    worker.join(5)
    _, v = figures(metrics)
    assert v("http.client.open_connections", http__connection__state="active") == 0
    assert v("http.client.open_connections", http__connection__state="idle") == 1
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 1
    assert v("poolscope.connection.oldest_active_age") == 0
    assert server.accepted == 1
    curl.close()


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "with-prereq"])
def test_a_retry_after_a_stale_connection(metrics, alone):
    """The server resets a request on a connection left idle 0.3 s; libcurl retries it on a
    new connection, and the application sees one transfer. With PREREQFUNCTION poolscope sees
    the stale connection taken; a handle performing alone tells only that it closed and that
    the transfer had a new connection (the one known difference between the two)."""
    with DemoServer(stale_after=0.3) as server:
        curl = pycurl.Curl()
        if not alone:
            curl.setopt(pycurl.PREREQFUNCTION, lambda *args: pycurl.PREREQFUNC_OK)
        for pause in (0, 0, 0.5):
            time.sleep(pause)
            assert fetch(curl, server.url + "/") == 200
        _, v = figures(metrics)
        assert server.reset == 1 and server.answered == 3
        assert v("poolscope.connection.created") == server.accepted == 2
        assert v("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 2
        assert v("poolscope.connection.acquisitions",
                 poolscope__connection__reused=True) == (1 if alone else 2)
        assert v("poolscope.connection.closed", poolscope__close__reason="server_closed") == 1
        assert v("http.client.open_connections", http__connection__state="idle") == 1
        data = metrics.read()
        count, total = metrics.histogram(data, "poolscope.connection.create_time", **LIB)
        assert count == 2 and 0 < total < 0.5
        curl.close()


def test_a_handle_performing_alone_under_spans(traced, server):
    """Each transfer's span says whether its connection was reused, and how long it was
    idle; the transfer that set the connection up has its set-up span, the later one a link
    to it (as with PREREQFUNCTION)."""
    tracer = traced.tracer_provider.get_tracer("app")
    curl = pycurl.Curl()
    for name, pause in (("first", 0), ("second", 0.2)):
        time.sleep(pause)
        with tracer.start_as_current_span(name):
            assert fetch(curl, server.url + "/") == 200
    curl.close()
    [setup] = traced.finished("HTTP connection_setup")
    [first] = traced.finished("first")
    [second] = traced.finished("second")
    assert setup.parent.span_id == first.context.span_id
    assert first.attributes["poolscope.connection.reused"] is False
    assert second.attributes["poolscope.connection.reused"] is True
    assert 0.2 <= second.attributes["poolscope.connection.idle_time"] < 0.4
    assert [link.context.span_id for link in second.links] == [setup.context.span_id]
    _, v = figures(traced)
    assert v("poolscope.connection.acquisitions") == 2 and server.accepted == 1


def _ws_recv(curl):
    """The next WebSocket frame's payload (``ws_recv`` does not block)."""
    for _ in range(500):
        try:
            return curl.ws_recv(1024)[0]
        except BlockingIOError:
            time.sleep(0.01)
    raise AssertionError("no frame")


@pytest.mark.skipif(not hasattr(pycurl.Curl, "ws_recv"), reason="pycurl without WebSockets")
@pytest.mark.parametrize("closer", ["client", "server"])
def test_a_websocket_is_no_leak_and_closes_as_upgraded(metrics, closer):
    """``CONNECT_ONLY`` 2 performs a WebSocket's handshake; the application then talks through
    ``ws_send`` and ``ws_recv`` on a connection libcurl keeps with the handle until the handle
    closes or performs again. It is active meanwhile but not in ``oldest_active_age``, and
    closes as ``upgraded``, whichever side ended the WebSocket. An upgrade the server refuses
    fails the transfer: ``error``. The handle's first connection, idle throughout, serves its
    last request. The figures are the server's: 3 connections."""
    from wsserver import WebSocketServer

    with WebSocketServer() as server:
        ws_url = server.url.replace("http", "ws", 1)
        curl = pycurl.Curl()
        assert fetch(curl, server.url + "/") == 200
        curl.setopt(pycurl.CONNECT_ONLY, 2)
        curl.setopt(pycurl.URL, ws_url + "/ws")
        curl.perform()
        assert curl.getinfo(pycurl.RESPONSE_CODE) == 101
        curl.ws_send("hi")
        assert _ws_recv(curl) == b"hi"
        time.sleep(0.2)
        _, v = figures(metrics)
        assert v("http.client.open_connections", http__connection__state="active") == 1
        assert v("http.client.open_connections", http__connection__state="idle") == 1
        assert v("poolscope.connection.oldest_active_age") == 0
        if closer == "client":
            curl.ws_close(1000)
        else:
            curl.ws_send("bye")
            assert _ws_recv(curl) == b"\x03\xe8"  # the server's close frame, code 1000
        curl.setopt(pycurl.URL, ws_url + "/")
        with pytest.raises(pycurl.error, match="upgrade"):
            curl.perform()  # which also ends the WebSocket's connection
        _, v = figures(metrics)
        assert v("http.client.open_connections", http__connection__state="active") == 0
        curl.setopt(pycurl.CONNECT_ONLY, 0)
        assert fetch(curl, server.url + "/") == 200
        curl.close()
    data, v = figures(metrics)
    assert v("poolscope.connection.created") == len(server.peers) == 3
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 1
    closed = {a["poolscope.close.reason"]: p.value
              for a, p in data["poolscope.connection.closed"] if p.value}
    assert closed == {"upgraded": 1, "error": 1, "pool_closed": 1}

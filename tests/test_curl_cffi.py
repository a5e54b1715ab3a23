"""curl_cffi: the shared scenarios run on its ``AsyncSession`` (flavor ``curl_cffi`` in
drivers.py); these are its own: issue 21's scenario under the launcher, what libcurl closes and
why, a cancelled wait, a held stream, the sync ``Session``, and the version gate."""

import asyncio
import gc
import logging
import socket
import threading
import time
import weakref

import pytest

import poolscope
from conftest import Metrics
from drivers import curl_cffi_requests
from poolscope.demo.server import DemoServer
from test_launcher import six_requests_limit_two
from unixserver import UnixSocketServer

pytestmark = pytest.mark.skipif(curl_cffi_requests is None, reason="curl_cffi is not installed")

WAIT = "poolscope.connection.wait_time"


def closes(metrics):
    return {a["poolscope.close.reason"]: p.value
            for a, p in metrics.read().get("poolscope.connection.closed", []) if p.value}


def test_six_requests_two_handles_in_the_report_and_on_the_prometheus_endpoint(server):
    """Issue 21's scenario, with no code change: ``AsyncSession(max_clients=2)``, 6 requests at
    once to a 300 ms endpoint. 4 wait for a handle: 2 for one service time, 2 for two, so at
    least 1.8 s in all; 2 connections created, the ones the server accepted."""
    report = six_requests_limit_two("curl_cffi_session.py", "curl_cffi")
    assert "raise AsyncSession(max_clients=...)" in report


def test_six_requests_two_handles_against_the_applications_own_figures(metrics, server):
    """The same in process: each wait is no longer than what its request took beyond the
    300 ms the server spent on it; the session has both handles back at the end."""
    took = []

    async def run():
        session = curl_cffi_requests.AsyncSession(max_clients=2)

        async def get():
            start = time.monotonic()
            assert (await session.get(server.url + "/delay/0.3")).status_code == 200
            took.append(time.monotonic() - start)
        await asyncio.gather(*(get() for _ in range(6)))
        return session
    session = asyncio.new_event_loop().run_until_complete(run())
    data = metrics.read()
    count, total = metrics.histogram(data, WAIT)
    assert count == 4
    assert 1.8 <= total <= sum(sorted(took)[2:]) - 4 * 0.3
    assert metrics.value(data, "poolscope.connection.created") == server.accepted == 2
    assert metrics.value(data, "poolscope.connection.acquisitions") == server.answered == 6
    assert session.pool.qsize() == 2  # both handles back in the session's queue
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="idle") == 2
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="active") == 0
    assert metrics.value(data, "poolscope.connection.pending_requests") == 0


def _run(coro):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.mark.parametrize("flavor", ["AsyncSession", "Session"])
def test_maxage_expiry(metrics, server, flavor):
    """libcurl closes a connection idle longer than the session's ``MAXAGE_CONN`` and opens
    another."""
    from curl_cffi.const import CurlOpt

    options = {CurlOpt.MAXAGE_CONN: 1}

    async def run():
        async with curl_cffi_requests.AsyncSession(curl_options=options) as s:
            assert (await s.get(server.url + "/")).status_code == 200
            await asyncio.sleep(1.3)
            assert (await s.get(server.url + "/")).status_code == 200
            return closes(metrics)
    if flavor == "AsyncSession":
        closed = _run(run())
    else:
        with curl_cffi_requests.Session(curl_options=options) as s:
            assert s.get(server.url + "/").status_code == 200
            time.sleep(1.3)
            assert s.get(server.url + "/").status_code == 200
            closed = closes(metrics)
    assert closed == {"keepalive_expired": 1}
    assert metrics.value(metrics.read(), "poolscope.connection.created") == server.accepted == 2


def test_a_full_cache_makes_room(metrics, server):
    """``MAXCONNECTS`` 1, two origins: libcurl closes the first origin's idle connection to
    keep the second's."""
    from curl_cffi.const import CurlOpt

    with DemoServer() as other:
        session = curl_cffi_requests.Session(curl_options={CurlOpt.MAXCONNECTS: 1})
        assert session.get(server.url + "/").status_code == 200
        assert session.get(other.url + "/").status_code == 200
        assert closes(metrics) == {"idle_limit": 1}
        data = metrics.read()
        assert metrics.value(data, "poolscope.connection.created") == 2 == \
            server.accepted + other.accepted
        assert metrics.value(data, "http.client.open_connections") == 1
        session.close()
    assert closes(metrics) == {"idle_limit": 1, "pool_closed": 1}


def test_a_full_multi_cache_closes_the_connection_handed_back(metrics, server):
    """A multi with ``MAXCONNECTS`` 1, two transfers at once: the first to end hands its
    connection back to a cache over its limit where it is the only idle one, and libcurl
    closes it (``idle_limit``) while ``perform`` has not yet told the transfer ended; the
    server sees that connection close after its one request."""
    from curl_cffi.aio import AsyncCurl
    from curl_cffi.const import CurlMOpt
    from curl_cffi.curl import ffi, lib

    async def run():
        acurl = AsyncCurl(loop=asyncio.get_running_loop())
        # AsyncCurl.setopt passes MAXCONNECTS as a pointer (curl_cffi 0.13 to 0.17)
        assert lib.curl_multi_setopt(acurl._curlm, CurlMOpt.MAXCONNECTS,
                                     ffi.cast("void *", 1)) == 0
        async with curl_cffi_requests.AsyncSession(async_curl=acurl, max_clients=2) as s:
            answers = await asyncio.gather(s.get(server.url + "/delay/0.2"),
                                           s.get(server.url + "/delay/0.5"))
            assert [a.status_code for a in answers] == [200, 200]
            found = closes(metrics), metrics.read()
        if acurl._curlm is not None:  # curl_cffi 0.17 leaves a multi it was given open
            await acurl.close()
        return found
    closed, data = _run(run())
    assert closed == {"idle_limit": 1}
    assert metrics.value(data, "http.client.open_connections") == 1
    assert metrics.value(data, "poolscope.connection.created") == server.accepted == 2
    server.wait_closed(2)
    assert sorted(server.per_connection) == [1, 1]


def test_forbid_reuse_is_the_sessions_own_limit(metrics, server):
    """``FORBID_REUSE``: libcurl closes each connection as its transfer ends, the server has
    not closed it and did not ask to: ``idle_limit``, the session's choice."""
    from curl_cffi.const import CurlOpt

    with curl_cffi_requests.Session(curl_options={CurlOpt.FORBID_REUSE: 1}) as s:
        assert [s.get(server.url + "/").status_code for _ in range(2)] == [200, 200]
        assert closes(metrics) == {"idle_limit": 2}
    assert server.accepted == 2


@pytest.mark.parametrize("status, headers, kept", [
    ("HTTP/1.1 200 OK", "Connection: close\r\n", False),
    ("HTTP/1.0 200 OK", "", False),
    ("HTTP/1.0 200 OK", "Connection: keep-alive\r\n", True)])
def test_an_answer_that_says_close(metrics, status, headers, kept):
    """The answer tells libcurl to close (``Connection: close``, HTTP/1.0 without keep-alive)
    and the server closes its end only 0.5 s later: libcurl has closed the connection before
    the server did, and it is ``server_closed`` all the same, not a full cache's."""
    listener = socket.create_server(("127.0.0.1", 0))
    answer = ("%s\r\n%sContent-Length: 2\r\n\r\nok" % (status, headers)).encode()
    accepted = []

    def serve():
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.recv(65536)
        conn.sendall(answer)
        time.sleep(0.5)
        conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with curl_cffi_requests.Session() as s:
            assert s.get("http://127.0.0.1:%d/" % listener.getsockname()[1]).status_code == 200
            closed = closes(metrics)
            data = metrics.read()
    finally:
        thread.join(2)
        listener.close()
    assert closed == ({} if kept else {"server_closed": 1})
    assert metrics.value(data, "http.client.open_connections") == (1 if kept else 0)
    assert len(accepted) == 1


def test_an_https_server_closing_an_idle_connection(metrics, tmp_path):
    """The server ends an idle TLS connection with a close alert, then its end of the stream
    (a test certificate made here): libcurl finds it dead at the next request."""
    import ssl

    import trustme

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        for _ in range(2):
            raw, _ = listener.accept()
            accepted.append(raw)
            with context.wrap_socket(raw, server_side=True) as conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                time.sleep(0.2)
                conn.settimeout(0.3)
                try:
                    conn.unwrap()  # the close alert; the client does not answer it
                except OSError:
                    pass
    threading.Thread(target=serve, daemon=True).start()
    url = "https://127.0.0.1:%d/" % listener.getsockname()[1]
    try:
        with curl_cffi_requests.Session(verify=False) as s:
            assert s.get(url).status_code == 200
            time.sleep(0.8)
            assert s.get(url).status_code == 200
            closed = closes(metrics)
    finally:
        listener.close()
    assert closed == {"server_closed": 1}
    assert metrics.value(metrics.read(), "poolscope.connection.created") == len(accepted) == 2


def test_a_cancelled_wait_is_neither_a_wait_nor_a_timeout(metrics, server):
    """One handle, held 0.6 s; a second request the application gives up on after 0.2 s while
    it waits for the handle (curl_cffi has no timeout of its own there)."""
    async def run():
        async with curl_cffi_requests.AsyncSession(max_clients=1) as s:
            held = asyncio.ensure_future(s.get(server.url + "/delay/0.6"))
            await asyncio.sleep(0.1)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(s.get(server.url + "/"), 0.2)
            data = metrics.read()
            assert (await held).status_code == 200
            return data
    data = _run(run())
    assert metrics.histogram(data, WAIT) == (0, 0)
    assert metrics.value(data, "poolscope.connection.timeouts") == 0
    assert metrics.value(data, "poolscope.connection.pending_requests") == 0
    assert server.answered == 1


def _slow_body_server():
    """A server answering one request with half its body, the rest 1 s later."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            time.sleep(1.0)
            conn.sendall(b"cd")
            conn.recv(1)  # until the client closes
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener


def test_a_stream_being_received_holds_its_connection(metrics):
    """A streamed response holds its connection until libcurl has received the whole body
    (curl_cffi queues what arrives whether or not the application reads it)."""
    listener = _slow_body_server()
    url = "http://127.0.0.1:%d/" % listener.getsockname()[1]

    async def run():
        async with curl_cffi_requests.AsyncSession() as s:
            async with s.stream("GET", url) as response:
                await asyncio.sleep(0.5)
                during = metrics.read()
                body = b"".join([chunk async for chunk in response.aiter_content()])
            return during, body
    try:
        during, body = _run(run())
    finally:
        listener.close()
    assert body == b"abcd"
    assert metrics.value(during, "http.client.open_connections",
                         http__connection__state="active") == 1
    assert 0.4 <= metrics.value(during, "poolscope.connection.oldest_active_age") <= 0.9
    assert metrics.value(metrics.read(), "poolscope.connection.oldest_active_age") == 0


async def _handles_back(session, count):
    """Wait (2 s at most) until ``count`` of the session's handles are in its queue: from
    curl_cffi 0.15 a WebSocket's handle comes back as the WebSocket's tasks end."""
    for _ in range(200):
        if session.pool.qsize() >= count:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("closer", ["client", "server"])
def test_a_websocket_holds_a_sessions_handle_but_is_no_leak(metrics, closer):
    """An ``AsyncSession``'s ``ws_connect`` performs the handshake on one of the session's
    handles and holds it, with its connection, until the WebSocket closes: with
    ``max_clients=1`` the session's pool has that connection active (saturated), yet neither
    ``oldest_active_age`` nor the report takes it for a leak, and its close, by either side,
    is ``upgraded``. A request meanwhile waits for the handle, or, from curl_cffi 0.15, is
    refused at once ("held by live WebSockets"): no wait then."""
    from poolscope import report
    from poolscope._instrument import current_recorder
    from wsserver import WebSocketServer

    held = 0.4

    async def run(url):
        async with curl_cffi_requests.AsyncSession(max_clients=1) as s:
            ws = await s.ws_connect(url.replace("http", "ws", 1) + "/ws")
            await ws.send_str("hi")
            assert await ws.recv_str() == "hi"
            refuses = hasattr(s, "_websockets")
            meanwhile = asyncio.ensure_future(s.get(url + "/"))
            await asyncio.sleep(held)
            data = metrics.read()
            text = report.render(metrics.reader.get_metrics_data(), current_recorder().scopes(),
                                 leak_after=held / 2)
            assert metrics.value(data, "http.client.open_connections",
                                 http__connection__state="active") == 1
            assert metrics.value(data, "poolscope.connection.max") == 1
            assert metrics.value(data, "poolscope.pool.count") == 1
            assert metrics.value(data, "poolscope.connection.oldest_active_age") == 0
            assert "has been held" not in text, text
            assert metrics.value(data, "poolscope.connection.pending_requests") == (not refuses)
            if closer == "client":
                await ws.close()
            else:
                await ws.send_str("bye")
                with pytest.raises(Exception):
                    await ws.recv_str()
            if refuses:
                with pytest.raises(Exception, match="held by live WebSockets"):
                    await meanwhile
                await _handles_back(s, 1)
                assert (await s.get(url + "/")).status_code == 200
            else:
                assert (await meanwhile).status_code == 200
            return refuses
    with WebSocketServer() as server:
        refuses = _run(run(server.url))
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.created") == len(server.peers) == 2
    assert closes(metrics) == {"upgraded": 1, "pool_closed": 1}
    assert metrics.value(data, "poolscope.connection.oldest_active_age") == 0
    assert {a["url.scheme"] for a, _ in data["poolscope.connection.created"]} == {"http"}
    assert metrics.histogram(data, WAIT)[0] == (not refuses)
    assert metrics.value(data, "poolscope.connection.waits") in ((None, 0) if refuses else (1,))


def test_websockets_and_requests_at_once_on_one_session(metrics):
    """Two tasks open and close 10 WebSockets each while four send requests, on one
    ``AsyncSession``: each handshake runs on a worker thread, the requests on the event loop,
    both in the session's pool. Every figure is the server's and the application's: the
    connections the server saw, one acquisition per request and per WebSocket, 20 closes
    ``upgraded``, nothing active at the end."""
    from wsserver import WebSocketServer

    async def run(url):
        async with curl_cffi_requests.AsyncSession(max_clients=6) as s:
            done = []

            async def requests():
                count = 0
                while not done:
                    assert (await s.get(url + "/")).status_code == 200
                    count += 1
                return count

            async def websockets():
                for _ in range(10):
                    ws = await s.ws_connect(url.replace("http", "ws", 1) + "/ws")
                    await ws.close()
            senders = [asyncio.ensure_future(requests()) for _ in range(4)]
            await asyncio.gather(websockets(), websockets())
            done.append(True)
            sent = sum(await asyncio.gather(*senders))
            await _handles_back(s, s.max_clients)
            return sent, metrics.read()
    with WebSocketServer() as server:
        sent, data = _run(run(server.url))
    assert metrics.value(data, "poolscope.connection.created") == len(server.peers)
    assert metrics.value(data, "poolscope.connection.acquisitions") == sent + 20
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="active") == 0
    assert metrics.value(data, "poolscope.connection.closed",
                         poolscope__close__reason="upgraded") == 20


@pytest.mark.parametrize("closer", ["client", "server"])
def test_a_sync_websocket_is_no_leak_and_closes_as_upgraded(metrics, closer):
    """A ``Session``'s ``ws_connect`` performs the handshake on a copy of the session's
    handle, its own pool: its connection is active while the WebSocket lasts, not in
    ``oldest_active_age``, and closes as ``upgraded``; the session's own connection, reused,
    stays idle in the other. An upgrade the server refuses fails the request: an ``error``
    close."""
    from wsserver import WebSocketServer

    with WebSocketServer() as server, curl_cffi_requests.Session() as s:
        assert s.get(server.url + "/").status_code == 200
        ws = s.ws_connect(server.url.replace("http", "ws", 1) + "/ws")
        ws.send_str("hi")
        assert ws.recv_str() == "hi"
        time.sleep(0.2)
        data = metrics.read()
        assert metrics.value(data, "http.client.open_connections",
                             http__connection__state="active") == 1
        assert metrics.value(data, "http.client.open_connections",
                             http__connection__state="idle") == 1
        assert metrics.value(data, "poolscope.connection.oldest_active_age") == 0
        if closer == "client":
            ws.close()
        else:
            ws.send_str("bye")
            ws.recv()  # the server's close frame: curl_cffi closes the WebSocket
        assert s.get(server.url + "/").status_code == 200
        assert metrics.value(metrics.read(), "http.client.open_connections",
                             http__connection__state="active") == 0
        peers = len(server.peers)
        with pytest.raises(Exception, match="Refused WebSockets? upgrade"):
            s.ws_connect(server.url.replace("http", "ws", 1) + "/")
        assert len(server.peers) == peers + 1
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.created") == len(server.peers) == 3
    assert closes(metrics) == {"upgraded": 1, "error": 1, "pool_closed": 1}
    assert metrics.value(data, "poolscope.connection.acquisitions", connection__reused=True) \
        is None


def test_sessions_over_a_unix_socket(metrics, tmp_path):
    """libcurl names a connection over a Unix socket by the socket's path alone: 3 requests at
    once through an ``AsyncSession``, twice, make 3 connections, each reused once, as the
    server saw them, and one more the server closes closes the one it went on; then a
    ``Session``, 3 requests on its own connection."""
    from curl_cffi.const import CurlOpt

    with UnixSocketServer(tmp_path / "s.sock") as server:
        options = {CurlOpt.UNIX_SOCKET_PATH: server.path.encode()}

        async def at_once():
            async with curl_cffi_requests.AsyncSession(max_clients=3,
                                                       curl_options=options) as session:
                for _ in range(2):
                    answers = await asyncio.gather(*(session.get("http://localhost/delay/0.2")
                                                     for _ in range(3)))
                    assert [a.status_code for a in answers] == [200] * 3
                data = metrics.read()
                assert metrics.served(data) == (3, 3, 3) and server.accepted == 3
                assert metrics.value(data, "http.client.open_connections",
                                     http__connection__state="idle") == 3
                # one the server closes, on one of them: the one closed has served 3
                assert (await session.get("http://localhost/close")).status_code == 200
                assert closes(metrics) == {"server_closed": 1}
                [(_, point)] = metrics.read()["poolscope.connection.requests"]
                assert (point.count, point.sum) == (1, 3)
        _run(at_once())
        with curl_cffi_requests.Session(curl_options=options) as session:
            assert [session.get("http://localhost/").status_code for _ in range(3)] == [200] * 3
        server.wait_closed(4)
    data = metrics.read()
    assert metrics.served(data) == (4, 4, 6) and server.accepted == 4
    assert sorted(server.per_connection) == [2, 2, 3, 3]
    assert closes(metrics) == {"server_closed": 1, "pool_closed": 3}
    [(_, point)] = data["poolscope.connection.requests"]
    assert (point.count, point.sum) == (4, 10)


def test_a_sync_session_per_thread(metrics, server):
    """A ``Session`` gives each thread a curl handle of its own, with its own connection
    cache: two threads, two pools, a connection each, reused. A thread's handle goes with the
    thread, and its pool with it."""
    session = curl_cffi_requests.Session()
    done, leave = threading.Barrier(3), threading.Event()

    def get():
        for _ in range(3):
            assert session.get(server.url + "/").status_code == 200
        done.wait()
        leave.wait()
    threads = [threading.Thread(target=get) for _ in range(2)]
    for t in threads:
        t.start()
    done.wait()
    data = metrics.read()
    leave.set()
    for t in threads:
        t.join()
    assert metrics.value(data, "poolscope.connection.created") == server.accepted == 2
    assert metrics.value(data, "poolscope.connection.acquisitions",
                         poolscope__connection__reused=True) == 4
    assert metrics.value(data, "poolscope.pool.count") == 2
    assert metrics.value(data, "http.client.open_connections",
                         http__connection__state="idle") == 2
    gc.collect()
    data = metrics.read()
    assert metrics.value(data, "poolscope.pool.count") == 0
    assert metrics.value(data, "poolscope.connection.closed",
                         poolscope__close__reason="pool_closed") == 2
    session.close()


def test_a_dropped_handle_or_session_is_freed_at_once(metrics, server):
    """No reference cycle through poolscope: with no garbage collection, a ``Curl`` that made
    a request is freed when dropped, and the server sees its connection close then, as
    without poolscope; an ``AsyncSession`` left unclosed is freed with its handle, and its
    connection stays open in its multi, which curl_cffi keeps running until it is closed."""
    from curl_cffi import Curl, CurlOpt

    async def session_dropped():
        session = curl_cffi_requests.AsyncSession()
        assert (await session.get(server.url + "/")).status_code == 200
        handle = session.pool.get_nowait()
        session.pool.put_nowait(handle)
        gone = weakref.ref(session), weakref.ref(handle), session.acurl
        del session, handle
        return gone

    gc.collect()
    gc.disable()
    try:
        curl = Curl()
        curl.setopt(CurlOpt.URL, (server.url + "/").encode())
        curl.setopt(CurlOpt.WRITEFUNCTION, len)
        curl.perform()
        gone = weakref.ref(curl)
        del curl
        assert gone() is None
        deadline = time.monotonic() + 5
        while not server.per_connection and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(server.per_connection) == 1
        loop = asyncio.new_event_loop()
        session, handle, multi = loop.run_until_complete(session_dropped())
        assert session() is None and handle() is None
    finally:
        gc.enable()
    assert server.accepted == 2
    assert closes(metrics) == {"pool_closed": 1}
    assert metrics.value(metrics.read(), "http.client.open_connections",
                         http__connection__state="idle") == 1 == 2 - len(server.per_connection)
    loop.run_until_complete(multi.close())
    loop.close()
    server.wait_closed(2)
    assert len(server.per_connection) == 2
    assert closes(metrics) == {"pool_closed": 2}


def test_sessions_sharing_a_multi_are_one_pool(metrics, server):
    """Two sessions given one ``AsyncCurl`` (``async_curl=``) share its connection cache: one
    pool, its limit their handles together (1 + 2). Three requests at once on each: the first
    session's wait for its one handle twice, the second's once. A session that does not own
    the multi takes its handles out as it closes (curl_cffi 0.17; 0.13 closes the multi); the
    connections, the ones the server accepted, close with the multi."""
    from curl_cffi.aio import AsyncCurl

    async def run():
        multi = AsyncCurl()
        one = curl_cffi_requests.AsyncSession(async_curl=multi, max_clients=1)
        two = curl_cffi_requests.AsyncSession(async_curl=multi, max_clients=2)
        answers = await asyncio.gather(*(session.get(server.url + "/delay/0.2")
                                         for session in (one, one, one, two, two, two)))
        assert [answer.status_code for answer in answers] == [200] * 6
        during = metrics.read()
        await one.close()
        after_one = metrics.read()
        owned = getattr(one, "_owns_acurl", True)
        if not owned:  # else the multi is closed already, and closing it again fails
            await two.close()
            await multi.close()
        return during, after_one, owned
    during, after_one, owned = _run(run())
    assert metrics.value(during, "poolscope.pool.count") == 1
    assert metrics.value(during, "poolscope.connection.max") == 3
    assert metrics.value(during, "poolscope.connection.waits",
                         poolscope__wait__outcome="granted") == 3
    assert metrics.value(during, "poolscope.connection.acquisitions") == server.answered == 6
    created = metrics.value(during, "poolscope.connection.created")
    assert created == server.accepted and 1 <= created <= 3
    if not owned:  # the multi is still open, with the second session's 2 handles
        assert metrics.value(after_one, "poolscope.connection.max") == 2
        assert metrics.value(after_one, "http.client.open_connections",
                             http__connection__state="idle") == created
    server.wait_closed(created)
    assert len(server.per_connection) == created
    assert closes(metrics) == {"pool_closed": created}


def test_a_session_dropped_unclosed_takes_its_handles_out_of_its_multis_limit(metrics, server):
    """A session sharing a multi and dropped without ``close()`` is freed; its handle leaves
    the multi's limit as it goes, while the multi keeps the connections open, as the server
    sees, until it closes."""
    from curl_cffi.aio import AsyncCurl

    async def run():
        multi = AsyncCurl()
        kept = curl_cffi_requests.AsyncSession(async_curl=multi, max_clients=2)
        dropped = curl_cffi_requests.AsyncSession(async_curl=multi, max_clients=1)
        for session in (kept, dropped):
            assert (await session.get(server.url + "/")).status_code == 200
        before = metrics.read()
        gone = weakref.ref(dropped)
        del dropped, session
        gc.collect()
        assert gone() is None
        after = metrics.read()
        closed_at_drop = len(server.per_connection)
        owned = getattr(kept, "_owns_acurl", True)
        await kept.close()  # curl_cffi 0.13 closes the multi it was given, 0.17 does not
        if not owned:
            await multi.close()
        return before, after, closed_at_drop
    before, after, closed_at_drop = _run(run())
    assert metrics.value(before, "poolscope.connection.max") == 3
    assert metrics.value(after, "poolscope.connection.max") == 2
    assert metrics.value(after, "poolscope.pool.count") == 1
    assert closed_at_drop == 0
    created = metrics.value(after, "poolscope.connection.created")
    assert created == server.accepted
    assert metrics.value(after, "http.client.open_connections",
                         http__connection__state="idle") == created
    server.wait_closed(created)
    assert closes(metrics) == {"pool_closed": created} and len(server.per_connection) == created


def test_a_version_outside_the_range_is_one_line(monkeypatch, caplog):
    from curl_cffi import aio

    from poolscope import _package

    monkeypatch.setitem(_package.SUPPORTED, "curl_cffi",
                        {**_package.SUPPORTED["curl_cffi"], "minimum": "9"})
    before = dict(vars(aio.AsyncCurl))
    with caplog.at_level(logging.WARNING, logger="poolscope"):
        poolscope.instrument(meter_provider=Metrics().provider)
        try:
            patched = dict(vars(aio.AsyncCurl)) != before
        finally:
            poolscope.uninstrument()
    lines = [r.getMessage() for r in caplog.records if r.name == "poolscope"]
    assert len(lines) == 1 and "curl_cffi" in lines[0] and "not supported" in lines[0], lines
    assert not patched


def test_requests_sharing_http2_connections(metrics):
    """An ``AsyncSession`` sends 4 requests at once, twice, over HTTP/2. libcurl opens what
    connections it decides and puts several streams on one (the server's books say which
    connection served each request): each connection the server accepted is created and
    acquired new once, every other request is a reuse; mid-round, the connections active are
    the ones serving that round, and all are idle after."""
    pytest.importorskip("h2")
    from h2server import H2Server

    lib = {"poolscope__library": "curl_cffi"}
    with H2Server(max_streams=100, delay=0.3) as server:
        async def rounds():
            session, active = curl_cffi_requests.AsyncSession(max_clients=10, verify=False), []
            for _ in range(2):
                sent = [asyncio.ensure_future(session.get(server.url + "/slow")) for _ in range(4)]
                await asyncio.sleep(0.15)
                active.append(metrics.value(metrics.read(), "http.client.open_connections",
                                            http__connection__state="active", **lib))
                answers = await asyncio.gather(*sent)
                assert [(r.status_code, r.http_version) for r in answers] == [(200, 3)] * 4
            data = metrics.read()
            await session.close()
            return active, data

        active, data = _run(rounds())

        def value(name, **attrs):
            return metrics.value(data, name, **lib, **attrs)
        context = (active, server.served_on)
        assert value("poolscope.connection.created") == server.accepted, context
        assert value("poolscope.connection.acquisitions",
                     poolscope__connection__reused=False) == server.accepted, context
        assert value("poolscope.connection.acquisitions",
                     poolscope__connection__reused=True) == 8 - server.accepted, context
        assert active == [len(set(server.served_on[:4])), len(set(server.served_on[4:]))], context
        assert value("http.client.open_connections", http__connection__state="idle",
                     network__protocol__version="2") == server.accepted, context
        assert value("http.client.open_connections", http__connection__state="active") == 0
        assert value("poolscope.connection.closed") is None
        assert closes(metrics) == {"pool_closed": server.accepted}, context

"""httpx, through httpcore's ``ConnectionPool`` and ``AsyncConnectionPool`` (httpcore 1.0.3+),
and httpx2 (the fork the openai and anthropic SDKs use) through httpcore2's (2.0+).

One implementation serves all four: the hooks are plain functions, applied to the ``_sync``
and ``_async`` classes of ``httpcore`` or ``httpcore2`` by name. What differs between the two
is data (:class:`Httpx2Adapter`). A healthy request passes through one poolscope function
and one observed list, both where httpcore already keeps its books under its pool's lock:

- ``PoolRequest.assign_to_connection``: the acquisition. httpcore may hand one idle HTTP/1.1
  connection to several queued requests; all but one then raise ``ConnectionNotAvailable``
  and ``clear_connection`` undoes their acquisition, and their wait goes on.
- The pool's request list (``_requests``), which takes an observed subclass: ``remove`` is
  the release, when the response is closed or the request failed. A connection that closed
  with its response (``Connection: close``, a failed or abandoned read) is counted closed
  there.
- Wait: the ``Event`` a ``PoolRequest`` waits on, whose ``wait`` httpcore calls only when the
  request has no connection. It ends in ``PoolTimeout``, cancellation, or once the request
  holds a connection it keeps (at its release).

HTTP/2: httpcore hands any number of requests to one HTTP/2 connection, where each then takes
a stream from the connection's semaphore (``_max_streams_semaphore``), sized by the server's
``SETTINGS_MAX_CONCURRENT_STREAMS``. That semaphore takes an observed subclass whose ``acquire``
counts a wait only when no stream is free. Active streams and the stream limit are read from
the connection (its ``_events`` and ``_max_streams``) when metrics are collected.

Through a proxy the pool's connection is the proxy's (forward, tunnel or SOCKS5). Its set-up
begins with its connection to the proxy (the inner ``HTTPConnection``'s ``_connect``, a SOCKS
connection's ``connect_tcp``) and ends once requests can go out on it: a forward proxy's when
connected, a tunnel's and a SOCKS connection's at their last set-up step, which httpcore marks
with the ``Trace`` of its proxy modules (only set-up steps use it there); one that fails ends
as its request leaves the pool with the exception. httpx-socks' connections set up in their
own ``_connect_via_proxy``, timed whole. A connect httpcore tries again (its transport's
``retries``) starts over after each ``retry`` step: the set-up is the attempt that connected.

Pool-initiated closes pass through ``HTTPConnection.close``, where the reason is read from the
connection as ``_assign_requests_to_connections`` judged it: past ``_expire_at`` is
``keepalive_expired``, an idle socket the server closed is ``server_closed``, the rest are idle
connections the pool had no room for (``idle_limit``). A connection still in use when the pool
closes it (a race in httpcore 1.0.9, encode/httpcore#1110) fails its request: ``error``.
httpcore2 2.17 and later check an idle connection as a request takes it instead: one the
server closed is closed there, the request clears it and waits on, and the pool drops it
without closing it again; it is counted ``server_closed`` where the request clears it.

httpcore2 2.6 and later drop, without closing it, a connection whose request was cancelled
before it connected (httpcore keeps it, and its slot, for good: encode/httpcore#1093); such a
connection is let go with its request.
"""

import functools
import importlib
import inspect
import sys
import threading
import time
import weakref

from .. import _semconv as sc
from .._config import internal_error
from .._recorder import CANCELLED, TIMED_OUT
from .._spans import recording_span
from ._base import (Adapter, arg, disconnected, http_scheme, phase_ended, phases_begin,
                    phases_end)


_LINKING = threading.Lock()


def _flavors(root):
    """The sync and async classes of ``root`` (``httpcore`` or ``httpcore2``), by name."""
    return (
        {"package": f"{root}._sync", "pool": "ConnectionPool", "request": "PoolRequest",
         "event": "Event", "semaphore": "Semaphore", "connection": "HTTPConnection",
         "close": "close", "interface": "ConnectionInterface",
         "handle": "handle_request", "upgrade": "HTTP11UpgradeStream",
         "proxies": (("http_proxy", "HTTPProxy", ("ForwardHTTPConnection", "TunnelHTTPConnection")),
                     ("socks_proxy", "SOCKSProxy", ("Socks5Connection",))),
         "forward": "ForwardHTTPConnection"},
        {"package": f"{root}._async", "pool": "AsyncConnectionPool", "request": "AsyncPoolRequest",
         "event": "AsyncEvent", "semaphore": "AsyncSemaphore",
         "connection": "AsyncHTTPConnection", "close": "aclose",
         "interface": "AsyncConnectionInterface",
         "handle": "handle_async_request", "upgrade": "AsyncHTTP11UpgradeStream",
         "proxies": (("http_proxy", "AsyncHTTPProxy",
                      ("AsyncForwardHTTPConnection", "AsyncTunnelHTTPConnection")),
                     ("socks_proxy", "AsyncSOCKSProxy", ("AsyncSocks5Connection",))),
         "forward": "AsyncForwardHTTPConnection"},
    )


def _limit(value):
    return None if value is None or value >= sys.maxsize else value


def _protocol(conn):
    """The HTTP/1.1 or HTTP/2 connection object under an httpcore connection (or proxy one)."""
    inner = getattr(conn, "_connection", None)
    while inner is not None and not hasattr(inner, "_expire_at"):
        inner = getattr(inner, "_connection", None)
    return inner


# the set-up of httpx-socks' connections (SOCKS4/5 or an HTTP tunnel, through python-socks,
# then TLS with the target): from its first step towards the proxy, ending with the stream its
# requests go out on
_OWN_SET_UP = "_connect_via_proxy"

# httpcore's HTTPConnectionState of an HTTP/1.1 or HTTP/2 connection (``_state``): an IntEnum
_NEW, _ACTIVE, _CLOSED = 0, 1, 3


def _pool_close_reason(conn):
    inner = _protocol(conn)
    if inner is None or getattr(inner, "_state", None) == _ACTIVE:
        return sc.ERROR  # an exchange on it is cut off (httpcore#1110)
    expire_at = inner._expire_at
    if expire_at is not None and time.monotonic() > expire_at:
        return sc.KEEPALIVE_EXPIRED
    if inner.has_expired():
        return sc.SERVER_CLOSED
    return sc.IDLE_LIMIT


def _served(conn):
    """The requests a connection served, by httpcore's count: it hands an idle HTTP/1.1
    connection to every queued request, and those that find it closed by the one that took it
    served none."""
    return getattr(_protocol(conn), "_request_count", None)


def _their_state(conn):
    """h11's state of the server's side of an HTTP/1.1 connection, or None (HTTP/2)."""
    h11_state = getattr(_protocol(conn), "_h11_state", None)
    return None if h11_state is None else getattr(h11_state.their_state, "__name__", "")


def _self_close_reason(conn):
    """Why a connection closed along with its response: the server said so, or the exchange broke."""
    their = _their_state(conn)
    return sc.SERVER_CLOSED if their in (None, "MUST_CLOSE", "CLOSED") else sc.ERROR


class _Requests(list):
    """A pool's list of requests in flight: ``remove`` is a request leaving the pool."""

    __slots__ = ("_poolscope",)

    def append(self, pool_request):
        list.append(self, pool_request)
        span = recording_span()  # a request joins in its own thread; another may assign it
        if span is not None:
            pool_request._poolscope_span = span

    def remove(self, pool_request):
        list.remove(self, pool_request)
        if pool_request.connection is not None or "_poolscope_wait" in pool_request.__dict__:
            try:
                self._poolscope.left(pool_request)
            except Exception:
                internal_error("httpx:ConnectionPool._requests")


def _observed_assign(assign_to_connection, adapter):
    """``PoolRequest.assign_to_connection``, observed: the acquisition (under the pool's lock),
    in the one frame a request passes through here."""
    recorder = adapter.recorder

    @functools.wraps(assign_to_connection)
    def observed(pool_request, connection):
        rec = connection.__dict__.get("_poolscope") if connection is not None else None
        if rec is not None:
            try:
                found = pool_request.__dict__
                span = found.get("_poolscope_span")
                recorder.acquired(rec, found.get("_poolscope_wait"), span=span, link=False)
                if span is not None and not adapter._linking:
                    adapter._link_when_sent()
            except Exception:
                internal_error("httpx:PoolRequest.assign_to_connection")
        return assign_to_connection(pool_request, connection)
    return observed


def _observed_clear(clear_connection, adapter):
    """``PoolRequest.clear_connection``, observed: the request found the connection it was
    given taken by another request, or closed (``ConnectionNotAvailable``), and waits on, on a
    new ``Event``, which is given its wait here (a wait found again costs no look-up of the
    request's frame)."""

    @functools.wraps(clear_connection)
    def observed(pool_request):
        try:
            adapter.cleared(pool_request)
        except Exception:
            internal_error("httpx:PoolRequest.clear_connection")
        clear_connection(pool_request)
        found = pool_request.__dict__
        wait = found.get("_poolscope_wait")
        if wait is not None:
            event = found.get("_connection_acquired")
            if isinstance(event, adapter._events):
                event._poolscope_wait = wait
    return observed


def _observed_event(base, adapter):
    """A subclass of httpcore's ``Event`` (or ``AsyncEvent``) whose ``wait``, called by
    ``PoolRequest.wait_for_connection`` only when the request has no connection, is a wait."""
    if inspect.iscoroutinefunction(base.wait):
        async def wait(self, timeout=None):
            waiting = adapter.waiting(self, sys._getframe(1))
            try:
                result = await base.wait(self, timeout)
            except BaseException as exc:
                adapter.wait_failed(waiting, exc)
                raise
            adapter.wait_granted(waiting)
            return result
    else:
        def wait(self, timeout=None):
            waiting = adapter.waiting(self, sys._getframe(1))
            try:
                result = base.wait(self, timeout)
            except BaseException as exc:
                adapter.wait_failed(waiting, exc)
                raise
            adapter.wait_granted(waiting)
            return result
    return type(base.__name__, (base,), {"wait": wait, "__module__": base.__module__,
                                         "_poolscope_wait": None})


def _observed_semaphore(base, adapter):
    """A subclass of httpcore's ``Semaphore`` (or ``AsyncSemaphore``), the streams of an HTTP/2
    connection, whose ``acquire`` is a wait when no stream is free."""
    if inspect.iscoroutinefunction(base.acquire):
        async def acquire(self):
            try:
                if not self._backend:
                    self.setup()
                free = (getattr(self, "_anyio_semaphore", None)
                        or getattr(self, "_trio_semaphore", None))
                busy = free is not None and free.value == 0  # and stays so until it is awaited
            except Exception:
                internal_error("httpx:HTTP/2 stream")
                busy = False
            if not busy:
                return await base.acquire(self)
            waiting = adapter.stream_waiting(sys._getframe(1))
            try:
                await base.acquire(self)
            except BaseException as exc:
                adapter.wait_failed(waiting, exc)
                raise
            adapter.stream_granted(waiting)
    else:
        def acquire(self):
            try:
                if self._semaphore.acquire(False):
                    return
            except Exception:
                internal_error("httpx:HTTP/2 stream")
            waiting = adapter.stream_waiting(sys._getframe(1))
            try:
                base.acquire(self)
            except BaseException as exc:
                adapter.wait_failed(waiting, exc)
                raise
            adapter.stream_granted(waiting)
    return type(base.__name__, (base,), {"acquire": acquire, "__module__": base.__module__})


_TRACED_PHASES = {"connect_tcp": sc.CONNECT, "connect_unix_socket": sc.CONNECT, "start_tls": sc.TLS}


def _stepped_trace(base, step, where):
    """httpcore's ``Trace`` (``base``), calling ``step(trace, frame, exc_type)`` as each step
    begins (``exc_type`` ``True``) and ends (None, or the exception's type); ``frame`` runs
    the step. Its failures are poolscope's (``where``)."""
    def guarded(trace, exc_type):
        try:
            step(trace, sys._getframe(2), exc_type)
        except Exception:
            internal_error(where)

    class Trace(base):
        def __enter__(self):
            guarded(self, True)
            return super().__enter__()

        def __exit__(self, exc_type=None, exc_value=None, traceback=None):
            guarded(self, exc_type)
            return super().__exit__(exc_type, exc_value, traceback)

        async def __aenter__(self):
            guarded(self, True)
            return await super().__aenter__()

        async def __aexit__(self, exc_type=None, exc_value=None, traceback=None):
            guarded(self, exc_type)
            return await super().__aexit__(exc_type, exc_value, traceback)
    Trace.__module__ = base.__module__
    return Trace


def _proxy_step(adapter):
    """In httpcore's proxy modules, ``Trace`` is only around the steps of a proxied
    connection's set-up: a SOCKS connection's begins with its ``connect_tcp``; a tunnel's, and
    a SOCKS connection's, ends with its last step (the TLS handshake with the target; for plain
    HTTP through SOCKS, the SOCKS handshake). The connection is the ``self`` of the method
    running the step."""
    def step(trace, frame, exc_type):
        proxied = frame.f_locals.get("self")
        if exc_type not in (True, None) or "_poolscope" not in getattr(proxied, "__dict__", {}):
            return
        if exc_type is True:
            if trace.name == "connect_tcp":
                adapter.proxied_begins(proxied)
        elif trace.name == "start_tls" or (trace.name == "setup_socks5_connection"
                                           and proxied._remote_origin.scheme != b"https"):
            adapter.proxied_through(proxied, trace.return_value)
    return step


def _http2(conn, stream):
    """Whether httpcore makes ``conn`` (set up on ``stream``) an HTTP/2 connection, as it
    decides it: the TLS handshake's ALPN, or HTTP/2 alone allowed."""
    ssl_object = stream.get_extra_info("ssl_object")
    return ((ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2")
            or (conn._http2 and not conn._http1))


def _stream_counts(conn):
    """A function giving the (active streams, stream limit) of ``conn``'s HTTP/2 connection."""
    ref = weakref.ref(conn)

    def streams():
        inner = _protocol(ref())
        return len(getattr(inner, "_events", ())), getattr(inner, "_max_streams", 0)
    return streams


class HttpxAdapter(Adapter):
    library = "httpx"
    root = "httpcore"  # the package whose pools are patched

    def patch(self):
        core = importlib.import_module(self.root)
        self._pool_timeout = core.PoolTimeout
        self._remote_protocol_error = core.RemoteProtocolError
        connection = importlib.import_module(self.root + "._sync.connection").HTTPConnection
        # httpcore2 2.6+ (which added is_connected) drops an unconnected, unclaimed connection
        self._drops_unclaimed = hasattr(connection, "is_connected")
        self._connections, self._linking, self._by_url, self._events = [], False, {}, []
        self._forwards = ()
        for flavor in _flavors(self.root):
            self._patch_flavor(flavor)
        self._events = tuple(self._events)

    def _patch_flavor(self, f):
        package = f["package"]
        pools = importlib.import_module(package + ".connection_pool")
        pool_cls = getattr(pools, f["pool"])
        pool_classes = [pool_cls]
        connection = importlib.import_module(package + ".connection")
        conn_classes = [getattr(connection, f["connection"])]
        for module_name, proxy, connections in f["proxies"]:
            try:
                module = importlib.import_module(f"{package}.{module_name}")
            except ImportError:  # socksio not installed
                continue
            pool_classes.append(getattr(module, proxy))
            conn_classes.extend(getattr(module, name) for name in connections)
            self._forwards += tuple(getattr(module, name) for name in connections
                                    if name == f["forward"])
            self.replace(module, "Trace", _stepped_trace(module.Trace, _proxy_step(self),
                                                         "httpx:proxied set-up"))

        self.wrap(pool_cls, "__init__", after=self._pool_init)
        self.wrap(pool_cls, f["close"], before=self._pool_close)
        request_cls = getattr(pools, f["request"])
        self.replace(request_cls, "assign_to_connection",
                     _observed_assign(request_cls.assign_to_connection, self))
        self.replace(request_cls, "clear_connection",
                     _observed_clear(request_cls.clear_connection, self))
        event = _observed_event(getattr(pools, f["event"]), self)
        self.replace(pools, f["event"], event)
        self._events.append(event)
        try:
            http2 = importlib.import_module(package + ".http2")
        except ImportError:  # h2 not installed: no HTTP/2
            pass
        else:
            self.replace(http2, f["semaphore"],
                         _observed_semaphore(getattr(http2, f["semaphore"]), self))
        for cls in pool_classes:
            if "create_connection" in vars(cls):
                self.wrap(cls, "create_connection", before=self._origin_arg, after=self._created)
        for cls in conn_classes:
            self.wrap(cls, f["close"], before=self._conn_close)
        # pools that make connections of their own (httpx-socks'), and those connections
        self.observe_subclasses(pool_cls, {"create_connection": (self._origin_arg, self._created)})
        interface = getattr(importlib.import_module(package + ".interfaces"), f["interface"])
        self.observe_subclasses(interface, {f["close"]: (self._conn_close, None),
                                            _OWN_SET_UP: (self._connect_start, self._connected)})
        self.wrap(conn_classes[0], "_connect", before=self._connect_start, after=self._connected)
        self.replace(connection, "Trace", _stepped_trace(connection.Trace, self._set_up_step,
                                                         "httpx:set-up phase"))
        self._connections.append((conn_classes[0], f["handle"]))
        upgrade = getattr(importlib.import_module(package + ".http11"), f["upgrade"], None)
        if upgrade is not None:  # httpcore 1.0.4+, httpcore2
            self.wrap(upgrade, "__init__", before=self._upgrading)

    def _upgrading(self, stream, args, kwargs):
        """A ``101 Switching Protocols`` response (a WebSocket, httpx-ws') takes its connection
        out of HTTP: marked so that it is no leak while the WebSocket holds it. (A tunnel's
        ``CONNECT`` makes such a stream too, on a connection of its own.)"""
        frame = sys._getframe(2)  # the HTTP/1.1 connection's handle_request
        if frame.f_locals.get("status") != 101:
            return
        inner = frame.f_locals.get("self")
        for _ in range(4):  # up to the pool's connection (a hook's frame between, or not)
            frame = frame.f_back
            owner = getattr(frame, "f_locals", {}).get("self")
            rec = getattr(owner, "__dict__", {}).get("_poolscope")
            if rec is not None and _protocol(owner) is inner:
                self.recorder.upgraded(rec)
                return

    def _link_when_sent(self):
        """Once a traced request is seen: a request's span links its connection's set-up when
        the connection takes the request. httpcore may hand one connection to several requests
        (see ``_observed_assign``), so only the one whose request goes out on it is known to be
        served by it; untraced, a request pays nothing for this."""
        with _LINKING:
            if not self._linking:
                self._linking = True
                for cls, handle in self._connections:
                    self.wrap(cls, handle, after=self._sent)

    def _sent(self, token, conn, response, exc):
        span = recording_span()
        rec = conn.__dict__.get("_poolscope")
        if exc is None and span is not None and rec is not None:
            self.recorder.link(span, rec)

    def unpatch(self):
        super().unpatch()
        for pool_obj in self.recorder.pool_objects(self.library):
            if type(getattr(pool_obj, "_requests", None)) is _Requests:
                pool_obj._requests = list(pool_obj._requests)

    def limits(self, pool_obj):
        return {"max_connections": _limit(pool_obj._max_connections),
                "max_idle": _limit(pool_obj._max_keepalive_connections),
                "serialized": hasattr(pool_obj, "_optional_thread_lock")}

    def registered(self, pool_obj, state):
        requests = getattr(pool_obj, "_requests", None)
        if type(requests) is list:
            observed = pool_obj._requests = _Requests(requests)
            observed._poolscope = self

    def _series(self, origin):
        return self.recorder.series(self.library, (http_scheme(origin.scheme.decode("ascii")),
                                                   origin.host.decode("ascii"), origin.port))

    def _url_series(self, url):
        """The series of a request's URL. httpcore builds a new ``Origin`` each time it is
        asked for one, which costs a waiting request more than the rest of its wait's
        bookkeeping, so the series is kept by the URL's own parts (at most as many entries as
        the origins poolscope reports)."""
        key = (url.scheme, url.host, url.port)
        found = self._by_url.get(key)
        if found is None:
            found = self._series(url.origin)
            if len(self._by_url) < self.recorder.max_origins:
                self._by_url[key] = found
        return found

    def own_lock(self, pool_obj):
        return getattr(pool_obj, "_optional_thread_lock", None)

    # -- pool -------------------------------------------------------------

    def _pool_close(self, pool_obj, args, kwargs):
        state = getattr(pool_obj, "_poolscope", None)
        if state is not None:
            with self.serialized(state):
                self.recorder.pool_closed(state)

    def _origin_arg(self, pool_obj, args, kwargs):
        return arg(args, kwargs, 0, "origin")

    def _created(self, origin, pool_obj, conn, exc):
        if exc is None and "_poolscope" not in conn.__dict__:
            conn._poolscope = self.recorder.conn_created(self.pool_state(pool_obj),
                                                         self._series(origin))
            inner = conn.__dict__.get("_connection")
            if inner is not None:  # an HTTP proxy's: its connection to the proxy comes first
                inner._poolscope_proxied = conn

    # -- requests ---------------------------------------------------------

    def cleared(self, pool_request):
        """The request found its connection taken by another request, or closed, and waits on."""
        conn = pool_request.connection
        rec = conn.__dict__.get("_poolscope") if conn is not None else None
        if rec is not None:  # ConnectionNotAvailable: taken by another request, or closed
            with self.serialized(rec.pool):
                self.recorder.unacquired(rec, pool_request.__dict__.get("_poolscope_wait"))
                if not rec.closed and conn.is_closed():
                    # closed by its own check before the request went out: the server had
                    # closed it while idle (httpcore2 2.17+; the pool drops it unclosed)
                    self.recorder.closed(rec, sc.SERVER_CLOSED, served=_served(conn))

    def left(self, pool_request):
        """The request left its pool (under the pool's lock): its response is closed, or it
        failed or gave up."""
        wait = pool_request.__dict__.get("_poolscope_wait")
        gave_up = wait is not None and wait.done  # timed out or cancelled
        if wait is not None and not wait.done:
            self.recorder.wait_ended(wait)  # it holds the connection it waited for
        conn = pool_request.connection
        rec = conn.__dict__.get("_poolscope") if conn is not None else None
        if rec is None or not rec.in_use:
            return
        if rec.closed:  # by another request's failure, or the pool: its hold ends here
            self.recorder.released(rec)
            return
        if not rec.opened and "_poolscope_setup" in conn.__dict__:
            self._proxied_failed(conn)
        inner = _protocol(conn)
        state = getattr(inner, "_state", None)
        closed = state == _CLOSED if inner is not None else conn.is_closed()  # two calls fewer
        if closed:
            self.recorder.released(rec, _self_close_reason(conn) if rec.opened else sc.ERROR,
                                   getattr(inner, "_request_count", None))
            if rec.uses > 1 and self._stale(conn, sys._getframe(2)):
                self.recorder.stale_failure(rec, False)  # httpcore never sends it again
        elif gave_up and self._drops_unclaimed and not conn.is_connected():
            # given to the request as it gave up; httpcore2 drops it unconnected
            self.recorder.released(rec, sc.ERROR)
        else:
            if rec.in_use == 1 and (inner is None or state in (_NEW, _ACTIVE)):
                # never used (its request cancelled before it), or cut off mid-response:
                # httpcore keeps it, and its slot, for good (httpcore#1093)
                return
            if not rec.opened:  # a proxied connection, through at last
                http2 = hasattr(inner, "_h2_state")
                self.recorder.conn_opened(rec, protocol="2" if http2 else "1.1")
            self.recorder.released(rec)

    def _stale(self, conn, frame):
        """Whether the request failed, before any response, because the server had closed its
        connection: reset, or closed with no response begun (``RemoteProtocolError`` while h11
        still awaits the response). ``frame``: where the request left the pool, which is
        ``handle_request`` for a request that failed there."""
        if not self._in_handle(frame):
            return False
        error = sys.exc_info()[1]
        return disconnected(error) or (isinstance(error, self._remote_protocol_error)
                                       and _their_state(conn) == "SEND_RESPONSE")

    def _in_handle(self, frame):
        """Whether ``frame`` runs a connection's request method (``handle_request``, or its
        async twin)."""
        return frame.f_code.co_name in (handle for _, handle in self._connections)

    # -- waits ------------------------------------------------------------

    def waiting(self, event, frame):
        """(wait, pool request) of the request whose ``wait_for_connection`` is ``frame`` (None
        if it is not one poolscope observes); the request is None for an untraced wait that goes
        on after ``ConnectionNotAvailable``, found on ``event``."""
        try:
            wait = event._poolscope_wait
            if wait is not None and not wait.done and wait.parent is None:
                return wait, None
            if frame.f_code.co_name != "wait_for_connection":
                return None
            pool_request = frame.f_locals["self"]
            wait = pool_request.__dict__.get("_poolscope_wait")
            if wait is not None and not wait.done:
                return wait, pool_request  # waiting again after ConnectionNotAvailable
            pool_obj = frame.f_back.f_locals.get("self") if frame.f_back is not None else None
            pool = getattr(pool_obj, "_poolscope", None)
            if pool is None or pool.owner is not self.recorder:
                return None
            wait = self.recorder.wait_started(pool, self._url_series(pool_request.request.url))
            pool_request._poolscope_wait = wait
            return wait, pool_request
        except Exception:
            internal_error("httpx:wait_for_connection")
            return None

    def stream_waiting(self, frame):
        """The wait of a request for a stream of an HTTP/2 connection, if ``frame`` is the
        request's (not httpcore's own, when the server lowers its limit)."""
        try:
            if not self._in_handle(frame):
                return None
            for _ in range(3):  # up to the httpcore connection, past a proxy's
                frame = frame.f_back
                if frame is None or not self._in_handle(frame):
                    return None  # (only httpcore's frames are read: see urllib3's _pool_of)
                rec = getattr(frame.f_locals.get("self"), "_poolscope", None)
                if rec is not None:
                    return self.recorder.wait_started(rec.pool, rec.series), None
            return None
        except Exception:
            internal_error("httpx:HTTP/2 stream")
            return None

    def stream_granted(self, waiting):
        if waiting is not None:
            try:
                self.recorder.wait_ended(waiting[0])
            except Exception:
                internal_error("httpx:HTTP/2 stream")

    def wait_granted(self, waiting):
        """The request has a connection. It is counted when the request leaves the pool; its
        span ends now unless another request was handed the same connection too (httpcore
        1.0), when one of the two will find it taken and wait on."""
        if waiting is None or waiting[1] is None:  # an untraced wait: nothing to end now
            return
        wait, pool_request = waiting
        try:
            rec = pool_request.connection.__dict__.get("_poolscope")
            self.recorder.wait_granted(wait, end_span=rec is None or rec.in_use == 1)
        except Exception:
            internal_error("httpx:wait_for_connection")

    def wait_failed(self, waiting, exc):
        if waiting is None:
            return
        wait = waiting[0]
        try:
            timed_out = isinstance(exc, self._pool_timeout)
            self.recorder.wait_ended(wait, TIMED_OUT if timed_out else CANCELLED, exc)
        except Exception:
            internal_error("httpx:wait_for_connection")

    # -- connections ------------------------------------------------------

    def _connect_start(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is None:
            proxied = conn.__dict__.get("_poolscope_proxied")
            if proxied is None:
                return None
            self.proxied_begins(proxied)
            # a forward proxy's connection is through once connected to the proxy; a tunnel's
            # once the TLS handshake with the target is done (see _proxy_step)
            return proxied if isinstance(proxied, self._forwards) else None
        attempt = conn._poolscope_attempt = rec, time.monotonic(), time.time_ns(), phases_begin()
        return attempt

    def _connected(self, token, conn, stream, exc):
        if type(token) is not tuple:  # a forward proxy's connection (token) to the proxy
            if exc is None:
                self.proxied_through(token, stream, conn)
            return
        phases_end()
        self._set_up(conn.__dict__.pop("_poolscope_attempt", token), conn, stream, exc)

    def _set_up_step(self, trace, frame, exc_type):
        """In httpcore's connection module, ``Trace`` is around each step of a connect: those
        that are set-up phases (the TCP connect, with name resolution, and the TLS handshake)
        are timed. A ``retry`` step (the back-off before httpcore's transport ``retries`` try
        again) follows a failed attempt, whose set-up span ends then in error; the set-up
        starts over after it."""
        if exc_type is True:
            trace._poolscope_started = time.monotonic()
            if trace.name == "retry":
                conn, failed = frame.f_locals["self"], sys.exc_info()[1]
                attempt = conn.__dict__.get("_poolscope_attempt")
                if attempt is not None and failed is not None:
                    self._set_up(attempt, conn, None, failed)
        elif exc_type is None:
            phase = _TRACED_PHASES.get(trace.name)
            if phase is not None:
                phase_ended(phase, trace._poolscope_started)
            elif trace.name == "retry":
                state = frame.f_locals["self"].__dict__
                attempt, proxied = state.get("_poolscope_attempt"), state.get("_poolscope_proxied")
                if attempt is not None:
                    state["_poolscope_attempt"] = (attempt[0], time.monotonic(), time.time_ns(),
                                                   phases_begin())
                elif proxied is not None and "_poolscope_setup" in proxied.__dict__:
                    self.proxied_begins(proxied)

    def proxied_begins(self, proxied):
        """The set-up of a proxied connection (``proxied``, the pool's) begins."""
        proxied._poolscope_setup = time.monotonic(), time.time_ns()

    def proxied_through(self, proxied, stream, speaks=None):
        """The proxied connection ``proxied`` is set up, on ``stream``, since
        :meth:`proxied_begins`. ``speaks``: the connection its requests go out on, if not its
        own (a forward proxy's connection to the proxy)."""
        started = proxied.__dict__.pop("_poolscope_setup", None)
        rec = proxied.__dict__.get("_poolscope")
        if started is not None and rec is not None and not rec.opened:
            self._set_up((rec, *started, []), speaks or proxied, stream, None)

    def _proxied_failed(self, proxied):
        """The set-up of the proxied connection ``proxied`` did not end: its request leaves the
        pool, with the exception in hand where the set-up failed (the proxy refused it, a
        tunnel's ``CONNECT`` was answered with an error, a handshake failed). A tunnel whose
        TLS handshake failed stays in httpcore's pool, active, until the pool closes
        (encode/httpcore#1023)."""
        started = proxied.__dict__.pop("_poolscope_setup")
        error = sys.exc_info()[1]
        if error is not None:
            self._set_up((proxied._poolscope, *started, []), proxied, None, error)

    def _set_up(self, token, conn, stream, exc):
        """A connection's set-up ended, on ``stream`` (``exc``: failed): opened, its set-up time
        and phases, and its set-up span, made now that it is over. ``token``: (its state, when
        it began as ``time.monotonic()`` and ``time.time_ns()``, its phases); ``conn``: the
        httpcore connection its requests go out on."""
        rec, started, started_ns, phases = token
        ended, ended_ns = time.monotonic(), time.time_ns()
        span = self.recorder.setup_started(rec, start_ns=started_ns)
        peer = None
        try:
            if exc is None:
                http2 = _http2(conn, stream)
                with self.serialized(rec.pool):
                    self.recorder.conn_opened(rec, ended - started, "2" if http2 else "1.1",
                                              _stream_counts(conn) if http2 else None)
                self.recorder.setup_phases(rec, phases)
                peer = stream.get_extra_info("server_addr")
        finally:  # a span poolscope started is ended, whatever failed
            self.recorder.setup_ended(span, exc, peer[0] if peer else None, ended_ns)

    def _conn_close(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is not None and not rec.closed:
            with self.serialized(rec.pool):
                self.recorder.closed(rec, _pool_close_reason(conn), served=_served(conn))


class Httpx2Adapter(HttpxAdapter):
    """httpx2, through httpcore2: the same pool under other names."""

    library = "httpx2"
    root = "httpcore2"

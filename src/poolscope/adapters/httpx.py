"""httpx, through httpcore's ``ConnectionPool`` and ``AsyncConnectionPool`` (httpcore 1.0.3+),
and httpx2 (the fork the openai and anthropic SDKs use) through httpcore2's (2.0+).

One implementation serves all four: the hooks are plain functions, applied to the ``_sync``
and ``_async`` classes of ``httpcore`` or ``httpcore2`` by name. What differs between the two
is data (:class:`Httpx2Adapter`). Where the hooks are (per request, cheapest first):

- ``ConnectionPool.handle_request``: tags the request with its pool, for the wait hook.
- ``PoolRequest.wait_for_connection``: a wait starts when the request has no connection on
  entry; it ends in PoolTimeout, cancellation, or at the connection's ``handle_request``.
- ``HTTPConnection.handle_request`` (and the proxy connections'): the acquisition. httpcore may
  hand one idle HTTP/1.1 connection to several queued requests; all but one then raise
  ``ConnectionNotAvailable`` and queue again, so that acquisition is undone and the wait goes on.
- ``PoolByteStream.close``: the release, read once the stream is closed; a connection that
  closed with its response (``Connection: close``, a failed or abandoned read) is counted
  closed there.

Pool-initiated closes pass through ``HTTPConnection.close``, where the reason is read from the
connection as ``_assign_requests_to_connections`` judged it: past ``_expire_at`` is
``keepalive_expired``, an idle socket the server closed is ``server_closed``, the rest are idle
connections the pool had no room for (``idle_limit``). A connection still in use when the pool
closes it (a race in httpcore 1.0.9, encode/httpcore#1110) fails its request: ``error``.

httpcore2 2.6 and later drop, without closing it, a connection whose request was cancelled
before it connected (httpcore keeps it, and its slot, for good: encode/httpcore#1093); such a
connection is let go with its request. httpcore2's other pool changes (single-pass
assignment in 2.3, a released connection assigned to a single queued request in 2.8) need
nothing: a connection handed to a request that then finds it taken is undone as above.
"""

import importlib
import sys
import time

from .. import _semconv as sc
from .._recorder import ABANDONED, TIMED_OUT
from ._base import Adapter, arg

def _flavors(root):
    """The sync and async classes of ``root`` (``httpcore`` or ``httpcore2``), by name."""
    return (
        {"package": f"{root}._sync", "pool": "ConnectionPool", "request": "PoolRequest",
         "connection": "HTTPConnection", "send": "handle_request", "close": "close",
         "proxies": (("http_proxy", "HTTPProxy", ("ForwardHTTPConnection", "TunnelHTTPConnection")),
                     ("socks_proxy", "SOCKSProxy", ("Socks5Connection",)))},
        {"package": f"{root}._async", "pool": "AsyncConnectionPool", "request": "AsyncPoolRequest",
         "connection": "AsyncHTTPConnection", "send": "handle_async_request", "close": "aclose",
         "proxies": (("http_proxy", "AsyncHTTPProxy",
                      ("AsyncForwardHTTPConnection", "AsyncTunnelHTTPConnection")),
                     ("socks_proxy", "AsyncSOCKSProxy", ("AsyncSocks5Connection",)))},
    )


def _limit(value):
    return None if value is None or value >= sys.maxsize else value


def _protocol(conn):
    """The HTTP/1.1 or HTTP/2 connection object under an httpcore connection (or proxy one)."""
    inner = getattr(conn, "_connection", None)
    while inner is not None and not hasattr(inner, "_expire_at"):
        inner = getattr(inner, "_connection", None)
    return inner


def _state(inner):
    """httpcore's state of an HTTP/1.1 or HTTP/2 connection ("NEW", "IDLE", "ACTIVE", …)."""
    return getattr(getattr(inner, "_state", None), "name", "")


def _pool_close_reason(conn):
    inner = _protocol(conn)
    if inner is None or _state(inner) == "ACTIVE":
        return sc.ERROR  # an exchange on it is cut off (httpcore#1110)
    expire_at = inner._expire_at
    if expire_at is not None and time.monotonic() > expire_at:
        return sc.KEEPALIVE_EXPIRED
    if inner.has_expired():
        return sc.SERVER_CLOSED
    return sc.IDLE_LIMIT


def _left_busy(conn, rec):
    """Whether httpcore keeps the connection out of service for good now that its only request
    is over: never used (cancelled between connecting and sending) or still ``ACTIVE`` (its
    response closed mid-way by a cancellation), httpcore#1093. It holds its slot, so it stays
    active."""
    return rec.in_use == 1 and _state(_protocol(conn)) in ("NEW", "ACTIVE")


def _self_close_reason(conn):
    """Why a connection closed along with its response: the server said so, or the exchange broke."""
    h11_state = getattr(_protocol(conn), "_h11_state", None)
    if h11_state is None:
        return sc.SERVER_CLOSED
    their = getattr(h11_state.their_state, "__name__", "")
    return sc.SERVER_CLOSED if their in ("MUST_CLOSE", "CLOSED") else sc.ERROR


class HttpxAdapter(Adapter):
    library = "httpx"
    root = "httpcore"  # the package whose pools are patched

    def patch(self):
        core = importlib.import_module(self.root)
        self._not_available = core.ConnectionNotAvailable
        self._pool_timeout = core.PoolTimeout
        connection = importlib.import_module(self.root + "._sync.connection").HTTPConnection
        # httpcore2 2.6+ (which added is_connected) drops an unconnected, unclaimed connection
        self._drops_unclaimed = hasattr(connection, "is_connected")
        for flavor in _flavors(self.root):
            self._patch_flavor(flavor)

    def _patch_flavor(self, f):
        package = f["package"]
        pools = importlib.import_module(package + ".connection_pool")
        pool_cls = getattr(pools, f["pool"])
        pool_classes = [pool_cls]
        conn_classes = [getattr(importlib.import_module(package + ".connection"), f["connection"])]
        for module_name, proxy, connections in f["proxies"]:
            try:
                module = importlib.import_module(f"{package}.{module_name}")
            except ImportError:  # socksio not installed
                continue
            pool_classes.append(getattr(module, proxy))
            conn_classes.extend(getattr(module, name) for name in connections)

        self.wrap(pool_cls, "__init__", after=self._pool_init)
        self.wrap(pool_cls, f["send"], before=self._tag_request)
        self.wrap(pool_cls, f["close"], before=self._pool_close)
        self.wrap(getattr(pools, f["request"]), "wait_for_connection",
                  before=self._wait_start, after=self._wait_failed)
        self.wrap(pools.PoolByteStream, f["close"], before=self._release, after=self._released)
        for cls in pool_classes:
            if "create_connection" in vars(cls):
                self.wrap(cls, "create_connection", before=self._origin_arg, after=self._created)
        for cls in conn_classes:
            self.wrap(cls, f["send"], before=self._acquire, after=self._sent)
            self.wrap(cls, f["close"], before=self._conn_close)
        self.wrap(conn_classes[0], "_connect", before=self._connect_start, after=self._connected)

    def limits(self, pool_obj):
        return {"max_connections": _limit(pool_obj._max_connections),
                "max_idle": _limit(pool_obj._max_keepalive_connections)}

    def _series(self, origin):
        return self.recorder.series(
            self.library, (origin.scheme.decode("ascii"), origin.host.decode("ascii"), origin.port))

    # -- pool -------------------------------------------------------------

    def _tag_request(self, pool_obj, args, kwargs):
        arg(args, kwargs, 0, "request")._poolscope_pool = self.pool_state(pool_obj)

    def _origin_arg(self, pool_obj, args, kwargs):
        return arg(args, kwargs, 0, "origin")

    def _created(self, origin, pool_obj, conn, exc):
        if exc is None and "_poolscope" not in conn.__dict__:
            conn._poolscope = self.recorder.conn_created(self.pool_state(pool_obj),
                                                         self._series(origin))

    # -- waits ------------------------------------------------------------

    def _wait_start(self, pool_request, args, kwargs):
        if pool_request.connection is not None:
            return None
        request = pool_request.request
        wait = request.__dict__.get("_poolscope_wait")
        if wait is None or wait.done:
            pool = request.__dict__.get("_poolscope_pool")
            if pool is None:
                return None
            wait = self.recorder.wait_started(pool, self._series(request.url.origin))
            request._poolscope_wait = wait
        return wait

    def _wait_failed(self, wait, pool_request, result, exc):
        if exc is not None:
            timed_out = isinstance(exc, self._pool_timeout)
            self.recorder.wait_ended(wait, TIMED_OUT if timed_out else ABANDONED, exc)
            conn = pool_request.connection  # given to the request as it gave up
            if self._drops_unclaimed and conn is not None and not conn.is_connected():
                rec = conn.__dict__.get("_poolscope")
                if rec is not None and rec.in_use == 0:
                    self.recorder.closed(rec, sc.ERROR)  # never established: not counted

    # -- connections ------------------------------------------------------

    def _acquire(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is None:
            return None
        wait = arg(args, kwargs, 0, "request").__dict__.get("_poolscope_wait")
        return rec, wait, self.recorder.acquired(rec, wait)

    def _sent(self, token, conn, response, exc):
        rec, wait, reused = token
        if isinstance(exc, self._not_available):
            self.recorder.unacquired(rec, wait)
            return
        if wait is not None:
            self.recorder.wait_ended(wait)
        if exc is None:
            self.recorder.conn_opened(rec)  # a proxied connection; no-op once opened
        elif conn.is_closed():
            self.recorder.released(rec, sc.ERROR)
        elif not _left_busy(conn, rec):
            self.recorder.released(rec)

    def _connect_start(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is None:
            return None
        return rec, time.monotonic(), self.recorder.setup_started(rec.series)

    def _connected(self, token, conn, stream, exc):
        rec, started, span = token
        if exc is None:
            self.recorder.conn_opened(rec, time.monotonic() - started)
        if span is not None:
            peer = stream.get_extra_info("server_addr") if exc is None else None
            self.recorder.setup_ended(span, exc, peer[0] if peer else None)

    def _release(self, stream, args, kwargs):
        if stream._closed:
            return None
        conn = stream._pool_request.connection
        rec = conn.__dict__.get("_poolscope") if conn is not None else None
        return None if rec is None else (rec, conn)

    def _released(self, token, stream, result, exc):
        rec, conn = token
        if not rec.closed and conn.is_closed():
            self.recorder.released(rec, _self_close_reason(conn))
        elif not _left_busy(conn, rec):
            self.recorder.released(rec)

    def _conn_close(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is not None and not rec.closed:
            self.recorder.closed(rec, _pool_close_reason(conn))


class Httpx2Adapter(HttpxAdapter):
    """httpx2, through httpcore2: the same pool under other names."""

    library = "httpx2"
    root = "httpcore2"

"""aiohttp 3.10.11+, through ``aiohttp.connector.BaseConnector`` and ``ResponseHandler``.

- Acquire and release: the connector's own set of connections in use (``_acquired``), which
  takes an observed subclass: its ``add`` is the acquisition of a pooled connection (one
  ``_create_connection`` made is acquired as it is made), its ``discard`` the release. No
  wrapper on ``connect`` or ``_release``.
- Wait: ``_wait_for_available_connection``, entered only when no slot is free under ``limit``
  or ``limit_per_host``. A wait cut off by an exception timed out if the ``connect`` timeout
  around it (``ceil_timeout``, which aiohttp calls in ``connect`` only when no pooled
  connection is free) has expired; otherwise it was cancelled.
- Create: ``_create_connection`` (name resolution, TCP, TLS, and the proxy's when there is one).
- Close: ``ResponseHandler.close``. Inside ``_release`` the connection closes with its
  response: the caller of ``_release`` (``Connection.release``, or ``close`` for a response
  given up) and the protocol's state tell why. Elsewhere aiohttp closes an idle connection
  (``_get`` and the periodic ``_cleanup``: expired if still connected, else the server had
  closed it). ``ResponseHandler.connection_lost`` when the server or the network closes the
  socket first.
- Limits: the connector's ``limit`` is one pool; with ``limit_per_host`` each host's
  connections also form a pool of that size inside it.

Before 3.10.11 aiohttp waited inline in ``connect()``, with nothing to hook that tells a
queued request from one served at once; those versions are skipped.
"""

import asyncio
import contextvars
import sys
import time

from .. import _semconv as sc
from .._config import internal_error
from .._recorder import CANCELLED, TIMED_OUT, Conn
from ._base import (Adapter, arg, calling, disconnected, peer_address, phase_timer,
                    phases_begin, phases_end)


def _origin(key):
    """The origin of a ``ConnectionKey``; None for a key of another kind (a test's stand-in)."""
    try:
        return ("https" if key.is_ssl else "http"), key.host, key.port
    except AttributeError:
        return None


_timeout = contextvars.ContextVar("poolscope_connect_timeout", default=None)


def _expired(timeout):
    """Whether an ``asyncio.timeout`` or ``async_timeout`` context has fired."""
    expired = getattr(timeout, "expired", False)
    return expired() if callable(expired) else bool(expired)


class _AcquiredSet(set):
    """A connector's set of connections in use: adding a pooled one is its acquisition,
    discarding one its release. Only poolscope's own record counts: aiohttp's tests add mock
    protocols, whose every attribute is a mock too."""

    __slots__ = ()

    def add(self, proto):
        set.add(self, proto)
        rec = getattr(proto, "_poolscope", None)
        if type(rec) is Conn and not rec.in_use and not rec.closed:
            try:
                rec.pool.owner.acquired(rec)
            except Exception:
                internal_error("aiohttp:BaseConnector._acquired")

    def discard(self, proto):
        set.discard(self, proto)
        rec = getattr(proto, "_poolscope", None)
        if type(rec) is Conn and rec.in_use:
            try:
                rec.pool.owner.released(rec)
                if rec.closed and rec.uses > 1:  # lost under its request (_proto_lost)
                    _stale(rec)
            except Exception:
                internal_error("aiohttp:BaseConnector._acquired")


_RELEASE = _RELEASED = None  # code objects of BaseConnector._release, Connection.release
_SERVER_DISCONNECTED = ()  # aiohttp's ServerDisconnectedError


def _stale(rec):
    """A reused connection lost under its request is released as the request fails: if the
    server had closed it, the request failed stale. ``ClientSession._request`` sends an
    idempotent request again once (``retry_persistent_connection``)."""
    error = sys.exc_info()[1]
    if not (isinstance(error, _SERVER_DISCONNECTED) or disconnected(error)):
        return
    # aiohttp.client imports the connector: read only now, not at patch
    session = getattr(sys.modules.get("aiohttp.client"), "ClientSession", None)
    request = getattr(getattr(session, "_request", None), "__code__", None)
    frame = calling(request, depth=12)
    retried = frame is not None and bool(frame.f_locals.get("retry_persistent_connection"))
    rec.pool.owner.stale_failure(rec, retried)


def _release_reason(connector, proto, should_close):
    """Why ``_release`` closes ``proto`` (None: it would not)."""
    if should_close:
        return sc.ERROR
    if connector._force_close:
        return sc.IDLE_LIMIT  # a force_close connector keeps no idle connection
    if not proto.should_close:
        return None
    if proto.exception() is not None or proto.upgraded:
        return sc.ERROR
    payload = proto._payload
    if payload is not None and not payload.is_eof():
        return sc.ERROR  # released before the body was read
    return sc.SERVER_CLOSED


class AiohttpAdapter(Adapter):
    library = "aiohttp"

    def patch(self):
        global _RELEASE, _RELEASED, _SERVER_DISCONNECTED
        from aiohttp import client_exceptions, client_proto, client_ws, connector

        base = connector.BaseConnector
        _RELEASE, _RELEASED = base._release.__code__, connector.Connection.release.__code__
        _SERVER_DISCONNECTED = client_exceptions.ServerDisconnectedError
        self.wrap(base, "__init__", after=self._pool_init)
        if hasattr(connector, "ceil_timeout"):
            timeout = connector.ceil_timeout

            def ceil_timeout(*args, **kwargs):
                made = timeout(*args, **kwargs)
                _timeout.set(made)
                return made
            self.replace(connector, "ceil_timeout", ceil_timeout)
        self.wrap(base, "_wait_for_available_connection", before=self._wait_start,
                  after=self._wait_end)
        self.wrap(base, "_close", before=self._closing)
        for cls in vars(connector).values():
            if isinstance(cls, type) and issubclass(cls, base) and "_create_connection" in vars(cls):
                self.wrap(cls, "_create_connection", before=self._create_start, after=self._created)
        # name resolution is a phase of its own; asyncio's create_connection does TCP and TLS
        # in one call
        self.wrap(connector.TCPConnector, "_resolve_host", *phase_timer(sc.DNS))
        self.wrap(client_ws.ClientWebSocketResponse, "__init__", before=self._websocket)
        handler = client_proto.ResponseHandler
        self.wrap(handler, "close", before=self._proto_close)
        self.wrap(handler, "connection_lost", after=self._proto_lost)

    def unpatch(self):
        super().unpatch()
        for connector in self.recorder.pool_objects(self.library):
            if type(getattr(connector, "_acquired", None)) is _AcquiredSet:
                connector._acquired = set(connector._acquired)

    def limits(self, connector):
        idle_max = 0 if connector._force_close else None
        return {"max_connections": connector._limit or None, "max_idle": idle_max,
                "serialized": True}  # a connector lives in one event loop

    def registered(self, connector, state):
        acquired = getattr(connector, "_acquired", None)
        if type(acquired) is set:
            connector._acquired = _AcquiredSet(acquired)

    def _pool(self, connector, key):
        """The pool a connection key counts against: its host's, under ``limit_per_host``."""
        main = self.pool_state(connector)
        per_host = connector._limit_per_host
        if not per_host:
            return main
        hosts = connector.__dict__.get("_poolscope_hosts")
        if hosts is None or hosts[0] is not main:
            hosts = connector._poolscope_hosts = (main, {})
        pool = hosts[1].get(key)
        if pool is None or not pool.live:
            pool = hosts[1][key] = self.recorder.pool_opened(
                self.library, connector, max_connections=per_host,
                max_idle=main.idle_max, origin=_origin(key), parent=main, serialized=True)
        return pool

    def _series(self, key):
        return self.recorder.series(self.library, _origin(key))

    def _closing(self, connector, args, kwargs):
        state = connector.__dict__.get("_poolscope")
        if state is None or connector._closed:
            return
        hosts = connector.__dict__.get("_poolscope_hosts")
        for pool in (hosts[1].values() if hosts is not None else ()):
            self.recorder.pool_closed(pool)
        self.recorder.pool_closed(state)

    # -- waits ------------------------------------------------------------

    def _wait_start(self, connector, args, kwargs):
        key = arg(args, kwargs, 0, "key")
        return self.recorder.wait_started(self._pool(connector, key), self._series(key))

    def _wait_end(self, wait, connector, result, exc):
        if exc is None:
            self.recorder.wait_ended(wait)
        elif _expired(_timeout.get()):
            self.recorder.wait_ended(wait, TIMED_OUT, asyncio.TimeoutError())
        else:
            self.recorder.wait_ended(wait, CANCELLED, exc)

    # -- connections ------------------------------------------------------

    def _create_start(self, connector, args, kwargs):
        key = getattr(arg(args, kwargs, 0, "req"), "connection_key", None)
        if key is None:  # not a request aiohttp made: nothing to count (the call fails)
            return None
        rec = self.recorder.conn_created(self._pool(connector, key), self._series(key))
        return rec, time.monotonic(), time.time_ns(), phases_begin()

    def _created(self, token, connector, proto, exc):
        """The set-up ended; its span is made now that it is over, as long as ``create_time``."""
        rec, started, started_ns, phases = token
        ended, ended_ns = time.monotonic(), time.time_ns()
        phases_end()
        span = self.recorder.setup_started(rec, start_ns=started_ns)
        if exc is not None:
            self.recorder.setup_ended(span, exc, end_ns=ended_ns)
            self.recorder.closed(rec, sc.ERROR)
            return
        try:
            proto._poolscope = rec
            self.recorder.acquired(rec)
            self.recorder.conn_opened(rec, ended - started)
            self.recorder.setup_phases(rec, phases)
        finally:
            if span is not None:
                self.recorder.setup_ended(span, peer=peer_address(
                    lambda: proto.transport.get_extra_info("peername")), end_ns=ended_ns)

    def _websocket(self, ws, args, kwargs):
        connection = getattr(arg(args, kwargs, 3, "response"), "connection", None)
        rec = getattr(getattr(connection, "protocol", None), "_poolscope", None)
        if rec is not None:
            self.recorder.upgraded(rec)

    def _proto_close(self, proto, args, kwargs):
        rec = proto.__dict__.get("_poolscope")
        if rec is None or rec.closed or proto.transport is None:
            return
        release = calling(_RELEASE)
        if release is not None:  # closing with its response, just released
            should_close = release.f_back is None or release.f_back.f_code is not _RELEASED
            reason = _release_reason(release.f_locals["self"], proto, should_close) or sc.ERROR
        elif rec.in_use:
            reason = sc.ERROR
        else:
            reason = sc.KEEPALIVE_EXPIRED if proto.is_connected() else sc.SERVER_CLOSED
        self.recorder.closed(rec, reason)

    def _proto_lost(self, token, proto, result, exc):
        rec = proto.__dict__.get("_poolscope")
        if rec is None or rec.closed:
            return
        failed = rec.in_use and proto.exception() is not None
        self.recorder.closed(rec, sc.ERROR if failed else sc.SERVER_CLOSED)

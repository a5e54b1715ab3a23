"""urllib3-future 2.x (and so niquests), through ``HTTPConnectionPool`` and its ``TrafficPolice``.

urllib3-future keeps each pool's connections in a ``TrafficPolice``: ``_registry`` (every
connection), ``_container`` (the available ones) and ``_cursor`` (the one each thread holds).
poolscope reads those books where the police changes them:

- Acquire: the police's ``get``, which hands the calling thread a pooled connection (reused;
  one urllib3-future then finds dropped is closed in ``_get_conn`` before any use, and the
  request's new socket is acquired at ``connect``) or reserves a slot for a new one (acquired
  at ``connect``, as urllib3's).
- Release: ``_next_signal_or_container_insert``, where the police takes a thread's connection
  back, into its container or straight to a waiting thread, the first time after the thread
  acquired it (it takes it back again each time the thread locates it to read a response).
  Where a response is still to come or to be read then (an HTTP/2 stream in flight; niquests
  reads every body after that, a ``stream=True`` response when the application does), the
  release waits until none is: the connection's ``_pending_responses``, where urllib3-future
  keeps them, is observed from ``connect`` on, and its ``_promises`` read.
- Wait: a ``get`` that registers a signal waits; the wait ends when that ``get`` returns
  (granted: a connection, or a slot to open one) or raises (``UnavailableTraffic``: timed
  out). A thread the police wakes without a connection and that waits again goes on waiting
  in the same wait.
- Create: ``HTTPConnection.connect`` / ``HTTPSConnection.connect``; close:
  ``HTTPConnection.close``, the reason read from the police method closing it.
- Pools register at ``__init__`` (or, made before ``instrument()``, at their next new
  connection) and close with ``close``; a pool the ``PoolManager``'s police sacrifices for a
  new one is ``evicted``.

Sync pools are covered, HTTP/1.1, HTTP/2 and HTTP/3 (a connection several threads' requests
share, a stream each); the async pools (niquests' ``AsyncSession``) keep other books and are not
observed yet (an async pool is one log line). The module tree is data
(``root``): the same adapter observes ``urllib3_future`` and, where urllib3-future installed
itself as ``urllib3``, that copy.
"""

import importlib
import sys
import threading
import time
import weakref

from .. import _semconv as sc
from .._config import internal_error, logger
from .._recorder import CANCELLED, GRANTED, TIMED_OUT
from ._base import DEFAULT_PORTS, calling, disconnected
from .urllib3 import Urllib3Adapter

get_ident = threading.get_ident


def _code(function):
    return getattr(function, "__code__", None)


_VERSIONS = {"HTTP/1.1": "1.1", "HTTP/2.0": "2", "HTTP/3.0": "3"}
_REMOTE_CLOSED = "Remote end closed connection without response"


class _PendingResponses(dict):
    """A connection's responses still to be read (urllib3-future's ``_pending_responses``;
    ``promises``: its ``_promises``, the requests sent and not yet answered). ``returned``:
    the requests that gave the connection back while a response was still to come or to be
    read (several on a multiplexed connection): they are released once none is. Decided under
    the police's lock on both sides."""

    __slots__ = ("recorder", "rec", "lock", "promises", "returned")

    def __delitem__(self, key):
        dict.__delitem__(self, key)
        if not self:
            self.settle()

    def pop(self, *args):
        value = dict.pop(self, *args)
        if not self:
            self.settle()
        return value

    def owned(self):
        """Whether a response is still to come or to be read (urllib3-future's
        ``_has_response_owner``, for this connection's own)."""
        return bool(self) or bool(self.promises)

    def settle(self):
        try:
            with self.lock:
                while self.returned and not self.owned():
                    self.returned -= 1
                    self.recorder.released(self.rec)
        except Exception:
            internal_error("urllib3-future:response read")


class Urllib3FutureAdapter(Urllib3Adapter):
    library = "urllib3-future"
    root = "urllib3_future"

    def patch(self):
        def module(name):
            return importlib.import_module(f"{self.root}.{name}")

        connection, connectionpool = module("connection"), module("connectionpool")
        police = module("util.traffic_police")
        police_cls, self._unavailable = police.TrafficPolice, police.UnavailableTraffic
        self._protocol_error = module("exceptions").ProtocolError
        pool_cls = connectionpool.HTTPConnectionPool
        self._get_code, self._sacrifice_code, self._get_conn_code, self._urlopen_code = (
            _code(police_cls.get), _code(police_cls._sacrifice_first_idle), _code(pool_cls._get_conn),
            _code(pool_cls.urlopen))
        self.patch_pools(pool_cls, connection)
        self._async_told = False
        async_pools = getattr(sys.modules.get(f"{self.root}._async.connectionpool"),
                              "AsyncHTTPConnectionPool", None)
        if async_pools is not None:
            self.wrap(async_pools, "__init__", after=self._async_pool_made)
        self.wrap(police_cls, "_register_signal", after=self._signalled)
        self.replace(police_cls, "get", self._observed_get(police_cls.get))
        self.replace(police_cls, "_next_signal_or_container_insert",
                     self._observed_insert(police_cls._next_signal_or_container_insert))

    def unpatch(self):  # urllib3's, but no queue to give its class back
        super(Urllib3Adapter, self).unpatch()

    def limits(self, pool_obj):
        scheme = pool_obj.scheme or "http"
        size = getattr(pool_obj.pool, "maxsize", None)
        return {"max_connections": size, "max_idle": size,
                "origin": (scheme, pool_obj.host, pool_obj.port or DEFAULT_PORTS.get(scheme))}

    def registered(self, pool_obj, state):
        if pool_obj.pool is not None:
            # then open waits by thread, and each thread's acquisition not yet given back
            pool_obj.pool._poolscope = (self.recorder, state, {}, threading.local())

    def own_lock(self, pool_obj):
        return None

    def _observed_get(self, get):
        """The police's ``get``: the acquisition of a pooled connection, and the end of a
        wait begun inside it. A ``get`` woken without a connection calls itself again: its
        caller observes it."""
        get_code = _code(get)

        def observed_get(police, *args, **kwargs):
            observed = police.__dict__.get("_poolscope")
            if observed is None or sys._getframe(1).f_code is get_code:
                return get(police, *args, **kwargs)
            try:
                conn = get(police, *args, **kwargs)
            except BaseException as exc:
                if observed[2]:
                    try:
                        self._wait_over(observed, TIMED_OUT if isinstance(exc, self._unavailable)
                                        else CANCELLED, exc)
                    except Exception:
                        internal_error("urllib3-future:police get")
                raise
            try:
                if observed[2]:
                    self._wait_over(observed, GRANTED)
                if conn is not None:
                    rec = conn.__dict__.get("_poolscope")
                    if rec is not None and not rec.closed and conn.sock is not None:
                        observed[0].acquired(rec)
                        observed[3].rec = rec
            except Exception:
                internal_error("urllib3-future:police get")
            return conn

        observed_get.__wrapped__ = get
        return observed_get

    def _observed_insert(self, insert):
        """The police's ``_next_signal_or_container_insert``: a thread's connection is back,
        once after its acquisition (the release, or the start of the wait for its response),
        and after each time the thread located it again to read a response."""

        def observed_insert(police, *args, **kwargs):
            observed = police.__dict__.get("_poolscope")
            if observed is None:  # a PoolManager's police of pools, on every request
                return insert(police, *args, **kwargs)
            try:  # the thread's key: an argument from urllib3-future 2.24 on
                key = args[0] if args else get_ident()
                cursor = police._cursor.get(key)
            except Exception:
                cursor = None
            insert(police, *args, **kwargs)
            if cursor is not None:
                try:
                    attrs = getattr(cursor.conn_or_pool, "__dict__", {})
                    pending = attrs.get("_pending_responses")
                    if type(pending) is not _PendingResponses:
                        pending = None
                    held = getattr(observed[3], "rec", None)
                    if held is None or held is not attrs.get("_poolscope"):
                        if pending is not None and pending.returned:
                            pending.settle()
                        return
                    observed[3].rec = None
                    if held.in_use and not held.closed:
                        if pending is not None and pending.owned():
                            pending.returned += 1
                        else:
                            observed[0].released(held)
                except Exception:
                    internal_error("urllib3-future:police release")

        observed_insert.__wrapped__ = insert
        return observed_insert

    def _connected(self, token, conn, result, exc):
        super()._connected(token, conn, result, exc)
        rec = token[0]
        police = getattr(rec.pool.ref(), "pool", None)
        observed = getattr(police, "__dict__", {}).get("_poolscope")
        if exc is not None or observed is None:
            return
        observed[3].rec = rec  # acquired at connect: given back at the thread's insert
        if type(getattr(conn, "_pending_responses", None)) is dict:
            pending = _PendingResponses(conn._pending_responses)
            pending.recorder, pending.rec, pending.lock = self.recorder, rec, police._lock
            pending.promises, pending.returned = getattr(conn, "_promises", {}), 0
            conn._pending_responses = pending

    @staticmethod
    def http_version(conn):
        """HTTP/1.1, 2 or 3, as urllib3-future negotiated it (``HttpVersion``: "HTTP/2.0")."""
        version = getattr(conn, "_svn", None)
        return _VERSIONS.get(getattr(version, "value", None))

    def streams(self, conn):
        """An HTTP/2 connection's streams: its requests with a response still to come or to be
        read (urllib3-future's ``_promises`` and ``_pending_responses``), and the server's
        limit (its protocol's ``max_stream_count``)."""
        if self.http_version(conn) != "2":
            return None
        ref = weakref.ref(conn)

        def streams():
            conn = ref()
            books = conn.__dict__ if conn is not None else {}
            return (len(books.get("_promises", ())) + len(books.get("_pending_responses", ())),
                    getattr(books.get("_protocol"), "max_stream_count", 0))
        return streams

    def _async_pool_made(self, token, pool_obj, result, exc):
        """An async pool (niquests' ``AsyncSession``): not observed yet, said once."""
        if not self._async_told:
            self._async_told = True
            logger.warning("poolscope: urllib3-future's async pools (niquests' AsyncSession) "
                           "are not observed yet: they report nothing")

    def _signalled(self, token, police, signal, exc):
        """A thread registered to be woken: from ``get``, a wait for a connection begins
        (unless this thread's wait goes on after a wake-up without one)."""
        observed = police.__dict__.get("_poolscope")
        if observed is None or exc is not None or calling(self._get_code) is None:
            return
        waits = observed[2]
        if get_ident() not in waits:
            waits[get_ident()] = observed[0].wait_started(observed[1])

    def _wait_over(self, observed, outcome, error=None):
        wait = observed[2].pop(get_ident(), None)
        if wait is not None:
            observed[0].wait_ended(wait, outcome, error if outcome == TIMED_OUT else None)

    def _pool_close(self, pool_obj, args, kwargs):
        state = getattr(pool_obj, "_poolscope", None)
        if state is not None:
            evicted = calling(self._sacrifice_code, depth=1) is not None
            self.recorder.pool_closed(state, sc.EVICTED if evicted else sc.POOL_CLOSED)

    def disconnected(self, error):
        """As urllib3's, and (before 2.25) urllib3-future's own unchained "Remote end closed
        connection without response"."""
        return disconnected(error) or (isinstance(error, self._protocol_error)
                                       and str(error) == _REMOTE_CLOSED)

    def _conn_close(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is None:
            return
        if rec.uses > 1:  # urlopen lets go of a reused connection (police.kill), closed or not
            self._stale(rec, calling(self._urlopen_code, depth=2))
        if rec.closed:
            return
        if calling(self._sacrifice_code, depth=1) is not None:
            reason = sc.POOL_FULL
        elif rec.in_use and calling(self._get_conn_code) is None:
            reason = sc.SERVER_CLOSED if _refused_more(conn) else sc.ERROR
        else:
            if rec.in_use:
                # urllib3-future found the pooled connection dropped as it handed it out: the
                # request goes out on a new socket, acquired at connect
                self.recorder.unacquired(rec)
            reason = sc.KEEPALIVE_EXPIRED if _past_keepalive(conn) else sc.SERVER_CLOSED
        self.recorder.closed(rec, reason)


def _refused_more(conn):
    """Whether the server said this connection takes no more requests (``Connection: close``,
    HTTP/2 GOAWAY): urllib3-future closes it once the response is read."""
    protocol = getattr(conn, "_protocol", None)
    try:
        return protocol is not None and bool(protocol.has_expired())
    except Exception:
        return False


def _past_keepalive(conn):
    """Whether the connection outlived its ``keepalive_delay``, after which urllib3-future
    counts it dropped."""
    delay, born = getattr(conn, "_keepalive_delay", None), getattr(conn, "connected_at", None)
    return delay is not None and born is not None and time.monotonic() - born >= delay


class Urllib3FutureAsUrllib3Adapter(Urllib3FutureAdapter):
    """urllib3-future installed as ``urllib3``."""

    root = "urllib3"

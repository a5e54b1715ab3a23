"""urllib3-future 2.x (and so niquests), through its pools' ``TrafficPolice``.

urllib3-future keeps each pool's connections in a ``TrafficPolice`` (``AsyncTrafficPolice``
for the async pools of niquests' ``AsyncSession``): ``_registry`` (every connection),
``_container`` (the available ones) and the cursors (``_cursor`` by thread, ``_cursors`` by
task: the connection each holds). poolscope reads those books where the police changes them;
the sync and async police are twins, and what differs between them is data (the caller's key
and the police's cursors, see ``registered``):

- Acquire: the police's ``get``, which hands the caller a pooled connection (reused; one
  urllib3-future then finds dropped is closed in ``_get_conn`` before any use, and the
  request's new socket is acquired at ``connect``) or reserves a slot for a new one (acquired
  at ``connect``, as urllib3's). The acquisition rides on the caller's cursor from then on.
- Release: where the police takes a cursor's connection back, into its container or straight
  to a waiter (``_next_signal_or_container_insert``; ``AsyncSignals.next``), the first time
  after the acquisition the cursor carries (the police takes it back again each time the
  caller locates it to read a response). Where a response is still to come or to be read
  then (an HTTP/2 stream in flight; niquests reads every body after that, a ``stream=True``
  response when the application does), the release waits until none is: the connection's
  ``_pending_responses``, where urllib3-future keeps them, is observed from ``connect`` on,
  and its ``_promises`` read.
- Wait: a ``get`` that registers a signal waits; the wait ends when that ``get`` returns
  (granted: a connection, or a slot to open one) or raises (``UnavailableTraffic``: timed
  out; cancelled). A caller the police wakes without a connection and that waits again goes
  on waiting in the same wait.
- Create: ``connect`` of the (async) HTTP and HTTPS connections; close: their ``close``, the
  reason read from the police method closing it.
- A WebSocket (niquests' ``ws://``): the extension taking a response's connection over after a
  ``101`` (``ExtensionFromHTTP.start``, its async twin's) marks the connection upgraded.
- Pools register at ``__init__`` (or, made before ``instrument()``, at their next new
  connection) and close with ``close``; a pool the ``PoolManager``'s police sacrifices for a
  new one is ``evicted``.

HTTP/1.1, HTTP/2 and HTTP/3 (a connection several requests share, a stream each). The module
tree is data too (``root``): the same adapter observes ``urllib3_future`` and, where
urllib3-future installed itself as ``urllib3``, that copy.
"""

import asyncio
import contextlib
import importlib
import sys
import threading
import time
import weakref

from .. import _semconv as sc
from .._config import internal_error
from .._recorder import CANCELLED, GRANTED, TIMED_OUT
from ._base import DEFAULT_PORTS, calling, disconnected
from .urllib3 import Urllib3Adapter

get_ident = threading.get_ident
current_task = asyncio.current_task


def _code(function):
    return getattr(function, "__code__", None)


_VERSIONS = {"HTTP/1.1": "1.1", "HTTP/2.0": "2", "HTTP/3.0": "3"}
_REMOTE_CLOSED = "Remote end closed connection without response"


class _PendingResponses(dict):
    """A connection's responses still to be read (urllib3-future's ``_pending_responses``;
    ``promises``: its ``_promises``, the requests sent and not yet answered). ``returned``:
    the requests that gave the connection back while a response was still to come or to be
    read (several on a multiplexed connection): they are released once none is. Decided under
    the police's lock on both sides (the async police has none: its pool lives in one thread)."""

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


_NO_LOCK = contextlib.nullcontext()


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
        aconnection, apolice = module("_async.connection"), module("util._async.traffic_police")
        apolice_cls, apool_cls = apolice.AsyncTrafficPolice, module(
            "_async.connectionpool").AsyncHTTPConnectionPool
        pool_cls = connectionpool.HTTPConnectionPool
        # the twins' codes, each pair read as one (see calling)
        self._get_code, self._sacrifice_code, self._get_conn_code, self._urlopen_code = (
            (_code(getattr(sync, name)), _code(getattr(twin, name))) for sync, twin, name in (
                (police_cls, apolice_cls, "get"),
                (police_cls, apolice_cls, "_sacrifice_first_idle"),
                (pool_cls, apool_cls, "_get_conn"), (pool_cls, apool_cls, "urlopen")))
        self._abort_code = (_code(module("backend._base").LowLevelResponse.abort),
                            _code(module("backend._async._base").AsyncLowLevelResponse.abort))
        self._async_police = apolice_cls
        self.patch_pools(pool_cls, (connection.HTTPConnection, connection.HTTPSConnection))
        self.patch_pools(apool_cls, (aconnection.AsyncHTTPConnection,
                                     aconnection.AsyncHTTPSConnection))
        self.wrap(police_cls, "_register_signal", after=self._signalled)
        self.wrap(apolice.AsyncSignals, "register", after=self._signalled)
        self.replace(police_cls, "get", self._observed_get(police_cls.get))
        self.replace(apolice_cls, "get", self._observed_async_get(apolice_cls.get))
        self.replace(police_cls, "_next_signal_or_container_insert",
                     self._observed_insert(police_cls._next_signal_or_container_insert))
        self.wrap(apolice.AsyncSignals, "next", before=self._async_given_back)
        for extensions, name in (("protocol", "ExtensionFromHTTP"),
                                 ("_async.protocol", "AsyncExtensionFromHTTP")):
            try:  # the subclasses (WebSocket, server-sent events, raw) start here
                extension = getattr(module("contrib.webextensions." + extensions), name)
            except (ImportError, AttributeError):
                continue
            self.wrap(extension, "start", after=self._extension_started)

    def unpatch(self):  # urllib3's, but no queue to give its class back
        super(Urllib3Adapter, self).unpatch()

    def limits(self, pool_obj):
        scheme = pool_obj.scheme or "http"
        size = getattr(pool_obj.pool, "maxsize", None)
        return {"max_connections": size, "max_idle": size,
                "origin": (scheme, pool_obj.host, pool_obj.port or DEFAULT_PORTS.get(scheme))}

    def registered(self, pool_obj, state):
        """The police observed: (recorder, pool state, open waits by caller, the caller's key,
        the police's cursors by that key). The sync police keys by thread, the async one by
        task, and its ``AsyncSignals`` hand connections over: they carry it too."""
        police = pool_obj.pool
        if police is None:
            return
        if isinstance(police, self._async_police):
            police._poolscope = police._signals._poolscope = (
                self.recorder, state, {}, current_task, police._cursors)
        else:
            police._poolscope = (self.recorder, state, {}, get_ident, police._cursor)

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
                self._get_failed(observed, exc)
                raise
            self._got(observed, conn)
            return conn

        observed_get.__wrapped__ = get
        return observed_get

    def _observed_async_get(self, get):
        """The async police's ``get``, observed as the sync one's."""

        async def observed_get(police, *args, **kwargs):
            observed = police.__dict__.get("_poolscope")
            if observed is None:
                return await get(police, *args, **kwargs)
            try:
                conn = await get(police, *args, **kwargs)
            except BaseException as exc:
                self._get_failed(observed, exc)
                raise
            self._got(observed, conn)
            return conn

        observed_get.__wrapped__ = get
        return observed_get

    def _got(self, observed, conn):
        try:
            if observed[2]:
                self._wait_over(observed, GRANTED)
            if conn is not None:
                rec = conn.__dict__.get("_poolscope")
                if rec is not None and not rec.closed and conn.sock is not None:
                    observed[0].acquired(rec)
                    _hold(observed, conn, rec)
        except Exception:
            internal_error("urllib3-future:police get")

    def _get_failed(self, observed, exc):
        if observed[2]:
            try:
                self._wait_over(observed, TIMED_OUT if isinstance(exc, self._unavailable)
                                else CANCELLED, exc)
            except Exception:
                internal_error("urllib3-future:police get")

    def _observed_insert(self, insert):
        """The police's ``_next_signal_or_container_insert``: a thread's connection is back,
        once after its acquisition (the release, or the start of the wait for its response),
        and after each time the thread located it again to read a response."""

        def observed_insert(police, *args, **kwargs):
            observed = police.__dict__.get("_poolscope")
            if observed is None:  # a PoolManager's police of pools, on every request
                return insert(police, *args, **kwargs)
            try:  # the thread's key: an argument from urllib3-future 2.24 on
                cursor = police._cursor.get(args[0] if args else get_ident())
            except Exception:
                cursor = None
            insert(police, *args, **kwargs)
            if cursor is not None:
                self._given_back(observed, cursor)

        observed_insert.__wrapped__ = insert
        return observed_insert

    def _async_given_back(self, signals, args, kwargs):
        """``AsyncSignals.next``: the current task's connection goes back, to a waiting task
        or (next returning False) into the container, as for the sync police's insert."""
        observed = signals.__dict__.get("_poolscope")
        if observed is not None:
            cursor = observed[4].get(current_task())
            if cursor is not None:
                self._given_back(observed, cursor)

    def _given_back(self, observed, cursor):
        """The connection of ``cursor`` is back with the police: released, if the cursor
        carries its acquisition, once no response is still to come or to be read on it."""
        try:
            attrs = getattr(cursor.conn_or_pool, "__dict__", {})
            pending = attrs.get("_pending_responses")
            if type(pending) is not _PendingResponses:
                pending = None
            held = cursor.__dict__.pop("_poolscope", None)
            if held is None or held is not attrs.get("_poolscope"):
                if pending is not None and pending.returned:
                    pending.settle()
                return
            if held.in_use:  # closed in use, it still ends a hold
                if pending is not None and pending.owned():
                    pending.returned += 1
                else:
                    observed[0].released(held)
        except Exception:
            internal_error("urllib3-future:police release")

    @staticmethod
    def _new_conn_start(pool_obj, args, kwargs):
        return time.monotonic(), time.time_ns()

    def _new_conn(self, token, pool_obj, conn, exc):
        super()._new_conn(token, pool_obj, conn, exc)
        if exc is None and "_poolscope" not in conn.__dict__ and not conn.is_closed:
            self._raced(token, pool_obj, conn)

    def _raced(self, token, pool_obj, conn):
        """A connection happy eyeballs established inside ``_new_conn``: urllib3-future races
        its challengers' ``connect`` in other threads or tasks, where no pool is known. The
        winner is created, acquired and opened now, its set-up time the race's (as a
        ``connect``'s includes name resolution); the losers never were the pool's."""
        pool = self.pool_state(pool_obj)
        with self.serialized(pool):
            rec = conn._poolscope = self.recorder.conn_created(pool)
            self.recorder.acquired(rec)
        self._connected((rec, *token, []), conn, None, None)

    def _connected(self, token, conn, result, exc):
        super()._connected(token, conn, result, exc)
        rec = token[0]
        police = getattr(rec.pool.ref(), "pool", None)
        observed = getattr(police, "__dict__", {}).get("_poolscope")
        if exc is not None or observed is None:
            return
        _hold(observed, conn, rec)  # acquired at connect: given back with the caller's cursor
        if type(getattr(conn, "_pending_responses", None)) is dict:
            pending = _PendingResponses(conn._pending_responses)
            pending.recorder, pending.rec = self.recorder, rec
            pending.lock = getattr(police, "_lock", _NO_LOCK)
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

    def _signalled(self, token, owner, signal, exc):
        """A caller registered to be woken (with the police, or its ``AsyncSignals``): from
        ``get``, a wait for a connection begins (unless this caller's wait goes on after a
        wake-up without one)."""
        observed = owner.__dict__.get("_poolscope")
        if observed is None or exc is not None or calling(self._get_code) is None:
            return
        waits, key = observed[2], observed[3]()
        if key not in waits:
            waits[key] = observed[0].wait_started(observed[1])

    def _wait_over(self, observed, outcome, error=None):
        wait = observed[2].pop(observed[3](), None)
        if wait is not None:
            observed[0].wait_ended(wait, outcome, error if outcome == TIMED_OUT else None)

    def _extension_started(self, token, extension, result, exc):
        """An HTTP extension took its response's connection over: after a ``101``, a
        WebSocket's, held until it closes (an HTTP/2 one is a stream: its connection goes on)."""
        response = getattr(extension, "_response", None)
        rec = getattr(getattr(response, "_connection", None), "__dict__", {}).get("_poolscope")
        if exc is None and rec is not None and response.status == 101:
            self.recorder.upgraded(rec)

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
        elif calling(self._abort_code, depth=2) is not None:
            reason = sc.ERROR  # a response given back before its end: HTTP/1.1 resets by closing
        elif rec.in_use and calling(self._get_conn_code) is None:
            reason = sc.SERVER_CLOSED if _refused_more(conn) else sc.ERROR
        else:
            if rec.in_use:
                # urllib3-future found the pooled connection dropped as it handed it out: the
                # request goes out on a new socket, acquired at connect
                self.recorder.unacquired(rec)
            reason = sc.KEEPALIVE_EXPIRED if _past_keepalive(conn) else sc.SERVER_CLOSED
        self.recorder.closed(rec, reason)


def _hold(observed, conn, rec):
    """The caller's cursor on ``conn`` carries its acquisition ``rec`` until the police takes
    the connection back (a cursor handed to another caller, as the police does to read a
    response, takes it along)."""
    cursor = observed[4].get(observed[3]())
    if cursor is not None and cursor.conn_or_pool is conn:
        cursor._poolscope = rec


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

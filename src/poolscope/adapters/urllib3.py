"""urllib3 1.26 and 2.x (and so requests and botocore), through ``HTTPConnectionPool``.

- Waits: the queue urllib3 made for the pool (whatever its class: urllib3 2.8 looks
  ``queue.LifoQueue`` up as each pool is made, so gevent and others can patch it late) takes
  the class of an observed subclass of its own class, which tells whether a ``get`` found the
  queue empty (every slot out) and so had to wait. A compiled queue class that refuses a new
  ``__class__`` (gevent's) is replaced by an observed subclass holding the same items.
- Acquire: ``_get_conn``; the request reuses the connection when its socket is still open
  (after urllib3's own dropped-connection check), otherwise it will open a new one.
- Create: ``HTTPConnection.connect`` / ``HTTPSConnection.connect`` (TCP, plus TLS).
- Release: ``_put_conn``; a ``put`` into a full queue marks the connection ``pool_full``.
- Close: ``HTTPConnection.close``, the reason read from the context described in
  :func:`_close_reason`. A urllib3 connection object outlives its sockets (it reconnects), so
  poolscope counts each socket as one connection.
- Eviction: ``RecentlyUsedContainer.__setitem__`` marks the pool a ``PoolManager`` drops.
"""

import queue
import sys
import time
import weakref

from .. import _semconv as sc
from .._config import internal_error
from .._recorder import ABANDONED, GRANTED, TIMED_OUT
from ._base import Adapter, arg, peer_address

_DEFAULT_PORTS = {"http": 80, "https": 443}
_EMPTY_POOL = None  # the EmptyPoolError urllib3 raises next, for the wait span (set at patch)


def _event(method, *args):
    try:
        return method(*args)
    except Exception:
        internal_error("urllib3:pool queue")
        return None


class _ObservedQueue:
    """Mixed in before a pool's queue class: tells poolscope when a request had to wait.

    No ``__slots__``: with them, CPython refuses the class as a new ``__class__`` of a queue.
    """

    _poolscope = None  # (recorder, pool state), set when the pool registers

    def get(self, block=True, timeout=None):
        observed = self._poolscope
        if observed is None or not block:
            return super().get(block, timeout)
        try:  # only the public interface: gevent's queue, for one, has none of Queue's insides
            return super().get(False)
        except queue.Empty:  # every slot is out: a wait
            pass
        recorder, pool = observed
        wait = _event(recorder.wait_started, pool)
        outcome, error = ABANDONED, None
        try:
            item = super().get(block, timeout)
            outcome = GRANTED
            return item
        except queue.Empty:
            outcome, error = TIMED_OUT, _EMPTY_POOL
            raise
        finally:
            if wait is not None:
                _event(recorder.wait_ended, wait, outcome, error)

    def put(self, item, block=True, timeout=None):
        try:
            super().put(item, block, timeout)
        except queue.Full:
            rec = getattr(item, "_poolscope", None)
            if rec is not None:
                rec.reason = sc.POOL_FULL
            raise


_observed_classes = {}


def _observed_queue(pool_obj):
    """The pool's queue, made observed: the same object, given an observed subclass of its
    class; for a compiled class that refuses it (gevent's), a new queue of that subclass with
    the same items, which urllib3's finalizer of the pool drains as it would the old one."""
    old = pool_obj.pool
    if isinstance(old, _ObservedQueue):
        return old
    cls = type(old)
    observed = _observed_classes.get(cls)
    if observed is None:
        observed = _observed_classes[cls] = type(cls.__name__, (_ObservedQueue, cls),
                                                 {"__slots__": (), "__module__": cls.__module__})
    try:
        old.__class__ = observed
        return old
    except TypeError:
        pass
    new = observed(old.maxsize)
    items = []
    while True:
        try:
            items.append(old.get(False))
        except queue.Empty:
            break
    for item in reversed(items):  # in the order a LIFO queue gives them out
        new.put(item, False)
    pool_obj.pool = new
    drain = getattr(sys.modules.get("urllib3.connectionpool"), "_close_pool_connections", None)
    if drain is not None:
        weakref.finalize(pool_obj, drain, new)
    return new


def _close_reason(conn, rec):
    """Why urllib3 is closing ``conn``.

    Marked beforehand: ``pool_full`` (the queue refused it); the recorder applies the pool's
    own reason once it is closed, evicted or collected. Otherwise, in use: http.client closes an idle-state
    connection with no response pending only for a ``Connection: close`` reply
    (``server_closed``); any other close mid-exchange is a failed or abandoned request
    (``error``). Idle and still pooled: urllib3's dropped-connection check (``server_closed``).
    """
    if rec.reason:
        return rec.reason
    if rec.in_use:
        complete = (getattr(conn, "_HTTPConnection__state", None) == "Idle"
                    and getattr(conn, "_HTTPConnection__response", None) is None)
        return sc.SERVER_CLOSED if complete else sc.ERROR
    return sc.SERVER_CLOSED


class Urllib3Adapter(Adapter):
    library = "urllib3"

    def patch(self):
        global _EMPTY_POOL
        from urllib3 import _collections, connection, connectionpool, exceptions

        _EMPTY_POOL = exceptions.EmptyPoolError(
            None, "Pool is empty and a new connection can't be opened due to blocking mode.")
        pool_cls = connectionpool.HTTPConnectionPool
        self.wrap(pool_cls, "__init__", after=self._pool_init)
        self.wrap(pool_cls, "_get_conn", after=self._acquired)
        self.wrap(pool_cls, "_put_conn", before=self._release)
        self.wrap(pool_cls, "close", before=self._pool_close)
        for cls in (connection.HTTPConnection, connection.HTTPSConnection):
            if "connect" in vars(cls):
                self.wrap(cls, "connect", before=self._connect_start, after=self._connected)
        self.wrap(connection.HTTPConnection, "close", before=self._conn_close)
        self.wrap(_collections.RecentlyUsedContainer, "__setitem__", before=self._evicting)

    def limits(self, pool_obj):
        scheme = pool_obj.scheme or "http"
        size = pool_obj.pool.maxsize if pool_obj.pool is not None else None
        return {"max_connections": size, "max_idle": size,
                "origin": (scheme, pool_obj.host, pool_obj.port or _DEFAULT_PORTS.get(scheme))}

    def registered(self, pool_obj, state):
        if pool_obj.pool is not None:
            _observed_queue(pool_obj)._poolscope = (self.recorder, state)

    def _acquired(self, token, pool_obj, conn, exc):
        if exc is not None:
            return
        rec = conn.__dict__.get("_poolscope")
        if conn.sock is None:
            rec = conn._poolscope = self.recorder.conn_created(self.pool_state(pool_obj))
        elif rec is None or rec.closed:
            return  # opened before poolscope was on: not tracked
        self.recorder.acquired(rec)

    def _release(self, pool_obj, args, kwargs):
        conn = arg(args, kwargs, 0, "conn")
        rec = conn.__dict__.get("_poolscope") if conn is not None else None
        if rec is not None and not rec.closed:
            self.recorder.released(rec)

    def _connect_start(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is None or rec.opened or rec.closed:
            return None
        return rec, time.monotonic(), self.recorder.setup_started(rec.series)

    def _connected(self, token, conn, result, exc):
        rec, started, span = token
        try:
            if exc is None:
                self.recorder.conn_opened(rec, time.monotonic() - started)
        finally:
            if span is not None:
                self.recorder.setup_ended(span, exc, peer_address(lambda: conn.sock.getpeername()))

    def _conn_close(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is not None and not rec.closed:
            self.recorder.closed(rec, _close_reason(conn, rec))

    def _evicting(self, container, args, kwargs):
        entries = container._container
        if arg(args, kwargs, 0, "key") in entries or len(entries) < container._maxsize:
            return
        victim = next(iter(entries.values()), None)
        state = getattr(victim, "__dict__", {}).get("_poolscope")
        if state is not None and state.close_reason is None:
            state.close_reason = sc.EVICTED

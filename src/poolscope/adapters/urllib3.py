"""urllib3 1.26 and 2.x (and so requests and botocore), through ``HTTPConnectionPool``.

A healthy request passes through no poolscope wrapper: poolscope observes the queue urllib3
keeps each pool's connections in, where urllib3 already does its bookkeeping under the
queue's own lock.

- The queue (whatever its class: urllib3 2.8 looks ``queue.LifoQueue`` up as each pool is
  made, so gevent and others can patch it late) takes the class of an observed subclass of its
  own class. Its ``_get`` is the acquisition of a pooled, established connection (reused);
  its ``_put`` the release. A compiled queue class that refuses a new ``__class__`` (gevent's)
  is replaced by an observed subclass holding the same items, observed at ``get``/``put``.
- Wait: the queue's ``not_empty`` condition, which ``Queue.get`` waits on exactly when every
  slot is out; the wait ends granted, timed out (urllib3 then raises ``EmptyPoolError``) or
  abandoned, all inside that ``wait``.
- Create: ``HTTPConnection.connect`` / ``HTTPSConnection.connect`` (TCP, plus TLS), where a
  request on a new connection (or on a pooled one whose socket was closed) is acquired.
- Close: ``HTTPConnection.close``, the reason read from the context described in
  :func:`_close_reason`. A urllib3 connection object outlives its sockets (it reconnects), so
  poolscope counts each socket as one connection. A pooled connection urllib3 finds dropped
  as it hands it out was acquired as reused at ``_get``; that acquisition is undone at its
  close, and the request's new socket is acquired at ``connect``.
- Pools register at ``__init__``, or (made before ``instrument()``) at their next new
  connection; ``close`` and collection detach the queue before urllib3 drains it.
- Eviction: ``RecentlyUsedContainer.__setitem__`` marks the pool a ``PoolManager`` drops.
"""

import queue
import sys
import threading
import time
import weakref

from .. import _semconv as sc
from .._config import internal_error
from .._recorder import CANCELLED, GRANTED, TIMED_OUT
from ._base import (DEFAULT_PORTS, Adapter, arg, calling, disconnected, peer_address,
                    phase_timer, phases_begin, phases_end)

_EMPTY_POOL = None  # the EmptyPoolError urllib3 raises next, for the wait span (set at patch)
_GET_CONN = _PUT_CONN = _URLOPEN = None  # code objects of urllib3's own methods (set at patch)
monotonic = time.monotonic


def _event(method, *args):
    try:
        return method(*args)
    except Exception:
        internal_error("urllib3:pool queue")
        return None


class _ObservedQueue:
    """Mixed in before a pool's queue class. No ``__slots__``: with them, CPython refuses the
    class as a new ``__class__`` of a queue."""

    _poolscope = None  # (recorder, pool state) while the pool is observed

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(getattr(self, "not_empty", None)) is threading.Condition:
            self.not_empty = _ObservedCondition(self.mutex)
        self._poolscope = None
        _own_methods(self)

    def _get(self):
        get = self._poolscope_get
        item = self.queue.pop() if get is None else get(self)
        observed = self._poolscope
        if observed is not None and item is not None:
            try:
                rec = item._poolscope
            except AttributeError:  # not a urllib3 connection
                rec = None
            if rec is not None and not rec.closed and item.sock is not None:
                try:
                    observed[0].acquired(rec)
                except Exception:
                    internal_error("urllib3:pool queue")
        return item

    def _put(self, item):
        put = self._poolscope_put
        if put is None:
            self.queue.append(item)
        else:
            put(self, item)
        observed = self._poolscope
        if observed is not None and item is not None:
            try:
                rec = item._poolscope
            except AttributeError:
                rec = None
            if rec is not None and rec.in_use:  # closed in use, it still ends a hold
                try:
                    observed[0].released(rec)
                except Exception:
                    internal_error("urllib3:pool queue")


def _own_methods(q):
    """The queue's own ``_get``/``_put`` (None: ``LifoQueue``'s, done inline), as attributes of
    the queue itself: read from its class, they cost each request a slow look-up."""
    q._poolscope_get, q._poolscope_put = q._poolscope_get, q._poolscope_put


class _ObservedCondition(threading.Condition):
    """The ``not_empty`` condition of an observed queue: ``Queue.get`` waits on it only when
    the queue is empty. The wait is seen whole here: this ``wait`` returns only once the queue
    has an item (granted: ``_get`` follows under the same lock) or the caller's deadline has
    passed (``Queue.get`` then raises ``Empty``)."""

    def wait(self, timeout=None):
        caller = sys._getframe(1).f_locals
        q = caller.get("self")
        observed = getattr(q, "_poolscope", None)
        if observed is None or not hasattr(q, "_qsize"):
            return super().wait(timeout)
        recorder, pool = observed
        endtime = caller.get("endtime") if timeout is not None else None
        if timeout is not None and endtime is None:
            endtime = monotonic() + timeout
        wait = _event(recorder.wait_started, pool)
        outcome, got = CANCELLED, False
        try:
            while True:
                got = super().wait(timeout)
                if q._qsize():
                    outcome = GRANTED
                    return got
                if getattr(q, "is_shutdown", False):
                    return got
                if endtime is not None:
                    timeout = endtime - monotonic()
                    if timeout <= 0:
                        outcome = TIMED_OUT
                        return got
        finally:
            _ended(recorder, wait, outcome)


class _WaitObservedQueue(_ObservedQueue):
    """For a queue without ``Queue``'s condition (gevent's compiled one): a ``get`` that finds
    the queue empty is a wait."""

    def get(self, block=True, timeout=None):
        observed = self._poolscope
        if observed is None or not block:
            return super().get(block, timeout)
        try:
            return super().get(False)
        except queue.Empty:  # every slot is out: a wait
            pass
        recorder, pool = observed
        wait = _event(recorder.wait_started, pool)
        outcome = CANCELLED
        try:
            item = super().get(block, timeout)
            outcome = GRANTED
            return item
        except queue.Empty:
            outcome = TIMED_OUT
            raise
        finally:
            _ended(recorder, wait, outcome)


def _ended(recorder, wait, outcome):
    if wait is not None:
        _event(recorder.wait_ended, wait, outcome, _EMPTY_POOL if outcome == TIMED_OUT else None)


_observed_classes = {}


def _unless(method, lifo):
    """``method`` (called with the queue), or None where it is ``LifoQueue``'s own (done
    inline, a call less)."""
    return None if method is lifo else staticmethod(method)


def _observe_queue(pool_obj, observed):
    """Observe the pool's queue with an observed subclass of its own class.

    A pool's queue as ``__init__`` left it (every slot free, no one else holding the pool) is
    replaced by a new queue of that subclass: an object made with its class runs as fast as
    the original, where one given a new ``__class__`` does not (CPython's attribute caches
    miss on it, about 0.6 µs per request). urllib3 2.x's finalizer of the pool would drain
    the old queue, so the new one gets a finalizer of its own. A pool poolscope meets later,
    in use, keeps its queue, which takes the subclass in place (or, a compiled class that
    refuses it, gevent's, is replaced with the same items).
    """
    old = pool_obj.pool
    cls = type(old)
    if isinstance(old, _ObservedQueue):
        old._poolscope = observed
        return
    new_class = _observed_classes.get(cls)
    if new_class is None:
        inline = isinstance(getattr(old, "not_empty", None), threading.Condition)
        new_class = _observed_classes[cls] = type(
            cls.__name__, (_ObservedQueue if inline else _WaitObservedQueue, cls),
            {"_poolscope_get": _unless(cls._get, queue.LifoQueue._get),
             "_poolscope_put": _unless(cls._put, queue.LifoQueue._put),
             "__slots__": (), "__module__": cls.__module__})
    items = list(getattr(old, "queue", ()))
    if len(items) != old.maxsize or any(item is not None for item in items):
        try:
            old.__class__ = new_class
            if type(getattr(old, "not_empty", None)) is threading.Condition:
                old.not_empty.__class__ = _ObservedCondition
            _own_methods(old)
            old._poolscope = observed
            return
        except TypeError:
            pass
    new = new_class(old.maxsize)
    items = []
    while True:
        try:
            items.append(old.get(False))
        except queue.Empty:
            break
    for item in reversed(items):  # in the order a LIFO queue gives them out
        new.put(item, False)
    new._poolscope = observed
    pool_obj.pool = new
    drain = getattr(sys.modules.get("urllib3.connectionpool"), "_close_pool_connections", None)
    if drain is not None:
        weakref.finalize(pool_obj, drain, new)


_LOCK_TYPE = type(threading.Lock())


def _detach(q, restore=False):
    """Stop observing ``q``: its pool was closed or collected (urllib3 drains it next), or
    poolscope is uninstrumented (``restore``: the queue and its condition get their own
    classes back)."""
    q._poolscope = None
    if restore and type(q) in _observed_classes.values():
        try:
            q.__class__ = type(q).__mro__[2]
            for name in ("_poolscope_get", "_poolscope_put"):
                q.__dict__.pop(name, None)
            if type(getattr(q, "not_empty", None)) is _ObservedCondition:
                q.not_empty.__class__ = threading.Condition
        except TypeError:
            pass


def _close_reason(conn, rec):
    """Why urllib3 is closing ``conn``.

    Marked beforehand: ``pool_full`` (the queue refused it); the recorder applies the pool's
    own reason once it is closed, evicted or collected. Otherwise, in use: http.client closes an idle-state
    connection with no response pending only for a ``Connection: close`` reply
    (``server_closed``); any other close mid-exchange is a failed or abandoned request
    (``error``). Idle and still pooled: urllib3's dropped-connection check (``server_closed``).
    """
    if rec.in_use:
        complete = (getattr(conn, "_HTTPConnection__state", None) == "Idle"
                    and getattr(conn, "_HTTPConnection__response", None) is None)
        return sc.SERVER_CLOSED if complete else sc.ERROR
    return sc.SERVER_CLOSED


def _left_unread(conn):
    """Whether ``conn``'s last response was given back before its end (``release_conn()``
    unread): the rest of it makes the socket readable, which urllib3 takes for a drop."""
    response = getattr(conn, "_HTTPConnection__response", None)
    return response is not None and not response.isclosed()


class Urllib3Adapter(Adapter):
    library = "urllib3"
    _https = ()  # the connection class whose connect is TCP then TLS (urllib3's, not its fork's)
    _pool_methods = frozenset()  # the names of the pool classes' methods
    _new_conn_start = None  # a before hook of the pools' _new_conn (urllib3-future's)

    def patch(self):
        global _EMPTY_POOL, _GET_CONN, _PUT_CONN, _URLOPEN
        from urllib3 import _collections, connection, connectionpool, exceptions

        _EMPTY_POOL = exceptions.EmptyPoolError(
            None, "Pool is empty and a new connection can't be opened due to blocking mode.")
        pool_cls = connectionpool.HTTPConnectionPool
        _GET_CONN, _PUT_CONN, _URLOPEN = (getattr(getattr(pool_cls, name), "__code__", None)
                                          for name in ("_get_conn", "_put_conn", "urlopen"))
        self.patch_pools(pool_cls, (connection.HTTPConnection, connection.HTTPSConnection))
        # the socket's opening (name resolution and TCP connect); the rest of an HTTPS
        # connection's connect is its TLS handshake
        self._https = connection.HTTPSConnection
        # its poolscope state (a Conn, set at connect), read by the pool's queue on each request
        self.replace(connection.HTTPConnection, "_poolscope", None)
        self.wrap(connection.HTTPConnection, "_new_conn", *phase_timer(sc.CONNECT))
        self.wrap(_collections.RecentlyUsedContainer, "__setitem__", before=self._evicting)

    def patch_pools(self, pool_cls, conn_classes):
        """The pool's life and its connections' (``conn_classes``: the HTTP connection class,
        then its HTTPS subclass) set-up and close; shared with urllib3-future, whose sync and
        async pools each come through here."""
        self._pool_methods = self._pool_methods | frozenset(
            name for cls in (pool_cls, *pool_cls.__subclasses__()) for name in vars(cls))
        self.wrap(pool_cls, "__init__", after=self._pool_init)
        for cls in (pool_cls, *pool_cls.__subclasses__()):  # the HTTPS pool has its own
            if cls.__module__ == pool_cls.__module__ and "_new_conn" in vars(cls):
                self.wrap(cls, "_new_conn", before=self._new_conn_start, after=self._new_conn)
        self.wrap(pool_cls, "close", before=self._pool_close)
        for cls in conn_classes:
            if "connect" in vars(cls):
                self.wrap(cls, "connect", before=self._connect_start, after=self._connected)
        self.wrap(conn_classes[0], "close", before=self._conn_close)
        # a subclass that opens its socket its own way (docker's and requests-unixsocket's
        # Unix socket connections)
        self.observe_subclasses(conn_classes[0], {"connect": (self._connect_start,
                                                              self._connected)})

    def unpatch(self):
        super().unpatch()
        for pool_obj in self.recorder.pool_objects(self.library):
            if getattr(pool_obj, "pool", None) is not None:
                _detach(pool_obj.pool, restore=True)

    def limits(self, pool_obj):
        scheme = pool_obj.scheme or "http"
        size = pool_obj.pool.maxsize if pool_obj.pool is not None else None
        return {"max_connections": size, "max_idle": size,
                "origin": (scheme, pool_obj.host, pool_obj.port or DEFAULT_PORTS.get(scheme)),
                "serialized": isinstance(getattr(pool_obj.pool, "mutex", None), _LOCK_TYPE)}

    def registered(self, pool_obj, state):
        if pool_obj.pool is not None:
            _observe_queue(pool_obj, (self.recorder, state))
            weakref.finalize(pool_obj, _detach, pool_obj.pool)

    def own_lock(self, pool_obj):
        q = getattr(pool_obj, "pool", None)  # the queue's mutex, while poolscope observes it
        return q.mutex if getattr(q, "_poolscope", None) is not None else None

    def _pool_close(self, pool_obj, args, kwargs):
        state = getattr(pool_obj, "_poolscope", None)
        if state is None:
            return
        with self.serialized(state):
            if pool_obj.pool is not None:
                _detach(pool_obj.pool)
            self.recorder.pool_closed(state)

    def _new_conn(self, token, pool_obj, conn, exc):
        if exc is None:
            conn._poolscope_pool = self.pool_state(pool_obj)

    def _connect_start(self, conn, args, kwargs):
        if "_poolscope_connecting" in conn.__dict__:
            return None  # a subclass's connect calling its parent's (see patch_pools)
        rec = conn.__dict__.get("_poolscope")
        if rec is None or rec.closed:
            pool = self._pool_of(conn, rec)
            if pool is None:
                return None  # opened before poolscope was on: not tracked
            with self.serialized(pool):
                rec = conn._poolscope = self.recorder.conn_created(pool)
                self.recorder.acquired(rec)
        elif rec.opened:
            return None
        conn._poolscope_connecting = True
        return rec, time.monotonic(), time.time_ns(), phases_begin()

    def _pool_of(self, conn, rec):
        """The live pool state of a connection object about to open a socket: its last
        socket's, its tag from ``_new_conn``, or (made before ``instrument()``) the pool found
        as the ``self`` of the pool method that is connecting it. Only such methods' frames are
        read: before Python 3.13, reading a frame's ``f_locals`` keeps its locals alive until
        it returns, and the application's own must not be."""
        for pool in (rec.pool if rec is not None else None, conn.__dict__.get("_poolscope_pool")):
            if pool is not None and pool.live and pool.owner is self.recorder:
                return pool
        frame = sys._getframe(3)
        for _ in range(8):
            if frame is None:
                return None
            code = frame.f_code
            if code.co_name in self._pool_methods and "conn" in code.co_varnames:
                owner = frame.f_locals.get("self")
                if hasattr(owner, "_get_conn") and frame.f_locals.get("conn") is conn:
                    return self.pool_state(owner)
            frame = frame.f_back
        return None

    def _connected(self, token, conn, result, exc):
        """The set-up that began at ``token`` (its state, when it began as ``time.monotonic()``
        and ``time.time_ns()``, its phases) ended; its span is made now that it is over."""
        rec, started, started_ns, phases = token
        ended, ended_ns = time.monotonic(), time.time_ns()
        conn.__dict__.pop("_poolscope_connecting", None)
        phases_end()
        span = self.recorder.setup_started(rec, start_ns=started_ns)
        try:
            if exc is None:
                with self.serialized(rec.pool):
                    self.recorder.conn_opened(rec, ended - started, self.http_version(conn),
                                              self.streams(conn))
                if (phases and isinstance(conn, self._https)
                        and not getattr(conn, "_tunnel_host", None)):
                    phases.append((sc.TLS, (ended_ns - phases[-1][2]) / 1e9, ended_ns))
                self.recorder.setup_phases(rec, phases)
        finally:
            if span is not None:
                self.recorder.setup_ended(span, exc, peer_address(lambda: conn.sock.getpeername()),
                                          ended_ns)

    @staticmethod
    def http_version(conn):
        """The HTTP version a connection speaks (network.protocol.version): HTTP/2 where TLS
        chose it (``urllib3.http2.inject_into_urllib3()``), else 1.1."""
        try:
            return "2" if conn.sock.selected_alpn_protocol() == "h2" else "1.1"
        except Exception:  # no TLS (no ALPN), or a socket of another kind
            return "1.1"

    def streams(self, conn):
        """For a multiplexed connection, a function giving its (active streams, stream limit)
        (see :meth:`Recorder.conn_opened`); None for urllib3's."""
        return None

    def _conn_close(self, conn, args, kwargs):
        rec = conn.__dict__.get("_poolscope")
        if rec is None:
            return
        if not rec.closed:
            with self.serialized(rec.pool):
                if rec.in_use and calling(_GET_CONN) is not None:
                    # urllib3 found the pooled connection dropped as it handed it out: the
                    # request goes out on a new socket, acquired at connect
                    self.recorder.unacquired(rec)
                    reason = sc.ERROR if _left_unread(conn) else sc.SERVER_CLOSED
                    self.recorder.closed(rec, reason)
                elif rec.in_use and calling(_PUT_CONN) is not None:
                    # given back to a pool that is full (or closed), it never reaches the queue
                    self.recorder.released(rec, sc.POOL_FULL if rec.pool.live
                                           else _close_reason(conn, rec))
                else:
                    self.recorder.closed(rec, _close_reason(conn, rec))
        if rec.uses > 1:
            self._stale(rec, calling(_URLOPEN, depth=1))

    def _stale(self, rec, frame):
        """``urlopen`` (``frame``) closes a reused connection its request failed on, whether or
        not the connection closed itself already: if the server had closed it, the request
        failed stale. The retry goes ahead when ``urlopen`` kept the error (``err``); else its
        exception is under way."""
        if frame is None:
            return
        err = frame.f_locals.get("err")
        if self.disconnected(err if err is not None else sys.exc_info()[1]):
            self.recorder.stale_failure(rec, err is not None)

    disconnected = staticmethod(disconnected)

    def _evicting(self, container, args, kwargs):
        entries = container._container
        if arg(args, kwargs, 0, "key") in entries or len(entries) < container._maxsize:
            return
        victim = next(iter(entries.values()), None)
        state = getattr(victim, "__dict__", {}).get("_poolscope")
        if state is not None and state.close_reason is None:
            state.close_reason = sc.EVICTED

"""Pool events in, OpenTelemetry out: the per-pool live state, the records into the
histograms ``_instruments`` makes, and when to make the spans ``_spans`` makes.

Adapters call the event methods below; only this module and ``_instruments`` touch
the metrics API. A healthy request (a pooled connection reused, no wait) changes
plain integers on its connection and its pool only, serialized by the
library's own lock where the pool has one; the per-origin counts and gauges
are summed from the pools' connections when a reader collects (``_instruments``), so a
request costs no SDK call. Rarer events (a new connection, a close, a wait) also take
the recorder's lock. Histograms record only waits, new connections and closes
(and, with detailed timings, use and idle times).
"""

import gc
import os
import queue
import sys
import threading
import time
import weakref

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation import _SPAN_KEY

from . import _semconv as sc
from ._config import internal_error, logger
from ._instruments import make_instruments
from ._spans import Tracing, current_context, recording_span
from ._version import __version__

monotonic = time.monotonic

GRANTED, TIMED_OUT, CANCELLED = sc.GRANTED, sc.TIMED_OUT, sc.CANCELLED
_CURRENT = object()


def _count(counts, key):
    counts[key] = counts.get(key, 0) + 1


class Series:
    """One attribute set (a library, or a library and an origin) for the life of the process."""

    __slots__ = ("key", "attrs", "pending", "acquired", "acquired_seen", "created", "closed",
                 "waits", "stale", "saturated", "saturated_seen", "peak", "pools_opened",
                 "multiplexed", "_derived")

    def __init__(self, key, attrs):
        self.key = key
        self.attrs = attrs
        self.pending = 0
        self.acquired = [0, 0]  # [new, reused on connections since closed]
        self.acquired_seen = [0, 0]
        self.created = self.peak = self.pools_opened = 0
        self.closed = {}
        self.waits = {}  # outcome -> waits ended so
        self.stale = {}  # retried -> requests failed on a connection the server had closed
        self.saturated = self.saturated_seen = 0.0
        self.multiplexed = False  # it had HTTP/2 (or HTTP/3) connections
        self._derived = {}

    @property
    def is_origin(self):
        return len(self.key) > 1

    def attr(self, *items):
        """The series' attributes plus ``(name, value)`` items (None values left out), built
        once."""
        derived = self._derived.get(items)
        if derived is None:
            derived = self._derived[items] = {**self.attrs,
                                              **{k: v for k, v in items if v is not None}}
        return derived

    def reset_counts(self):
        self.acquired = [0, 0]
        self.acquired_seen = [0, 0]
        self.created = self.peak = self.pools_opened = 0
        self.closed = {}
        self.waits = {}
        self.stale = {}
        self.saturated = self.saturated_seen = 0.0


_NEVER = float("inf")


class Pool:
    """The live state of one library pool object.

    ``active``, ``peak``, ``sat_since`` and ``saturated`` change under ``lock``; None where the
    adapter serializes the pool's events itself (under the library's own lock, or in one
    event loop).
    """

    __slots__ = ("owner", "library", "scope", "max", "idle_max", "active", "pending", "peak",
                 "sat_since", "saturated", "full_at", "conns", "waits", "queued", "busy", "live",
                 "close_reason", "ref", "parent", "lock", "__weakref__")

    def __init__(self, owner, library, scope, max_, idle_max, parent=None, lock=None):
        self.owner = owner
        self.parent = parent  # a pool whose limit also applies (aiohttp: the connector of a host)
        self.library = library
        self.scope = scope
        self.max = max_
        self.idle_max = idle_max
        self.lock = lock
        self.full_at = _NEVER if max_ is None else max_  # saturated at this many active
        self.active = self.pending = self.peak = 0
        self.sat_since = None
        self.saturated = 0.0
        self.conns = set()
        self.waits = set()
        self.queued = None  # or a function giving (series, since) of each queued request
        # or a function giving (connection, since) of each one a request holds that the
        # adapter learns of only when the request ends
        self.busy = None
        self.live = True
        self.close_reason = None
        self.ref = None


class Conn:
    """One connection, from the slot it takes to its close (a socket's lifetime)."""

    __slots__ = ("pool", "series", "in_use", "uses", "opened", "born", "acquired_at",
                 "released_at", "closed", "site", "warned", "setup", "setup_by", "protocol",
                 "streams", "stale_use", "upgraded", "idle_noted")

    def __init__(self, pool, series):
        self.pool = pool
        self.series = series
        self.in_use = self.uses = self.stale_use = 0
        self.opened = self.closed = self.warned = self.upgraded = self.idle_noted = False
        self.born = self.acquired_at = self.released_at = 0.0
        # a Link to its connection_setup span, and the span id of the request it was set up for
        self.site = self.setup = self.setup_by = None
        self.protocol = None  # "1.1", "2", "3" once known
        # a multiplexed connection's (active streams, stream limit), read from the library
        self.streams = None

    @property
    def active(self):
        return self.in_use > 0 or not self.opened

    @property
    def reuses(self):
        return self.uses - 1 if self.uses > 1 else 0


class Wait:
    """A request waiting for a connection."""

    __slots__ = ("pool", "series", "start", "end", "end_ns", "active", "done", "span", "parent")

    def __init__(self, pool, series, start):
        self.pool = pool
        self.series = series
        self.start = start
        self.end = self.end_ns = self.span = self.parent = None
        self.active = True
        self.done = False


class _Limits:
    """Which limits a scope's pools ever had (for the pool sums to report 0, not nothing)."""

    max = idle_max = peak_limit = None


_recorders = weakref.WeakSet()  # the recorders not closed
_collecting = None  # the thread running the cycle collector, while it runs


def _gc_phase(phase, info, get_ident=threading.get_ident):  # bound: it runs at shutdown too
    global _collecting
    _collecting = get_ident() if phase == "start" else None

# Frames of these packages are not "where the application acquired a connection".
_NOT_CALLERS = ("poolscope", "wrapt", "urllib3", "requests", "botocore", "httpx", "httpcore",
                "httpx2", "httpcore2", "openai", "anthropic", "urllib3_future", "niquests",
                "curl_cffi",
                "aiohttp", "pycurl", "asyncio", "anyio", "concurrent", "threading", "contextlib",
                "queue", "http", "ssl", "socket")


def _within(pool, outer):
    """Whether ``pool`` is ``outer`` or part of it."""
    while pool is not None:
        if pool is outer:
            return True
        pool = pool.parent
    return False


def _caller():
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.partition(".")[0] not in _NOT_CALLERS:
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _origin_text(series):
    attrs = series.attrs
    return (f"{attrs.get(sc.URL_SCHEME)}://{attrs.get(sc.SERVER_ADDRESS)}:"
            f"{attrs.get(sc.SERVER_PORT)} ({attrs[sc.LIBRARY]})")


# why a connection is held: one that opened, and one that never did but keeps its slot
_HELD_OPEN = "a response that is never closed keeps its connection"
_HELD_UNOPENED = ("it never opened (its set-up failed, or its request gave up), yet the library "
                  "keeps it, and its slot, in its pool (httpcore keeps a tunnel whose TLS "
                  "handshake failed: encode/httpcore#1023)")


class Recorder(Tracing):
    """Owns poolscope's state and instruments; adapters report pool events to it (its spans:
    :class:`~poolscope._spans.Tracing`)."""

    def __init__(self, meter_provider=None, tracer_provider=None, detailed=False, max_origins=1000,
                 leak_after=None):
        """``leak_after``: seconds after which a held connection is logged as a likely leak,
        with where it was acquired (None: off)."""
        self._lock = threading.RLock()
        self.leak_after = leak_after
        self._stopped = threading.Event()
        self._series = {}
        self._origins = {}
        self._pools = set()
        self._scopes = {}  # scope series -> _Limits seen on its pools
        self._deferred = queue.SimpleQueue()  # (event, args) from finalizers, see _reap
        self.detailed = detailed
        self.max_origins = max_origins
        self.on_first_pool = None  # called once, when this process's first pool opens
        meter = metrics.get_meter(sc.INSTRUMENTATION_NAME, __version__, meter_provider)
        (self._wait_time, self._create_time, self._phase_time, self._use_time, self._idle_time,
         self._duration, self._requests) = make_instruments(
            self, meter, meter_provider is None or meter_provider is metrics.get_meter_provider())
        self._tracer = trace.get_tracer(sc.INSTRUMENTATION_NAME, __version__, tracer_provider)
        _recorders.add(self)
        if _gc_phase not in gc.callbacks:
            gc.callbacks.append(_gc_phase)
        self._start_watch()

    def close(self):
        """Stop the leak watch thread, if any, and the garbage collector's callback."""
        self._stopped.set()
        _recorders.discard(self)
        if not _recorders and _gc_phase in gc.callbacks:
            gc.callbacks.remove(_gc_phase)

    def _start_watch(self):
        if self.leak_after is not None:
            threading.Thread(target=self._watch, name="poolscope-leaks", daemon=True).start()

    def _watch(self):
        interval = min(max(self.leak_after / 4, 0.05), 5.0)
        while not self._stopped.wait(interval):
            try:
                self.warn_leaks()
            except Exception:
                logger.warning("poolscope: leak watch failed", exc_info=True)
                return

    def warn_leaks(self):
        """Log one warning per connection held longer than ``leak_after`` (once each)."""
        self._reap()
        now = monotonic()
        with self._lock:
            leaked = [c for pool in self._pools for c in pool.conns
                      if c.in_use and not c.warned and now - c.acquired_at >= self.leak_after]
            for conn in leaked:
                conn.warned = True
        for conn in leaked:
            logger.warning("poolscope: a connection to %s has been held for %.1f s without being "
                           "returned, acquired at %s; %s", _origin_text(conn.series),
                           now - conn.acquired_at, conn.site or "an unknown place",
                           _HELD_OPEN if conn.opened else _HELD_UNOPENED)

    # -- registry ---------------------------------------------------------

    def series(self, library, origin=None):
        """The series of a library, or of a library and an origin ``(scheme, host, port)``."""
        key = (library,) if origin is None else (library, *origin)
        found = self._series.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._series.get(key)
            if found is not None:
                return found
            if origin is not None and self._origins.get(library, 0) >= self.max_origins:
                return self._other(library, origin[0])
            attrs = {sc.LIBRARY: library}
            if origin is not None:
                scheme, host, port = origin
                attrs.update({sc.URL_SCHEME: scheme, sc.SERVER_ADDRESS: host, sc.SERVER_PORT: port})
                self._origins[library] = self._origins.get(library, 0) + 1
            found = self._series[key] = Series(key, attrs)
            return found

    def _other(self, library, scheme):
        key = (library, scheme, sc.OTHER_ORIGIN)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(key, {sc.LIBRARY: library, sc.URL_SCHEME: scheme,
                                                     sc.SERVER_ADDRESS: sc.OTHER_ORIGIN})
        return found

    # -- pools ------------------------------------------------------------

    def pool_opened(self, library, obj, max_connections=None, max_idle=None, origin=None,
                    parent=None, serialized=False):
        """A library pool came to life; ``origin`` only where the pool serves one origin.

        ``parent``: the pool this one is part of, whose counts include this one's (a per-host
        limit inside a connector-wide one). ``serialized``: the adapter never reports two
        events of this pool at once (it reports them under the library's own lock of the pool,
        or from the one event loop the pool belongs to); else the recorder's lock serializes
        them.
        """
        self._reap()
        pool = Pool(self, library, self.series(library, origin), max_connections, max_idle, parent,
                    None if serialized else self._lock)
        pool.ref = weakref.ref(obj)
        with self._lock:
            self._pools.add(pool)
            pool.scope.pools_opened += 1
            seen = self._scopes.setdefault(pool.scope, _Limits())
            seen.max = seen.max if max_connections is None else max_connections
            seen.idle_max = seen.idle_max if max_idle is None else max_idle
        weakref.finalize(obj, self._deferred.put, (self.pool_gone, (pool,)))
        hook, self.on_first_pool = self.on_first_pool, None
        if hook is not None:
            try:
                hook()
            except Exception:
                internal_error("first pool")
        return pool

    def has_pools(self):
        """Whether any pool is live or holds connections in this process."""
        self._reap()
        with self._lock:
            return bool(self._pools)

    def pool_objects(self, library):
        """The library's pool objects this recorder observes that are still alive."""
        with self._lock:
            pools = [pool.ref() for pool in self._pools if pool.library == library]
        return [obj for obj in pools if obj is not None]

    def limit_changed(self, pool, max_connections):
        """The pool's connection limit is now ``max_connections`` (None: none)."""
        with self._lock:
            pool.max = max_connections
            if pool.live:
                pool.full_at = _NEVER if max_connections is None else max_connections
                self._shift(pool, 0, monotonic())

    def shared(self, pool):
        """Events of ``pool``, serialized until now, may also come from another thread from now
        on: the recorder's lock serializes them."""
        pool.lock = self._lock

    def pool_closed(self, pool, reason=sc.POOL_CLOSED, now=None):
        """The application closed the pool: it stops counting as live and saturated."""
        now = now or monotonic()
        if self.deferred(self.pool_closed, pool, reason, now):
            return
        with self._lock:
            if pool.close_reason is None:
                pool.close_reason = reason
            if pool.live:
                pool.live = False
                pool.full_at = _NEVER
                self._shift(pool, 0, now)
                self._forget(pool)

    def _reap(self):
        """Run the events that finalizers deferred. A finalizer runs at any allocation in any
        thread, even one that holds poolscope's lock or the SDK's, so it queues its event. They
        run in an empty context: the span current here has nothing to do with them."""
        deferred = self._deferred
        if deferred.empty():
            return
        token = otel_context.attach(otel_context.Context())
        try:
            while True:
                try:
                    event, args = deferred.get_nowait()
                except queue.Empty:
                    return
                event(*args)
        finally:
            otel_context.detach(token)

    def deferred(self, event, *args):
        """Whether a finalizer (urllib3 closes a collected pool's connections in one, curl_cffi
        a collected handle's) may have interrupted a locked section of this thread: poolscope's
        own, or, while the cycle collector runs, the SDK's (its locks are not reentrant). The
        event is then deferred to :meth:`_reap`, instead of changing what that section is
        reading or waiting for that lock forever."""
        if self._lock._is_owned() or _collecting == threading.get_ident():
            self._deferred.put((event, args))
            return True
        return False

    def pool_gone(self, pool):
        """The pool object was garbage-collected: whatever it still held is closed."""
        try:
            self.pool_closed(pool)
            for conn in list(pool.conns):
                self.closed(conn, pool.close_reason)
            for wait in list(pool.waits):
                self.wait_ended(wait, CANCELLED)
        except Exception:
            internal_error("a pool's garbage collection")

    def _forget(self, pool):
        if not pool.live and not pool.conns and not pool.waits and pool in self._pools:
            self._pools.discard(pool)
            pool.scope.saturated += pool.saturated

    def _shift(self, pool, step, now):
        """``step`` more connections active in ``pool`` and the pools it is part of, with the
        peak and the saturated time that follow (under the pool's lock)."""
        while pool is not None:
            active = pool.active = pool.active + step
            if active >= pool.full_at:
                if pool.sat_since is None:
                    pool.sat_since = now
            elif pool.sat_since is not None:
                pool.saturated += now - pool.sat_since
                pool.sat_since = None
            if active > pool.peak:
                self._peaked(pool)
            pool = pool.parent

    def _peaked(self, pool):
        with self._lock:
            pool.peak = pool.active
            if pool.active > pool.scope.peak:
                pool.scope.peak = pool.active
                self._scopes[pool.scope].peak_limit = pool.max

    # -- connections ------------------------------------------------------

    def conn_created(self, pool, series=None):
        """The pool reserved a slot for a new connection (not yet established)."""
        conn = Conn(pool, series or pool.scope)
        with self._lock:
            pool.conns.add(conn)
            self._shift(pool, 1, monotonic())
        return conn

    def setup_failed(self, series, error, context=None, seconds=0.0):
        """A connection to ``series`` failed to open (``error``) after ``seconds`` of set-up,
        where the library keeps nothing of it (libcurl): its ``HTTP connection_setup`` span,
        ended now in error; it counts nowhere, as no connection."""
        end_ns = time.time_ns()
        span = self.setup_started(Conn(None, series), context, end_ns - int(seconds * 1e9))
        self.setup_ended(span, error, end_ns=end_ns)

    def conn_opened(self, conn, seconds=None, protocol="1.1", streams=None, now=None):
        """The connection is established; ``seconds`` is its TCP (+TLS) set-up time if measured,
        ``protocol`` its HTTP version (None: not known). ``streams``, for an HTTP/2 or HTTP/3
        connection: a function giving its (active streams, stream limit) from the library's
        own books, read at collection. ``now``: when, where the adapter learns of it later."""
        with self._lock:
            if conn.opened or conn.closed:
                return
            conn.opened = True
            conn.protocol = protocol
            conn.streams = streams
            if streams is not None:
                conn.series.multiplexed = True
            conn.born = now = monotonic() if now is None else now
            conn.series.created += 1
            if conn.in_use == 0:
                self._shift(conn.pool, -1, now)
        if seconds is not None:
            self._create_time.record(seconds, conn.series.attrs)

    @staticmethod
    def protocol_known(conn, protocol):
        """The HTTP version of an open connection, learned after :meth:`conn_opened` (libcurl
        tells it only once a transfer on the connection has a response)."""
        conn.protocol = protocol

    def acquired(self, conn, wait=None, context=None, span=_CURRENT, link=True, now=None):
        """A request got ``conn``; returns whether it was reused. Ends ``wait`` if given.

        ``context``: the request's, where it is not the current one (see :meth:`context`); or
        ``span``: the request's span (None: none), where the library hands the connection to
        the request from another thread or task. The connection's set-up span is linked from
        the request's span, unless ``link`` is False: the library may yet take the connection
        back, and the adapter calls :meth:`link` once it is sure. ``now``: when, where the
        adapter learns of it later.
        The healthy request (a reuse, no wait) changes only the connection and its pool, under
        the pool's lock.
        """
        if now is None:
            now = monotonic()
        pool = conn.pool
        lock = pool.lock if conn.uses and wait is None else self._lock
        if lock is not None:
            lock.acquire()
        try:
            uses = conn.uses
            conn.uses = uses + 1
            if not uses:
                conn.series.acquired[0] += 1
            in_use = conn.in_use
            if not in_use:
                conn.acquired_at = now
                conn.warned = False
                if conn.opened and not conn.closed:
                    if pool.parent is None:  # _shift inline, on the healthy request's path
                        active = pool.active = pool.active + 1
                        if active >= pool.full_at and pool.sat_since is None:
                            pool.sat_since = now
                        if active > pool.peak:
                            self._peaked(pool)
                    else:
                        self._shift(pool, 1, now)
            conn.in_use = in_use + 1
            if wait is not None and wait.active:
                self._unwait(wait)
                wait.end = now
                wait.end_ns = time.time_ns()
        finally:
            if lock is not None:
                lock.release()
        if self.detailed and uses and not in_use and conn.released_at:  # it was idle
            conn.idle_noted = True
            self._idle_time.record(now - conn.released_at, conn.series.attrs)
        if span is _CURRENT:  # recording_span(context), inline: a call costs the request more
            span = (current_context() if context is None else context).get(_SPAN_KEY)
            if span is not None and not span.is_recording():
                span = None
        if span is not None:
            span.set_attribute(sc.SPAN_REUSED, uses > 0)
            if uses and conn.released_at:
                span.set_attribute(sc.SPAN_IDLE_TIME, 0.0 if in_use else now - conn.released_at)
            if link:
                self.link(span, conn)
        if self.leak_after is not None:
            conn.site = _caller()
        return uses > 0

    def unacquired(self, conn, wait=None):
        """Undo :meth:`acquired`: the connection turned out not to be available after all."""
        with self._lock:
            uses = conn.uses = conn.uses - 1
            if not conn.closed:
                if not uses:
                    conn.series.acquired[0] -= 1
            elif conn.opened:  # undo what its close counted (httpcore hands one connection to
                # several requests: the one that took it may have closed it before the rest try)
                conn.series.acquired[1 if uses else 0] -= 1
            conn.in_use -= 1
            used = None
            if conn.in_use == 0 and conn.opened and not conn.closed:
                self._shift(conn.pool, -1, monotonic())
                if (self.detailed and conn.protocol != "1.1"
                        and conn.released_at > conn.acquired_at):
                    used = conn.released_at - conn.acquired_at  # its streams' time, ended then
            resumed = wait is not None and not wait.active and not wait.done
            if resumed:
                wait.active = True
                wait.end = wait.end_ns = None
                self._pend(wait, 1)
        if used is not None:
            self._use_time.record(used, conn.series.attrs)
        if resumed and wait.parent is not None and wait.span is None:  # its span had ended
            wait.span = self._wait_span(wait.series)

    def upgraded(self, conn):
        """``conn`` left HTTP (``101 Switching Protocols``: a WebSocket). It keeps its place in
        the pool, active, until it closes (``upgraded``), but is no leak: no warning, no
        ``oldest_active_age``."""
        conn.upgraded = conn.warned = True

    def released(self, conn, close_reason=None, served=None):
        """The request is done with ``conn``; ``close_reason`` if the connection closed with it
        (``served``: as for :meth:`closed`)."""
        now = monotonic()
        used = idle = None
        pool = conn.pool
        lock = pool.lock
        if lock is not None:
            lock.acquire()
        try:
            in_use = conn.in_use
            if in_use > 0:
                conn.in_use = in_use - 1
                if in_use == 1:
                    if not conn.opened:  # never established: it closes now, still active
                        close_reason = close_reason or sc.ERROR
                    elif not conn.closed:
                        if pool.parent is None:  # _shift inline, as in acquired
                            active = pool.active = pool.active - 1
                            if active < pool.full_at and pool.sat_since is not None:
                                pool.saturated += now - pool.sat_since
                                pool.sat_since = None
                        else:
                            self._shift(pool, -1, now)
                if self.detailed and (in_use == 1 or conn.protocol == "1.1"):
                    used, idle = self._held(conn, now)
                conn.released_at = now
        finally:
            if lock is not None:
                lock.release()
        if close_reason is not None:
            self.closed(conn, close_reason, now, served)
        if used is not None and not self.deferred(self._held_record, conn, used, idle):
            self._held_record(conn, used, idle)

    @staticmethod
    def _held(conn, now):
        """(use time, idle time or None) of the hold of ``conn`` that ends now.

        An HTTP/1.1 connection serves one request at a time, so each release ends one request's
        hold, which began no earlier than the release before: httpcore hands an idle connection
        to several requests at once (each counted in ``in_use``), and one may take it after
        another's release, unseen. Such a hold's idle time, not recorded as it was acquired, is
        recorded here. A multiplexed connection's use time is its streams' together, from the
        first acquired to the last released."""
        if conn.protocol != "1.1":
            return now - conn.acquired_at, None
        before = conn.released_at
        start = max(conn.acquired_at, before)
        idle = start - before if before and not conn.idle_noted else None
        conn.idle_noted = False
        return now - start, idle

    def _held_record(self, conn, used, idle):
        self._use_time.record(used, conn.series.attrs)
        if idle is not None:
            self._idle_time.record(idle, conn.series.attrs)

    def closed(self, conn, reason, now=None, served=None):
        """The connection closed. One never established is dropped without being counted, and
        so are the acquisitions of it; one closed with or after its pool counts under the
        pool's close reason. ``served``: the requests it served by the library's own count,
        where requests it was handed may yet find it closed (httpcore). A request holding it
        still gives it back (:meth:`released`), which ends that request's hold."""
        now = now or monotonic()
        if self.deferred(self.closed, conn, reason, now, served):
            return
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
            pool = conn.pool
            if conn.upgraded:  # it ends with its WebSocket, whoever closes it
                reason = sc.UPGRADED
            elif not pool.live or pool.ref() is None:
                reason = pool.close_reason or sc.POOL_CLOSED
            pool.conns.discard(conn)
            if conn.active:
                self._shift(pool, -1, now)
            self._forget(pool)
            if not conn.opened:
                # never a connection: the requests handed it had none (as ``created`` counts)
                if conn.uses:
                    conn.series.acquired[0] -= 1
                return
            conn.series.acquired[1] += conn.reuses
            _count(conn.series.closed, reason)
            lifetime = now - conn.born
        self._duration.record(lifetime, conn.series.attr((sc.PROTOCOL_VERSION, conn.protocol)))
        self._requests.record(conn.uses if served is None else served, conn.series.attrs)
        span = recording_span()
        if span is not None:
            span.add_event(sc.EVENT_CLOSED, {sc.CLOSE_REASON: reason})

    def stale_failure(self, conn, retried):
        """A request failed on ``conn``, which it had reused, because the server had closed it
        (reset, or closed without a response); ``retried``: the library sends it again. Once
        per acquisition: a library may close the connection twice as the request fails."""
        with self._lock:
            if conn.stale_use != conn.uses:
                conn.stale_use = conn.uses
                _count(conn.series.stale, retried)

    # -- waits ------------------------------------------------------------

    def wait_started(self, pool, series=None, traced=True):
        """A request found no free connection and no room to open one.

        With ``traced`` and a recording span current, the wait is an ``HTTP wait_for_connection``
        span under it, ended by :meth:`wait_ended` at the moment the wait ended.
        """
        wait = Wait(pool, series or pool.scope, monotonic())
        with self._lock:
            self._pend(wait, 1)
        if traced:
            parent = recording_span()
            if parent is not None:
                with self._lock:
                    idle = sum(not c.active for p in self._pools if _within(p, pool)
                               for c in p.conns)
                    snapshot = (pool.active, idle, pool.pending, pool.max)
                wait.parent = parent
                wait.span = self._wait_span(wait.series, snapshot)
        return wait

    def wait_ended(self, wait, outcome=GRANTED, error=None, end=None):
        """The wait is over: a connection (or a slot) was granted, it timed out (``error`` the
        library's exception, if known), or it was cancelled (the request gave up, or its pool
        went)."""
        if end is None and wait.active:  # a granted wait ended when it was granted
            end = (monotonic(), time.time_ns())
        if self.deferred(self.wait_ended, wait, outcome, error, end):
            return
        with self._lock:
            if wait.done:
                return
            wait.done = True
            if wait.active:
                self._unwait(wait)
                wait.end, wait.end_ns = end or (monotonic(), time.time_ns())
            _count(wait.series.waits, outcome)
            span, wait.span = wait.span, None
        seconds = wait.end - wait.start
        if outcome == GRANTED:
            self._wait_time.record(seconds, wait.series.attrs)
        if span is not None:
            self._end_wait_span(span, wait.parent, outcome, seconds, error, wait.end_ns)

    def wait_granted(self, wait, end_span=True):
        """The request holds a connection the library may yet take back (httpcore's
        ``ConnectionNotAvailable``), its wait then going on; :meth:`wait_ended` counts it. The
        request's span learns the wait time now, and the wait's span ends now with
        ``end_span`` (else at :meth:`wait_ended`, at the time the wait ended)."""
        if wait.parent is None:  # untraced: no span to end or to annotate
            return
        with self._lock:
            if wait.done or wait.active:
                return
            span = wait.span if end_span else None
            if end_span:
                wait.span = None
        self._end_wait_span(span, wait.parent, GRANTED, wait.end - wait.start, None, wait.end_ns)

    def waited(self, series, seconds, context=None, end_ns=None, outcome=GRANTED, error=None):
        """A wait known only after it ended (pycurl): ``seconds`` long, ending at ``end_ns``
        (now if None), traced under ``context`` (see :meth:`context`). Only a granted wait's
        time is recorded; a timed-out one has the library's ``error``."""
        with self._lock:
            _count(series.waits, outcome)
        if outcome == GRANTED:
            self._wait_time.record(seconds, series.attrs)
        parent = recording_span(context)
        if parent is not None:
            end_ns = end_ns or time.time_ns()
            span = self._wait_span(series, context=context, start_ns=end_ns - int(seconds * 1e9))
            self._end_wait_span(span, parent, outcome, seconds, error, end_ns)

    def setup_phases(self, conn, phases):
        """How ``conn``'s set-up divided: ``phases`` are ``(phase, seconds, end_ns)``, each
        recorded in the phase histogram and, where the set-up was traced, as a child span of
        its ``HTTP connection_setup`` span."""
        for phase, seconds, _ in phases:
            self._phase_time.record(seconds, conn.series.attr((sc.SETUP_PHASE, phase)))
        if conn.setup is not None:
            self._phase_spans(conn, phases)

    def _unwait(self, wait):
        wait.active = False
        self._pend(wait, -1)

    def _pend(self, wait, step):
        wait.series.pending += step
        pool = wait.pool
        pool.pending += step
        if step > 0:
            pool.waits.add(wait)
        else:
            pool.waits.discard(wait)
            if not pool.live:
                self._forget(pool)
        pool = pool.parent
        while pool is not None:
            pool.pending += step
            pool = pool.parent

    def scopes(self):
        """{scope series: (limit of the pool that peaked, peak in use, pools opened)}, for the report."""
        self._reap()
        with self._lock:
            return {s: (limits.peak_limit if s.peak else limits.max, s.peak, s.pools_opened)
                    for s, limits in self._scopes.items()}

    # -- after fork -------------------------------------------------------

    def _after_fork(self):
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._start_watch()
        now = monotonic()
        for series in self._series.values():
            series.reset_counts()
        for pool in self._pools:
            for conn in pool.conns:
                conn.uses = min(conn.uses, 1)  # its acquisitions were the parent's
        for pool in self._pools:
            pool.peak = pool.active
            pool.saturated = 0.0
            if pool.lock is not None:
                pool.lock = self._lock
            if pool.sat_since is not None:
                pool.sat_since = now


def _after_fork():
    for recorder in list(_recorders):
        recorder._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

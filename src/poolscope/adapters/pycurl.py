"""pycurl 7.46+ (libcurl 7.80+), by replacing ``pycurl.Curl``, ``CurlMulti`` and ``CurlShare``.

Their methods are C functions that cannot be patched, so poolscope puts subclasses in their
place in the ``pycurl`` module. Code that took a reference to the original classes before
instrumenting (``from pycurl import Curl`` at import time, before ``instrument()``) and handles
made by ``duphandle()`` are not observed.

A pool is a libcurl connection cache: the multi handle's for transfers in a ``CurlMulti``, a
``CurlShare``'s when it shares connections, otherwise the easy handle's own. pycurl before 7.49
refuses a subclass of ``CurlShare``, so there it is left as it is, and every share is taken to
share connections (its handles' connections form one pool; it closes when it is collected).

- Acquire: libcurl's ``PREREQFUNCTION``, called once a transfer has its connection (new or
  reused), names the connection by its addresses and ports. An application's own
  ``PREREQFUNCTION`` is chained, never replaced.
- Create: the connection's TCP (+TLS) time from ``CONNECT_TIME_T``/``APPCONNECT_TIME_T`` minus
  ``NAMELOOKUP_TIME_T``, read when its first transfer completes.
- Release: when the transfer completes (``perform`` returns, or the multi's ``info_read``
  reports it). ``ACTIVESOCKET`` is -1 when the connection closed with the transfer.
- Wait: only a multi with ``M_MAX_TOTAL_CONNECTIONS`` or ``M_MAX_HOST_CONNECTIONS`` holds
  transfers back. libcurl's ``QUEUE_TIME_T`` is the time spent pending when a transfer was
  pending once, but adds up more than the elapsed time when it was woken and sent back to the
  queue (libcurl 8.23: 1.35 s reported for a 0.65 s wait), so the wait is the smaller of it and
  ``PRETRANSFER_TIME_T`` less the connection's set-up. A transfer counts as having waited when
  that is 1 ms or more: an unqueued one leaves the queue in microseconds. A transfer added to
  such a multi is pending from ``add_handle`` until it has a connection.
- Close: libcurl closes idle cached connections on its own (``MAXAGE_CONN`` expiry, a full
  cache, a dead socket) with no callback poolscope can rely on, so each idle connection's
  socket is checked when its pool opens a new connection and when the pool closes.
"""

import functools
import socket
import time
from urllib.parse import urlsplit

import pycurl

from .. import _semconv as sc
from .._config import internal_error
from .._recorder import ABANDONED, TIMED_OUT
from ._base import Adapter

_DEFAULT_PORTS = {"http": 80, "https": 443}
_QUEUED = 0.001
_DEFAULT_MAXAGE = 118.0  # libcurl's MAXAGE_CONN default, seconds

_adapter = None  # the active PycurlAdapter


def _alive(fd, key):
    """Whether ``fd`` is still the socket of connection ``key`` (local port, peer port)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.getsockname()[1] == key[1] and sock.getpeername()[1] == key[3]
    except OSError:
        return False
    finally:
        sock.detach()


def _origin(url):
    parts = urlsplit(url if "://" in url else "http://" + url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, parts.hostname or "", port or _DEFAULT_PORTS.get(scheme)


class _Cache:
    """poolscope's view of one libcurl connection cache."""

    __slots__ = ("conns", "fds", "maxage", "max_total", "max_host", "__weakref__")

    def __init__(self):
        self.conns = {}  # (local ip, local port, peer ip, peer port) -> Conn
        self.fds = {}  # key -> socket of a connection that has been idle
        self.maxage = _DEFAULT_MAXAGE
        self.max_total = self.max_host = 0

    @property
    def limited(self):
        """Whether the multi holds transfers back (only a multi's cache has limits)."""
        return bool(self.max_total or self.max_host)


def _cache(owner):
    cache = getattr(owner, "_poolscope_cache", None)
    if cache is None:
        cache = owner._poolscope_cache = _Cache()
    return cache


def _guard(where, fn, *args):
    try:
        return fn(*args)
    except Exception:
        internal_error(where)
        return None


class _ClosesCache:
    """Closing a handle closes its connection cache."""

    def close(self):
        if _adapter is not None:
            _guard(f"pycurl:{type(self).__name__}.close", _adapter.cache_closed, self)
        return super().close()


class _Handle:
    """poolscope's state of one easy handle, whose methods are its libcurl callbacks.

    It lives apart from the handle because reading an attribute of a pycurl object costs ten
    times a plain object's, and the callbacks run on every transfer.
    """

    __slots__ = ("curl", "url", "origin", "prereq", "sockopt", "forbid_reuse", "share", "multi",
                 "cache", "conn", "wait", "context", "fresh")

    def __init__(self, curl):
        self.curl = curl
        self.url = ""
        self.origin = None
        self.prereq = self.sockopt = self.share = self.multi = None
        self.cache = _Cache()  # the handle's own, when it is in no multi and shares none
        self.forbid_reuse = self.fresh = False
        self.conn = self.wait = self.context = None

    def socket(self, fd, purpose):
        self.fresh = True
        app = self.sockopt
        return pycurl.SOCKOPT_OK if app is None else app(fd, purpose)

    def granted(self, peer_ip, local_ip, peer_port, local_port):
        if _adapter is not None:
            _guard("pycurl:PREREQFUNCTION", _adapter.granted, self,
                   (local_ip, local_port, peer_ip, peer_port))
        app = self.prereq
        return pycurl.PREREQFUNC_OK if app is None else app(peer_ip, local_ip, peer_port,
                                                            local_port)

    def series(self, recorder):
        """The series of the handle's origin (its URL parsed once)."""
        if self.origin is None:
            self.origin = _origin(self.url)
        return recorder.series(PycurlAdapter.library, self.origin)

    def owner(self):
        """The object whose connection cache the transfer uses, and poolscope's view of it."""
        if self.multi is not None:
            return self.multi
        share = self.share
        # a share poolscope could not observe (pycurl < 7.49) may share connections: one pool
        if share is not None and getattr(share, "_ps_connections",
                                         not isinstance(share, CurlShare)):
            return share, _cache(share)
        return self.curl, self.cache


def _observed(perform):
    """``Curl.perform`` (or ``perform_rb``, ``perform_rs``), with the transfer's end told."""

    @functools.wraps(perform)
    def method(self):
        errno = 0
        try:
            return perform(self)
        except pycurl.error as exc:
            errno = exc.args[0] if exc.args else -1
            raise
        finally:
            if _adapter is not None:
                _guard("pycurl:Curl.perform", _adapter.finished, self._ps, errno)
    return method


class Curl(_ClosesCache, pycurl.Curl):
    """``pycurl.Curl``, observed by poolscope."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ps = _Handle(self)
        self._poolscope_cache = self._ps.cache  # for the code that sees any owner alike
        self._ps_callbacks()

    def _ps_callbacks(self):
        super().setopt(pycurl.PREREQFUNCTION, self._ps.granted)
        super().setopt(pycurl.SOCKOPTFUNCTION, self._ps.socket)

    def setopt(self, option, value):
        state = self._ps
        if option == pycurl.URL:
            state.url = value if isinstance(value, str) else value.decode("utf-8", "replace")
            state.origin = None
        elif option == pycurl.PREREQFUNCTION:
            state.prereq = value
            return None
        elif option == pycurl.SOCKOPTFUNCTION:
            state.sockopt = value
            return None
        elif option == pycurl.MAXAGE_CONN:
            state.cache.maxage = value
        elif option == pycurl.FORBID_REUSE:
            state.forbid_reuse = bool(value)
        elif option == pycurl.SHARE:
            state.share = value
        return super().setopt(option, value)

    def unsetopt(self, option):
        if option == pycurl.PREREQFUNCTION:
            self._ps.prereq = None
        elif option == pycurl.SOCKOPTFUNCTION:
            self._ps.sockopt = None
        else:
            return super().unsetopt(option)
        return None

    def reset(self):
        super().reset()
        state = self._ps
        state.prereq = state.sockopt = state.share = None
        state.forbid_reuse = False
        self._ps_callbacks()

    perform = _observed(pycurl.Curl.perform)
    perform_rb = _observed(pycurl.Curl.perform_rb)
    perform_rs = _observed(pycurl.Curl.perform_rs)


class CurlMulti(_ClosesCache, pycurl.CurlMulti):
    """``pycurl.CurlMulti``, observed by poolscope."""

    def setopt(self, option, value):
        if option == pycurl.M_MAX_TOTAL_CONNECTIONS:
            _cache(self).max_total = value
        elif option == pycurl.M_MAX_HOST_CONNECTIONS:
            _cache(self).max_host = value
        result = super().setopt(option, value)
        if _adapter is not None and option == pycurl.M_MAX_TOTAL_CONNECTIONS:
            _guard("pycurl:CurlMulti.setopt", _adapter.limit_changed, self)
        return result

    def add_handle(self, handle):
        result = super().add_handle(handle)
        if isinstance(handle, Curl):
            state = handle._ps
            state.multi = self, _cache(self)
            if _adapter is not None:
                _guard("pycurl:CurlMulti.add_handle", _adapter.queued, self, state)
        return result

    def info_read(self, *args):
        result = super().info_read(*args)
        if _adapter is not None:
            _, ok, failed = result
            for handle in ok:
                _guard("pycurl:CurlMulti.info_read", _adapter.finished, _state(handle), 0)
            for handle, errno, _ in failed:
                _guard("pycurl:CurlMulti.info_read", _adapter.finished, _state(handle), errno)
        return result

    def remove_handle(self, handle):
        result = super().remove_handle(handle)
        state = _state(handle)
        if state is not None:
            if _adapter is not None:  # a transfer removed before info_read reported it
                _guard("pycurl:CurlMulti.remove_handle", _adapter.finished, state, None)
            state.multi = state.context = None
        return result


def _state(handle):
    return handle._ps if isinstance(handle, Curl) else None


class CurlShare(_ClosesCache, pycurl.CurlShare):
    """``pycurl.CurlShare``, observed by poolscope."""

    def setopt(self, option, value):
        if option == pycurl.SH_SHARE and value == pycurl.LOCK_DATA_CONNECT:
            self._ps_connections = True
        elif option == pycurl.SH_UNSHARE and value == pycurl.LOCK_DATA_CONNECT:
            self._ps_connections = False
        return super().setopt(option, value)



def _takes_share_subclass():
    """pycurl before 7.49 refuses a subclass of ``CurlShare`` in ``setopt(SHARE)``."""
    curl, share = pycurl.Curl(), CurlShare()
    try:
        curl.setopt(pycurl.SHARE, share)
        return True
    except TypeError:
        return False
    finally:
        curl.close()
        share.close()


class PycurlAdapter(Adapter):
    library = "pycurl"

    def patch(self):
        global _adapter
        if pycurl.version_info()[2] < 0x075000:
            raise RuntimeError("libcurl 7.80 or newer is needed (PREREQFUNCTION)")
        for cls in (Curl, CurlMulti) + ((CurlShare,) if _takes_share_subclass() else ()):
            self.replace(pycurl, cls.__name__, cls)
        _adapter = self

    def unpatch(self):
        global _adapter
        if _adapter is self:
            _adapter = None
        super().unpatch()

    def limits(self, owner):
        if isinstance(owner, pycurl.CurlMulti):
            return {"max_connections": _cache(owner).max_total or None}
        return {}

    def limit_changed(self, multi):
        state = getattr(multi, "_poolscope", None)
        if state is not None:
            state.max = _cache(multi).max_total or None

    def queued(self, multi, state):
        """A transfer joined a multi: it runs later, outside the context it was added in."""
        state.context = self.recorder.context()
        if state.multi[1].limited:
            state.wait = self.recorder.wait_started(
                self.pool_state(multi), state.series(self.recorder), traced=False)

    def granted(self, state, key):
        if state.wait is not None:  # no longer pending; libcurl's figure for the wait comes at the end
            wait, state.wait = state.wait, None
            self.recorder.wait_ended(wait, ABANDONED)
        if state.conn is not None:  # libcurl retried on a new connection, or followed a redirect
            self._let_go(state.conn)
        owner, cache = state.owner()
        rec = cache.conns.get(key)
        if state.fresh or rec is None or rec.closed:
            state.fresh = False
            self._sweep(cache, fresh_key=key)
            rec = self.recorder.conn_created(self.pool_state(owner),
                                             state.series(self.recorder))
            cache.conns[key] = rec
        state.conn = rec, key, cache
        self.recorder.acquired(rec, context=state.context)

    def finished(self, state, errno):
        """A transfer ended: ``errno`` 0 when it succeeded, None when not known."""
        if state is None:
            return
        taken, state.conn = state.conn, None
        context = state.context
        curl = state.curl
        if taken is None:
            wait, state.wait = state.wait, None
            if wait is not None:
                timed_out = errno == pycurl.E_OPERATION_TIMEDOUT and \
                    curl.getinfo(pycurl.NUM_CONNECTS) == 0
                error = pycurl.error(errno, "timed out waiting for a connection")
                if timed_out:
                    self.recorder.waited(wait.series, time.monotonic() - wait.start, context,
                                         error=error)
                self.recorder.wait_ended(wait, TIMED_OUT if timed_out else ABANDONED, error)
            return
        rec, key, cache = taken
        getinfo = curl.getinfo
        limited = state.multi is not None and state.multi[1].limited
        if not rec.opened or limited:
            self._timings(state, rec, limited)
        fd = getinfo(pycurl.ACTIVESOCKET) if not rec.closed else -1
        if fd == -1:
            if errno == 0:
                reason = sc.IDLE_LIMIT if state.forbid_reuse else sc.SERVER_CLOSED
            else:
                reason = sc.ERROR
            cache.conns.pop(key, None)
            cache.fds.pop(key, None)
            self.recorder.released(rec, reason)
        else:
            cache.fds[key] = fd
            self.recorder.released(rec)

    def _timings(self, state, rec, limited):
        """A new connection's set-up, and in a limited multi the transfer's wait, from libcurl's
        times (which run from the transfer's start)."""
        getinfo = state.curl.getinfo
        queued = getinfo(pycurl.QUEUE_TIME_T) / 1e6 if limited else 0.0
        if rec.opened and queued < _QUEUED:
            return  # neither a set-up nor a wait to record: spare the other lookups
        start_ns = time.time_ns() - getinfo(pycurl.TOTAL_TIME_T) * 1000
        setup = 0.0
        if not rec.opened:
            connected = getinfo(pycurl.APPCONNECT_TIME_T) or getinfo(pycurl.CONNECT_TIME_T)
            resolved = getinfo(pycurl.NAMELOOKUP_TIME_T)
            setup = max(0, connected - resolved) / 1e6
            self.recorder.conn_opened(rec, setup)
            span = self.recorder.setup_started(rec.series, state.context, start_ns + resolved * 1000)
            self.recorder.setup_ended(span, peer=getinfo(pycurl.PRIMARY_IP) if span else None,
                                      end_ns=start_ns + connected * 1000)
        if limited:
            queued = min(queued, getinfo(pycurl.PRETRANSFER_TIME_T) / 1e6 - setup)
            if queued >= _QUEUED:
                self.recorder.waited(rec.series, queued, state.context,
                                     start_ns + int(queued * 1e9))

    def _let_go(self, taken):
        """Release a connection a transfer moved off; libcurl closed it if it was found dead."""
        rec, key, cache = taken
        fd = cache.fds.get(key)
        if fd is not None and not _alive(fd, key):
            cache.conns.pop(key, None)
            cache.fds.pop(key, None)
            self.recorder.released(rec, sc.SERVER_CLOSED)
        else:
            self.recorder.released(rec)

    def _sweep(self, cache, reason=None, fresh_key=None):
        """Close the idle connections whose sockets libcurl has closed since poolscope looked.

        ``fresh_key``: a new connection's key, which a closed one may have had before it.
        """
        now = time.monotonic()
        for key, rec in list(cache.conns.items()):
            if rec.closed:
                del cache.conns[key]
                continue
            if rec.in_use:
                continue
            fd = cache.fds.get(key)
            if reason is None and key != fresh_key and (fd is None or _alive(fd, key)):
                continue  # alive, or never seen idle (a redirect's): kept until the pool closes
            del cache.conns[key]
            cache.fds.pop(key, None)
            if reason is not None:
                why = reason
            elif rec.released_at and now - rec.released_at >= cache.maxage:
                why = sc.KEEPALIVE_EXPIRED
            else:
                why = sc.SERVER_CLOSED
            self.recorder.closed(rec, why)

    def cache_closed(self, owner):
        state = getattr(owner, "_poolscope", None)
        cache = getattr(owner, "_poolscope_cache", None)
        if state is None or cache is None:
            return
        self.recorder.pool_closed(state)
        self._sweep(cache, sc.POOL_CLOSED)

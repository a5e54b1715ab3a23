"""pycurl 7.46+ (libcurl 7.80+), by replacing ``pycurl.Curl`` and ``pycurl.CurlMulti``.

Their methods are C functions that cannot be patched, so poolscope puts subclasses in their
place in the ``pycurl`` module (and in ``pycurl.async_multi``, whose ``AsyncCurlMulti`` drives
a ``CurlMulti`` of its own). The subclasses are transparent: every argument reaches pycurl
unchanged and pycurl checks it first (its own errors for a wrong one); constructor arguments,
which pycurl reads only for its exact types, are checked by pycurl and their effect kept
(``CurlMulti(close_handles=True)``); poolscope holds no reference that outlives what pycurl
keeps, so a dropped handle closes its sockets at once; it reads nothing from libcurl that
changes what the application reads next. Code that took a reference to the original classes
before instrumenting (``from pycurl import Curl`` before ``instrument()``), and a module
reloaded with ``importlib.reload(pycurl)``, are not observed.

A pool is a libcurl connection cache: the multi handle's for transfers in a ``CurlMulti``, a
``CurlShare``'s when the handle has one (a share that does not share connections is counted as
one pool all the same: libcurl does not say, and only the pool count differs), otherwise the
easy handle's own.

- Create: libcurl's ``SOCKOPTFUNCTION``, called once per new socket, gives its descriptor and
  the start of its set-up; ``PREREQFUNCTION`` (below) its end (TCP, plus TLS).
- Acquire: ``PREREQFUNCTION``, called once a transfer has its connection (new or reused), names
  the connection by its addresses and ports. The application's own callbacks are chained,
  never replaced. It is a call into Python on every transfer, so a handle that performs on
  its own (no multi, no share, no ``FOLLOWLOCATION``, no ``PREREQFUNCTION`` of the
  application's, no detailed timings) goes without it: ``perform`` tells the transfer, and
  libcurl's ``ACTIVESOCKET`` after it, that it reused the handle's last connection, which is
  still open (with no socket opened, no other connection in the handle's cache can have that
  socket). Any other end reads the connection's addresses from libcurl then; a transfer that
  retried on a new connection after its reused one failed counts as that new connection's
  alone (the failed one closes, ``server_closed``). A connection such a transfer holds reads as
  active from the start of ``perform``, at collection.
- Release: when the transfer completes (``perform`` returns, or the multi's ``info_read``
  reports it; else ``remove_handle`` or ``close``). The connection closed with the transfer
  when its socket is gone. Not a WebSocket's handshake (``CONNECT_ONLY`` 2) answered ``101``:
  its connection stays active until libcurl closes it (``upgraded``).
- Wait: only a multi with ``M_MAX_TOTAL_CONNECTIONS`` or ``M_MAX_HOST_CONNECTIONS`` holds
  transfers back. libcurl's ``QUEUE_TIME_T`` is the time spent pending when a transfer was
  pending once, but adds up more than the elapsed time when it was woken and sent back to the
  queue (libcurl 8.23: 1.35 s reported for a 0.65 s wait), so the wait is the smaller of it and
  ``PRETRANSFER_TIME_T`` less the connection's set-up. A transfer counts as having waited when
  that is 1 ms or more: an unqueued one leaves the queue in microseconds. libcurl's figures are
  read only where they can say so: that wait is at most the time from ``add_handle`` until the
  connection (``PREREQFUNCTION``), and a transfer that had its connection sooner than 0.5 ms
  did not wait. A transfer added to such a multi is pending from ``add_handle`` until it has a
  connection, which a collection reads from the multi's handles (no wait is told transfer by
  transfer). A transfer that timed out with no connection (no socket opened for it, none
  reused: no ``PRIMARY_PORT``) timed out waiting.
- Close: libcurl closes idle cached connections on its own (``MAXAGE_CONN`` expiry, a full
  cache, a dead socket) with no callback poolscope can rely on, so each idle connection's
  socket is checked when its pool opens a new connection, when a transfer that opened one
  ends (where libcurl makes room in a full cache) and when the pool closes. One closed while
  the server had not (``/proc/net/tcp``) made room: ``idle_limit``.
"""

import functools
import os
import socket
import struct
import sys
import time
import weakref
from time import monotonic

import pycurl
from opentelemetry.trace.propagation import _SPAN_KEY

from .. import _semconv as sc
from .._config import internal_error
from .._recorder import CANCELLED, TIMED_OUT
from .._spans import current_context
from ._base import (CURL_HTTP_VERSIONS, CURL_UNOPENED, Adapter, curl_failed_setup, curl_phases,
                    curl_setup, url_origin)

_QUEUED = 0.001
_DEFAULT_MAXAGE = 118.0  # libcurl's MAXAGE_CONN default, seconds
_ORIGINAL = {name: getattr(pycurl, name) for name in ("Curl", "CurlMulti")}
_getinfo = pycurl.Curl.getinfo
_get_blocking = os.get_blocking
_ACTIVESOCKET = pycurl.ACTIVESOCKET

_adapter = None  # the active PycurlAdapter


def _inode(fd):
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def _alive(sock):
    """Whether a connection's socket ``(fd, inode)`` is still open: the inode tells it from a
    socket that took the same descriptor since."""
    return sock is not None and _inode(sock[0]) == sock[1]


# TCP states of a socket whose own side closed first (FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSING):
# one the server closed first goes through CLOSE_WAIT and LAST_ACK instead
_CLOSED_FIRST = {"04", "05", "06", "0B"}


def _proc_address(ip, port):
    """An address as Linux's ``/proc/net/tcp`` and ``tcp6`` write it."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    packed = socket.inet_pton(family, ip)
    words = struct.unpack("=%dI" % (len(packed) // 4), packed)
    return "".join("%08X" % word for word in words) + ":%04X" % port


def _closed_first(keys):
    """Of the connections ``keys`` whose sockets libcurl has closed, those it closed while the
    server had not: their TCP connection waits out its close on this side (Linux's
    ``/proc/net/tcp``, for 60 s). Empty where that cannot be read."""
    wanted = {"/proc/net/tcp": {}, "/proc/net/tcp6": {}}
    for key in keys:
        try:
            marker = " %s %s " % (_proc_address(key[0], key[1]), _proc_address(key[2], key[3]))
        except (OSError, ValueError, TypeError):  # a Unix socket's
            continue
        wanted["/proc/net/tcp6" if ":" in key[0] else "/proc/net/tcp"][marker] = key
    found = set()
    for path, markers in wanted.items():
        if not markers:
            continue
        try:
            with open(path) as table:
                text = table.read()
        except OSError:
            continue
        for marker, key in markers.items():
            at = text.find(marker)
            if at >= 0 and text[at + len(marker):at + len(marker) + 2] in _CLOSED_FIRST:
                found.add(key)
    return found


def _open(curl, sock):
    """Whether the socket ``(fd, inode)`` of the connection a transfer just used is still open.

    A closed descriptor tells at once. An open one may have been taken by another thread's new
    socket since libcurl closed it: while the handle still holds the connection (``curl`` not
    None), libcurl confirms it where pycurl lets it be asked (``ACTIVESOCKET``, read only then:
    once the connection is gone, reading it makes libcurl forget the transfer's ``CONN_ID``);
    otherwise the socket's inode does.
    """
    try:
        os.get_blocking(sock[0])
    except OSError:
        return False
    if curl is None:
        return _alive(sock)
    try:
        return curl.getinfo(pycurl.ACTIVESOCKET) == sock[0]
    except pycurl.error:  # inside one of the multi's callbacks
        return True


class _Cache:
    """poolscope's view of one libcurl connection cache."""

    __slots__ = ("conns", "socks", "handles", "maxage", "max_total", "max_host", "limited",
                 "pool", "ref", "__weakref__")

    def __init__(self, multi=None):
        self.conns = {}  # (local ip, local port, peer ip, peer port) -> Conn
        self.socks = {}  # key -> (fd, inode) of the connection's socket
        self.handles = set()  # a multi's: the _Handle of each easy handle added to it
        self.maxage = _DEFAULT_MAXAGE
        self.max_total = self.max_host = 0
        self.limited = False  # whether the multi holds transfers back (only a multi has limits)
        self.pool = None  # a multi's pool state
        self.ref = weakref.ref(multi) if multi is not None else None  # a multi's, weakly

    def unix_key(self, path, sockets):
        """The key of a connection over the Unix socket ``path``, which libcurl names by the
        path alone (no addresses, no ports): a new one (``sockets``: those opened for the
        transfer) by its descriptor, a reused one is the first idle one cached to that path,
        as libcurl picks it."""
        if sockets:
            return "", sockets[-1][0], path, 0
        for key, rec in self.conns.items():
            if key[2] == path and not rec.in_use and not rec.closed:
                return key
        return "", 0, path, 0

    def queued(self, recorder):
        """(series, since) of each transfer the multi holds back: added, with no connection
        yet. Read at collection, so that a transfer's time in the queue costs it nothing."""
        for state in tuple(self.handles):
            since = state.queued_at
            if since is not None:
                yield state.series(recorder), since


def _share_cache(share):
    """poolscope's view of a ``CurlShare``'s connection cache."""
    cache = getattr(share, "_poolscope_cache", None)
    if cache is None:
        cache = share._poolscope_cache = _Cache()
    return cache


def _guard(where, fn, *args):
    try:
        return fn(*args)
    except Exception:
        internal_error(where)
        return None


def _checked(cls, args, kwargs):
    """pycurl reads constructor arguments only for its exact types: let it check them."""
    if cls.__module__ == __name__ and (args or kwargs):
        _ORIGINAL[cls.__name__](*args, **kwargs).close()


class _Handle:
    """poolscope's state of one easy handle, whose methods are its libcurl callbacks.

    It lives apart from the handle because reading an attribute of a pycurl object costs ten
    times a plain object's, and the callbacks run on every transfer. It holds the handle, its
    multi and its share only weakly: pycurl's own references decide when they go.
    """

    __slots__ = ("curl", "url", "origin", "prereq", "sockopt", "forbid_reuse", "share", "multi",
                 "cache", "conn", "queued_at", "held", "context", "sockets", "setup", "errno",
                 "follow", "prereq_on", "last", "fd", "by", "since", "fresh", "connect_only",
                 "__weakref__")

    def __init__(self, curl):
        self.curl = weakref.ref(curl)
        self.url = ""
        self.origin = None
        self.prereq = self.sockopt = self.share = self.multi = None
        self.cache = _Cache()  # the handle's own, when it is in no multi and shares none
        self.forbid_reuse = self.follow = self.prereq_on = False
        self.connect_only = False  # CONNECT_ONLY 2: a WebSocket's handshake
        self.conn = self.queued_at = self.held = self.context = self.sockets = self.errno = None
        self.setup = 0.0
        # a transfer performed without PREREQFUNCTION: the connection the handle last used
        # (still open when it ended), its socket and the adapter that saw it; the start of
        # the one under way, and the connection it opens
        self.last = self.fd = self.by = self.since = self.fresh = None

    def copy(self, curl):
        """The state of ``curl``, a duplicate of this handle."""
        dup = _Handle(curl)
        dup.url, dup.origin, dup.prereq, dup.sockopt = self.url, self.origin, self.prereq, self.sockopt
        dup.forbid_reuse, dup.share, dup.follow = self.forbid_reuse, self.share, self.follow
        dup.connect_only = self.connect_only
        dup.cache.maxage = self.cache.maxage
        return dup

    def socket(self, fd, purpose):
        if purpose == pycurl.SOCKTYPE_IPCXN:
            opened = fd, time.monotonic(), time.time_ns()
            if self.sockets is None:
                self.sockets = [opened]
                adapter = _adapter
                if self.since is not None and adapter is not None:  # no PREREQFUNCTION
                    self.last = None  # not the healthy transfer
                    _guard("pycurl:SOCKOPTFUNCTION", adapter.creating, self)
            else:
                self.sockets.append(opened)
        app = self.sockopt
        return pycurl.SOCKOPT_OK if app is None else app(fd, purpose)

    def granted(self, peer_ip, local_ip, peer_port, local_port):
        adapter = _adapter
        if adapter is not None:
            try:
                key = local_ip, local_port, peer_ip, peer_port
                if peer_port <= 0 and peer_ip:  # a Unix socket's
                    key = self.owner()[1].unix_key(peer_ip, self.sockets)
                multi = self.multi
                cache = multi[1] if multi is not None else self.cache
                rec = cache.conns.get(key)
                if (rec is None or rec.closed or self.sockets or self.conn is not None
                        or multi is None and self.share is not None):
                    adapter.granted(self, key)
                else:  # the healthy request: a cached connection, no share
                    if self.queued_at is not None:
                        self.dequeued()
                    self.conn = rec, key, cache
                    adapter.recorder.acquired(rec, context=self.context)
            except Exception:
                internal_error("pycurl:PREREQFUNCTION")
        app = self.prereq
        return pycurl.PREREQFUNC_OK if app is None else app(peer_ip, local_ip, peer_port,
                                                            local_port)

    def dequeued(self):
        """The transfer has its connection: it was held back for at most ``held`` seconds."""
        self.held, self.queued_at = time.monotonic() - self.queued_at, None

    def install(self, curl):
        """Set poolscope's callbacks on ``curl`` (through pycurl's own ``setopt``):
        ``PREREQFUNCTION`` only where ``perform`` cannot tell (see the module's docstring);
        once set, it stays until the handle is reset."""
        cls = _ORIGINAL["Curl"]
        self.prereq_on = self.prereq_on or bool(
            self.multi is not None or self.share is not None or self.follow or self.connect_only
            or self.prereq is not None or _adapter is not None and _adapter.recorder.detailed)
        if self.prereq_on:
            cls.setopt(curl, pycurl.PREREQFUNCTION, self.granted)
        else:
            cls.unsetopt(curl, pycurl.PREREQFUNCTION)
        cls.setopt(curl, pycurl.SOCKOPTFUNCTION, self.socket)

    def busy(self):
        """(connection, since) of the transfer under way without ``PREREQFUNCTION``: it holds
        the handle's last connection (if to the same origin) from the start of ``perform``."""
        since, fresh, rec = self.since, self.fresh, self.last
        if since is not None and fresh is not None:
            yield fresh, since
        elif since is not None and rec is not None:
            try:
                origin = self.origin or url_origin(self.url)
            except ValueError:
                return
            if rec.series.key[1:] == origin:
                yield rec, since

    def series(self, recorder):
        """The series of the handle's origin (its URL parsed once)."""
        if self.origin is None:
            self.origin = url_origin(self.url)
        return recorder.series(PycurlAdapter.library, self.origin)

    def owner(self):
        """The object whose connection cache the transfer uses, and poolscope's view of it."""
        if self.multi is not None:
            multi = self.multi[0]()
            if multi is not None:
                return multi, self.multi[1]
        share = self.share() if self.share is not None else None
        if share is not None:
            return share, _share_cache(share)
        return self.curl(), self.cache


def _read(curl, *infos):
    """libcurl's figures for a finished transfer, or None while pycurl refuses ``getinfo``
    (inside one of the multi's callbacks) or once the handle is closed."""
    try:
        return list(map(curl.getinfo, infos))
    except pycurl.error:
        return None


def _errno(exc):
    """libcurl's error code in a ``pycurl.error`` (-1 if it has none); 0 for any other error."""
    if not isinstance(exc, pycurl.error):
        return 0
    return exc.args[0] if exc.args else -1


def _told(perform, curl, state):
    """A transfer whose connection ``PREREQFUNCTION`` tells: its end told when it returns."""
    errno = 0
    try:
        return perform(curl)
    except pycurl.error as exc:
        errno = _errno(exc)
        raise
    finally:
        if _adapter is not None:
            _guard("pycurl:Curl.perform", _adapter.finished, state, errno)


def _ended(adapter, state, curl, errno, since):
    """A transfer performed alone ended other than the healthy way."""
    if _adapter is adapter:
        _guard("pycurl:Curl.perform", adapter.performed, state, curl, errno, since)


def _observed(perform):
    """``Curl.perform`` (or ``perform_rb``, ``perform_rs``), with the transfer's end told."""

    @functools.wraps(perform)
    def method(self):
        state = self._ps
        adapter = _adapter
        if adapter is None:
            return perform(self)
        if state.prereq_on:
            return _told(perform, self, state)
        since = state.since = monotonic()
        try:
            result = perform(self)
        except BaseException as exc:
            state.since = None
            _ended(adapter, state, self, _errno(exc), since)
            raise
        state.since = None
        try:
            rec = state.last  # None once the transfer opened a socket (see _Handle.socket)
            # healthy: it reused the handle's last connection, still open. get_blocking
            # raises for a closed socket, which tells without ACTIVESOCKET (see _open)
            if (rec is not None and state.by is adapter and _get_blocking(state.fd) is not None
                    and _getinfo(self, _ACTIVESOCKET) == state.fd):
                span = current_context().get(_SPAN_KEY)
                if span is None or not span.is_recording():
                    # What Recorder.acquired and released do for a reuse with no wait and no
                    # span, in a pool with no limit whose events the handle serializes (its
                    # count in use goes up and back down; the acquisition time is read only
                    # while in use, and collection reads the transfer's from ``since``)
                    rec.uses += 1
                    rec.released_at = monotonic()
                else:
                    adapter.recorder.acquired(rec, span=span, now=since)
                    adapter.recorder.released(rec)
                return result
        except OSError:
            pass
        except Exception:
            internal_error("pycurl:Curl.perform")
            return result
        _ended(adapter, state, self, 0, since)
        return result
    return method


class Curl(pycurl.Curl):
    """``pycurl.Curl``, observed by poolscope."""

    # poolscope's state of the handle, in a slot: pycurl finds its other attributes only
    # after raising and clearing an AttributeError, 0.4 µs a read
    __slots__ = ("_ps",)

    def __new__(cls, *args, **kwargs):
        _checked(cls, args, kwargs)
        self = super().__new__(cls)
        _set_state(self, _Handle(self))
        self._ps.install(self)
        return self

    def setopt(self, *args, **kwargs):
        result = super().setopt(*args, **kwargs)
        if len(args) < 2:
            return result
        option, value = args[0], args[1]
        state = self._ps
        if option == pycurl.URL:
            state.url = value if isinstance(value, str) else value.decode("utf-8", "replace")
            state.origin = None
        elif option == pycurl.PREREQFUNCTION or option == pycurl.SOCKOPTFUNCTION:
            if option == pycurl.PREREQFUNCTION:
                state.prereq = value
            else:
                state.sockopt = value
            state.install(self)
        elif option == pycurl.MAXAGE_CONN:
            state.cache.maxage = value
        elif option == pycurl.FORBID_REUSE:
            state.forbid_reuse = bool(value)
        elif option == pycurl.SHARE:
            state.share = weakref.ref(value) if value is not None else None
            state.install(self)
        elif option == pycurl.FOLLOWLOCATION:
            state.follow = bool(value)
            state.install(self)
        elif option == pycurl.CONNECT_ONLY:
            state.connect_only = value == 2
            state.install(self)
        return result

    def unsetopt(self, *args, **kwargs):
        result = super().unsetopt(*args, **kwargs)
        option = args[0] if args else None
        if option == pycurl.PREREQFUNCTION or option == pycurl.SOCKOPTFUNCTION:
            if option == pycurl.PREREQFUNCTION:
                self._ps.prereq = None
            else:
                self._ps.sockopt = None
            self._ps.install(self)
        elif option == pycurl.SHARE:
            self._ps.share = None
        return result

    def reset(self, *args, **kwargs):
        result = super().reset(*args, **kwargs)
        state = self._ps
        state.prereq = state.sockopt = state.share = None
        state.url, state.origin = "", None
        state.forbid_reuse = state.follow = state.prereq_on = state.connect_only = False
        state.cache.maxage = _DEFAULT_MAXAGE
        state.install(self)
        return result

    def duphandle(self, *args, **kwargs):
        dup = super().duphandle(*args, **kwargs)
        if isinstance(dup, Curl):  # its attributes are copies of this handle's: make its own
            if getattr(dup, "_poolscope", None) is not None:
                del dup._poolscope
            _set_state(dup, self._ps.copy(dup))
            dup._ps.install(dup)
        return dup

    def close(self, *args, **kwargs):
        state, pool = getattr(self, "_ps", None), getattr(self, "_poolscope", None)
        result = super().close(*args, **kwargs)  # which clears the handle's attributes
        if _adapter is not None and state is not None:
            _guard("pycurl:Curl.close", _adapter.handle_closed, state, pool)
        return result

    perform = _observed(pycurl.Curl.perform)
    perform_rb = _observed(pycurl.Curl.perform_rb)
    perform_rs = _observed(pycurl.Curl.perform_rs)


_set_state = Curl.__dict__["_ps"].__set__  # pycurl's own setattr would not reach the slot


def _state(handle):
    return getattr(handle, "_ps", None) if isinstance(handle, Curl) else None


class CurlMulti(pycurl.CurlMulti):
    """``pycurl.CurlMulti``, observed by poolscope."""

    __slots__ = ("_ps",)  # its _Cache (see Curl)

    def __new__(cls, *args, **kwargs):
        _checked(cls, args, kwargs)
        self = super().__new__(cls)
        _set_cache(self, _Cache(self))
        # pycurl ignores it for a subclass: close() below does what it would
        self._ps_close_handles = bool(kwargs.get("close_handles")) if cls is CurlMulti else False
        return self

    def setopt(self, *args, **kwargs):
        result = super().setopt(*args, **kwargs)
        if len(args) >= 2 and args[0] in (pycurl.M_MAX_TOTAL_CONNECTIONS,
                                          pycurl.M_MAX_HOST_CONNECTIONS):
            cache = self._ps
            if args[0] == pycurl.M_MAX_TOTAL_CONNECTIONS:
                cache.max_total = args[1]
            else:
                cache.max_host = args[1]
            cache.limited = bool(cache.max_total or cache.max_host)
            if args[0] == pycurl.M_MAX_TOTAL_CONNECTIONS and _adapter is not None:
                _guard("pycurl:CurlMulti.setopt", _adapter.limit_changed, self)
        return result

    def add_handle(self, *args, **kwargs):
        state = _state(args[0]) if args else None
        if state is not None and not state.prereq_on:
            state.prereq_on = True  # a transfer in a multi is told by PREREQFUNCTION
            _guard("pycurl:CurlMulti.add_handle", state.install, args[0])
        result = super().add_handle(*args, **kwargs)
        if state is not None:
            cache = self._ps
            state.multi = cache.ref, cache
            cache.handles.add(state)
            adapter = _adapter
            if adapter is not None:
                try:
                    adapter.queued(self, state)
                except Exception:
                    internal_error("pycurl:CurlMulti.add_handle")
        return result

    def info_read(self, *args, **kwargs):
        result = super().info_read(*args, **kwargs)
        if _adapter is not None:
            _, ok, failed = result
            for handle in ok:
                _read_out(handle, 0)
            for handle, errno, _ in failed:
                _read_out(handle, errno)
        return result

    def remove_handle(self, *args, **kwargs):
        result = super().remove_handle(*args, **kwargs)
        state = _state(args[0]) if args else None
        if state is not None:
            # a transfer info_read did not report, or could not finish
            if _adapter is not None and (state.conn is not None or state.queued_at is not None):
                _guard("pycurl:CurlMulti.remove_handle", _adapter.finished, state, state.errno,
                       True, False)
            _detach(state)
        return result

    def close(self, *args, **kwargs):
        cache, pool = getattr(self, "_ps", None), getattr(self, "_poolscope", None)
        attached = list(cache.handles) if cache is not None else []
        close_handles = getattr(self, "_ps_close_handles", False)
        result = super().close(*args, **kwargs)
        for state in attached:
            if _adapter is not None:
                _guard("pycurl:CurlMulti.close", _adapter.finished, state, state.errno, True,
                       False)
            _detach(state)
        if _adapter is not None and cache is not None:
            _guard("pycurl:CurlMulti.close", _adapter.cache_closed, pool, cache)
        if close_handles:
            for state in attached:
                curl = state.curl()
                if curl is not None:
                    curl.close()
        return result


_set_cache = CurlMulti.__dict__["_ps"].__set__


def _read_out(handle, errno):
    """``info_read`` reported the transfer of ``handle`` done (``errno`` 0: it succeeded)."""
    adapter = _adapter
    if adapter is not None:
        try:
            adapter.finished(_state(handle), errno, False)
        except Exception:
            internal_error("pycurl:CurlMulti.info_read")


def _detach(state):
    """The easy handle left its multi."""
    if state.multi is not None:
        state.multi[1].handles.discard(state)
    state.multi = state.queued_at = state.held = state.context = state.errno = None
    state.sockets = None


class PycurlAdapter(Adapter):
    library = "pycurl"

    def patch(self):
        global _adapter
        if pycurl.version_info()[2] < 0x075000:
            raise RuntimeError("libcurl 7.80 or newer is needed (PREREQFUNCTION)")
        for cls in (Curl, CurlMulti):
            self.replace(pycurl, cls.__name__, cls)
        async_multi = sys.modules.get("pycurl.async_multi")
        if async_multi is not None and getattr(async_multi, "CurlMulti", None) is _ORIGINAL["CurlMulti"]:
            self.replace(async_multi, "CurlMulti", CurlMulti)
        _adapter = self

    def unpatch(self):
        global _adapter
        if _adapter is self:
            _adapter = None
        super().unpatch()

    def limits(self, owner):
        # libcurl lets one thread at a time use a handle or a multi; a share, several
        if isinstance(owner, pycurl.CurlMulti):
            return {"max_connections": owner._ps.max_total or None, "serialized": True}
        return {"serialized": isinstance(owner, pycurl.Curl)}

    def registered(self, owner, pool):
        if isinstance(owner, CurlMulti):
            owner._ps.pool = pool
            pool.queued = functools.partial(owner._ps.queued, self.recorder)
        elif isinstance(owner, Curl):
            pool.busy = owner._ps.busy

    def limit_changed(self, multi):
        pool = multi._ps.pool
        if pool is not None:
            self.recorder.limit_changed(pool, multi._ps.max_total or None)

    def queued(self, multi, state):
        """A transfer joined a multi: it runs later, outside the context it was added in. In a
        multi that holds transfers back it is pending until it has a connection (libcurl's
        figure for the wait comes at the end)."""
        state.context = self.recorder.context()
        cache = state.multi[1]
        if cache.limited:
            state.queued_at = time.monotonic()
            pool = cache.pool
            if pool is None or not pool.live or pool.owner is not self.recorder:
                self.pool_state(multi)

    def performed(self, state, curl, errno, since):
        """A transfer performed without ``PREREQFUNCTION`` ended, other than the healthy way
        (``since``: when ``perform`` began). Which connection it had, if it reached one,
        is read from libcurl now."""
        state.last = state.fd = None
        info = _read(curl, pycurl.LOCAL_IP, pycurl.LOCAL_PORT, pycurl.PRIMARY_IP,
                     pycurl.PRIMARY_PORT, pycurl.PRETRANSFER_TIME_T, pycurl.TOTAL_TIME_T,
                     pycurl.NAMELOOKUP_TIME_T, pycurl.CONNECT_TIME_T, pycurl.APPCONNECT_TIME_T)
        if info is None:
            self.finished(state, errno)
            return
        (local_ip, local_port, peer_ip, peer_port, pretransfer_us, total_us, dns_us, connect_us,
         tls_us) = info
        unix = peer_port <= 0 and peer_ip  # a Unix socket's: no ports
        if pretransfer_us <= 0 if unix else local_port <= 0 or peer_port <= 0:  # no connection
            self.finished(state, errno)
            return
        # A transfer that failed had its connection (reached PREREQFUNCTION's moment) if it
        # reused one, or if its new one connected (and finished TLS, for https) and no proxy
        # refused it
        if errno and state.sockets is not None and (errno in CURL_UNOPENED or not (
                connect_us > 0 and (tls_us > 0 or state.url[:6].lower() != "https:"))):
            self.finished(state, errno)
            return
        # acquired when PREREQFUNCTION would have been called: a new connection once set up
        # (its socket opened after the name lookup; libcurl's times run from an attempt's
        # start, and where it retried, not all from the same one), a reused one at pretransfer
        key = (state.owner()[1].unix_key(peer_ip, state.sockets) if unix
               else (local_ip, local_port, peer_ip, peer_port))
        if state.sockets is not None:
            self.granted(state, key, setup=curl_setup(dns_us, connect_us, tls_us, pretransfer_us))
        else:
            at = time.monotonic() - (total_us - pretransfer_us) / 1e6
            self.granted(state, key, max(since, at))
        taken = state.conn
        self.finished(state, errno)
        if taken is not None:
            rec, key, cache = taken
            sock = cache.socks.get(key)
            if not rec.closed and sock is not None:
                state.last, state.fd, state.by = rec, sock[0], self

    def creating(self, state):
        """A transfer performed without ``PREREQFUNCTION`` opens a new connection: it shows
        from now, though which one it is will be known only when the transfer ends."""
        owner, _ = state.owner()
        state.fresh = self.recorder.conn_created(self.pool_state(owner),
                                                 state.series(self.recorder))

    def granted(self, state, key, at=None, setup=None):
        """The transfer of ``state`` has the connection ``key``: since ``at``, if before now;
        ``setup``: a new connection's set-up time, where it ended before now."""
        if state.queued_at is not None:
            state.dequeued()
        if state.conn is not None:  # libcurl retried on a new connection, or followed a redirect
            self._let_go(state.conn)
            state.held = None  # it may have waited again: libcurl's figures tell
        owner, cache = state.owner()
        rec = cache.conns.get(key)
        sockets, state.sockets = state.sockets, None
        if sockets or rec is None or rec.closed:
            self._sweep(cache, fresh_key=key)
            rec, state.fresh = state.fresh, None
            if rec is None:
                rec = self.recorder.conn_created(self.pool_state(owner),
                                                 state.series(self.recorder))
            cache.conns[key] = rec
            if sockets:
                ready = self._opened(state, rec, key, cache, sockets, setup)
                at = ready if setup is not None else at
        state.conn = rec, key, cache
        self.recorder.acquired(rec, context=state.context, now=at)

    def _opened(self, state, rec, key, cache, sockets, setup=None):
        """A new connection is ready: its socket (of those opened for the transfer, the one
        bound to its local port) and its set-up, from the socket's opening until now (or for
        ``setup`` seconds); returns when it was ready."""
        fd, started, started_ns = sockets[-1]
        if len(sockets) > 1:  # several addresses tried
            for opened in sockets:
                try:
                    sock = socket.socket(fileno=opened[0])
                except OSError:
                    continue
                try:
                    if sock.getsockname()[1] == key[1]:
                        fd, started, started_ns = opened[0], sockets[0][1], sockets[0][2]
                except OSError:
                    pass
                finally:
                    sock.detach()
        cache.socks[key] = fd, _inode(fd)
        now = time.monotonic()
        # never after now: the socket's opening is read in SOCKOPTFUNCTION, which may run late
        ready = now if setup is None else min(now, started + setup)
        state.setup = ready - started
        # its protocol is known once it answers
        self.recorder.conn_opened(rec, state.setup, protocol=None, now=ready)
        span = self.recorder.setup_started(rec, state.context, started_ns)
        self.recorder.setup_ended(span, peer=key[2] if span else None,
                                  end_ns=started_ns + int(state.setup * 1e9))
        return ready

    def finished(self, state, errno, final=True, attached=True):
        """A transfer ended: ``errno`` 0 when it succeeded, None when not known.

        ``final`` False (``info_read``): where libcurl's figures are needed and pycurl cannot
        give them yet (inside one of the multi's callbacks), nothing changes but the error
        kept, and ``remove_handle`` or the multi's ``close`` finishes the transfer.
        ``attached`` False: the handle has left its multi, or closed.
        """
        if state is None:
            return
        taken = state.conn
        curl = state.curl()
        if taken is None:
            since = state.queued_at
            if since is not None:
                outcome = None
                if state.sockets is None and errno in (0, None, pycurl.E_OPERATION_TIMEDOUT):
                    port = _read(curl, pycurl.PRIMARY_PORT) if curl is not None else None
                    if port is None and not final:
                        state.errno = errno
                        return
                    if errno and port is not None and port[0] <= 0:
                        outcome = TIMED_OUT
                    elif not errno and (port is None or port[0] <= 0):  # removed, or closed
                        outcome = CANCELLED
                state.queued_at = None
                waited = time.monotonic() - since
                series = state.series(self.recorder)  # the origin reads 0 pending from now
                if outcome is TIMED_OUT or outcome is CANCELLED and waited >= _QUEUED:
                    error = (pycurl.error(errno, "timed out waiting for a connection")
                             if errno else None)
                    self.recorder.waited(series, waited, state.context, outcome=outcome,
                                         error=error)
            if errno and curl is not None:  # it may have failed to open its connection
                times = _read(curl, pycurl.NAMELOOKUP_TIME_T, pycurl.CONNECT_TIME_T,
                              pycurl.TOTAL_TIME_T)
                if times is None and not final:
                    state.errno = errno
                    return
                seconds = curl_failed_setup(*times, errno) if times is not None else None
                if seconds is not None:
                    self.recorder.setup_failed(state.series(self.recorder),
                                               pycurl.error(errno, curl.errstr()),
                                               state.context, seconds)
            state.sockets = None
            if state.fresh is not None:  # never established: dropped uncounted
                self.recorder.closed(state.fresh, sc.ERROR)
                state.fresh = None
            return
        rec, key, cache = taken
        if rec.protocol is None and curl is not None:
            version = _read(curl, pycurl.INFO_HTTP_VERSION)
            if version is not None:
                self.recorder.protocol_known(rec, CURL_HTTP_VERSIONS.get(version[0]))
        times = None
        # libcurl's figures only for a transfer that may have waited 1 ms: the wait it reports
        # is at most ``held``, add_handle until the connection (half: libcurl's clock for it
        # stops a few µs after PREREQFUNCTION)
        held = state.held
        if (state.multi is not None and state.multi[1].limited and curl is not None
                and (held is None or held >= _QUEUED / 2)):
            times = _read(curl, pycurl.QUEUE_TIME_T, pycurl.PRETRANSFER_TIME_T,
                          pycurl.TOTAL_TIME_T)
            if times is None and not final:
                state.errno = errno
                return
        phases = None
        if state.setup and curl is not None:  # the transfer opened its connection
            phases = _read(curl, pycurl.NAMELOOKUP_TIME_T, pycurl.CONNECT_TIME_T,
                           pycurl.APPCONNECT_TIME_T, pycurl.TOTAL_TIME_T)
            if phases is None and not final:
                state.errno = errno
                return
        setup, state.setup = state.setup, 0.0
        state.conn = state.sockets = state.held = None
        if times is not None and times[0] >= _QUEUED * 1e6:
            self._waited(state, rec, setup, *times)
        if phases is not None:
            *marks, total_us = phases
            self.recorder.setup_phases(rec, curl_phases(*marks, time.time_ns() - total_us * 1000))
        sock = cache.socks.get(key)
        if (state.connect_only and errno == 0 and final and curl is not None
                and _read(curl, pycurl.RESPONSE_CODE) == [101]):
            self.recorder.upgraded(rec)  # a WebSocket's: active until it closes
            return
        if sock is None or _open(curl if attached else None, sock):
            self.recorder.released(rec)
        else:
            if errno == 0:
                reason = sc.IDLE_LIMIT if state.forbid_reuse else sc.SERVER_CLOSED
            else:
                reason = sc.ERROR
            cache.conns.pop(key, None)
            cache.socks.pop(key, None)
            self.recorder.released(rec, reason)
        if setup:  # a new connection joined the cache: libcurl may have closed one for room
            self._sweep(cache)

    def _waited(self, state, rec, setup, queue_us, pretransfer_us, total_us):
        """A transfer's wait in a limited multi, from libcurl's times (which run from the
        transfer's start)."""
        queued = min(queue_us / 1e6, pretransfer_us / 1e6 - setup)
        if queued >= _QUEUED:
            start_ns = time.time_ns() - total_us * 1000
            self.recorder.waited(rec.series, queued, state.context, start_ns + int(queued * 1e9))

    def _let_go(self, taken):
        """Release a connection a transfer moved off; libcurl closed it if it was found dead."""
        rec, key, cache = taken
        if key in cache.socks and not _alive(cache.socks[key]):
            cache.conns.pop(key, None)
            cache.socks.pop(key, None)
            self.recorder.released(rec, sc.SERVER_CLOSED)
        else:
            self.recorder.released(rec)

    def _sweep(self, cache, reason=None, fresh_key=None):
        """Close the idle connections whose sockets libcurl has closed since poolscope looked.

        ``fresh_key``: a new connection's key, which a closed one may have had before it.
        """
        now = time.monotonic()
        gone = []
        for key, rec in list(cache.conns.items()):
            if rec.closed:
                del cache.conns[key]
                continue
            if rec.in_use and not rec.upgraded:
                continue
            sock = cache.socks.get(key)
            if reason is None and key != fresh_key and (sock is None or _alive(sock)):
                continue  # alive, or its socket unknown: kept until the pool closes
            del cache.conns[key]
            cache.socks.pop(key, None)
            gone.append((key, rec))
        closed_first = _closed_first([key for key, _ in gone]) if reason is None and gone else ()
        for key, rec in gone:
            if reason is not None:
                why = reason
            elif rec.released_at and now - rec.released_at >= cache.maxage:
                why = sc.KEEPALIVE_EXPIRED
            elif key in closed_first:  # libcurl closed it alive: a full cache
                why = sc.IDLE_LIMIT
            else:
                why = sc.SERVER_CLOSED
            self.recorder.closed(rec, why)

    def handle_closed(self, state, pool):
        """An easy handle closed: its transfer (if one was under way) and its own cache end."""
        if state.conn is not None or state.queued_at is not None:
            self.finished(state, state.errno, True, False)
        _detach(state)
        self.cache_closed(pool, state.cache)

    def cache_closed(self, pool, cache):
        """A connection cache closed with its handle; ``pool`` None if it never served."""
        if pool is not None:
            self.recorder.pool_closed(pool)
        self._sweep(cache, sc.POOL_CLOSED)

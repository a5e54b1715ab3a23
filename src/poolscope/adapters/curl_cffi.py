"""curl_cffi 0.13 to 0.17, through its ``Curl``, ``AsyncCurl`` and ``AsyncSession`` and three
libcurl callbacks set on each transfer through curl_cffi's own ``curl_easy_setopt``.

A pool is a libcurl connection cache and the requests that share it: an ``AsyncSession``'s
(its ``AsyncCurl`` multi's cache, its limit the session's ``max_clients`` curl handles), an
``AsyncCurl`` used without a session, or, for ``Curl.perform`` (``Session``), the easy handle's
own cache (a ``CurlShare``'s when the handle has one).

- Wait: ``AsyncSession.pop_curl`` when the session's queue of curl handles is empty, until it
  hands the request a handle (granted) or the request gives up (cancelled: abandoned).
- Acquire: libcurl's ``PREREQFUNCTION``, called once a transfer has its connection, new or
  reused, names it by its addresses and ports (one connection: no two open ones share them).
  A name poolscope has not seen open is a new connection: created and established then, its
  set-up libcurl's connect (plus TLS) time.
- Release: when the transfer ends: ``perform`` returns, the multi reports it done
  (``AsyncCurl.set_result`` / ``set_exception``), or it is removed unfinished
  (``remove_handle``, the multi's ``close``). Not a WebSocket's handshake (``ws_connect``:
  ``perform`` on a handle an ``AsyncSession`` handed out, in its pool, or in
  ``WebSocket.connect``) answered ``101``: its connection stays active until it closes
  (``upgraded``).
- Close: libcurl's ``CLOSESOCKETFUNCTION``, which libcurl keeps with each connection it opened
  while the callback was set and calls whenever it closes it (the callback closes the socket,
  as libcurl would). The socket's descriptor names the connection: ``SOCKOPTFUNCTION`` gives
  it as libcurl opens the socket, and the new connection's addresses pick it out. (A socket's
  addresses would not do: one the peer reset has no peer address, and its local port may be
  another destination's connection's too.) Closed during a transfer: ``error`` when the
  transfer failed; else ``server_closed`` when the server had closed it or its last answer
  said it would (``Connection: close``, HTTP/1.0 without keep-alive, read in libcurl's own
  header store), else ``idle_limit``: the session's ``FORBID_REUSE``, or libcurl, handed the
  connection back into a cache over ``MAXCONNECTS``, closed it as the oldest idle one.
  Closed idle: ``server_closed`` when the server had closed it first (libcurl found it dead),
  ``keepalive_expired`` past ``MAXAGE_CONN`` (118 s unless the session's ``curl_options`` say
  otherwise), else ``idle_limit`` (libcurl makes room in a full cache); with its pool,
  ``pool_closed``.

poolscope sets ``PREREQFUNCTION``, ``PREREQDATA``, ``SOCKOPTFUNCTION`` and
``CLOSESOCKETFUNCTION`` at the start of each transfer; curl_cffi's API sets none of them. The
close callback outlives ``uninstrument()`` on the connections opened before it (it then only
closes their sockets).
"""

import ctypes
import functools
import os
import socket
import sys
import time
import weakref
from urllib.parse import urljoin

from curl_cffi import aio, curl
from curl_cffi.const import CurlInfo, CurlOpt
from curl_cffi.requests import session as sessions
from curl_cffi.requests import websockets

from .. import _semconv as sc
from .._config import internal_error
from .._recorder import CANCELLED
from ._base import (CURL_HTTP_VERSIONS, Adapter, calling, curl_failed_setup, curl_phases,
                    curl_setup, url_origin)

ffi, lib = curl.ffi, curl.lib
setopt = lib._curl_easy_setopt
_DEFAULT_MAXAGE = 118.0  # libcurl's MAXAGE_CONN default, seconds
_OK = 0
_HTTP_1_0 = 1  # CURL_HTTP_VERSION_1_0, as CURLINFO_HTTP_VERSION reads it
# the method that calls pop_curl with the request's URL (before 0.15: request itself)
_REQUEST_ONCE = getattr(sessions.AsyncSession, "_request_once",
                        sessions.AsyncSession.request).__code__

_adapter = None  # the active CurlCffiAdapter
_by_key = {}  # (local ip, local port, peer ip, peer port) of each open connection -> its Conn
_by_fd = {}  # the descriptor of each open connection's socket -> its key
# a connection over a Unix socket is keyed (_UNIX, libcurl's CONN_ID, the path, its pool's id):
# libcurl numbers connections per pool, and the socket has no addresses of its own
_UNIX = b"unix"
_new_fds = set()  # sockets libcurl opened (SOCKOPTFUNCTION) not yet known as a connection
# Conns closed while a transfer held them, released when it ends -> whether the peer had closed
_lost = {}


class _Transfer:
    """poolscope's state of one curl handle's transfer; the libcurl callbacks find it through
    ``PREREQDATA``. ``owner``: its pool's owner (a multi, a share or the handle itself), or,
    from its session's handing it out until it is added to a multi, the session. It holds
    both weakly: the handle holds it, and a dropped handle or session must be freed at once,
    as without poolscope."""

    __slots__ = ("curl", "owner", "context", "conn", "handshake", "__weakref__")

    def __init__(self, handle):
        self.curl = weakref.ref(handle)
        self.owner = self.context = self.conn = None
        self.handshake = False  # a WebSocket's, performed next


def _transfer(handle):
    """The handle's transfer state, made (with the handle's ``PREREQDATA``) on first use."""
    try:
        return handle._poolscope_transfer
    except AttributeError:
        state = handle._poolscope_transfer = _Transfer(handle)
        handle._poolscope_data = ffi.new_handle(state)
        return state


@ffi.callback("int(void *, char *, char *, int, int)", onerror=lambda *exc: 0)
def _prereq(data, peer_ip, local_ip, peer_port, local_port):
    adapter = _adapter
    if adapter is not None:
        try:
            state = ffi.from_handle(data)
            key = ffi.string(local_ip), local_port, ffi.string(peer_ip), peer_port
            if peer_port <= 0 and key[2]:  # a Unix socket's: libcurl names it by the path alone
                key = _UNIX, state.curl().getinfo(CurlInfo.CONN_ID), key[2], id(state.owner())
            rec = _by_key.get(key)
            if rec is None or state.conn is not None:
                adapter.granted(state, key, rec)
            else:  # the healthy request: a cached connection
                state.conn = rec
                adapter.recorder.acquired(rec, context=state.context)
        except Exception:
            internal_error("curl_cffi:PREREQFUNCTION")
    return _OK


@ffi.callback("int(void *, int, int)", onerror=lambda *exc: 0)
def _sockopt(data, fd, purpose):
    if _adapter is not None:
        _new_fds.add(fd)
    return _OK


@ffi.callback("int(void *, int)", onerror=lambda *exc: 1)
def _closesocket(data, fd):
    adapter = _adapter
    if adapter is not None and (_by_fd or _new_fds):
        try:
            adapter.socket_closing(fd)
        except Exception:
            internal_error("curl_cffi:CLOSESOCKETFUNCTION")
    os.close(fd)
    return _OK


def _descriptor(key):
    """The descriptor of the socket libcurl opened for the connection ``key`` (connected: its
    addresses are its own; a Unix socket's, the path it reaches), or None."""
    for fd in list(_new_fds):
        sock = None
        try:
            sock = socket.socket(fileno=fd)
            local, peer = sock.getsockname(), sock.getpeername()
            unix = sock.family == socket.AF_UNIX
        except OSError:
            continue
        finally:
            if sock is not None:
                sock.detach()
        if unix:  # libcurl keeps the path's first 45 bytes
            found = key[0] == _UNIX and peer.encode().startswith(key[2])
        else:
            found = (local[0].encode(), local[1], peer[0].encode(), peer[1]) == key
        if found:
            _new_fds.discard(fd)
            return fd
    return None


class _Header(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p), ("amount", ctypes.c_size_t),
                ("index", ctypes.c_size_t), ("origin", ctypes.c_uint), ("anchor", ctypes.c_void_p)]


@functools.lru_cache(maxsize=None)
def _easy_header():
    """libcurl's ``curl_easy_header`` (7.84+), which curl_cffi's module exports but does not
    bind."""
    from curl_cffi import _wrapper

    function = ctypes.CDLL(_wrapper.__file__).curl_easy_header
    function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                         ctypes.c_int, ctypes.POINTER(ctypes.POINTER(_Header))]
    function.restype = ctypes.c_int
    return function


def _header(handle, name):
    """The lower-cased values of the last response's ``name`` headers, joined."""
    easy = int(ffi.cast("uintptr_t", handle._curl))
    found = ctypes.POINTER(_Header)()
    values, index, amount = [], 0, 1
    while index < amount and _easy_header()(easy, name, index, 1, -1, ctypes.byref(found)) == 0:
        values.append(found.contents.value.decode("latin-1").lower())
        amount, index = found.contents.amount, index + 1
    return ",".join(values)


def _said_close(handle):
    """Whether the transfer's last answer told libcurl to close its connection."""
    said = _header(handle, b"Connection") + "," + _header(handle, b"Proxy-Connection")
    return "close" in said or (handle.getinfo(CurlInfo.HTTP_VERSION) == _HTTP_1_0
                               and "keep-alive" not in said)


def _peer_closed(sock):
    """Whether the peer has closed (or reset) the idle connection on ``sock``."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class CurlCffiAdapter(Adapter):
    library = "curl_cffi"

    def patch(self):
        global _adapter
        self.wrap(sessions.AsyncSession, "pop_curl", self._wait_for_handle, self._handed)
        self.wrap(sessions.AsyncSession, "close", self._session_close)
        self.wrap(aio.AsyncCurl, "add_handle", self._added)
        self.wrap(aio.AsyncCurl, "set_result", functools.partial(self._ended, False))
        self.wrap(aio.AsyncCurl, "set_exception", functools.partial(self._ended, True))
        # after: libcurl closes the connection of a transfer removed unfinished as it removes it
        self.wrap(aio.AsyncCurl, "remove_handle", self._removing, self._removed)
        self.wrap(aio.AsyncCurl, "close", self._multi_close)
        self.wrap(curl.Curl, "perform", self._perform, self._performed)
        self.wrap(websockets.WebSocket, "connect", self._sync_handshake)
        self.wrap(sessions.AsyncSession, "ws_connect", self._async_handshake)
        self.wrap(curl.Curl, "close", self._pool_close)
        _adapter = self

    def unpatch(self):
        global _adapter
        if _adapter is self:
            _adapter = None
            _by_key.clear()
            _by_fd.clear()
            _new_fds.clear()
            _lost.clear()
        super().unpatch()

    def limits(self, owner):
        # a multi's events come from its event loop; a handle serves one thread at a time; a
        # share, several
        return {"max_connections": _handles(owner),
                "serialized": isinstance(owner, (aio.AsyncCurl, curl.Curl))}

    def registered(self, owner, pool):
        """A sync ``Session``'s handle: the session's ``curl_options`` (its ``MAXAGE_CONN``)
        are found in the frames that called ``perform``, once. Only the session module's
        frames are read: before Python 3.13, reading a frame's ``f_locals`` keeps its locals
        alive until it returns, and the application's own must not be."""
        if isinstance(owner, curl.Curl):
            frame = sys._getframe(1)
            for _ in range(16):
                if frame is None:
                    break
                if frame.f_globals is vars(sessions):
                    session = frame.f_locals.get("self")
                    if isinstance(session, sessions.BaseSession):
                        owner._poolscope_options = session.curl_options
                        break
                frame = frame.f_back

    # -- waits --------------------------------------------------------------

    def _wait_for_handle(self, session, args, kwargs):
        # from 0.15, a session whose handles all serve WebSockets refuses at once: no wait
        if session.pool.empty() and (len(getattr(session, "_websockets", ()))
                                     + getattr(session, "_pending_ws_connects", 0)
                                     < session.max_clients):
            return self.recorder.wait_started(self.pool_state(self._session_multi(session)),
                                              self._series(session))
        return False

    def _session_multi(self, session):
        """The session's multi. Its connection cache is the pool of the sessions that share it
        (``async_curl=``), alive as long as the multi, which may outlive them; their handles
        are its limit, and the session's ``curl_options`` its options."""
        multi = session.acurl
        sessions_ = multi.__dict__.get("_poolscope_sessions")
        if sessions_ is None:
            sessions_ = multi._poolscope_sessions = weakref.WeakSet()
        if session not in sessions_:
            sessions_.add(session)
            multi._poolscope_options = session.curl_options
            self._limit_changed(multi)
            # a session dropped unclosed takes its handles out as it is freed
            weakref.finalize(session, self._session_gone, weakref.ref(multi)).atexit = False
        return multi

    def _session_close(self, session, args, kwargs):
        """A session closing takes its handles out of its multi's pool (which closes with the
        multi, when the session owns it)."""
        sessions_ = getattr(session._acurl, "_poolscope_sessions", None)
        if sessions_ is not None and session in sessions_:
            sessions_.discard(session)
            self._limit_changed(session._acurl)

    def _session_gone(self, multi_ref):
        """A session sharing the multi was freed unclosed: its handles leave the limit. A
        finalizer: deferred while this thread is inside poolscope's or the SDK's lock."""
        if _adapter is self and not self.recorder.deferred(self._session_gone, multi_ref):
            multi = multi_ref()
            if multi is not None:
                self._limit_changed(multi)

    def _limit_changed(self, multi):
        pool = multi.__dict__.get("_poolscope")
        if pool is not None and pool.live and pool.owner is self.recorder:
            self.recorder.limit_changed(pool, _handles(multi))

    def _series(self, session):
        """The series of the URL the waiting request is for (read from the request's frame:
        ``pop_curl`` is not told), or None."""
        frame = calling(_REQUEST_ONCE)
        url = frame.f_locals.get("url") if frame is not None else None
        if not isinstance(url, str):
            return None
        base = getattr(session, "base_url", None)
        if base and "://" not in url:
            url = urljoin(base, url)
        return self.recorder.series(self.library, url_origin(url))

    def _handed(self, wait, session, handle, exc):
        if wait:
            if exc is None:
                self.recorder.wait_ended(wait)
            else:
                self.recorder.wait_ended(wait, CANCELLED, exc)
        if exc is None:
            _transfer(handle).owner = weakref.ref(session)

    # -- transfers ----------------------------------------------------------

    def _start(self, handle, owner, state=None):
        """A transfer starts on ``handle`` for the pool ``owner``: poolscope's callbacks are
        set (a reset or a duplicated handle may have dropped or copied them)."""
        if state is None:
            state = _transfer(handle)
        state.owner = weakref.ref(owner)
        state.context = self.recorder.context()
        c = handle._curl
        setopt(c, CurlOpt.PREREQFUNCTION, _prereq)
        setopt(c, CurlOpt.PREREQDATA, handle._poolscope_data)
        setopt(c, CurlOpt.SOCKOPTFUNCTION, _sockopt)
        setopt(c, CurlOpt.CLOSESOCKETFUNCTION, _closesocket)
        return state

    def _added(self, multi, args, kwargs):
        handle = args[0]
        state = getattr(handle, "_poolscope_transfer", None)
        session = state.owner() if state is not None and state.owner is not None else None
        if isinstance(session, sessions.AsyncSession) and session._acurl is multi:
            self._session_multi(session)
        self._start(handle, multi)

    def _perform(self, handle, args, kwargs):
        state = _transfer(handle)
        session = state.owner() if state.owner is not None else None
        if isinstance(session, sessions.AsyncSession):
            # a WebSocket's handshake, on a handle the session handed out: its connection holds
            # one of the session's handles for the WebSocket's life
            state.handshake = True
            return self._start(handle, self._session_multi(session), state)
        share = getattr(handle, "_share", None)  # curl_cffi 0.16+
        return self._start(handle, share if share is not None else handle, state)

    def _sync_handshake(self, ws, args, kwargs):
        _transfer(ws.curl).handshake = True

    def _async_handshake(self, session, args, kwargs):
        """The handshake of an ``AsyncSession``'s WebSocket runs on a worker thread: its pool
        hears from that thread too from now on."""
        self.recorder.shared(self.pool_state(self._session_multi(session)))

    def _performed(self, state, handle, result, exc):
        if state.handshake:
            state.handshake = False
            if exc is None and state.conn is not None and (
                    handle.getinfo(CurlInfo.RESPONSE_CODE) == 101):
                rec, state.conn = state.conn, None
                self._protocol(rec, handle)
                self.recorder.upgraded(rec)  # active until it closes, with the WebSocket
                return
        if exc is not None and state.conn is None:
            self._failed_open(state, handle, exc)
        self.finished(state, exc is not None)

    def _ended(self, failed, multi, args, kwargs):
        state = getattr(args[0], "_poolscope_transfer", None)
        if state is None:
            return
        if state.conn is not None:
            self.finished(state, failed)
        elif failed:
            self._failed_open(state, args[0], args[1])

    def _failed_open(self, state, handle, error):
        """A transfer failed (``error``) without a connection: if it began to open one, its
        set-up span ends in error."""
        seconds = curl_failed_setup(*[handle.getinfo(info) for info in (
            CurlInfo.NAMELOOKUP_TIME_T, CurlInfo.CONNECT_TIME_T, CurlInfo.TOTAL_TIME_T)],
            getattr(error, "code", None))
        if seconds is not None:
            url = handle.getinfo(CurlInfo.EFFECTIVE_URL).decode("utf-8", "replace")
            self.recorder.setup_failed(self.recorder.series(self.library, url_origin(url)),
                                       error, state.context, seconds)

    def _removing(self, multi, args, kwargs):
        """The transfer's state if it had not ended (else None: nothing to do after)."""
        state = getattr(args[0], "_poolscope_transfer", None)
        return state if state is not None and state.conn is not None else None

    def _removed(self, state, multi, result, exc):
        self.finished(state, True)

    def _multi_close(self, multi, args, kwargs):
        for handle in list(multi._curl2future):
            state = getattr(handle, "_poolscope_transfer", None)
            if state is not None and state.conn is not None:
                self.finished(state, True)
        self._pool_close(multi, args, kwargs)

    def granted(self, state, key, rec):
        """The transfer has a connection poolscope had not seen open (``rec`` None), or moved
        to another (libcurl retried on a new connection, or followed a redirect)."""
        if state.conn is not None:
            self.finished(state)
        if rec is None:
            handle = state.curl()
            fd = _descriptor(key) if handle.getinfo(CurlInfo.NUM_CONNECTS) else None
            if fd is None:
                return  # a connection opened before poolscope was instrumented: not observed
            owner = state.owner()
            if owner is None:
                return  # its owner is being freed
            pool = self.pool_state(owner)
            url = handle.getinfo(CurlInfo.EFFECTIVE_URL).decode("utf-8", "replace")
            rec = self.recorder.conn_created(pool, self.recorder.series(self.library,
                                                                         url_origin(url)))
            *times, pretransfer = [handle.getinfo(info) for info in (
                CurlInfo.NAMELOOKUP_TIME_T, CurlInfo.CONNECT_TIME_T, CurlInfo.APPCONNECT_TIME_T,
                CurlInfo.PRETRANSFER_TIME_T)]
            setup = curl_setup(*times, pretransfer)
            self.recorder.conn_opened(rec, setup, protocol=None)  # known once it answers
            _by_key[key], _by_fd[fd] = rec, key
            now = time.time_ns()
            span = self.recorder.setup_started(rec, state.context, now - int(setup * 1e9))
            self.recorder.setup_ended(span, peer=key[2].decode() if span else None, end_ns=now)
            self.recorder.setup_phases(rec, curl_phases(*times, now - max(times) * 1000))
        state.conn = rec
        self.recorder.acquired(rec, context=state.context)

    def finished(self, state, failed=False):
        """The transfer ended (or moved off its connection)."""
        rec, state.conn = state.conn, None
        if rec is None:
            return
        if rec.protocol is None:
            self._protocol(rec, state.curl())
        peer_closed = _lost.pop(rec, None)
        if peer_closed is None:
            self.recorder.released(rec)
        elif failed:
            self.recorder.released(rec, sc.ERROR)
        else:
            handle = state.curl()
            if peer_closed or handle is None or _said_close(handle):
                reason = sc.SERVER_CLOSED
            else:  # FORBID_REUSE, or a cache over MAXCONNECTS: the pool keeps too few idle
                reason = sc.IDLE_LIMIT
            self.recorder.released(rec, reason)

    def _protocol(self, rec, handle):
        if handle is not None:
            self.recorder.protocol_known(
                rec, CURL_HTTP_VERSIONS.get(handle.getinfo(CurlInfo.HTTP_VERSION)))

    def socket_closing(self, fd):
        """libcurl is closing socket ``fd``: a connection's, if poolscope saw it open."""
        _new_fds.discard(fd)
        rec = _by_key.pop(_by_fd.pop(fd, None), None)
        if rec is None:
            return
        sock = socket.socket(fileno=fd)
        try:
            # a WebSocket's connection has no transfer to wait for: the recorder names its close
            if rec.in_use and not rec.upgraded:
                _lost[rec] = _peer_closed(sock)
                return
            if _peer_closed(sock):
                reason = sc.SERVER_CLOSED
            elif (rec.released_at and time.monotonic() - rec.released_at
                  >= float(_option(rec, CurlOpt.MAXAGE_CONN, _DEFAULT_MAXAGE)) - 0.01):
                reason = sc.KEEPALIVE_EXPIRED
            else:
                reason = sc.IDLE_LIMIT  # libcurl makes room in a full cache
        finally:
            sock.detach()
        self.recorder.closed(rec, reason)


def _option(rec, option, default):
    """An option of the connection's pool as its session's ``curl_options`` set it, else
    ``default`` (libcurl's)."""
    owner = rec.pool.ref()
    options = getattr(owner, "_poolscope_options", None) or {}
    return options.get(option, default)


def _handles(multi):
    """The curl handles of the sessions that share ``multi``: the limit of its pool (None for
    a multi used without a session, a handle or a share)."""
    sessions_ = getattr(multi, "_poolscope_sessions", None)
    return sum(session.max_clients for session in sessions_) if sessions_ else None

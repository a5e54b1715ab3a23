"""What every adapter shares: patch bookkeeping and the one guarded wrapper for sync and async."""

import contextlib
import contextvars
import errno
import functools
import inspect
import sys
import time
import types
from urllib.parse import urlsplit

from .. import _semconv as sc
from .._config import internal_error

DEFAULT_PORTS = {"http": 80, "https": 443}
_WEBSOCKET_SCHEMES = {"ws": "http", "wss": "https"}


def http_scheme(scheme):
    """The scheme of the HTTP connection a URL's scheme opens: a WebSocket's (``ws``, ``wss``)
    is ``http`` or ``https``."""
    return _WEBSOCKET_SCHEMES.get(scheme, scheme)

# libcurl's CURLINFO_HTTP_VERSION codes, as network.protocol.version
CURL_HTTP_VERSIONS = {1: "1.0", 2: "1.1", 3: "2", 30: "3"}
_MISSING = object()
_UNLOCKED = contextlib.nullcontext()
# the phases of the connection set-up this thread or task is running: (phase, seconds, end_ns)
_PHASES = contextvars.ContextVar("poolscope_setup_phases", default=None)


def phases_begin():
    """Start collecting the phases of a connection set-up in this thread or task; returns the
    list they land in (see :func:`phase_timer`)."""
    phases = []
    _PHASES.set(phases)
    return phases


def phases_end():
    _PHASES.set(None)


def phase_timer(phase):
    """``before``/``after`` hooks for :meth:`Adapter.wrap` that time a call as ``phase`` of the
    set-up in progress (none in progress: nothing)."""
    def before(obj, args, kwargs):
        return time.monotonic() if _PHASES.get() is not None else None

    def after(started, obj, result, exc):
        if exc is None:
            phase_ended(phase, started)
    return before, after


def curl_setup(namelookup_us, connect_us, appconnect_us, pretransfer_us):
    """A new connection's set-up in seconds from libcurl's times (µs from the transfer's start):
    from the socket's opening, once the name is looked up, until the transfer can begin
    (PRETRANSFER: past a proxy's handshake too, which CONNECT, the TCP connect to the proxy, and
    APPCONNECT do not cover through a SOCKS proxy). A lookup that ends after the connect is the
    target's, which libcurl makes for a SOCKS5 proxy once connected to it: the set-up then runs
    from the transfer's start."""
    start = namelookup_us if namelookup_us <= connect_us else 0
    return max(0, max(connect_us, appconnect_us, pretransfer_us) - start) / 1e6


# CURLE_COULDNT_RESOLVE_PROXY, CURLE_COULDNT_RESOLVE_HOST
_CURL_UNRESOLVED = (5, 6)
# libcurl's errors that leave a transfer without a connection even where its socket connected
# (to a proxy that then refused it): a name not found, CURLE_COULDNT_CONNECT (a proxy's refusal
# before libcurl 7.73) and CURLE_PROXY
CURL_UNOPENED = (*_CURL_UNRESOLVED, 7, 97)


def curl_failed_setup(namelookup_us, connect_us, total_us, errno):
    """The set-up, in seconds, of a connection that a libcurl transfer failed to open
    (``errno``), from its times: from the socket's opening (as :func:`curl_setup`) until the
    transfer ended, or from its start for a name that could not be looked up; None if the
    transfer began no connection (it had none, or was refused one while queued)."""
    if namelookup_us > 0:
        start = namelookup_us if connect_us <= 0 or namelookup_us <= connect_us else 0
    elif errno in _CURL_UNRESOLVED:
        start = 0
    else:
        return None
    return max(0, total_us - start) / 1e6


def curl_phases(namelookup_us, connect_us, appconnect_us, start_ns):
    """The set-up phases of a libcurl transfer that opened a connection, from its times
    (NAMELOOKUP, CONNECT, APPCONNECT: microseconds from the transfer's start at ``start_ns``;
    APPCONNECT 0 without TLS)."""
    marks = ((sc.DNS, namelookup_us), (sc.CONNECT, connect_us), (sc.TLS, appconnect_us))
    phases, before = [], 0
    for phase, mark in marks[:3 if appconnect_us else 2]:
        phases.append((phase, max(0, mark - before) / 1e6, start_ns + mark * 1000))
        before = mark
    return phases


def phase_ended(phase, started):
    """``phase`` of the set-up in progress (if any) ended well; it started at ``started``
    (``time.monotonic()``)."""
    phases = _PHASES.get()
    if phases is not None:
        phases.append((phase, time.monotonic() - started, time.time_ns()))


def around(function, where, before=None, after=None, is_async=False):
    """A method calling ``function`` exactly once, with poolscope's work guarded.

    ``before(instance, args, kwargs)`` returns a token; ``after(token, instance, result, exc)``
    runs when there is no ``before`` or its token is not None, with ``exc`` the exception the
    call raised (re-raised unchanged afterwards) or None. A plain function, not a wrapt proxy:
    on every request it costs a third as much.
    """

    def enter(instance, args, kwargs):
        """The token, or None when there is nothing to do after the call."""
        try:
            token = before(instance, args, kwargs)
        except Exception:
            internal_error(where)
            return None
        return token if after is not None else None

    def leave(token, instance, result, exc):
        try:
            after(token, instance, result, exc)
        except Exception:
            internal_error(where)

    # a hook with only ``before`` is called inline: a frame less on every request, and the
    # same frames above the hook, sync or async (see calling)
    if is_async and after is None:
        async def method(instance, *args, **kwargs):
            try:
                before(instance, args, kwargs)
            except Exception:
                internal_error(where)
            return await function(instance, *args, **kwargs)
    elif is_async:
        async def method(instance, *args, **kwargs):
            token = True if before is None else enter(instance, args, kwargs)
            if token is None:
                return await function(instance, *args, **kwargs)
            try:
                result = await function(instance, *args, **kwargs)
            except BaseException as exc:
                leave(token, instance, None, exc)
                raise
            leave(token, instance, result, None)
            return result
    elif after is None:
        def method(instance, *args, **kwargs):
            try:
                before(instance, args, kwargs)
            except Exception:
                internal_error(where)
            return function(instance, *args, **kwargs)
    else:
        def method(instance, *args, **kwargs):
            token = True if before is None else enter(instance, args, kwargs)
            if token is None:
                return function(instance, *args, **kwargs)
            try:
                result = function(instance, *args, **kwargs)
            except BaseException as exc:
                leave(token, instance, None, exc)
                raise
            leave(token, instance, result, None)
            return result
    functools.update_wrapper(method, function)
    return method


def calling(code, depth=4):
    """The frame running ``code`` (or one of a tuple of codes) among the few that called the
    hooked method (the hook's own frame and its wrapper's skipped), or None: which of the
    library's methods an event comes from, asked only on rare events."""
    codes = code if type(code) is tuple else (code,)
    frame = sys._getframe(3)
    for _ in range(depth):
        if frame is None or any(frame.f_code is c for c in codes):
            return frame
        frame = frame.f_back
    return None


_DISCONNECTS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_DISCONNECT_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


def disconnected(error, depth=6):
    """Whether ``error`` is, or wraps, the server closing a connection under a request: a reset,
    a broken pipe (also as a library's own ``OSError``, aiohttp's ``ClientOSError``), or
    ``http.client.RemoteDisconnected`` (a ``ConnectionResetError``)."""
    for _ in range(depth):
        if error is None or isinstance(error, _DISCONNECTS) or (
                isinstance(error, OSError) and error.errno in _DISCONNECT_ERRNOS):
            return error is not None
        inner = getattr(error, "reason", None)  # urllib3's MaxRetryError
        if not isinstance(inner, BaseException):  # urllib3's ProtocolError("…", error)
            inner = next((a for a in getattr(error, "args", ()) if isinstance(a, BaseException)),
                         None)
        error = inner if inner is not None else error.__cause__
    return False


def peer_address(read):
    """The IP address in the peer name ``read()`` gives, or None: for a Unix socket's path, for
    no name, and when reading it fails (a socket already closed, a wrapper without it)."""
    try:
        name = read()
    except Exception:
        return None
    return name[0] if isinstance(name, tuple) and name and isinstance(name[0], str) else None


def url_origin(url):
    """The origin ``(scheme, host, port)`` of a URL (``http://`` where it has no scheme;
    ``ws://`` and ``wss://`` as ``http://`` and ``https://``)."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    scheme = http_scheme(parts.scheme.lower())
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, parts.hostname or "", port or DEFAULT_PORTS.get(scheme)


def arg(args, kwargs, index, name):
    """A wrapped call's argument, whether passed by position or by name."""
    return args[index] if len(args) > index else kwargs.get(name)


class Adapter:
    """Patches one library. Subclasses set ``library`` and implement ``patch()`` and ``limits()``."""

    library = ""

    def __init__(self, recorder):
        self.recorder = recorder
        self._saved = []

    def patch(self):
        raise NotImplementedError

    def limits(self, pool_obj):
        """Keyword arguments for ``Recorder.pool_opened`` describing a library pool object."""
        raise NotImplementedError

    def registered(self, pool_obj, state):
        """Hook for adapters that attach the pool state to more of the library's objects."""

    def own_lock(self, pool_obj):
        """The library's lock under which the adapter reports a serialized pool's frequent
        events (None: none)."""
        return None

    def serialized(self, pool):
        """What to hold while reporting a rarer event of ``pool`` from outside the library's
        lock: that lock, for a pool whose events the library's lock serializes."""
        lock = self.own_lock(pool.ref()) if pool.lock is None else None
        return _UNLOCKED if lock is None else lock

    def pool_state(self, pool_obj):
        """The pool state of a library pool, registering it now if this recorder has not seen it."""
        state = getattr(pool_obj, "_poolscope", None)
        if state is None or not state.live or state.owner is not self.recorder:
            state = self.recorder.pool_opened(self.library, pool_obj, **self.limits(pool_obj))
            pool_obj._poolscope = state
            self.registered(pool_obj, state)
        return state

    def _pool_init(self, token, pool_obj, result, exc):
        if exc is None:
            self.pool_state(pool_obj)

    def _pool_close(self, pool_obj, args, kwargs):
        state = getattr(pool_obj, "_poolscope", None)
        if state is not None:
            self.recorder.pool_closed(state)

    def wrap(self, owner, name, before=None, after=None):
        """Wrap the method ``owner.name`` with :func:`around`; a no-op for a name the owner lacks."""
        original = inspect.getattr_static(owner, name, _MISSING)
        if original is _MISSING:
            return
        if isinstance(original, types.FunctionType):
            function = original
        else:  # another tool's wrapper (a descriptor): bind it as attribute access would
            def function(instance, *args, **kwargs):
                return original.__get__(instance, type(instance))(*args, **kwargs)
        method = around(function, f"{self.library}:{getattr(owner, '__name__', owner)}.{name}",
                        before, after, inspect.iscoroutinefunction(original))
        method.__wrapped__ = original
        self.replace(owner, name, method)

    def observe_subclasses(self, base, hooks):
        """Wrap, as :meth:`wrap` does, each of ``hooks`` (``{method name: (before, after)}``) on
        the subclasses of ``base`` that define that method and are not the library's own (its
        own are patched by name): those made already, and through ``__init_subclass__`` those
        made later (their module imported after poolscope). Applications and SDKs subclass a
        library's classes with methods of their own: the docker SDK's urllib3 connection opens a
        Unix socket in a ``connect`` of its own, httpx-socks' pool makes connections of its
        own."""
        library = base.__module__.split(".")[0]
        seen = set()

        def observe(cls):
            if cls in seen or cls.__module__.split(".")[0] == library:
                return
            seen.add(cls)
            for name, (before, after) in hooks.items():
                if name in vars(cls):
                    self.wrap(cls, name, before, after)

        def __init_subclass__(cls, **kwargs):
            super(base, cls).__init_subclass__(**kwargs)
            try:
                observe(cls)
            except Exception:
                internal_error(f"{self.library}:{base.__name__} subclass")

        made = base.__subclasses__()
        while made:
            cls = made.pop()
            observe(cls)
            made.extend(cls.__subclasses__())
        self.replace(base, "__init_subclass__", classmethod(__init_subclass__))

    def replace(self, owner, name, value):
        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def unpatch(self):
        """Put back the very objects that were there before."""
        while self._saved:
            owner, name, original = self._saved.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

"""One interface over each client flavor, so a scenario is written once and run on all."""

import asyncio
import contextlib
import io
import queue
import threading
from concurrent.futures import Future

import aiohttp
import httpx
import pycurl
import urllib3
from opentelemetry import trace

from poolscope._instrument import _urllib3_is_future

try:  # not in the oldest pins of the version matrix (httpcore 1.0.3 and httpcore2 need other h11s)
    import httpx2
except ImportError:
    httpx2 = None
try:  # only in the version matrix's urllib3-future session: its urllib3-future replaces urllib3
    import niquests
except ImportError:
    niquests = None
try:  # Python 3.10+
    from curl_cffi import requests as curl_cffi_requests
except ImportError:
    curl_cffi_requests = None
try:
    import trio
except ImportError:
    trio = None

# where urllib3-future installed itself as urllib3, `import urllib3` gives it
URLLIB3_FUTURE = _urllib3_is_future()


def _in_threads(fn, args):
    results = [None] * len(args)
    barrier = threading.Barrier(len(args))

    def run(i, a):
        barrier.wait()
        try:
            results[i] = fn(a)
        except Exception as exc:  # the scenario asserts on it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def curl_statuses(url, n, **options):
    """The statuses of ``n`` requests to ``url`` on one pycurl handle (which reuses its
    connection), with ``options`` (pycurl's option names) set."""
    curl = pycurl.Curl()
    try:
        statuses = []
        for _ in range(n):
            curl.setopt(pycurl.URL, url)
            for name, value in options.items():
                curl.setopt(getattr(pycurl, name), value)
            curl.setopt(pycurl.WRITEDATA, io.BytesIO())
            curl.perform()
            statuses.append(curl.getinfo(pycurl.RESPONSE_CODE))
        return statuses
    finally:
        curl.close()


class _Driver:
    """Closes its client at the end of a ``with`` block, or with ``close()``."""

    closed = False
    has_pool_timeout = True
    can_cancel = True  # a request from ``submit`` stops when its future is cancelled

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if not self.closed:
            self.closed = True
            self._close()


class _SyncDriver(_Driver):
    """Requests from threads of the test's own."""

    can_cancel = False

    def get_all(self, paths):
        return _in_threads(self.get, paths)

    def submit(self, path):
        """``get(path)`` in a thread of its own, started now (a shared executor may queue it
        behind a thread an earlier scenario left busy)."""
        future = Future()

        def run():
            try:
                future.set_result(self.get(path))
            except BaseException as exc:  # the scenario asserts on it
                future.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        return future


class Urllib3Driver(_SyncDriver):
    library = "urllib3-future" if URLLIB3_FUTURE else "urllib3"

    def __init__(self, server, limit=10, pool_timeout=None, block=True, **kw):
        self.server = server
        self.pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=limit,
                                               block=block, timeout=5, retries=False, **kw)
        self.pool_timeout = pool_timeout

    def get(self, path):
        return self.pool.request("GET", path, pool_timeout=self.pool_timeout).status

    def _close(self):
        self.pool.close()


class NiquestsDriver(_SyncDriver):
    """A niquests ``Session`` whose ``http://`` adapter keeps ``limit`` connections, blocking
    when all are out. niquests sets no pool timeout (urllib3-future's own ``pool_timeout`` is
    driven through its urllib3 API)."""

    library = "urllib3-future"
    has_pool_timeout = False

    def __init__(self, server, limit=10, pool_timeout=None, block=True, tracer=None):
        if pool_timeout is not None:
            import pytest
            pytest.skip("niquests has no pool timeout")
        self.server = server
        self.tracer = tracer
        self.session = niquests.Session()
        self.session.mount("http://", niquests.adapters.HTTPAdapter(
            pool_maxsize=limit, pool_block=block, max_retries=0))

    def get(self, path):
        with _client_span(self.tracer):
            return self.session.get(self.server.url + path, timeout=5).status_code

    def _close(self):
        self.session.close()


class HttpxDriver(_SyncDriver):
    library = "httpx"
    module = httpx

    def __init__(self, server, limit=10, pool_timeout=5.0, **limits):
        self.server = server
        self.client = self.module.Client(
            limits=self.module.Limits(max_connections=limit, **limits),
            timeout=self.module.Timeout(5.0, pool=pool_timeout))

    def get(self, path):
        return self.client.get(self.server.url + path).status_code

    def _close(self):
        self.client.close()


class _AsyncDriver(_Driver):
    """A client living in its own event loop thread, driven from the test's thread."""

    def __init__(self, server, **kw):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self._call(self._make(**kw))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def get(self, path):
        return self._call(self._get(path))

    def get_all(self, paths):
        async def gather():
            return await asyncio.gather(*(self._get(p) for p in paths), return_exceptions=True)
        return self._call(gather())

    def submit(self, path):
        return asyncio.run_coroutine_threadsafe(self._get(path), self.loop)

    def _close(self):
        self._call(self._aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class AsyncHttpxDriver(_AsyncDriver):
    library = "httpx"
    module = httpx

    async def _make(self, limit=10, pool_timeout=5.0, **limits):
        return self.module.AsyncClient(
            limits=self.module.Limits(max_connections=limit, **limits),
            timeout=self.module.Timeout(5.0, pool=pool_timeout))

    async def _get(self, path):
        return (await self.client.get(self.server.url + path)).status_code

    async def _aclose(self):
        await self.client.aclose()


async def trio_gather(coros, return_exceptions=False):
    """``asyncio.gather`` under trio: the coroutines' results, in order, run at once."""
    results = [None] * len(coros)

    async def one(i, coro):
        try:
            results[i] = await coro
        except Exception as exc:
            if not return_exceptions:
                raise
            results[i] = exc  # the scenario asserts on it
    async with trio.open_nursery() as nursery:
        for i, coro in enumerate(coros):
            nursery.start_soon(one, i, coro)
    return results


class TrioThread:
    """A trio run in a thread of its own: ``run_until_complete(coro)`` runs a coroutine there
    (as an asyncio loop's does), ``start_soon`` starts a task there, ``close()`` ends the run."""

    def __init__(self):
        started = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._serve, started), daemon=True)
        self.thread.start()
        started.wait(5)

    async def _serve(self, started):
        self.token, self.stop = trio.lowlevel.current_trio_token(), trio.Event()
        async with trio.open_nursery() as self.nursery:
            started.set()
            await self.stop.wait()
            self.nursery.cancel_scope.cancel()

    def run_until_complete(self, coro):
        async def run():
            return await coro
        return trio.from_thread.run(run, trio_token=self.token)

    def start_soon(self, fn, *args):
        trio.from_thread.run_sync(self.nursery.start_soon, fn, *args, trio_token=self.token)

    def close(self):
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(5)


class _TrioFuture(Future):
    """What ``submit`` gives under trio: cancelling it cancels the request, as cancelling
    asyncio's ``run_coroutine_threadsafe`` future cancels its task."""

    def __init__(self, token):
        super().__init__()
        self.token, self.scope = token, trio.CancelScope()

    def cancel(self):
        trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        return super().cancel()


class TrioHttpxDriver(AsyncHttpxDriver):
    """httpx's async client under trio (httpcore's trio backend), in a thread of its own."""

    def __init__(self, server, **kw):
        self.server, self.loop = server, TrioThread()
        self.client = self._call(self._make(**kw))

    def _call(self, coro):
        return self.loop.run_until_complete(coro)

    def get_all(self, paths):
        return self._call(trio_gather([self._get(p) for p in paths], return_exceptions=True))

    def submit(self, path):
        future = _TrioFuture(self.loop.token)

        async def run():
            with future.scope:
                try:
                    result = await self._get(path)
                except Exception as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
        self.loop.start_soon(run)
        return future

    def _close(self):
        self._call(self._aclose())
        self.loop.close()


def _client_span(tracer):
    """The application's own span around a request (httpx2 has no OpenTelemetry instrumentation
    of its own), or none without a tracer."""
    if tracer is None:
        return contextlib.nullcontext()
    return tracer.start_as_current_span("GET", kind=trace.SpanKind.CLIENT)


class _AppSpans:
    """``tracer``: each request under the application's own CLIENT span (see _client_span).
    A client with no pool timeout skips a scenario that sets one."""

    def __init__(self, server, tracer=None, **kw):
        if not self.has_pool_timeout and kw.get("pool_timeout") is not None:
            import pytest
            pytest.skip(f"{type(self).__name__}: no pool timeout to set")
        self.tracer = tracer
        super().__init__(server, **kw)


class Httpx2Driver(_AppSpans, HttpxDriver):
    library = "httpx2"
    module = httpx2

    def get(self, path):
        with _client_span(self.tracer):
            return super().get(path)


class AsyncHttpx2Driver(_AppSpans, AsyncHttpxDriver):
    library = "httpx2"
    module = httpx2

    async def _get(self, path):
        with _client_span(self.tracer):
            return await super()._get(path)


class AsyncNiquestsDriver(_AppSpans, _AsyncDriver):
    """A niquests ``AsyncSession`` (urllib3-future's async pools) whose ``http://`` adapter
    keeps ``limit`` connections, blocking when all are out; no pool timeout, as niquests'
    sync ``Session``."""

    library = "urllib3-future"
    has_pool_timeout = False

    async def _make(self, limit=10, pool_timeout=None, block=True):
        session = niquests.AsyncSession()
        session.mount("http://", niquests.adapters.AsyncHTTPAdapter(
            pool_maxsize=limit, pool_block=block, max_retries=0))
        return session

    async def _get(self, path):
        with _client_span(self.tracer):
            return (await self.client.get(self.server.url + path, timeout=5)).status_code

    async def _aclose(self):
        await self.client.close()


class AiohttpDriver(_AsyncDriver):
    library = "aiohttp"

    async def _make(self, limit=10, pool_timeout=5.0, **connector):
        # aiohttp bounds the wait for the pool with the connect timeout
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, **connector),
                                     timeout=aiohttp.ClientTimeout(total=10, connect=pool_timeout))

    async def _get(self, path):
        async with self.client.get(self.server.url + path) as response:
            await response.read()
            return response.status

    async def _aclose(self):
        await self.client.close()


class CurlCffiDriver(_AppSpans, _AsyncDriver):
    """A curl_cffi ``AsyncSession`` with ``limit`` curl handles. curl_cffi sets no timeout on
    the wait for a handle."""

    library = "curl_cffi"
    has_pool_timeout = False

    async def _make(self, limit=10, pool_timeout=None):
        return curl_cffi_requests.AsyncSession(max_clients=limit, timeout=5)

    async def _get(self, path):
        with _client_span(self.tracer):
            return (await self.client.get(self.server.url + path)).status_code

    async def _aclose(self):
        await self.client.close()


class PycurlDriver(_Driver):
    """A CurlMulti run by its own thread; requests from any thread join it as transfers."""

    library = "pycurl"

    def __init__(self, server, limit=10, pool_timeout=None):
        self.server = server
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, limit)
        self.pool_timeout = pool_timeout
        self.incoming = queue.Queue()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, path):
        future = Future()
        self.incoming.put((path, future))
        return future

    def get(self, path):
        return self.submit(path).result(30)

    def get_all(self, paths):
        futures = [self.submit(p) for p in paths]
        return [f.exception(30) or f.result() for f in futures]

    def _start(self, path, future):
        curl = pycurl.Curl()
        curl.setopt(pycurl.URL, self.server.url + path)
        curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
        if self.pool_timeout is not None:  # libcurl bounds a queued transfer by its connect timeout
            curl.setopt(pycurl.CONNECTTIMEOUT_MS, int(self.pool_timeout * 1000))
        self.multi.add_handle(curl)
        return curl

    def _run(self):
        running = {}
        while not (self.stopping and not running):
            while not self.incoming.empty():
                path, future = self.incoming.get()
                running[self._start(path, future)] = future
            self.multi.perform()
            more = True
            while more:
                more, ok, failed = self.multi.info_read()
                for curl, error in [(c, None) for c in ok] + [(c, pycurl.error(n, m))
                                                              for c, n, m in failed]:
                    future = running.pop(curl)
                    status = curl.getinfo(pycurl.RESPONSE_CODE)
                    self.multi.remove_handle(curl)
                    curl.close()
                    future.set_exception(error) if error else future.set_result(status)
            for curl, future in list(running.items()):
                if future.cancelled():
                    del running[curl]
                    self.multi.remove_handle(curl)
                    curl.close()
            self.multi.select(0.01)

    def _close(self):
        self.stopping = True
        self.thread.join(10)
        self.multi.close()


DRIVERS = {"urllib3-future" if URLLIB3_FUTURE else "urllib3": Urllib3Driver,
           **({"niquests": NiquestsDriver, "niquests-async": AsyncNiquestsDriver} if niquests else {}),
           "httpx-sync": HttpxDriver, "httpx-async": AsyncHttpxDriver,
           **({"httpx-trio": TrioHttpxDriver} if trio else {}),
           "aiohttp": AiohttpDriver, "pycurl": PycurlDriver,
           **({"curl_cffi": CurlCffiDriver} if curl_cffi_requests else {}),
           **({"httpx2-sync": Httpx2Driver, "httpx2-async": AsyncHttpx2Driver} if httpx2 else {})}

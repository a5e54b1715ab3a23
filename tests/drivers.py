"""One interface over each client flavor, so a scenario is written once and run on all."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import urllib3


_executor = ThreadPoolExecutor(4)


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


class _Driver:
    closed = False

    def close(self):
        if not self.closed:
            self.closed = True
            self._close()


class Urllib3Driver(_Driver):
    library = "urllib3"

    def __init__(self, server, limit=10, pool_timeout=None, block=True, **kw):
        self.server = server
        self.pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=limit,
                                               block=block, timeout=5, retries=False, **kw)
        self.pool_timeout = pool_timeout

    def get(self, path):
        return self.pool.request("GET", path, pool_timeout=self.pool_timeout).status

    def get_all(self, paths):
        return _in_threads(self.get, paths)

    def submit(self, path):
        return _executor.submit(self.get, path)

    def _close(self):
        self.pool.close()


class HttpxDriver(_Driver):
    library = "httpx"

    def __init__(self, server, limit=10, pool_timeout=5.0, **limits):
        self.server = server
        self.client = httpx.Client(
            limits=httpx.Limits(max_connections=limit, **limits),
            timeout=httpx.Timeout(5.0, pool=pool_timeout))

    def get(self, path):
        return self.client.get(self.server.url + path).status_code

    def get_all(self, paths):
        return _in_threads(self.get, paths)

    def submit(self, path):
        return _executor.submit(self.get, path)

    def _close(self):
        self.client.close()


class AsyncHttpxDriver(_Driver):
    """An AsyncClient living in its own event loop thread, driven from the test's thread."""

    library = "httpx"

    def __init__(self, server, limit=10, pool_timeout=5.0, **limits):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make():
            return httpx.AsyncClient(limits=httpx.Limits(max_connections=limit, **limits),
                                     timeout=httpx.Timeout(5.0, pool=pool_timeout))
        self.client = self._call(make())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _get(self, path):
        return (await self.client.get(self.server.url + path)).status_code

    def get(self, path):
        return self._call(self._get(path))

    def get_all(self, paths):
        async def gather():
            return await asyncio.gather(*(self._get(p) for p in paths), return_exceptions=True)
        return self._call(gather())

    def submit(self, path):
        return asyncio.run_coroutine_threadsafe(self._get(path), self.loop)

    def _close(self):
        self._call(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


DRIVERS = {"urllib3": Urllib3Driver, "httpx-sync": HttpxDriver, "httpx-async": AsyncHttpxDriver}

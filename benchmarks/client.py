"""One benchmark run, in its own process: prints a JSON line with the µs per request.

    python benchmarks/client.py LIBRARY CASE SETUP REQUESTS URL

LIBRARY: urllib3, requests, httpx, httpx-async, aiohttp, pycurl, curl_cffi (its AsyncSession),
httpx2, httpx2-async, and niquests and niquests-async (its AsyncSession) where it is installed
(its urllib3-future replaces urllib3: the version matrix's urllib3-future venv).
CASE: sequential (one client, keep-alive, one request at a time) or saturated
(CONCURRENCY requests at once through a pool of LIMIT).
SETUP: plain, poolscope, detailed, traced, traced+poolscope, official.
"""

import asyncio
import gc
import importlib
import json
import os
import resource
import sys
import threading
import time


def _shift_layout(k):
    """``k`` classes given their type version tag, and ``k`` buffers, before anything else is
    imported: the later types' tags and objects' addresses move with ``k``. CPython's method
    cache finds an attribute of a type at (its version tag XOR its name's address), so which
    hot look-ups collide, and miss on every request, depends on the whole process's layout:
    instructions.py runs each round in another layout (``BENCH_LAYOUT``)."""
    kept = []
    for i in range(k):
        cls = type(f"_Layout{i}", (), {})
        getattr(cls, "x", None)
        kept.append((cls, bytes(16 * (i + 1))))
    return kept


_LAYOUT = _shift_layout(int(os.environ.get("BENCH_LAYOUT", "0")))
CONCURRENCY, LIMIT = 8, 2
WARMUP = 200
errors = []  # failed requests: a worker that died would shorten the run and flatter it


def _providers(setup):
    """SDK providers the way a production service has them: metrics read by a pull reader,
    spans batched to an exporter (one that drops them, so no I/O is measured)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    return reader, meter_provider, tracer_provider


def instrument(setup, library):
    """Apply SETUP before the library is imported; returns (reader, tracer or None)."""
    if setup == "plain":
        return None, None
    reader, meter_provider, tracer_provider = _providers(setup)
    if setup == "sdk":
        return reader, None
    tracer = tracer_provider.get_tracer("bench") if setup.startswith("traced") else None
    if setup == "official":
        _official(library, meter_provider, tracer_provider)
    elif setup != "traced":
        if setup == "detailed":
            os.environ["POOLSCOPE_DETAILED_TIMINGS"] = "true"
        import poolscope
        poolscope.instrument(meter_provider=meter_provider, tracer_provider=tracer_provider)
    return reader, tracer


def _official(library, meter_provider, tracer_provider):
    providers = {"meter_provider": meter_provider, "tracer_provider": tracer_provider}
    if library in ("urllib3", "niquests"):  # niquests' urllib3-future is installed as urllib3
        from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor as I
    elif library == "requests":
        from opentelemetry.instrumentation.requests import RequestsInstrumentor as I
    elif library.startswith("httpx"):
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor as I
    elif library == "aiohttp":
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor as I
    else:
        raise SystemExit(f"no official OpenTelemetry instrumentation for {library}")
    I().instrument(**providers)


def spanned(tracer, call):
    """Each request under a recording parent span when tracing, as a traced service has."""
    if tracer is None:
        return call

    def run(*args):
        with tracer.start_as_current_span("request"):
            return call(*args)
    return run


def aspanned(tracer, call):
    if tracer is None:
        return call

    async def run(*args):
        with tracer.start_as_current_span("request"):
            return await call(*args)
    return run


# -- one client per library: (sequential client, saturated client) -> a request function --

def sync_workload(library, case, url):
    if library == "urllib3":
        import urllib3
        if case == "sequential":
            pool = urllib3.PoolManager(maxsize=1)
        else:
            pool = urllib3.PoolManager(maxsize=LIMIT, block=True)
        return lambda: pool.request("GET", url).data
    if library == "requests":
        import requests
        session = requests.Session()
        if case == "saturated":
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=LIMIT, pool_block=True)
            session.mount("http://", adapter)
        return lambda: session.get(url).content
    if library in ("httpx", "httpx2"):
        httpx = importlib.import_module(library)
        limits = httpx.Limits(max_connections=LIMIT if case == "saturated" else None)
        client = httpx.Client(limits=limits)
        return lambda: client.get(url).content
    if library == "niquests":
        import niquests
        session = niquests.Session()
        if case == "saturated":
            session.mount("http://", niquests.adapters.HTTPAdapter(pool_maxsize=LIMIT,
                                                                    pool_block=True))
        return lambda: session.get(url).content
    if library == "pycurl":
        return None
    raise SystemExit(f"unknown library {library}")


async def async_workload(library, case, url):
    if library in ("httpx-async", "httpx2-async"):
        httpx = importlib.import_module(library.partition("-")[0])
        limits = httpx.Limits(max_connections=LIMIT if case == "saturated" else None)
        client = httpx.AsyncClient(limits=limits)

        async def get():
            return (await client.get(url)).content
        return get
    if library == "niquests-async":
        import niquests
        session = niquests.AsyncSession()
        if case == "saturated":
            session.mount("http://", niquests.adapters.AsyncHTTPAdapter(pool_maxsize=LIMIT,
                                                                         pool_block=True))

        async def get():
            return (await session.get(url)).content
        return get
    if library == "curl_cffi":
        from curl_cffi.requests import AsyncSession
        session = AsyncSession(max_clients=LIMIT if case == "saturated" else 10)

        async def get():
            return (await session.get(url)).content
        return get
    import aiohttp
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        limit=LIMIT if case == "saturated" else 100))

    async def get():
        async with session.get(url) as response:
            return await response.read()
    return get


def run_sync(call, case, requests):
    for _ in range(WARMUP):
        call()
    workers = 1 if case == "sequential" else CONCURRENCY

    def worker(n):
        for _ in range(n):
            try:
                call()
            except Exception as exc:
                errors.append(exc)
    threads = [threading.Thread(target=worker, args=(requests // workers,)) for _ in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


async def run_async(call, case, requests):
    for _ in range(WARMUP):
        await call()
    workers = 1 if case == "sequential" else CONCURRENCY

    async def worker(n):
        for _ in range(n):
            try:
                await call()
            except Exception as exc:
                errors.append(exc)
    start = time.perf_counter()
    await asyncio.gather(*(worker(requests // workers) for _ in range(workers)))
    return time.perf_counter() - start


def run_pycurl(case, requests, url, tracer):
    import pycurl
    from io import BytesIO

    def handle():
        curl = pycurl.Curl()
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.WRITEDATA, BytesIO())
        return curl

    if case == "sequential":
        curl = handle()
        call = spanned(tracer, curl.perform)
        for _ in range(WARMUP):
            call()
        start = time.perf_counter()
        for _ in range(requests):
            call()
        return time.perf_counter() - start

    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, LIMIT)
    free = [handle() for _ in range(CONCURRENCY)]

    def transfers(n):
        started = done = 0
        while done < n:
            while free and started < n:
                multi.add_handle(free.pop())
                started += 1
            while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            _, ok, failed = multi.info_read()
            errors.extend(failed)
            for curl in ok + [f[0] for f in failed]:
                multi.remove_handle(curl)
                free.append(curl)
                done += 1
            if not ok and not failed:
                multi.select(0.1)

    transfers(WARMUP)
    start = time.perf_counter()
    if tracer is None:
        transfers(requests)
    else:
        # a multi has no per-request call to wrap: the whole batch runs under one span
        with tracer.start_as_current_span("batch"):
            transfers(requests)
    return time.perf_counter() - start


def points(data, name):
    """The data points of the metric ``name`` in one collection's ``data``."""
    return [point for rm in (data.resource_metrics if data else ()) for sm in rm.scope_metrics
            for metric in sm.metrics if metric.name == name
            for point in metric.data.data_points]


def _waited(data):
    """Requests that waited for a connection, per poolscope (read by a collection, as a scrape
    would); None without poolscope."""
    if "poolscope" not in sys.modules:
        return None
    return sum(point.count for point in points(data, "poolscope.connection.wait_time"))


def run(library, case, requests, url, tracer=None):
    """One run of the workload with a fresh client; returns the seconds of the timed part."""
    if library == "pycurl":
        return run_pycurl(case, requests, url, tracer)
    if library in ("httpx-async", "httpx2-async", "aiohttp", "curl_cffi", "niquests-async"):
        async def go():
            call = aspanned(tracer, await async_workload(library, case, url))
            return await run_async(call, case, requests)
        return asyncio.run(go())
    return run_sync(spanned(tracer, sync_workload(library, case, url)), case, requests)


def main():
    library, case, setup, requests, url = sys.argv[1:6]
    requests = int(requests)
    reader, tracer = instrument(setup, library)
    gc.collect()
    cpu = time.process_time()
    seconds = run(library, case, requests, url, tracer)
    cpu = time.process_time() - cpu  # warm-up included, as in the same share on both sides
    waited = _waited(reader.get_metrics_data()) if reader is not None else None
    print(json.dumps({"us_per_request": seconds / requests * 1e6,
                      "cpu_us_per_request": cpu / (requests + WARMUP) * 1e6,
                      "waited_share": None if waited is None else waited / (requests + WARMUP),
                      "errors": len(errors), "first_error": repr(errors[0]) if errors else None,
                      "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


if __name__ == "__main__":
    main()

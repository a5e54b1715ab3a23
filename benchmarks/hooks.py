"""What poolscope adds to the pool bookkeeping of one request, with nothing else around it.

    python benchmarks/hooks.py [LIBRARY ...] [--rounds 12] [--cycles 30000] [--best-of 1]

A cycle is what a healthy request does to its library's pool, on one real pooled connection to
the local nginx:

- urllib3: ``_get_conn()`` and ``_put_conn()`` (the measurement of issue 20);
- httpx: a ``PoolRequest`` joins the pool's request list, is assigned the idle connection, and
  leaves the list;
- aiohttp: ``TCPConnector.connect()`` takes the idle connection and ``release()`` gives it back;
- pycurl: one whole ``perform()`` on a handle whose connection is cached (libcurl does the
  request in C: a pycurl request is no less than this);
- pycurl-multi: one whole transfer in a ``CurlMulti`` limited to 2 connections, driven as
  the saturated benchmark drives it (``add_handle``, ``perform``, ``info_read``,
  ``remove_handle``), on its cached connection.

One process, pinned like run.py's clients, alternates phases with and without poolscope (the
order swapped every round, a fresh client each phase, created after ``instrument()``) and
reports the median of the paired differences in µs per cycle (each phase the fastest of
``--best-of`` runs, which steadies a VM whose neighbours steal time). The request path around
these calls (sockets, parsing) costs poolscope nothing more, but makes each µs here cost two
to four in a real request (colder caches): this figure tracks changes to the hooks precisely,
run.py gives what an application pays.
"""

import argparse
import asyncio
import gc
import statistics
import time
from urllib.parse import urlsplit

import client
from nginx import nginx
from run import pin_client


def urllib3_cycles(url, cycles):
    import urllib3
    parts = urlsplit(url)
    pool = urllib3.HTTPConnectionPool(parts.hostname, parts.port, maxsize=1)
    pool.request("GET", "/")
    get, put = pool._get_conn, pool._put_conn
    started = time.perf_counter()
    for _ in range(cycles):
        put(get())
    elapsed = time.perf_counter() - started
    pool.close()
    return elapsed


def httpx_cycles(url, cycles):
    import httpcore
    from httpcore._sync.connection_pool import PoolRequest
    pool = httpcore.ConnectionPool()
    pool.request("GET", url)
    conn, requests = pool.connections[0], pool._requests
    request = httpcore.Request("GET", url)
    started = time.perf_counter()
    for _ in range(cycles):
        pool_request = PoolRequest(request)
        requests.append(pool_request)
        pool_request.assign_to_connection(conn)
        requests.remove(pool_request)
    elapsed = time.perf_counter() - started
    pool.close()
    return elapsed


def aiohttp_cycles(url, cycles):
    import aiohttp
    from aiohttp.client_reqrep import ClientRequest
    from yarl import URL

    async def main():
        connector = aiohttp.TCPConnector()
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(url) as response:
                await response.read()
            request = ClientRequest("GET", URL(url), loop=asyncio.get_running_loop())
            timeout = aiohttp.ClientTimeout()
            started = time.perf_counter()
            for _ in range(cycles):
                (await connector.connect(request, [], timeout)).release()
            return time.perf_counter() - started
    return asyncio.run(main())


def pycurl_cycles(url, cycles):
    import pycurl
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, url)
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
    curl.perform()
    started = time.perf_counter()
    for _ in range(cycles):
        curl.perform()
    elapsed = time.perf_counter() - started
    curl.close()
    return elapsed


def pycurl_multi_cycles(url, cycles):
    import pycurl
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, url)
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, 2)

    def transfer():
        multi.add_handle(curl)
        while True:
            while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            _, ok, failed = multi.info_read()
            if ok or failed:
                multi.remove_handle(curl)
                return
            multi.select(0.1)
    transfer()
    started = time.perf_counter()
    for _ in range(cycles):
        transfer()
    elapsed = time.perf_counter() - started
    multi.close()
    curl.close()
    return elapsed


def _acquisitions(reader, library):
    return sum(point.value for point in client.points(reader.get_metrics_data(),
                                                      "poolscope.connection.acquisitions")
               if point.attributes.get("poolscope.library") == library)


CYCLES = {"urllib3": urllib3_cycles, "httpx": httpx_cycles, "aiohttp": aiohttp_cycles,
          "pycurl": pycurl_cycles, "pycurl-multi": pycurl_multi_cycles}
WHAT = {"urllib3": "`_get_conn` + `_put_conn`", "httpx": "join, assign, leave",
        "aiohttp": "`connect` + `release`", "pycurl": "`perform` (a whole transfer)",
        "pycurl-multi": "a whole transfer in a limited multi"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("libraries", nargs="*", choices=[[], *CYCLES], default=[],
                        metavar="LIBRARY", help=f"any of {', '.join(CYCLES)} (default: all)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--cycles", type=int, default=30000)
    parser.add_argument("--best-of", type=int, default=1, metavar="N",
                        help="time each phase as the fastest of N runs (default: 1)")
    args = parser.parse_args()
    pin_client()
    reader, meter_provider, tracer_provider = client._providers("sdk")
    import poolscope

    def phase(library, url, instrumented):
        if instrumented:
            poolscope.instrument(meter_provider=meter_provider, tracer_provider=tracer_provider)
        gc.collect()
        try:
            us = min(CYCLES[library](url, args.cycles) for _ in range(args.best_of))
            if instrumented:  # the cycles went through poolscope: one acquisition each
                counted = _acquisitions(reader, library.split("-")[0])
                if counted != args.best_of * (args.cycles + 1):
                    raise SystemExit(f"{library}: poolscope counted {counted} acquisitions, not "
                                     f"{args.best_of} × ({args.cycles} cycles and 1 warm-up "
                                     "request)")
            return us / args.cycles * 1e6
        finally:
            if instrumented:
                poolscope.uninstrument()

    print("| library | cycle | plain µs | with poolscope µs | added µs (median) | spread |")
    print("|---|---|---:|---:|---:|---|")
    with nginx() as listen:
        url = "http://%s:%d/" % listen[0]
        for library in args.libraries or CYCLES:
            plain, added = [], []
            for r in range(args.rounds):
                order = (False, True) if r % 2 else (True, False)
                us = {i: phase(library, url, i) for i in order}
                plain.append(us[False])
                added.append(us[True] - us[False])
            base, plus = statistics.median(plain), statistics.median(added)
            print(f"| {library} | {WHAT[library]} | {base:.2f} | {base + plus:.2f} | "
                  f"**{plus:+.2f}** | {min(added):+.2f} to {max(added):+.2f} |", flush=True)


if __name__ == "__main__":
    main()

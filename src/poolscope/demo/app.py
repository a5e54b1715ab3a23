"""The demo application: an ordinary program that knows nothing of poolscope.

It saturates a urllib3 pool, a requests session, and httpx sync and async clients (limit 2
each, 6 requests at once against a 300 ms server), then waits for a line on stdin, so that
the demo can scrape its Prometheus endpoint before it exits.
"""

import asyncio
import sys
import threading

import httpx
import requests
import urllib3


def at_once(fn, n=6):
    threads = [threading.Thread(target=fn) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(url):
    slow = url + "/delay/0.3"
    pool = urllib3.PoolManager(maxsize=2, block=True)
    at_once(lambda: pool.request("GET", slow))

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2, pool_block=True))
    at_once(lambda: session.get(slow))

    client = httpx.Client(limits=httpx.Limits(max_connections=2))
    at_once(lambda: client.get(slow))

    async def async_requests():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=2)) as aclient:
            await asyncio.gather(*(aclient.get(slow) for _ in range(6)))
    asyncio.run(async_requests())

    print("workload done", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main(sys.argv[1])

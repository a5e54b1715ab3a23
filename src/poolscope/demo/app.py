"""The demo application: an ordinary program that knows nothing of poolscope.

It saturates a urllib3 pool, a requests session, httpx sync and async clients, an aiohttp
session, a pycurl multi and an openai client (on httpx2, where it is installed: Python 3.11+)
(limit 2 each, 6 requests at once against a 300 ms server), then waits for a line on stdin, so
that the demo can scrape its Prometheus endpoint before it exits.
"""

import asyncio
import sys
import threading

import aiohttp
import httpx
import pycurl
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

    async def aiohttp_requests():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
            async def get():
                async with session.get(slow) as response:
                    await response.read()
            await asyncio.gather(*(get() for _ in range(6)))
    asyncio.run(aiohttp_requests())

    curl_multi(slow)

    try:
        import httpx2
        import openai
    except ImportError:
        pass
    else:
        ai = openai.OpenAI(base_url=url + "/v1", api_key="demo",
                           http_client=openai.DefaultHttpxClient(
                               limits=httpx2.Limits(max_connections=2)))
        at_once(lambda: ai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}]))

    print("workload done", flush=True)
    sys.stdin.readline()


def curl_multi(url, n=6, limit=2):
    """``n`` transfers at once through a pycurl multi limited to ``limit`` connections."""
    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, limit)
    handles = []
    for _ in range(n):
        curl = pycurl.Curl()
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
        multi.add_handle(curl)
        handles.append(curl)
    done = 0
    while done < n:
        multi.perform()
        while True:
            queued, ok, failed = multi.info_read()
            done += len(ok) + len(failed)
            if not queued:
                break
        multi.select(0.1)
    for curl in handles:
        multi.remove_handle(curl)
        curl.close()
    multi.close()


if __name__ == "__main__":
    main(sys.argv[1])

"""httpx: one sync and one async client with max_connections=2, 6 requests at once each.

    poolscope-instrument python examples/httpx_client.py
"""
import asyncio
import threading

import httpx

from poolscope.demo.server import DemoServer

with DemoServer() as server:
    url = server.url + "/delay/0.3"
    with httpx.Client(limits=httpx.Limits(max_connections=2)) as client:
        threads = [threading.Thread(target=client.get, args=(url,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    async def main():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=2)) as aclient:
            await asyncio.gather(*(aclient.get(url) for _ in range(6)))
    asyncio.run(main())

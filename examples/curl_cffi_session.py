"""curl_cffi: an AsyncSession with 2 curl handles (max_clients=2); 6 requests at once, so 4 wait
for a handle, and libcurl keeps 2 connections in the session's cache.

    poolscope-instrument python examples/curl_cffi_session.py
"""
import asyncio

from curl_cffi.requests import AsyncSession

from poolscope.demo.server import DemoServer


async def main(url):
    session = AsyncSession(max_clients=2)  # left open: its 2 connections stay idle in the report
    await asyncio.gather(*(session.get(url) for _ in range(6)))
    return session


with DemoServer() as server:
    session = asyncio.run(main(server.url + "/delay/0.3"))
    print(f"the server accepted {server.accepted} connections", flush=True)

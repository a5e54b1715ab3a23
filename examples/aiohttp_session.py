"""aiohttp: a session whose connector allows 2 connections, 6 requests at once.

    poolscope-instrument python examples/aiohttp_session.py
"""
import asyncio

import aiohttp

from poolscope.demo.server import DemoServer


async def main(url):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
        async def get():
            async with session.get(url) as response:
                return await response.read()
        await asyncio.gather(*(get() for _ in range(6)))


with DemoServer() as server:
    asyncio.run(main(server.url + "/delay/0.3"))

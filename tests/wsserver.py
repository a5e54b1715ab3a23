"""A WebSocket echo server on 127.0.0.1 for tests (aiohttp's web server, in a thread of its
own): ``/`` answers ``ok``; ``/ws`` echoes text and closes on ``bye``. ``peers`` holds the
client address of each connection that sent a request: the server's own books."""

import asyncio
import threading

from aiohttp import web


class WebSocketServer:
    def __init__(self):
        self.peers = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _plain(self, request):
        self.peers.add(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    async def _echo(self, request):
        self.peers.add(request.transport.get_extra_info("peername"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is not web.WSMsgType.TEXT:
                break
            if message.data == "bye":
                await ws.close()
            else:
                await ws.send_str(message.data)
        return ws

    async def _start(self):
        app = web.Application()
        app.router.add_get("/", self._plain)
        app.router.add_get("/ws", self._echo)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    def __enter__(self):
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

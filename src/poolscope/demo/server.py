"""A small HTTP/1.1 keep-alive server on 127.0.0.1 for poolscope's demo, examples and tests.

Paths: ``/delay/<seconds>`` answers after that delay; ``/close`` answers with
``Connection: close``; ``/drop`` closes the socket without answering; ``/bytes/<n>`` answers
``n`` bytes (a body too large to be buffered at once); ``/chunked/<n>`` answers ``n`` bytes in
chunks (``Transfer-Encoding: chunked``); ``/status/<code>`` answers that status (a 204 or 304
with no body); anything else answers ``ok`` at once. ``POST /v1/chat/completions`` and
``POST /v1/messages`` answer as the OpenAI and Anthropic APIs do (a fixed reply, after
``api_delay`` seconds), for the SDKs built on httpx2. ``idle_timeout`` closes keep-alive
connections left idle that long, as a server's own keep-alive limit does; ``stale_after``
instead leaves them open and resets the next request on one idle that long, unanswered
(``reset`` counts them). The server counts the connections it accepted (``accepted``), those of
them that closed without sending a request (``empty``), the requests it answered (``answered``)
and when the latest arrived (``arrivals``, monotonic), and for each connection that has closed,
the requests answered on it (``per_connection``).
"""

import collections
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


_API = {
    "/v1/chat/completions": {
        "id": "chatcmpl-poolscope", "object": "chat.completion", "created": 0, "model": "demo",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
    "/v1/messages": {
        "id": "msg_poolscope", "type": "message", "role": "assistant", "model": "demo",
        "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}},
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.idle_timeout
        self.served = False
        self.answered = 0
        super().setup()
        with self.server.lock:
            self.server.accepted += 1
            self.server.peers.add(self.client_address[1])

    def handle_one_request(self):
        self.raw_requestline = b""
        try:
            super().handle_one_request()
        except (socket.timeout, ConnectionError):
            self.close_connection = True
        if self.raw_requestline:
            self.served = True
        elif not self.served:
            self.served = True  # counted once
            with self.server.lock:
                self.server.empty += 1

    def do_GET(self):
        with self.server.lock:
            self.server.received += 1
            self.server.arrivals.append(time.monotonic())
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        if "://" in path:  # asked as a forward proxy: answer for the target ourselves
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        if self.stale():
            return
        if path == "/drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        content_type = "text/plain"
        if path.startswith("/delay/"):
            time.sleep(float(path.rsplit("/", 1)[1]))
        if path in _API:
            time.sleep(self.server.api_delay)
            body, content_type = json.dumps(_API[path]).encode(), "application/json"
        elif path.startswith(("/bytes/", "/chunked/")):
            body = b"x" * int(path.rsplit("/", 1)[1])
        else:
            body = b"ok"
        status = int(path[len("/status/"):]) if path.startswith("/status/") else 200
        self.answered += 1
        with self.server.lock:
            self.server.answered += 1
        self.send_response(status)
        if status in (204, 304):  # no body, nor a length
            body = b""
        elif path.startswith("/chunked/"):
            self.send_header("Transfer-Encoding", "chunked")
            half = len(body) // 2
            body = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                            for part in (body[:half], body[half:]) if part) + b"0\r\n\r\n"
        else:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        if path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.last_answer = time.monotonic()

    do_POST = do_GET

    def stale(self):
        """With ``stale_after``: a request on a connection idle that long is reset unanswered,
        as a server (or a middlebox) that dropped the idle connection without a word does."""
        after = self.server.stale_after
        if after is None or not self.answered or time.monotonic() - self.last_answer < after:
            return False
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self.server.lock:
            self.server.reset += 1
        return True

    def finish(self):
        super().finish()
        with self.server.lock:
            self.server.per_connection.append(self.answered)

    def log_message(self, *args):
        pass


class InThread:
    """Mixed in before a ``socketserver`` server: ``with`` serves it in a thread of its own,
    and stops and closes it at the end of the block."""

    _thread = None

    def __enter__(self):
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class DemoServer(InThread, ThreadingHTTPServer):
    """Start with ``with DemoServer() as server:``; ``server.url`` is its base URL. ``host``:
    the loopback address it listens on."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    handler, scheme = _Handler, "http"

    def __init__(self, port=0, idle_timeout=None, api_delay=0.0, stale_after=None,
                 host="127.0.0.1"):
        super().__init__((host, port), self.handler)
        self.idle_timeout = idle_timeout
        self.stale_after = stale_after
        self.api_delay = api_delay
        self.lock = threading.Lock()
        self.accepted = self.empty = self.received = self.answered = self.reset = 0
        self.per_connection = []  # requests answered on each connection, once it has closed
        self.peers = set()  # the client ports of the connections accepted
        self.arrivals = collections.deque(maxlen=10_000)  # when the latest requests came in

    def wait_closed(self, n, timeout=5.0):
        """Wait (at most ``timeout`` seconds) until ``n`` connections have closed on the
        server's side; returns ``per_connection``."""
        deadline = time.monotonic() + timeout
        while len(self.per_connection) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.per_connection

    @property
    def port(self):
        return self.server_address[1]

    @property
    def url(self):
        return f"{self.scheme}://{self.server_address[0]}:{self.port}"


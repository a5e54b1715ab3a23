"""A small proxy on 127.0.0.1 for tests, speaking HTTP ``CONNECT`` and SOCKS5 (no
authentication) on one port: it opens a tunnel to the target asked for and copies bytes both
ways until either side closes. ``tunnels`` counts the tunnels it opened (each a connection a
client made through it), ``targets`` the targets asked for (``host:port``) and reached,
``refused`` the targets that refused the proxy's connection (answered ``502``, or SOCKS5's
"connection refused")."""

import select
import socket
import threading
from socketserver import BaseRequestHandler, ThreadingTCPServer

from poolscope.demo.server import InThread


class _Tunnel(BaseRequestHandler):
    def handle(self):
        if self.request.recv(1, socket.MSG_PEEK) == b"\x05":
            host, port = self.socks5()
        else:
            host, port = self.connect()
        if host is None:
            return
        try:
            upstream = socket.create_connection((host, port))
        except ConnectionRefusedError:
            with self.server.lock:
                self.server.refused += 1
            self.request.sendall(self.refusal)
            return
        with self.server.lock:
            self.server.tunnels += 1
            self.server.targets.append(f"{host}:{port}")
        self.request.sendall(self.established)
        self.pipe(upstream)

    def connect(self):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.request.recv(4096)
            if not chunk:
                return None, None
            head += chunk
        method, target = head.split(b" ", 2)[:2]
        if method != b"CONNECT":
            self.request.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return None, None
        self.established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        self.refusal = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
        host, port = target.decode().rsplit(":", 1)
        return host, int(port)

    def socks5(self):
        _, methods = self.read(2)
        self.read(methods)
        self.request.sendall(b"\x05\x00")  # no authentication
        _, command, _, kind = self.read(4)
        if kind == 1:
            host = socket.inet_ntoa(self.read(4))
        elif kind == 3:
            host = self.read(self.read(1)[0]).decode()
        else:
            host = socket.inet_ntop(socket.AF_INET6, self.read(16))
        port = int.from_bytes(self.read(2), "big")
        if command != 1:  # CONNECT only
            self.request.sendall(b"\x05\x07\x00\x01" + bytes(6))
            return None, None
        self.established = b"\x05\x00\x00\x01" + bytes(6)
        self.refusal = b"\x05\x05\x00\x01" + bytes(6)
        return host, port

    def read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.request.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the client closed mid-handshake")
            data += chunk
        return data

    def pipe(self, upstream):
        sockets = [self.request, upstream]
        try:
            while True:
                ready, _, _ = select.select(sockets, [], [], 30)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is self.request else self.request).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()


class TunnelProxy(InThread, ThreadingTCPServer):
    """Start with ``with TunnelProxy() as proxy:``; ``proxy.url`` is its URL."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Tunnel)
        self.lock = threading.Lock()
        self.tunnels = self.refused = 0
        self.targets = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def socks_url(self):
        return f"socks5://127.0.0.1:{self.server_address[1]}"


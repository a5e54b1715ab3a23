"""HTTP/1.1 over TLS on 127.0.0.1 that holds each TLS handshake, for tests: the truth about
set-up phases.

The server accepts a connection, waits ``handshake_delay`` seconds, then completes the
handshake; its books keep, for each connection, when its handler took it and when the
handshake was done (``time.monotonic``, the clock poolscope reads in this process).
"""

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import trustme


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        taken = time.monotonic()
        time.sleep(self.server.handshake_delay)
        self.request = self.server.context.wrap_socket(self.request, server_side=True)
        with self.server.books:
            self.server.handshakes.append((taken, time.monotonic()))
        super().setup()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class TLSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handshake_delay=0.2, cafile=None):
        self.handshake_delay = handshake_delay
        self.handshakes = []
        self.books = threading.Lock()
        ca = trustme.CA()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.client_context = ssl.create_default_context()
        ca.configure_trust(self.client_context)
        self.cafile = cafile  # a path for the CA's certificate, for libcurl
        if cafile is not None:
            ca.cert_pem.write_to_path(str(cafile))
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"https://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self._thread.join(5)

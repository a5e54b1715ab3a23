"""The demo server over TLS, holding each TLS handshake, for tests: the truth about set-up
phases.

The server takes a connection, waits ``handshake_delay`` seconds, then completes the
handshake; its books keep, for each connection, when its handler took it and when the
handshake was done (``time.monotonic``, the clock poolscope reads in this process).
"""

import ssl
import time

import trustme

from poolscope.demo.server import DemoServer


class _Handler(DemoServer.handler):
    def setup(self):
        taken = time.monotonic()
        time.sleep(self.server.handshake_delay)
        self.request = self.server.context.wrap_socket(self.request, server_side=True)
        with self.server.lock:
            self.server.handshakes.append((taken, time.monotonic()))
        super().setup()


class TLSServer(DemoServer):
    handler, scheme = _Handler, "https"

    def __init__(self, handshake_delay=0.2, cafile=None, **server):
        super().__init__(**server)
        self.handshake_delay = handshake_delay
        self.handshakes = []
        ca = trustme.CA()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.client_context = ssl.create_default_context()
        ca.configure_trust(self.client_context)
        self.cafile = cafile  # a path for the CA's certificate, for libcurl and urllib3
        if cafile is not None:
            ca.cert_pem.write_to_path(str(cafile))

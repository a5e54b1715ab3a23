"""A small HTTP/3 server (QUIC over UDP, with qh3, which urllib3-future installs) on 127.0.0.1,
for tests: the truth about HTTP/3 connections.

``/slow`` answers after ``delay`` seconds, anything else at once. The server keeps its own
books, as ``h2server.H2Server``: connections accepted, and for each request the seconds from its
arrival to its answer and the connection (1 for the first accepted) that served it, and any
error answering. Its
certificate is signed by a test CA, in ``ca_file``.
"""

import asyncio
import os
import tempfile
import threading
import time

import trustme
from qh3.asyncio import QuicConnectionProtocol, serve
from qh3.h3.connection import H3_ALPN, H3Connection
from qh3.h3.events import HeadersReceived
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.events import ProtocolNegotiated


class H3Server:
    def __init__(self, delay=0.3):
        self.delay = delay
        self.accepted = 0
        self.served = []  # seconds each request took the server, arrival to answer
        self.served_on = []  # the connection that served each
        self.errors = []
        self._dir = tempfile.TemporaryDirectory()
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        self.ca_file = os.path.join(self._dir.name, "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        self._config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN,
                                         max_datagram_frame_size=65536)  # urllib3-future asks it
        chain, key = os.path.join(self._dir.name, "chain.pem"), os.path.join(self._dir.name, "key.pem")
        with open(chain, "wb") as f:
            f.write(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(key)
        self._config.load_cert_chain(chain, key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(serve(
            "127.0.0.1", 0, configuration=self._config, create_protocol=self._protocol))
        self.port = self._server._transport.get_extra_info("sockname")[1]
        self._ready.set()
        self._loop.run_forever()

    def _protocol(self, *args, **kwargs):
        """One QUIC connection, on the server's event loop."""
        server = self
        server.accepted += 1

        class Connection(QuicConnectionProtocol):
            number, h3 = server.accepted, None

            def quic_event_received(self, event):
                if isinstance(event, ProtocolNegotiated):
                    self.h3 = H3Connection(self._quic)
                for h3_event in self.h3.handle_event(event) if self.h3 else ():
                    if isinstance(h3_event, HeadersReceived):
                        slow = dict(h3_event.headers).get(b":path") == b"/slow"
                        server._loop.call_later(server.delay if slow else 0, self.answer,
                                                h3_event.stream_id, time.monotonic())

            def answer(self, stream_id, arrived):
                try:
                    self.h3.send_headers(stream_id, [(b":status", b"200"),
                                                     (b"content-length", b"2")])
                    self.h3.send_data(stream_id, b"ok", end_stream=True)
                    server.served.append(time.monotonic() - arrived)  # before the client reads
                    server.served_on.append(self.number)
                    self.transmit()
                except Exception as exc:  # the client went: said in ``errors``
                    server.errors.append(repr(exc))
        return Connection(*args, **kwargs)

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the HTTP/3 test server did not start")
        self.url = f"https://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._dir.cleanup()

"""A small HTTP/2 server over TLS on 127.0.0.1, for tests: the truth about streams.

``/slow`` answers after ``delay`` seconds, anything else at once. The server allows
``max_streams`` concurrent streams per connection (``SETTINGS_MAX_CONCURRENT_STREAMS``). With
``max_requests`` it answers that many requests on a connection, then sends ``GOAWAY`` (its
last stream processed: the one it just answered; a client may send the streams after it again
on a new connection) and closes the connection. It keeps its own books: connections accepted,
the peak of streams open at once on any one connection, the connection each request came in
on, and for each request it answered when it arrived, the seconds from then to its response's
end, and the connection that served it.
"""

import select
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import trustme


class H2Server:
    def __init__(self, max_streams=2, delay=0.3, max_requests=None):
        self.max_streams = max_streams
        self.max_requests = max_requests
        self.delay = delay
        self.accepted = 0
        self.peak_streams = 0
        self.served = []  # seconds each request took the server, arrival to response end
        self.arrivals = []  # when each request arrived (time.monotonic)
        self.served_on = []  # the connection (1 for the first accepted) that served each
        self.received_on = []  # the connection each request (answered or not) came in on
        self.errors = []
        self._books = threading.Lock()
        self._conns = []
        ca = trustme.CA()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(self._context)
        self._context.set_alpn_protocols(["h2"])
        self.client_context = ssl.create_default_context()
        ca.configure_trust(self.client_context)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept; a close alone does not
        except OSError:
            pass
        self._listener.close()
        for sock in list(self._conns):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._thread.join(5)

    def _accept(self):
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            with self._books:
                self.accepted += 1
                number = self.accepted
            threading.Thread(target=self._serve, args=(raw, number), daemon=True).start()

    def _serve(self, raw, number):
        """One connection, all its I/O on this thread (an SSL socket is not for two threads):
        read what comes, answer each request when it is due."""
        try:
            sock = self._context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self._conns.append(sock)
        h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        h2conn.initiate_connection()
        due = []  # (when, stream id, arrived)
        answered = 0
        try:
            while True:
                sock.sendall(h2conn.data_to_send())
                now = time.monotonic()
                for when, stream_id, arrived in sorted(d for d in due if d[0] <= now):
                    due.remove((when, stream_id, arrived))
                    h2conn.send_headers(stream_id, [(":status", "200"), ("content-length", "2")])
                    h2conn.send_data(stream_id, b"ok", end_stream=True)
                    answered += 1
                    if answered == self.max_requests:
                        h2conn.close_connection(last_stream_id=stream_id)
                    with self._books:  # before the client can have the response, and read these
                        self.served.append(time.monotonic() - arrived)
                        self.arrivals.append(arrived)
                        self.served_on.append(number)
                    sock.sendall(h2conn.data_to_send())
                    if answered == self.max_requests:
                        return
                timeout = max(0.0, min(d[0] for d in due) - time.monotonic()) if due else None
                if not sock.pending() and not select.select([sock], [], [], timeout)[0]:
                    continue
                data = sock.recv(65536)
                if not data:
                    return
                for event in h2conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        arrived = time.monotonic()
                        with self._books:
                            self.received_on.append(number)
                        path = dict(event.headers).get(b":path", b"/")
                        due.append((arrived + (self.delay if path == b"/slow" else 0),
                                    event.stream_id, arrived))
                        with self._books:
                            self.peak_streams = max(self.peak_streams, len(due))
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        sock.sendall(h2conn.data_to_send())
                        return
        except Exception as exc:  # the client went, or the exchange broke: said in ``errors``
            self.errors.append(repr(exc))
        finally:
            sock.close()

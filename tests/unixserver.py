"""The demo server on a Unix socket, as the Docker daemon listens."""

import socket

from poolscope.demo.server import DemoServer


class UnixSocketServer(DemoServer):
    """The demo server listening on the Unix socket ``path``."""

    address_family = socket.AF_UNIX

    def __init__(self, path):
        self.path = str(path)
        super().__init__()

    def server_bind(self):
        self.socket.bind(self.path)
        self.server_address, self.server_name, self.server_port = self.path, "localhost", 0

    def get_request(self):
        return self.socket.accept()[0], ("unix", 0)  # the handler's books take a peer port

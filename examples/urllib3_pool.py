"""urllib3: 6 requests at once through a blocking pool of 2, against a local 300 ms server.

    poolscope-instrument python examples/urllib3_pool.py
"""
import threading

import urllib3

from poolscope.demo.server import DemoServer

with DemoServer() as server:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=2, block=True)
    threads = [threading.Thread(target=pool.request, args=("GET", "/delay/0.3")) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

"""requests: a Session whose adapter keeps 2 connections; 6 threads share it (non-blocking pool:
the surplus connections are discarded as "Connection pool is full").

    poolscope-instrument python examples/requests_session.py
"""
import threading

import requests

from poolscope.demo.server import DemoServer

with DemoServer() as server:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2))
    threads = [threading.Thread(target=session.get, args=(server.url + "/delay/0.3",))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

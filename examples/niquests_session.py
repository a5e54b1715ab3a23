"""niquests: a Session whose adapter keeps 2 connections and blocks when both are out; 6 threads
share it, so 4 requests wait for a connection (urllib3-future's pool, which niquests uses).

    poolscope-instrument python examples/niquests_session.py
"""
import threading

import niquests

from poolscope.demo.server import DemoServer

with DemoServer() as server:
    session = niquests.Session()
    session.mount("http://", niquests.adapters.HTTPAdapter(pool_maxsize=2, pool_block=True))
    threads = [threading.Thread(target=session.get, args=(server.url + "/delay/0.3",))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"the server accepted {server.accepted} connections", flush=True)

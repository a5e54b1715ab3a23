"""openai (on httpx2): 6 chat completions at once through a client limited to 2 connections,
against a local fake of the API that answers after 300 ms.

    poolscope-instrument python examples/openai_chat.py

The report shows the httpx2 pool: 6 acquisitions, 4 waited (0.3 s and 0.6 s), 2 created.
"""
import threading

import httpx2
import openai

from poolscope.demo.server import DemoServer

with DemoServer(api_delay=0.3) as server:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="demo",
                           http_client=openai.DefaultHttpxClient(
                               limits=httpx2.Limits(max_connections=2)))

    def ask():
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()

"""pycurl: a multi limited to 2 connections running 6 transfers, then one easy handle reused.

    poolscope-instrument python examples/pycurl_multi.py
"""
import pycurl

from poolscope.demo.app import curl_multi
from poolscope.demo.server import DemoServer

with DemoServer() as server:
    curl_multi(server.url + "/delay/0.3", n=6, limit=2)

    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, server.url + "/")
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
    for _ in range(3):
        curl.perform()
    curl.close()

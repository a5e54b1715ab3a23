"""Leaks and stuck pools: a response never closed holds its connection, and the age shows it."""

import asyncio
import logging
import threading
import time

import aiohttp
import httpx
import pycurl
import pytest
import urllib3

import poolscope
from conftest import Metrics
from drivers import httpx2
from poolscope import report

HOLD = 2.0
ACTIVE_AGE = "poolscope.connection.oldest_active_age"


def age(metrics, library):
    return metrics.value(metrics.read(), ACTIVE_AGE, poolscope__library=library)


def assert_held(metrics, library):
    assert HOLD - 0.1 <= age(metrics, library) <= HOLD + 0.4


@pytest.mark.parametrize("module", [m for m in (httpx, httpx2) if m], ids=lambda m: m.__name__)
def test_httpx_stream_left_open(metrics, server, module):
    library = module.__name__
    client = module.Client()
    stream = client.stream("GET", server.url + "/")
    stream.__enter__()
    time.sleep(HOLD)
    assert_held(metrics, library)
    stream.__exit__(None, None, None)
    assert age(metrics, library) == 0
    client.close()


def test_urllib3_unread_response(metrics, server):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
    response = pool.request("GET", "/", preload_content=False)
    time.sleep(HOLD)
    assert_held(metrics, "urllib3")
    response.release_conn()
    assert age(metrics, "urllib3") == 0
    pool.close()


def test_aiohttp_response_never_released(metrics, server):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            # a body too large to arrive before it is read: aiohttp releases a connection by
            # itself once the whole body is buffered
            response = await session.get(server.url + f"/bytes/{16 * 2**20}")
            await asyncio.sleep(HOLD)
            held = age(metrics, "aiohttp")
            response.release()
            return held, age(metrics, "aiohttp")

    held, after = asyncio.run(scenario())
    assert HOLD - 0.1 <= held <= HOLD + 0.4
    assert after == 0


def test_pycurl_transfer_paused(metrics, server):
    go = threading.Event()
    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, server.url + "/")
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: go.wait(10) and None)
    worker = threading.Thread(target=curl.perform)
    worker.start()
    time.sleep(HOLD)
    try:
        assert_held(metrics, "pycurl")
    finally:
        go.set()
        worker.join(10)
    assert age(metrics, "pycurl") == 0
    curl.close()


def test_report_flags_a_leak_and_a_stuck_pool(metrics, server):
    """One connection, held by an unread response; a second request waits behind it."""
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=1, block=True)
    leaked = pool.request("GET", "/", preload_content=False)
    waiter = threading.Thread(target=pool.request, args=("GET", "/"))
    waiter.start()
    time.sleep(1.2)
    text = report.render(metrics.reader.get_metrics_data(), {}, leak_after=1.0)
    leaked.release_conn()
    waiter.join(5)
    assert "WARNING: a connection has been held for 1.20 s" in text or \
        "WARNING: a connection has been held for 1.2" in text
    assert "WARNING: a request has been waiting 1." in text
    text = report.render(metrics.reader.get_metrics_data(), {}, leak_after=1.0)
    assert "WARNING" not in text
    pool.close()


def test_leak_warning_names_where_it_was_acquired(monkeypatch, server, caplog):
    monkeypatch.setenv("POOLSCOPE_LEAK_WARNINGS", "true")
    monkeypatch.setenv("POOLSCOPE_LEAK_SECONDS", "0.3")
    m = Metrics()
    poolscope.instrument(meter_provider=m.provider)
    try:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
        with caplog.at_level(logging.WARNING, logger="poolscope"):
            line = _line() + 1
            response = pool.request("GET", "/", preload_content=False)
            time.sleep(1.0)
        response.release_conn()
        pool.close()
    finally:
        poolscope.uninstrument()
        m.provider.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "held for" in r.getMessage()]
    assert len(warnings) == 1
    assert f"test_leaks.py:{line}" in warnings[0]
    assert f"http://127.0.0.1:{server.port} (urllib3)" in warnings[0]


def _line():
    import sys
    return sys._getframe(1).f_lineno


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_bad_leak_seconds_is_one_clear_line(monkeypatch, caplog, value):
    monkeypatch.setenv("POOLSCOPE_LEAK_WARNINGS", "true")
    monkeypatch.setenv("POOLSCOPE_LEAK_SECONDS", value)
    with caplog.at_level(logging.ERROR, logger="poolscope"):
        poolscope.instrument()
        poolscope.uninstrument()
    assert [r.getMessage() for r in caplog.records] == [
        f"poolscope: POOLSCOPE_LEAK_SECONDS={value!r} "
        + ("is not a number of seconds" if value == "soon" else "must be more than 0")
        + "; using 30.0"]

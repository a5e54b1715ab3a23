"""The real openai and anthropic SDKs (on httpx2, or on aiohttp through their aiohttp client)
against a loopback fake of their APIs answering after 300 ms, keep-alive.

6 calls at once through a pool limited to 2: 2 connections made (the server accepted 2),
4 reused acquisitions, 4 waits of 0.3, 0.3, 0.6 and 0.6 s (1.8 s in all), 2 idle, 0 active
and 0 pending at the end. The truth beside poolscope's figures: the sockets the server
accepted, the requests it answered and the latencies the application measured.
"""

import asyncio
import contextlib
import gc
import threading
import time

import pytest

# not in the oldest pins of the version matrix (the SDKs need newer httpx2 and aiohttp)
httpx2 = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from poolscope.demo.server import DemoServer

DELAY = 0.3
CALLS = 6
LIMIT = 2


@pytest.fixture
def api():
    with DemoServer(api_delay=DELAY) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def warmed():
    """One call of each SDK first, against a server of its own and not instrumented: an SDK's
    first call imports and builds its models, time the schedule of the timed calls must not
    include."""
    with DemoServer() as server:
        for client, call in ((openai.OpenAI(base_url=server.url + "/v1", api_key="test"),
                              openai_call),
                             (anthropic.Anthropic(base_url=server.url, api_key="test"),
                              anthropic_call)):
            with client:
                call(client)


def openai_call(client):
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user",
                                                                    "content": "hi"}])
    return reply.choices[0].message.content


async def openai_acall(client):
    reply = await client.chat.completions.create(model="demo", messages=[{"role": "user",
                                                                          "content": "hi"}])
    return reply.choices[0].message.content


def anthropic_call(client):
    return client.messages.create(model="demo", max_tokens=8, messages=[
        {"role": "user", "content": "hi"}]).content[0].text


@contextlib.contextmanager
def no_collection():
    """No garbage collection while the calls run. Late in the suite the first round of calls
    took 0.7 to 0.8 s instead of 0.3 in two runs out of five, moving the schedule the waits
    are checked against; most likely a full collection (every thread stops for it; 0.6 s
    for a heap of 4M containers here)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed_in_threads(call):
    """Run ``call`` CALLS times at once; the latency each call measured."""
    latencies = [None] * CALLS
    barrier = threading.Barrier(CALLS)

    def one(i):
        barrier.wait()
        started = time.monotonic()
        assert call() == "ok"
        latencies[i] = time.monotonic() - started

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CALLS)]
    with no_collection():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    return latencies


async def timed_in_tasks(call):
    async def one():
        started = time.monotonic()
        assert await call() == "ok"
        return time.monotonic() - started
    with no_collection():
        return await asyncio.gather(*(one() for _ in range(CALLS)))


def check(metrics, library, api, latencies):
    data = metrics.read()

    def value(name, **attrs):
        return metrics.value(data, name, poolscope__library=library, server__port=api.port,
                             **attrs)
    count, total = metrics.histogram(data, "poolscope.connection.wait_time",
                                     poolscope__library=library, server__port=api.port)
    # what the application saw: no more than two calls answered in each round of DELAY
    seen = sorted(latencies)
    assert all(seen[i + 1] - seen[i] > DELAY * 0.8 for i in (1, 3)), seen
    assert count == 4
    # at most what the calls spent beyond the server's own answer; about what the schedule
    # implies (0.3, 0.3, 0.6, 0.6 s, less the time a call's own preparation delayed its ask)
    assert total <= sum(t - DELAY for t in latencies), latencies
    assert total == pytest.approx(6 * DELAY, abs=0.5), latencies
    assert value("poolscope.connection.created") == 2 == api.accepted
    assert api.answered == CALLS
    assert value("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 4
    assert value("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 2
    assert value("http.client.open_connections", http__connection__state="idle") == 2
    assert value("http.client.open_connections", http__connection__state="active") == 0
    assert value("poolscope.connection.pending_requests") == 0
    assert metrics.value(data, "poolscope.connection.max", poolscope__library=library) == LIMIT


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_sync_default_client(metrics, api, sdk):
    make, http_client, path, call = {
        "openai": (openai.OpenAI, openai.DefaultHttpxClient, "/v1", openai_call),
        "anthropic": (anthropic.Anthropic, anthropic.DefaultHttpxClient, "", anthropic_call)}[sdk]
    client = make(base_url=api.url + path, api_key="test", max_retries=0,
                  http_client=http_client(limits=httpx2.Limits(max_connections=LIMIT)))
    latencies = timed_in_threads(lambda: call(client))
    check(metrics, "httpx2", api, latencies)
    client.close()


def test_openai_async_default_client(metrics, api):
    async def main():
        async with openai.AsyncOpenAI(
                base_url=api.url + "/v1", api_key="test", max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(
                    limits=httpx2.Limits(max_connections=LIMIT))) as client:
            latencies = await timed_in_tasks(lambda: openai_acall(client))
            check(metrics, "httpx2", api, latencies)  # before the client closes
    asyncio.run(main())


def test_openai_through_its_aiohttp_client(metrics, api):
    """``openai[aiohttp]``: httpx2's API over aiohttp's connector, which poolscope sees as
    aiohttp's pool."""
    import aiohttp

    async def main():
        http_client = openai.DefaultAioHttpClient(limits=httpx2.Limits(max_connections=LIMIT))
        async with openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="test", max_retries=0,
                                      http_client=http_client) as client:
            check(metrics, "aiohttp", api, await timed_in_tasks(lambda: openai_acall(client)))
            assert isinstance(http_client._transport.client.connector, aiohttp.TCPConnector)
    asyncio.run(main())

"""Real clients built on the covered libraries, against a local fake of their service: boto3
(botocore's urllib3 pool, which discards a connection when it is full) and elastic-transport,
the elasticsearch client's transport, with each of its node classes (urllib3, requests,
aiohttp, httpx); and tornado's curl client (pycurl).

6 calls at once through a pool of 2, each answered after 0.3 s, then 3 calls one after the
other. The truth beside poolscope's figures: the sockets the server accepted and the requests
it answered, urllib3's own "Connection pool is full" warnings, and the pools and idle
connections the client holds.
"""

import asyncio
import logging

import pytest

from drivers import _in_threads

CALLS, LIMIT, PATH = 6, 2, "/delay/0.3"


def figures(metrics, library, server, per_origin=True):
    """poolscope's figures for ``server``'s origin; those of the pools per origin, or (httpx's
    pool is the client's) of the library's pools."""
    data = metrics.read()

    def value(name, origin=True, **attrs):
        if origin:
            attrs["server__port"] = server.port
        return metrics.value(data, name, poolscope__library=library, **attrs)
    created, new, reused = metrics.served(data, server__port=server.port)
    return {"created": created, "new": new, "reused": reused,
            "waits": value("poolscope.connection.waits", poolscope__wait__outcome="granted"),
            "pool_full": value("poolscope.connection.closed",
                               poolscope__close__reason="pool_full"),
            "idle": value("http.client.open_connections", http__connection__state="idle"),
            "active": value("http.client.open_connections", http__connection__state="active"),
            "pools": value("poolscope.pool.count", per_origin),
            "max": value("poolscope.connection.max", per_origin)}


def pools_of(manager):
    """The pools a urllib3 ``PoolManager`` holds."""
    return list(manager.pools._container.values())


def idle_in(pools):
    """The connections waiting in urllib3 pools' own queues."""
    return sum(conn is not None for pool in pools for conn in list(pool.pool.queue))


def test_boto3_discards_what_its_full_pool_cannot_keep(metrics, server, caplog):
    """botocore's pool does not block: 6 calls at once make 6 connections and, as they come
    back to a pool of 2, 4 are discarded (urllib3 warns of each); the next 3 reuse the 2 kept."""
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test",
                      config=Config(max_pool_connections=LIMIT,
                                    retries={"total_max_attempts": 1}))
    bucket, key = PATH.strip("/").split("/")

    def call(_):
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        assert _in_threads(call, range(CALLS)) == [b"ok"] * CALLS
        assert [call(i) for i in range(3)] == [b"ok"] * 3
    warned = sum("Connection pool is full" in r.getMessage() for r in caplog.records)
    pools = pools_of(s3._endpoint.http_session._manager)
    got = figures(metrics, "urllib3", server)
    assert (server.accepted, server.answered, warned) == (CALLS, CALLS + 3, CALLS - LIMIT)
    assert (got["created"], got["new"], got["reused"]) == (server.accepted, CALLS, 3)
    assert got["pool_full"] == warned
    assert (got["idle"], got["active"]) == (idle_in(pools), 0) == (LIMIT, 0)
    assert (got["pools"], got["max"]) == (len(pools), LIMIT) == (1, LIMIT)
    s3.close()


def limited(metrics, library, server, pools, pool_max, per_origin=True):
    """The figures of 6 calls at once and 3 after through a pool that waits when full."""
    got = figures(metrics, library, server, per_origin)
    assert (server.accepted, server.answered) == (LIMIT, CALLS + 3)
    assert (got["created"], got["new"], got["reused"]) == (server.accepted, LIMIT,
                                                           CALLS + 3 - LIMIT)
    assert got["waits"] == CALLS - LIMIT
    assert (got["idle"], got["active"]) == (LIMIT, 0)
    assert (got["pools"], got["max"]) == (pools, pool_max)


@pytest.mark.parametrize("node_class", ["urllib3", "requests"])
def test_elastic_transport_sync_nodes(metrics, server, node_class):
    """A node's pool blocks when full: 2 connections, 4 waits. The requests node's pool
    manager holds two pools of the origin (one made when the node is, with another key than
    its requests use): poolscope counts the pools the client has."""
    elastic_transport = pytest.importorskip("elastic_transport")
    transport = elastic_transport.Transport(
        [elastic_transport.NodeConfig("http", "127.0.0.1", server.port,
                                      connections_per_node=LIMIT)],
        node_class=node_class, max_retries=0)

    def call(_):
        return transport.perform_request("GET", PATH).body
    assert _in_threads(call, range(CALLS)) == ["ok"] * CALLS
    assert [call(i) for i in range(3)] == ["ok"] * 3
    node = transport.node_pool.get()
    pools = ([node.pool] if node_class == "urllib3" else
             [p for adapter in node.session.adapters.values()
              for p in pools_of(adapter.poolmanager)])
    assert idle_in(pools) == LIMIT
    limited(metrics, "urllib3", server, len(pools), LIMIT * len(pools))
    transport.close()


@pytest.mark.parametrize("node_class, library", [("aiohttp", "aiohttp"),
                                                 ("httpxasync", "httpx")])
def test_elastic_transport_async_nodes(metrics, server, node_class, library):
    """The aiohttp node limits connections per host (one pool of the origin under a connector
    of aiohttp's default limit, 100); the httpx node, the client's."""
    elastic_transport = pytest.importorskip("elastic_transport")
    pytest.importorskip(library)

    async def main():
        transport = elastic_transport.AsyncTransport(
            [elastic_transport.NodeConfig("http", "127.0.0.1", server.port,
                                          connections_per_node=LIMIT)],
            node_class=node_class, max_retries=0)

        async def call():
            return (await transport.perform_request("GET", PATH)).body
        assert await asyncio.gather(*(call() for _ in range(CALLS))) == ["ok"] * CALLS
        assert [await call() for _ in range(3)] == ["ok"] * 3
        limited(metrics, library, server, 1, LIMIT, per_origin=library == "aiohttp")
        await transport.close()
    asyncio.run(main())


def test_tornado_curl_client_queues_in_tornado(metrics, server):
    """tornado's ``CurlAsyncHTTPClient`` drives a pycurl multi with ``socket_action`` and runs
    at most ``max_clients`` transfers, queueing the rest itself. libcurl's pool has no limit of
    its own, so no ``max`` and no waits (tornado's queue is not a pool); its 2 connections
    serve all 9 requests, as the server saw, and close with the client."""
    pytest.importorskip("pycurl")
    curl_httpclient = pytest.importorskip("tornado.curl_httpclient")

    async def main():
        client = curl_httpclient.CurlAsyncHTTPClient(force_instance=True, max_clients=LIMIT)
        answers = await asyncio.gather(*(client.fetch(server.url + PATH) for _ in range(CALLS)))
        answers += [await client.fetch(server.url + PATH) for _ in range(3)]
        assert [a.body for a in answers] == [b"ok"] * (CALLS + 3)
        got = figures(metrics, "pycurl", server, per_origin=False)
        assert (server.accepted, server.answered) == (LIMIT, CALLS + 3)
        assert (got["created"], got["new"], got["reused"]) == (server.accepted, LIMIT,
                                                               CALLS + 3 - LIMIT)
        assert (got["waits"], got["max"]) == (None, None)
        assert (got["idle"], got["active"]) == (server.accepted - len(server.per_connection), 0)
        assert got["pools"] == 1
        client.close()
    asyncio.run(main())
    assert len(server.wait_closed(LIMIT)) == LIMIT and sum(server.per_connection) == CALLS + 3
    data = metrics.read()
    assert metrics.value(data, "poolscope.connection.closed", server__port=server.port,
                         poolscope__close__reason="pool_closed") == LIMIT
    assert metrics.value(data, "poolscope.pool.count", poolscope__library="pycurl") == 0

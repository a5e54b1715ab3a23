"""pycurl specifics: one reused easy handle, MAXAGE_CONN, FORBID_REUSE, a share, chained callbacks."""

import os
import time

import pycurl
import pytest

LIB = {"poolscope__library": "pycurl"}


def fetch(curl, url):
    curl.setopt(pycurl.URL, url)
    curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
    curl.perform()
    return curl.getinfo(pycurl.RESPONSE_CODE)


def figures(metrics):
    data = metrics.read()
    return data, lambda name, **a: metrics.value(data, name, **LIB, **a)


def test_one_reused_handle(metrics, server):
    curl = pycurl.Curl()
    assert [fetch(curl, server.url + "/") for _ in range(3)] == [200] * 3
    data, v = figures(metrics)
    assert v("poolscope.connection.created") == 1
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=False) == 1
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 2
    assert metrics.histogram(data, "poolscope.connection.create_time", **LIB)[0] == 1
    assert v("http.client.open_connections", http__connection__state="idle") == 1
    assert v("poolscope.pool.count") == 1
    curl.close()
    _, v = figures(metrics)
    assert v("poolscope.connection.closed", poolscope__close__reason="pool_closed") == 1
    assert v("http.client.open_connections") == 0
    assert v("poolscope.pool.count") == 0
    assert server.accepted == 1


def test_maxage_conn_expiry(metrics, server):
    curl = pycurl.Curl()
    curl.setopt(pycurl.MAXAGE_CONN, 1)
    fetch(curl, server.url + "/")
    time.sleep(1.3)
    fetch(curl, server.url + "/")
    _, v = figures(metrics)
    assert v("poolscope.connection.closed", poolscope__close__reason="keepalive_expired") == 1
    assert v("poolscope.connection.created") == 2
    assert v("http.client.open_connections") == 1
    assert server.accepted == 2
    curl.close()


def test_forbid_reuse_closes_each_connection(metrics, server):
    curl = pycurl.Curl()
    curl.setopt(pycurl.FORBID_REUSE, 1)
    for _ in range(3):
        fetch(curl, server.url + "/")
    _, v = figures(metrics)
    assert v("poolscope.connection.created") == 3
    assert v("poolscope.connection.closed", poolscope__close__reason="idle_limit") == 3
    assert v("http.client.open_connections") == 0
    curl.close()


def test_share_handle_shares_connections(metrics, server):
    share = pycurl.CurlShare()
    share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_CONNECT)
    first, second = pycurl.Curl(), pycurl.Curl()
    for curl in (first, second):
        curl.setopt(pycurl.SHARE, share)
        fetch(curl, server.url + "/")
    _, v = figures(metrics)
    assert v("poolscope.connection.created") == 1
    assert v("poolscope.connection.acquisitions", poolscope__connection__reused=True) == 1
    assert v("poolscope.pool.count") == 1
    assert server.accepted == 1
    for curl in (first, second):
        curl.close()
    share.close()


def test_application_callbacks_still_run(metrics, server):
    calls = {"prereq": 0, "sockopt": 0, "closesocket": 0, "debug": 0}

    def prereq(*args):
        calls["prereq"] += 1
        return pycurl.PREREQFUNC_OK

    def sockopt(fd, purpose):
        calls["sockopt"] += 1
        return pycurl.SOCKOPT_OK

    def closesocket(fd):
        calls["closesocket"] += 1
        os.close(fd)
        return 0

    def debug(kind, message):
        calls["debug"] += 1

    curl = pycurl.Curl()
    curl.setopt(pycurl.PREREQFUNCTION, prereq)
    curl.setopt(pycurl.SOCKOPTFUNCTION, sockopt)
    curl.setopt(pycurl.CLOSESOCKETFUNCTION, closesocket)
    curl.setopt(pycurl.VERBOSE, 1)
    curl.setopt(pycurl.DEBUGFUNCTION, debug)
    for _ in range(3):
        fetch(curl, server.url + "/")
    curl.close()
    assert calls["prereq"] == 3 and calls["sockopt"] == 1 and calls["closesocket"] == 1
    assert calls["debug"] > 0
    _, v = figures(metrics)
    assert v("poolscope.connection.acquisitions") == 3
    assert v("poolscope.connection.created") == 1


def test_a_class_taken_before_instrumenting_is_not_observed(server):
    import poolscope
    from conftest import Metrics

    early = pycurl.Curl
    metrics = Metrics()
    poolscope.instrument(meter_provider=metrics.provider)
    try:
        assert pycurl.Curl is not early
        fetch(early(), server.url + "/")
        assert metrics.value(metrics.read(), "poolscope.connection.acquisitions", **LIB) is None
        fetch(pycurl.Curl(), server.url + "/")
        assert metrics.value(metrics.read(), "poolscope.connection.acquisitions", **LIB) == 1
    finally:
        poolscope.uninstrument()
    assert pycurl.Curl is early


@pytest.mark.parametrize("timeout_ms", [200])
def test_multi_queue_timeout(metrics, server, timeout_ms):
    """M_MAX_TOTAL_CONNECTIONS=1 held for 0.6 s; a second transfer's connect timeout expires queued."""
    from drivers import PycurlDriver

    with PycurlDriver(server, limit=1, pool_timeout=timeout_ms / 1000) as driver:
        held = driver.submit("/delay/0.6")
        time.sleep(0.1)
        with pytest.raises(pycurl.error) as info:
            driver.get("/")
        assert info.value.args[0] == pycurl.E_OPERATION_TIMEDOUT
        assert held.result(5) == 200
    data, v = figures(metrics)
    assert v("poolscope.connection.timeouts") == 1
    assert metrics.histogram(data, "poolscope.connection.wait_time", **LIB)[0] == 0
    assert v("poolscope.connection.created") == 1

"""A client poolscope does not observe, installed where it looks like one it does.

urllib3-future can install itself as ``urllib3``: its files in place of urllib3's, even with
urllib3's own metadata still installed (so the version check alone would pass). poolscope
must leave its pools alone and say so in one line. The version matrix's ``urllib3-future``
session runs this file with it so installed (urllib3, then urllib3-future over it, and
niquests); in an environment where ``import urllib3`` gives urllib3 it is skipped.
"""

import logging

import pytest

import poolscope
from conftest import Metrics
from poolscope._instrument import _urllib3_is_future

pytestmark = pytest.mark.skipif(not _urllib3_is_future(),
                                reason="`import urllib3` gives urllib3 here (the version "
                                       "matrix's urllib3-future session runs these tests)")


def test_urllib3_future_as_urllib3_is_left_alone_and_told_once(server, caplog):
    import urllib3
    import urllib3.connectionpool as connectionpool

    metrics = Metrics()
    before = dict(vars(connectionpool.HTTPConnectionPool))
    with caplog.at_level(logging.WARNING, logger="poolscope"):
        poolscope.instrument(meter_provider=metrics.provider)
        try:
            pool = urllib3.PoolManager(maxsize=2, block=True)
            statuses = [pool.request("GET", server.url + "/").status for _ in range(3)]
            import niquests
            with niquests.Session() as session:
                statuses += [session.get(server.url + "/").status_code for _ in range(3)]
            patched = [name for name, value in vars(connectionpool.HTTPConnectionPool).items()
                       if before.get(name) is not value]
            data = metrics.read()
        finally:
            poolscope.uninstrument()
    assert statuses == [200] * 6 and server.answered == 6  # what the application and server saw
    assert patched == []
    assert metrics.value(data, "poolscope.connection.acquisitions") is None
    assert metrics.value(data, "poolscope.connection.created") is None
    lines = [r.getMessage() for r in caplog.records if r.name == "poolscope"]
    assert len(lines) == 1, lines
    assert "niquests" in lines[0] and "urllib3-future" in lines[0]
    assert "`import urllib3` gives urllib3-future" in lines[0]

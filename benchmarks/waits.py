"""What one wait costs, in CPU instructions: the SDK's histogram record and poolscope's recorder.

    python benchmarks/waits.py [--operations 2000]

In a saturated pool most requests wait, and each wait's time is one OpenTelemetry
``Histogram.record()``. This counts, under valgrind's cachegrind as instructions.py does
(each case run with N and 2N operations; the difference over N is one operation):

- ``record``: one ``Histogram.record()`` with poolscope's four attributes, with one, with none;
- ``wait``: the recorder's acquisition and release of a pooled connection, plain, after a wait,
  and after a wait whose time is not recorded.
"""

import argparse
import shutil
import sys

from instructions import cachegrind

ATTRS = {"poolscope.library": "httpx2", "url.scheme": "http", "server.address": "127.0.0.1",
         "server.port": 8080}
CASES = [("record", "4 attributes"), ("record", "1 attribute"), ("record", "no attributes"),
         ("wait", "acquire and release, no wait"), ("wait", "after a wait"),
         ("wait", "after a wait, its time not recorded")]


def run(case, n):
    """``n`` operations of ``case`` after 200 to warm up."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    kind, variant = CASES[case]
    if kind == "record":
        histogram = provider.get_meter("waits").create_histogram("h", unit="s")
        attrs = {"4 attributes": ATTRS, "1 attribute": dict(list(ATTRS.items())[:1]),
                 "no attributes": None}[variant]

        def operation():
            histogram.record(0.001, attrs)
    else:
        from poolscope._recorder import Recorder
        recorder = Recorder(meter_provider=provider)
        owner = type("Pool", (), {})()
        pool = recorder.pool_opened("httpx2", owner, max_connections=2, serialized=True)
        series = recorder.series("httpx2", ("http", "127.0.0.1", 8080))
        conn = recorder.conn_created(pool, series)
        recorder.conn_opened(conn)
        recorder.released(conn)
        if variant.endswith("not recorded"):
            recorder._wait_time = type("Dropped", (), {"record": lambda self, *args: None})()

        def operation():
            wait = None if variant.endswith("no wait") else recorder.wait_started(pool, series)
            recorder.acquired(conn, wait)
            if wait is not None:
                recorder.wait_granted(wait)
                recorder.wait_ended(wait)
            recorder.released(conn)
    for _ in range(200 + n):
        operation()


def instructions(case, n):
    return cachegrind([__file__, "--run", str(case), str(n)], f"case {case}")[0]


def main():
    if sys.argv[1:2] == ["--run"]:
        run(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=2000,
                        help="N, operations in the shorter run of each case (default: 2000)")
    n = parser.parse_args().operations
    if n < 1:
        parser.error("--operations must be at least 1")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed: apt-get install valgrind")
    print("| what | case | instructions |\n|---|---|---:|")
    for case, (kind, variant) in enumerate(CASES):
        one = (instructions(case, 2 * n) - instructions(case, n)) / n
        print(f"| {kind} | {variant} | {one:,.0f} |", flush=True)


if __name__ == "__main__":
    main()

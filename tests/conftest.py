import contextlib
import os
import shutil

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

os.environ.setdefault("POOLSCOPE_STRICT", "true")

import poolscope  # noqa: E402
from poolscope.demo.server import DemoServer  # noqa: E402


class Metrics:
    """poolscope instrumented into an in-memory SDK pipeline; ``read()`` collects it."""

    def __init__(self, views=()):
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], views=views)

    def read(self):
        """{metric name: [(attributes dict, point)]} from one collection."""
        out = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out.setdefault(metric.name, []).extend(
                        (dict(p.attributes), p) for p in metric.data.data_points)
        return out

    def value(self, data, name, **attrs):
        """Sum of the points of ``name`` whose attributes include ``attrs`` (None if no point)."""
        want = {k.replace("__", "."): v for k, v in attrs.items()}
        points = [p for a, p in data.get(name, []) if want.items() <= a.items()]
        if not points:
            return None
        return sum(getattr(p, "value", None) if hasattr(p, "value") else p.count for p in points)

    def served(self, data, **attrs):
        """(connections created, acquisitions of a new connection, of a reused one) of the
        points whose attributes include ``attrs``: (1, 1, n - 1) when one connection served n
        requests."""
        acquisitions = "poolscope.connection.acquisitions"
        return (self.value(data, "poolscope.connection.created", **attrs),
                self.value(data, acquisitions, poolscope__connection__reused=False, **attrs),
                self.value(data, acquisitions, poolscope__connection__reused=True, **attrs))

    def histogram(self, data, name, **attrs):
        """(count, sum) of a histogram's points whose attributes include ``attrs``."""
        want = {k.replace("__", "."): v for k, v in attrs.items()}
        points = [p for a, p in data.get(name, []) if want.items() <= a.items()]
        return sum(p.count for p in points), sum(p.sum for p in points)


@contextlib.contextmanager
def instrumented(pipeline=Metrics):
    """poolscope instrumented into a new ``pipeline`` (:class:`Metrics`, or :class:`Traced`
    with its tracer provider), for the block."""
    m = pipeline()
    poolscope.instrument(meter_provider=m.provider,
                         tracer_provider=getattr(m, "tracer_provider", None))
    try:
        yield m
    finally:
        poolscope.uninstrument()
        m.provider.shutdown()


@pytest.fixture
def metrics():
    with instrumented() as m:
        yield m


@pytest.fixture
def detailed(monkeypatch):
    """:class:`Metrics` with detailed timings (``use_time``, ``idle_time``)."""
    monkeypatch.setenv("POOLSCOPE_DETAILED_TIMINGS", "true")
    with instrumented() as m:
        yield m


class Traced(Metrics):
    """:class:`Metrics` with spans: ``finished(name)`` gives the ended spans."""

    def __init__(self, views=()):
        super().__init__(views)
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))

    def finished(self, name=None):
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]


@pytest.fixture
def traced():
    with instrumented(Traced) as t:
        yield t


@pytest.fixture
def server():
    with DemoServer() as s:
        yield s


@pytest.fixture
def short_keepalive_server():
    with DemoServer(idle_timeout=0.3) as s:
        yield s


def buckets(point):
    """{upper bound: count} of a histogram point (inf for the last bucket)."""
    bounds = list(point.explicit_bounds) + [float("inf")]
    return {b: c for b, c in zip(bounds, point.bucket_counts) if c}


def reached(server, start, free):
    """Seconds from ``start`` to when each request that waited for a connection reached
    ``server`` (all but the first ``free`` to arrive): each wait ended before, so these bound
    the waits from above, however much a loaded machine stretched them."""
    return sorted(t - start for t in server.arrivals)[free:]


def require_tool(name):
    """The path of a command-line tool; fails under CI (CI=true) when missing, else skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (scripts/test.sh installs it as root)")
        pytest.skip(f"{name} not installed")
    return path

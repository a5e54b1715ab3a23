"""pytest plugin for a library's own test suite: poolscope instrumented before the library is
imported (``-p poolscope_peer``), into an in-memory SDK read after every test.

``POOLSCOPE_PEER_SPAN=true``: each test runs under a recording parent span, so poolscope's
spans and span attributes are made too. ``POOLSCOPE_STRICT=true``: poolscope's own failures
raise instead of being logged (and so fail the test that met them).
"""

import os

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import poolscope

_reader = InMemoryMetricReader()
_spans = InMemorySpanExporter()
_tracer_provider = TracerProvider()
_tracer_provider.add_span_processor(SimpleSpanProcessor(_spans))
poolscope.instrument(meter_provider=MeterProvider(metric_readers=[_reader]),
                     tracer_provider=_tracer_provider)
_parent = os.environ.get("POOLSCOPE_PEER_SPAN", "").lower() in ("1", "true")


@pytest.fixture(autouse=True)
def _poolscope_observed():
    """Each test under a recording span when asked; the metrics collected after it."""
    if _parent:
        with _tracer_provider.get_tracer("poolscope-peer").start_as_current_span("test"):
            yield
    else:
        yield
    _reader.get_metrics_data()
    _spans.clear()

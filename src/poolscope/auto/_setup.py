"""Inside the application: build the export pipeline, instrument, and print the report at exit."""

import atexit
import errno
import importlib.machinery
import importlib.util
import logging
import os
import sys
import weakref

from opentelemetry import metrics, trace

from .. import report
from .._config import ConfigError
from .._instrument import current_recorder, instrument
from ._options import Options

logger = logging.getLogger("poolscope")


class _OnceFilter(logging.Filter):
    """Let an exporter's failure through once; an unreachable collector is one warning, not many."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record):
        if record.levelno < logging.WARNING:
            return True
        if self.seen:
            return False
        self.seen = True
        return True


class Pipeline:
    """The SDK providers and exporters poolscope sets up when the application has none."""

    def __init__(self, options):
        self.options = options
        self.report_reader = None
        self.prometheus_server = None
        self.serve_later = False
        self.owned = []

    def start(self):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        meter_provider = metrics.get_meter_provider()
        if not isinstance(meter_provider, MeterProvider):
            readers = [r for r in (self._reader(name) for name in self.options.metrics) if r]
            meter_provider = MeterProvider(resource=Resource.create(), metric_readers=readers)
            self.owned.append(meter_provider)
            if any(r is not self.report_reader for r in readers):
                metrics.set_meter_provider(meter_provider)
        tracer_provider = self._tracer_provider()
        instrument(meter_provider=meter_provider, tracer_provider=tracer_provider,
                   libraries=self.options.libraries)
        self._arm()
        # weakref.finalize runs pending finalizers (which close pools) from its own atexit hook;
        # make sure that hook is registered before ours, so the report sees the pools as they were.
        weakref.finalize(self, int)
        atexit.register(self.stop)

    def _reader(self, name):
        from opentelemetry.sdk.metrics.export import (ConsoleMetricExporter, InMemoryMetricReader,
                                                      PeriodicExportingMetricReader)
        interval = self.options.interval_ms
        if name == "report":
            self.report_reader = InMemoryMetricReader()
            return self.report_reader
        if name == "console":
            return PeriodicExportingMetricReader(ConsoleMetricExporter(),
                                                 export_interval_millis=interval)
        if name == "otlp":
            if self.options.protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            _quiet_exporters()
            return PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=interval)
        if name == "prometheus":
            return self._prometheus()
        return None

    def _prometheus(self):
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        # The launched process serves at once, on the configured port. Its other processes
        # (workers, forked or spawned) serve from their first pool on, each on the next free
        # port of the range: helpers with no pools (multiprocessing's trackers) take none.
        if self.options.launched_pid in (None, os.getpid()):
            if not self._serve_prometheus():
                return None
        else:
            self.serve_later = True
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._prometheus_after_fork)
        return PrometheusMetricReader()

    def _serve_prometheus(self):
        """Serve the scrape endpoint on the configured port, or, when another process (a sibling
        worker) holds it, on the next free one of the range."""
        from prometheus_client import start_http_server

        host, first = self.options.prometheus_host, self.options.prometheus_port
        ports = range(first, first + self.options.prometheus_ports) if first else [0]
        error = None
        for port in ports:
            try:
                server = start_http_server(port, addr=host)
            except OSError as exc:
                error = exc
                if exc.errno != errno.EADDRINUSE:
                    break
                continue
            self.prometheus_server = server[0] if isinstance(server, tuple) else None
            if port != first:
                served = self.prometheus_server.server_port if self.prometheus_server else port
                sys.stderr.write(f"poolscope: process {os.getpid()} serves its Prometheus metrics "
                                 f"on {host}:{served} ({host}:{first} is taken)\n")
            return True
        span = f"{first}-{ports[-1]}" if len(ports) > 1 else str(first)
        logger.warning("poolscope: cannot serve Prometheus metrics on %s:%s (%s); process %s "
                       "exports none there", host, span, error.strerror or error, os.getpid())
        return False

    def _prometheus_after_fork(self):
        """A forked worker (gunicorn, multiprocessing) serves its own pools on a port of its own:
        the parent's server thread did not survive the fork, and its socket is the parent's."""
        if self.prometheus_server is not None:
            self.prometheus_server.socket.close()
            self.prometheus_server = None
        self.serve_later = True
        self._arm()

    def _arm(self):
        recorder = current_recorder()
        if not self.serve_later or recorder is None:
            return
        self.serve_later = False
        if recorder.has_pools():
            self._serve_prometheus()
        else:
            recorder.on_first_pool = self._serve_prometheus

    def _tracer_provider(self):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider) or not self.options.traces:
            return current
        provider = TracerProvider()
        for name in self.options.traces:
            if name == "console":
                exporter = ConsoleSpanExporter()
            elif self.options.protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
                exporter = OTLPSpanExporter()
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                exporter = OTLPSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(exporter))
        _quiet_exporters()
        trace.set_tracer_provider(provider)
        self.owned.append(provider)
        return provider

    def stop(self):
        recorder = current_recorder()
        if self.report_reader is not None and recorder is not None:
            try:
                text = report.render(self.report_reader.get_metrics_data(), recorder.scopes(),
                                     self.options.leak_seconds)
                sys.stderr.write("\n" + text)
                sys.stderr.flush()
            except Exception:
                logger.warning("poolscope: could not print the pool report", exc_info=True)
        for provider in self.owned:
            try:
                provider.shutdown()
            except Exception:
                pass


def _quiet_exporters():
    """OpenTelemetry's exporter warnings (an unreachable collector) reach stderr once, not per try."""
    otel = logging.getLogger("opentelemetry")
    if any(isinstance(f, _OnceFilter) for h in otel.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("poolscope: OpenTelemetry export: %(message)s "
                                           "(further export errors are not shown)"))
    handler.addFilter(_OnceFilter())
    otel.addHandler(handler)
    otel.propagate = False


def start_in_process():
    """Set poolscope up in this process; a problem is one line on stderr, never an exception."""
    try:
        options = Options()
    except ConfigError as exc:
        sys.stderr.write(f"poolscope: {exc}; poolscope is off in this process\n")
        return
    try:
        Pipeline(options).start()
    except Exception as exc:
        sys.stderr.write(f"poolscope: could not start ({type(exc).__name__}: {exc}); "
                         "poolscope is off in this process\n")


def chain_sitecustomize(own_file):
    """Import the next ``sitecustomize`` on the path (the user's own), as if ours were not there."""
    own_dir = os.path.dirname(os.path.abspath(own_file))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != own_dir]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    ours = sys.modules.get("sitecustomize")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if ours is not None:
            sys.modules["sitecustomize"] = ours

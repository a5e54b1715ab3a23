"""The launcher's settings: flags and ``OTEL_*``/``POOLSCOPE_*`` variables, checked with clear errors."""

import importlib.util
import os

from .._config import ConfigError, env_bool, env_int, env_seconds

METRICS_EXPORTERS = ("report", "prometheus", "otlp", "console", "none")
TRACES_EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")
# exporter -> (module that must import, the extra that installs it)
EXTRAS = {
    ("metrics", "prometheus"): ("opentelemetry.exporter.prometheus", "prometheus"),
    ("metrics", "otlp", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http", "otlp"),
    ("metrics", "otlp", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc", "otlp-grpc"),
    ("traces", "otlp", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http", "otlp"),
    ("traces", "otlp", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc", "otlp-grpc"),
}


def exporters(value, allowed, variable):
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ConfigError(f"{variable}={value!r}: unknown exporter {', '.join(bad) or '(empty)'}; "
                          f"choose from {', '.join(allowed)}")
    return [n for n in names if n != "none"]


class Options:
    """Everything the bootstrap configures, read from the environment."""

    def __init__(self):
        env = os.environ
        self.metrics = exporters(env.get("OTEL_METRICS_EXPORTER") or "report",
                                 METRICS_EXPORTERS, "OTEL_METRICS_EXPORTER")
        self.traces = exporters(env.get("OTEL_TRACES_EXPORTER") or "none",
                                TRACES_EXPORTERS, "OTEL_TRACES_EXPORTER")
        self.protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={self.protocol!r}: choose from "
                              f"{', '.join(PROTOCOLS)}")
        self.prometheus_host = env.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "127.0.0.1"
        self.prometheus_port = env_int("OTEL_EXPORTER_PROMETHEUS_PORT", 9464, 0)
        if self.prometheus_port > 65535:
            raise ConfigError(f"OTEL_EXPORTER_PROMETHEUS_PORT={self.prometheus_port} is not a port")
        self.prometheus_ports = env_int("POOLSCOPE_PROMETHEUS_PORTS", 16, 1)
        launched = env.get("POOLSCOPE_LAUNCHED_PID", "")
        self.launched_pid = int(launched) if launched.isdigit() else None
        self.interval_ms = env_int("OTEL_METRIC_EXPORT_INTERVAL", 60000, 1)
        libraries = env.get("POOLSCOPE_LIBRARIES")
        self.libraries = [n.strip() for n in libraries.split(",") if n.strip()] if libraries else None
        self.detailed = env_bool("POOLSCOPE_DETAILED_TIMINGS")
        env_int("POOLSCOPE_MAX_ORIGINS", 1000, 1)
        env_bool("POOLSCOPE_LEAK_WARNINGS")
        env_bool("POOLSCOPE_STRICT")
        self.leak_seconds = env_seconds("POOLSCOPE_LEAK_SECONDS", 30.0)

    def missing_packages(self):
        """One line per configured exporter whose package is missing, naming the extra to install."""
        wanted = [("metrics", n) for n in self.metrics] + [("traces", n) for n in self.traces]
        lines = []
        for kind, name in wanted:
            module, extra = EXTRAS.get((kind, name)) or EXTRAS.get((kind, name, self.protocol)) \
                or (None, None)
            if module and not _importable(module):
                lines.append(f"the {name} {kind} exporter needs {module}: "
                             f"pip install 'poolscope[{extra}]'")
        return lines


def _importable(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False

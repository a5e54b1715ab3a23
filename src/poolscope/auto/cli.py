"""``poolscope-instrument [options] COMMAND [ARGS...]``: run COMMAND with poolscope active.

Like ``opentelemetry-instrument``: the options become environment variables, the bootstrap
directory goes first on ``PYTHONPATH`` so its ``sitecustomize`` runs before the application's
first import, and COMMAND replaces this process. Python processes that COMMAND starts inherit
the environment, and so are instrumented too.
"""

import argparse
import os
import socket
import sys

from .._config import ConfigError
from ._options import METRICS_EXPORTERS, TRACES_EXPORTERS, Options

BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see poolscope-instrument --help)")


def fail(message, code=2):
    sys.stderr.write(f"poolscope-instrument: {message}\n")
    raise SystemExit(code)


def parse(argv):
    parser = _Parser(prog="poolscope-instrument", allow_abbrev=False,
                     description="Run COMMAND with poolscope's connection pool metrics on.")
    parser.add_argument("--metrics-exporter", metavar="LIST",
                        help=f"comma list of {', '.join(METRICS_EXPORTERS)} "
                             "(default: report, or OTEL_METRICS_EXPORTER)")
    parser.add_argument("--traces-exporter", metavar="LIST",
                        help=f"comma list of {', '.join(TRACES_EXPORTERS)} (default: none, or "
                             "OTEL_TRACES_EXPORTER)")
    parser.add_argument("--service-name", help="service.name (OTEL_SERVICE_NAME)")
    parser.add_argument("--libraries", metavar="LIST",
                        help="only these libraries (default: every supported one installed)")
    parser.add_argument("--detailed-timings", action="store_true",
                        help="also record use_time and idle_time (costs every request a little)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")
    args = parser.parse_args(argv)
    if not args.command:
        fail("no command given, e.g. poolscope-instrument python app.py")
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    for value, variable in ((args.metrics_exporter, "OTEL_METRICS_EXPORTER"),
                            (args.traces_exporter, "OTEL_TRACES_EXPORTER"),
                            (args.service_name, "OTEL_SERVICE_NAME"),
                            (args.libraries, "POOLSCOPE_LIBRARIES"),
                            ("true" if args.detailed_timings else None,
                             "POOLSCOPE_DETAILED_TIMINGS")):
        if value is not None:
            os.environ[variable] = value
    try:
        options = Options()
    except ConfigError as exc:
        fail(str(exc))
    from .._instrument import ADAPTERS
    unknown = [n for n in options.libraries or () if n not in ADAPTERS]
    if unknown:
        fail(f"unknown libraries {', '.join(unknown)}; supported: {', '.join(ADAPTERS)}")
    for line in options.missing_packages():
        fail(line)
    if "prometheus" in options.metrics and options.prometheus_port:
        _check_port(options.prometheus_host, options.prometheus_port)
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = BOOTSTRAP + (os.pathsep + path if path else "")
    os.environ["POOLSCOPE_LAUNCHED_PID"] = str(os.getpid())  # exec keeps the pid
    try:
        os.execvp(args.command[0], args.command)
    except OSError as exc:
        fail(f"cannot run {args.command[0]}: {exc.strerror}", 127)


def _check_port(host, port):
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        fail(f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror or exc} "
             "(set OTEL_EXPORTER_PROMETHEUS_HOST, OTEL_EXPORTER_PROMETHEUS_PORT or --metrics-exporter)")

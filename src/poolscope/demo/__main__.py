"""``python -m poolscope.demo``: the whole product on an embedded default.

Starts a local server, runs the demo application under ``poolscope-instrument`` with the
report and Prometheus exporters, shows what the Prometheus endpoint serves, and lets the
application exit so that it prints the pool report.
"""

import os
import socket
import subprocess
import sys
import urllib.request

from .server import DemoServer

SHOWN = ("poolscope_connection_wait_time_seconds_count", "poolscope_connection_wait_time_seconds_sum",
         "poolscope_connection_created_total", "poolscope_connection_acquisitions_total",
         "http_client_open_connections", "poolscope_pool_saturation_time_seconds_total",
         "poolscope_connection_max")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port = free_port()
    env = {**os.environ, "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
           "OTEL_SERVICE_NAME": "poolscope-demo"}
    launcher = os.path.join(os.path.dirname(sys.executable), "poolscope-instrument")
    with DemoServer(api_delay=0.3) as server:
        print(f"demo server on {server.url}; running the demo app under:\n"
              f"  poolscope-instrument --metrics-exporter report,prometheus "
              f"python -m poolscope.demo.app {server.url}\n", flush=True)
        app = subprocess.Popen(
            [launcher, "--metrics-exporter", "report,prometheus", sys.executable, "-m",
             "poolscope.demo.app", server.url],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = app.stdout.readline()
            if line.strip() != "workload done":
                raise SystemExit(f"demo app failed: {line!r}")
            endpoint = f"http://127.0.0.1:{port}/metrics"
            body = urllib.request.urlopen(endpoint, timeout=10).read().decode()
            print(f"Prometheus endpoint {endpoint} (poolscope's series, abridged):")
            for text in body.splitlines():
                if text.startswith(SHOWN):
                    print("  " + text)
            app.stdin.write("\n")
            app.stdin.flush()
            app.wait(30)
        finally:
            if app.poll() is None:
                app.kill()
    return app.returncode


if __name__ == "__main__":
    sys.exit(main())

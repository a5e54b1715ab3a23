"""The launcher end to end: a plain application (no poolscope import) in a subprocess."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from conftest import require_tool

PY = sys.executable
LAUNCHER = os.path.join(os.path.dirname(sys.executable), "poolscope-instrument")
APP = textwrap.dedent("""
    import sys, threading, urllib3
    pool = urllib3.HTTPConnectionPool("127.0.0.1", int(sys.argv[1]), maxsize=2, block=True)
    threads = [threading.Thread(target=pool.request, args=("GET", "/delay/0.3")) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print("workload done", flush=True)
    sys.stdin.readline()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "POOLSCOPE_")) and k != "PYTHONPATH"}
    return {**env, **extra}


@pytest.fixture
def app_file(tmp_path):
    path = tmp_path / "app.py"
    path.write_text(APP)
    return str(path)


def launch(args, env, launcher=LAUNCHER, **kw):
    return subprocess.Popen([launcher, *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc):
    out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    return out, err


def test_report_is_printed_at_exit_for_a_plain_app(app_file, server):
    proc = launch([PY, app_file, str(server.port)], clean_env())
    out, err = finish(proc)
    assert out == "workload done\n"
    assert f"urllib3 http://127.0.0.1:{server.port}" in err
    assert "pool: limit 2, peak 2 in use" in err
    assert "requests: 6 acquisitions, 4 waited" in err
    assert "connections: 2 created, reuse 67%, open 0 active / 2 idle" in err
    assert "raise maxsize" in err


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def series(samples, name, **labels):
    return [v for k, v in samples.items() if k.split("{")[0] == name
            and all(f'{a}="{b}"' in k for a, b in labels.items())]


def six_requests_limit_two(example, library):
    """Issue 21's scenario, with no code change: ``example`` (in ``examples/``) sends 6
    requests at once through a pool of 2 to a 300 ms endpoint, prints how many connections its
    server accepted, and waits. 4 requests wait: 2 for one service time, 2 for two, so at least
    1.8 s in all; 2 connections are created, the ones the server accepted, and stay idle. The
    Prometheus endpoint is read while it waits; returns the pool report (the launcher's
    stderr)."""
    path = os.path.join(os.path.dirname(__file__), "..", "examples", example)
    port = free_port()
    proc = subprocess.Popen(
        [LAUNCHER, "--metrics-exporter", "prometheus,report", PY, "-c",
         f"import runpy, sys; runpy.run_path({path!r}, run_name='__main__'); "
         "sys.stdin.readline()"],
        env=clean_env(OTEL_EXPORTER_PROMETHEUS_PORT=str(port)), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "the server accepted 2 connections\n", proc.stderr.read()
        samples = scrape(port)
        labels = {"poolscope_library": library}
        [waits] = series(samples, "poolscope_connection_wait_time_seconds_count", **labels)
        [waited] = series(samples, "poolscope_connection_wait_time_seconds_sum", **labels)
        assert waits == 4 and 1.8 <= waited <= 2.4
        assert series(samples, "poolscope_connection_created_total", **labels) == [2.0]
        for state, count in (("idle", 2.0), ("active", 0.0)):
            assert series(samples, "http_client_open_connections", http_connection_state=state,
                          **labels) == [count]
        assert series(samples, "poolscope_connection_pending_requests", **labels) == [0.0]
    finally:
        out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    assert f"{library} http://127.0.0.1:" in err
    assert "limit 2, peak 2 in use" in err
    assert "requests: 6 acquisitions, 4 waited" in err
    assert "connections: 2 created, reuse 67%" in err
    assert "not observed" not in err
    return err


def test_prometheus_endpoint_and_a_real_prometheus_server(app_file, server, tmp_path):
    require_tool("prometheus")
    port = free_port()
    proc = launch(["--metrics-exporter", "prometheus", "--service-name", "e2e", PY,
                   app_file, str(server.port)],
                  clean_env(OTEL_EXPORTER_PROMETHEUS_PORT=str(port)))
    try:
        assert proc.stdout.readline() == "workload done\n"
        samples = scrape(port)
        origin = {"server_port": str(server.port), "poolscope_library": "urllib3"}
        assert series(samples, "poolscope_connection_wait_time_seconds_count", **origin) == [4.0]
        assert series(samples, "poolscope_connection_created_total", **origin) == [2.0]
        assert series(samples, "poolscope_connection_waits_total", poolscope_wait_outcome="granted",
                      **origin) == [4.0]

        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(textwrap.dedent(f"""
            global: {{scrape_interval: 1s}}
            scrape_configs:
              - job_name: poolscope
                static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
        """))
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            query = ('{__name__=~"poolscope_connection_wait_time_seconds_count|'
                     f'poolscope_connection_created_total",server_port="{server.port}"}}')
            url = (f"http://127.0.0.1:{prom_port}/api/v1/query?query="
                   + urllib.request.quote(query))
            found = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(found) < 2:
                time.sleep(0.5)
                try:
                    result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
                except OSError:
                    continue
                found = {r["metric"]["__name__"]: float(r["value"][1]) for r in result}
            assert found == {"poolscope_connection_wait_time_seconds_count": 4.0,
                             "poolscope_connection_created_total": 2.0}
        finally:
            prom.terminate()
            prom.wait(10)
    finally:
        finish(proc)


@pytest.mark.parametrize("args, env, message", [
    (["--bogus", "python", "x.py"], {}, "unrecognized arguments: --bogus"),
    (["--metrics-exporter", "nope", "python", "x.py"], {}, "unknown exporter nope"),
    (["python", "x.py"], {"OTEL_EXPORTER_PROMETHEUS_PORT": "abc",
                          "OTEL_METRICS_EXPORTER": "prometheus"}, "is not a whole number"),
    (["--libraries", "nope", "python", "x.py"], {}, "unknown libraries nope"),
    ([], {}, "no command given"),
    *((["python", "x.py"], {name: value, **extra}, message) for name, value, extra, message in [
        ("OTEL_METRICS_EXPORTER", "nope", {}, "unknown exporter nope"),
        ("OTEL_TRACES_EXPORTER", "zipkin", {}, "unknown exporter zipkin"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift", {}, "choose from http/protobuf, grpc"),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "70000", {}, "is not a port"),
        ("OTEL_EXPORTER_PROMETHEUS_HOST", "999.1.1.1", {"OTEL_METRICS_EXPORTER": "prometheus"},
         "cannot serve Prometheus metrics on 999.1.1.1:9464"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "-5", {}, "must be at least 1"),
        ("POOLSCOPE_LIBRARIES", "urllib3,nope", {}, "unknown libraries nope"),
        ("POOLSCOPE_DETAILED_TIMINGS", "maybe", {}, "is not a boolean"),
        ("POOLSCOPE_MAX_ORIGINS", "0", {}, "must be at least 1"),
        ("POOLSCOPE_LEAK_WARNINGS", "perhaps", {}, "is not a boolean"),
        ("POOLSCOPE_LEAK_SECONDS", "-1", {}, "must be more than 0"),
        ("POOLSCOPE_PROMETHEUS_PORTS", "lots", {}, "is not a whole number"),
        ("POOLSCOPE_STRICT", "kinda", {}, "is not a boolean"),
    ]),
])
def test_bad_input_is_one_line_and_exit_2(args, env, message):
    result = subprocess.run([LAUNCHER, *args], env=clean_env(**env), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("env, said", [
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "abc"}, "Invalid timeout value 'abc'"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "==="}, "Header format invalid"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "not a url"}, "Failed to parse"),
    ({"OTEL_METRIC_EXPORT_TIMEOUT": "abc"}, "invalid value for export timeout"),
])
def test_bad_values_the_sdk_reads_are_one_line_and_the_app_runs(env, said, server, tmp_path):
    """Values only OpenTelemetry's exporters read: they say what is wrong; the app runs on."""
    app = tmp_path / "app.py"
    app.write_text("import sys, urllib3\n"
                   "print('status', urllib3.PoolManager().request('GET', sys.argv[1]).status)\n")
    result = subprocess.run([LAUNCHER, PY, str(app), server.url], capture_output=True, text=True,
                            timeout=60, env=clean_env(OTEL_METRICS_EXPORTER="otlp", **env))
    assert result.returncode == 0 and result.stdout.strip() == "status 200", result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if said in line]
    assert len(lines) == 1, result.stderr


def test_port_in_use_is_refused_before_the_app_starts():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run([LAUNCHER, "--metrics-exporter", "prometheus", PY, "-c", "0"],
                                env=clean_env(OTEL_EXPORTER_PROMETHEUS_PORT=str(port)),
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"cannot serve Prometheus metrics on 127.0.0.1:{port}" in result.stderr


def test_unreachable_collector_warns_once_and_the_app_runs_on(app_file, server):
    port = free_port()  # nothing listens there
    start = time.monotonic()
    proc = launch(["--metrics-exporter", "otlp", PY, app_file, str(server.port)],
                  clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
                            OTEL_METRIC_EXPORT_INTERVAL="200", OTEL_EXPORTER_OTLP_TIMEOUT="1"))
    assert proc.stdout.readline() == "workload done\n"
    assert time.monotonic() - start < 10
    time.sleep(1)
    out, err = finish(proc)
    assert "Traceback" not in err
    assert 1 <= len([line for line in err.splitlines() if line.strip()]) <= 2


def test_user_sitecustomize_still_runs(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins; builtins.USER_SITE = 42\n")
    result = subprocess.run(
        [LAUNCHER, PY, "-c", "import builtins, sys; print(builtins.USER_SITE, "
                                   "'poolscope' in sys.modules)"],
        env=clean_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42", "True"]


@pytest.mark.parametrize("example, expected", [
    ("urllib3_pool.py", ["urllib3 http://127.0.0.1", "6 acquisitions, 4 waited"]),
    ("requests_session.py", ["urllib3 http://127.0.0.1", "closed: pool_full 4"]),
    ("httpx_client.py", ["httpx http://127.0.0.1", "12 acquisitions, 8 waited"]),
    ("openai_chat.py", ["httpx2 http://127.0.0.1", "6 acquisitions, 4 waited",
                        "connections: 2 created", "open 0 active / 0 idle, closed: pool_closed 2",
                        "raise httpx2.Limits(max_connections=...)"]),
    ("aiohttp_session.py", ["aiohttp http://127.0.0.1", "6 acquisitions, 4 waited"]),
    ("pycurl_multi.py", ["pycurl http://127.0.0.1", "9 acquisitions, 4 waited",
                         "3 created"]),
])
def test_examples_run_under_the_launcher(example, expected):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", example)
    result = subprocess.run([LAUNCHER, PY, path], env=clean_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stderr


@pytest.fixture
def collector():
    """An OTLP/HTTP receiver on 127.0.0.1 that decodes what it gets: ``.received`` is a list
    of (path, decoded request)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest)
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    kinds = {"/v1/metrics": ExportMetricsServiceRequest, "/v1/traces": ExportTraceServiceRequest}
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = kinds[self.path]()
            request.ParseFromString(body)
            received.append((self.path, request))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.received = received
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def exported(received, port):
    """The names of the scopes exported, and {poolscope's metric name: (service.name, metric,
    its points for the origin on ``port``)}, from the last export of each metric the collector
    received."""
    assert received and all(path == "/v1/metrics" for path, _ in received)
    scopes, last = set(), {}
    for _, request in received:
        for rm in request.resource_metrics:
            service = {a.key: a.value.string_value for a in rm.resource.attributes}["service.name"]
            for sm in rm.scope_metrics:
                scopes.add(sm.scope.name)
                for metric in sm.metrics if sm.scope.name == "poolscope" else ():
                    points = getattr(metric, metric.WhichOneof("data")).data_points
                    last[metric.name] = service, metric, [
                        p for p in points if {a.key: (a.value.string_value or a.value.int_value)
                                              for a in p.attributes}.get("server.port") == port]
    return scopes, last


def test_otlp_http_export_reaches_a_receiver_that_decodes_the_protobuf(app_file, server,
                                                                       collector):
    proc = launch(["--metrics-exporter", "otlp", "--service-name", "otlp-e2e", PY,
                   app_file, str(server.port)],
                  clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.server_port}"))
    finish(proc)  # the final export happens at exit
    scopes, last = exported(collector.received, server.port)
    assert scopes == {"poolscope"}

    def origin_points(name):
        service, metric, points = last[name]
        assert service == "otlp-e2e"
        return metric, points

    metric, [wait] = origin_points("poolscope.connection.wait_time")
    assert metric.unit == "s" and wait.count == 4 and 1.75 <= wait.sum <= 2.2
    attrs = {a.key: a.value for a in wait.attributes}
    assert attrs["poolscope.library"].string_value == "urllib3"
    assert attrs["server.address"].string_value == "127.0.0.1"
    assert attrs["url.scheme"].string_value == "http"
    metric, [created] = origin_points("poolscope.connection.created")
    assert metric.unit == "{connection}" and created.as_int == 2
    assert metric.sum.is_monotonic
    metric, [granted] = origin_points("poolscope.connection.waits")
    assert metric.unit == "{wait}" and granted.as_int == 4


def test_opentelemetry_instrument_loads_poolscope_through_its_entry_point(app_file, server,
                                                                          collector):
    """OpenTelemetry's own launcher with its distro, no poolscope-instrument: poolscope is one
    of the instrumentors it loads, on the distro's providers, and its figures leave through the
    distro's OTLP exporter: the server's 2 connections and the 4 requests that waited."""
    proc = launch(["--service_name", "distro-e2e", PY, app_file, str(server.port)],
                  clean_env(OTEL_METRICS_EXPORTER="otlp", OTEL_TRACES_EXPORTER="none",
                            OTEL_LOGS_EXPORTER="none", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.server_port}"),
                  launcher=os.path.join(os.path.dirname(PY), "opentelemetry-instrument"))
    finish(proc)
    scopes, last = exported(collector.received, server.port)
    assert "opentelemetry.instrumentation.urllib3" in scopes  # the distro loaded the others too
    assert server.accepted == 2
    service, _, [created] = last["poolscope.connection.created"]
    assert service == "distro-e2e" and created.as_int == 2
    _, _, [granted] = last["poolscope.connection.waits"]
    assert granted.as_int == 4
    _, _, acquired = last["poolscope.connection.acquisitions"]
    assert sorted(p.as_int for p in acquired) == [2, 4]


TRACED_APP = textwrap.dedent("""
    import sys, threading, urllib3
    from opentelemetry import trace
    tracer = trace.get_tracer("app")
    pool = urllib3.HTTPConnectionPool("127.0.0.1", int(sys.argv[1]), maxsize=1, block=True)
    def request(i):
        with tracer.start_as_current_span(f"request {i}"):
            pool.request("GET", "/delay/0.3")
    threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
""")


def test_spans_exported_over_otlp_arrive_intact(tmp_path, server, collector):
    """maxsize 1, two requests of 0.3 s under the application's own spans: one set-up span under
    the first (with its socket connect), one 0.3 s wait span under the second."""
    app = tmp_path / "traced.py"
    app.write_text(TRACED_APP)
    proc = launch(["--metrics-exporter", "none", "--traces-exporter", "otlp", PY, str(app),
                   str(server.port)],
                  clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.server_port}"))
    finish(proc)
    spans = [span for path, request in collector.received if path == "/v1/traces"
             for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
    by_id = {span.span_id: span for span in spans}
    [wait] = [s for s in spans if s.name == "HTTP wait_for_connection"]
    [setup] = [s for s in spans if s.name == "HTTP connection_setup"]
    assert by_id[wait.parent_span_id].name.startswith("request ")
    assert by_id[setup.parent_span_id].name.startswith("request ")
    assert wait.parent_span_id != setup.parent_span_id
    assert 0.25 <= (wait.end_time_unix_nano - wait.start_time_unix_nano) / 1e9 <= 0.45
    attrs = {a.key: a.value for a in wait.attributes}
    assert attrs["poolscope.library"].string_value == "urllib3"
    assert attrs["server.port"].int_value == server.port
    assert attrs["poolscope.pool.max"].int_value == 1
    assert attrs["poolscope.wait.outcome"].string_value == "granted"
    # both requests link to the set-up of the one connection that served them
    requests = [s for s in spans if s.name.startswith("request ")]
    assert [[(link.trace_id, link.span_id) for link in r.links] for r in requests] == \
        [[(setup.trace_id, setup.span_id)]] * 2
    # the set-up's one phase apart over plain HTTP: urllib3's socket opening
    [connect] = [s for s in spans if s.name == "socket connect"]
    assert connect.parent_span_id == setup.span_id
    # within it (to a millisecond: a phase's start is its end less its monotonic duration)
    assert setup.start_time_unix_nano - 1_000_000 <= connect.start_time_unix_nano
    assert connect.end_time_unix_nano <= setup.end_time_unix_nano
    # two requests, one wait, one set-up and its phase: no root spans of poolscope's
    assert len(spans) == 5


WSGI_APP = textwrap.dedent("""
    import os, urllib3
    pool = urllib3.PoolManager(maxsize=1)  # made in the master under --preload

    def app(environ, start_response):
        pool.request("GET", f"http://127.0.0.1:{environ['PATH_INFO'].strip('/')}/")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
""")

ASGI_APP = textwrap.dedent("""
    import os, urllib3
    pool = urllib3.PoolManager(maxsize=1)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        pool.request("GET", f"http://127.0.0.1:{scope['path'].strip('/')}/")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
""")


def free_ports(count):
    """The first of ``count`` consecutive free ports."""
    for _ in range(50):
        first = free_port()
        try:
            for port in range(first, first + count):
                socket.create_server(("127.0.0.1", port)).close()
            return first
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def get(url, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("server_cmd", [
    ["-m", "gunicorn", "-w", "2", "wsgi:app"],
    ["-m", "gunicorn", "-w", "2", "--preload", "wsgi:app"],
    ["-m", "uvicorn", "--workers", "2", "--log-level", "warning", "asgi:app"],
], ids=["gunicorn", "gunicorn-preload", "uvicorn"])
def test_every_worker_serves_its_own_pools_on_a_port_of_its_own(tmp_path, server, server_cmd):
    """A master and 2 workers: 3 endpoints on consecutive ports; the acquisitions each endpoint
    reports are the requests its worker served, and every worker prints its report at exit."""
    (tmp_path / "wsgi.py").write_text(WSGI_APP)
    (tmp_path / "asgi.py").write_text(ASGI_APP)
    metrics_port, app_port = free_ports(3), free_port()
    bind = (["-b", f"127.0.0.1:{app_port}"] if "gunicorn" in server_cmd
            else ["--host", "127.0.0.1", "--port", str(app_port)])
    proc = launch(["--metrics-exporter", "prometheus,report", PY, *server_cmd, *bind],
                  clean_env(OTEL_EXPORTER_PROMETHEUS_PORT=str(metrics_port),
                            POOLSCOPE_PROMETHEUS_PORTS="3"), cwd=tmp_path)
    try:
        served = {}
        for _ in range(12):
            pid = int(get(f"http://127.0.0.1:{app_port}/{server.port}", timeout=30))
            served[pid] = served.get(pid, 0) + 1
        counts = {}  # port -> acquisitions it reports; the master's (first) has none
        for port in range(metrics_port, metrics_port + 3):
            try:
                samples = scrape(port)
            except OSError:
                continue  # a worker that served no request opened no pool, and takes no port
            counts[port] = int(sum(series(samples, "poolscope_connection_acquisitions_total",
                                          server_port=str(server.port))))
        assert counts[metrics_port] == 0
        assert sorted(c for p, c in counts.items() if p != metrics_port) \
            == sorted(served.values())
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    if "uvicorn" not in server_cmd:  # uvicorn's workers end without running exit handlers
        for pid in served:
            assert f"poolscope pool report (process {pid})" in err, err
    assert err.count(f"(127.0.0.1:{metrics_port} is taken)") == len(served), err
    assert "Traceback" not in err and "cannot serve" not in err, err


GEVENT_APP = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import sys
    import gevent, httpx, urllib3
    port = int(sys.argv[1])
    pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=2, block=True)
    client = httpx.Client(limits=httpx.Limits(max_connections=2))
    jobs = [gevent.spawn(pool.request, "GET", "/delay/0.3") for _ in range(6)]
    jobs += [gevent.spawn(client.get, f"http://127.0.0.1:{port}/delay/0.3") for _ in range(6)]
    gevent.joinall(jobs, timeout=20)
    print(*(getattr(j.value, "status", None) or j.value.status_code for j in jobs))
""")


def test_a_gevent_application_under_the_launcher(tmp_path, server):
    """Greenlets share one thread: 6 at once through a pool of 2, per library, as with threads."""
    app = tmp_path / "app.py"
    app.write_text(GEVENT_APP)
    result = subprocess.run([LAUNCHER, PY, str(app), str(server.port)], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["200"] * 12, result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
    for library in ("urllib3", "httpx"):
        section = result.stderr.split(f"{library} http://127.0.0.1:{server.port}")[1]
        assert "requests: 6 acquisitions, 4 waited" in section
        assert "connections: 2 created, reuse 67%, open 0 active / 2 idle" in section

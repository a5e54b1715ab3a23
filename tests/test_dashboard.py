"""The Grafana dashboard's queries against a real Prometheus that scraped a real poolscope run."""

import json
import os
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request

from conftest import require_tool
from test_launcher import LAUNCHER, PY, clean_env, free_port

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "examples", "grafana",
                         "poolscope-dashboard.json")
# Two rounds with a pause between, so every rate has samples before and after: waits (6 at
# once through 2), a pool timeout, a server close, a stale failure, pools made and dropped, and
# HTTP/2 streams (3 at once on a connection that allows 2, kept open).
APP = textwrap.dedent("""
    import sys, threading, time, urllib3
    sys.path.insert(0, sys.argv[2])
    import httpx
    from h2server import H2Server
    from poolscope.demo.server import DemoServer
    port = int(sys.argv[1])
    stale = DemoServer(stale_after=0.05).__enter__()  # resets a request on an idle connection
    h2 = H2Server(max_streams=2, delay=0.3).__enter__()
    http2 = httpx.Client(http2=True, verify=h2.client_context)
    def round_():
        streams = [threading.Thread(target=http2.get, args=(h2.url + "/slow",))
                   for _ in range(3)]
        [t.start() for t in streams]
        dropped = urllib3.HTTPConnectionPool("127.0.0.1", stale.port, retries=False)
        dropped.request("GET", "/")
        time.sleep(0.1)
        try:
            dropped.request("GET", "/")
        except urllib3.exceptions.ProtocolError:
            pass
        pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=2, block=True)
        threads = [threading.Thread(target=pool.request, args=("GET", "/delay/0.3"))
                   for _ in range(6)]
        [t.start() for t in threads]
        try:
            pool.urlopen("GET", "/", pool_timeout=0.05)
        except urllib3.exceptions.EmptyPoolError:
            pass
        [t.join() for t in threads + streams]
        pool.request("GET", "/close")
        return pool
    kept = round_()
    print("round", flush=True)
    sys.stdin.readline()
    kept = round_()
    print("round", flush=True)
    sys.stdin.readline()
""")


def query(prom_port, expr):
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]


def concrete(expr):
    for variable, value in (("$job", ".*"), ("$library", ".*"), ("$origin", ".*"),
                            ("$__rate_interval", "1m")):
        expr = expr.replace(variable, value)
    return expr


def test_every_panel_query_returns_data(tmp_path, server):
    require_tool("prometheus")
    app, port, prom_port = tmp_path / "app.py", free_port(), free_port()
    app.write_text(APP)
    proc = subprocess.Popen([LAUNCHER, "--metrics-exporter", "prometheus", PY, str(app),
                             str(server.port), os.path.dirname(__file__)], env=clean_env(OTEL_EXPORTER_PROMETHEUS_PORT=str(port)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    (tmp_path / "prometheus.yml").write_text(textwrap.dedent(f"""
        global: {{scrape_interval: 1s}}
        scrape_configs:
          - job_name: shop
            static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
    """))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == "round\n"
        deadline = time.monotonic() + 30
        while not _scraped(prom_port, 3):
            assert time.monotonic() < deadline, "Prometheus never scraped poolscope"
            time.sleep(0.5)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "round\n"
        time.sleep(3)  # scrapes after the second round

        dashboard = json.load(open(DASHBOARD))
        empty = [(panel["title"], target["expr"]) for panel in dashboard["panels"]
                 for target in panel["targets"]
                 if not _numbers(query(prom_port, concrete(target["expr"])))]
        assert not empty, empty
        timeouts = query(prom_port, 'sum(poolscope_connection_timeouts_total{job="shop"})')
        assert float(timeouts[0]["value"][1]) == 2

        for variable in dashboard["templating"]["list"][1:]:
            metric, label = variable["query"]["query"][len("label_values("):-1].rsplit(", ", 1)
            url = (f"http://127.0.0.1:{prom_port}/api/v1/label/{label}/values?"
                   + urllib.parse.urlencode({"match[]": concrete(metric)}))
            values = json.load(urllib.request.urlopen(url, timeout=5))["data"]
            assert values == {"job": ["shop"], "poolscope_library": ["httpx", "urllib3"],
                              "server_address": ["127.0.0.1"]}[label]
    finally:
        prom.terminate()
        prom.wait(10)
        proc.communicate("\n", timeout=30)


def _scraped(prom_port, samples):
    try:
        result = query(prom_port, 'count_over_time(up{job="shop"}[1m])')
    except OSError:
        return False
    return bool(result) and float(result[0]["value"][1]) >= samples


def _numbers(result):
    """The result's values that are numbers (a rate over a quiet minute is 0, and a quantile of
    no waits is NaN, which is no data)."""
    return [r for r in result if r["value"][1] not in ("NaN", "+Inf", "-Inf")]

"""poolscope's memory: flat over a million requests, bounded with 10,000 origins.

Each case runs in its own process under poolscope (default mode) against the local nginx and
prints the resident set size at checkpoints; run through ``run.py --memory``.
"""

import json
import os
import subprocess
import sys

from nginx import nginx

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _instrument():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    import poolscope
    reader = InMemoryMetricReader()
    poolscope.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    return reader


def requests_case(url, total):
    """Sequential keep-alive requests through one urllib3 pool, RSS every tenth of the way."""
    reader = _instrument()
    import urllib3
    pool = urllib3.PoolManager(maxsize=1)
    points, step = [], total // 10
    for i in range(1, total + 1):
        pool.request("GET", url).data
        if i % step == 0:
            reader.get_metrics_data()  # a scrape, as production would have
            points.append((i, rss_kb()))
    return points


def origins_case(origins):
    """One request to each origin (address × port) through a PoolManager that keeps 10 pools."""
    reader = _instrument()
    import urllib3
    pool = urllib3.PoolManager(num_pools=10, maxsize=1)
    points, step = [], len(origins) // 10
    for i, (host, port) in enumerate(origins, 1):
        pool.request("GET", f"http://{host}:{port}/").data
        if i % step == 0:
            data = reader.get_metrics_data()
            series = sum(len(m.data.data_points) for rm in data.resource_metrics
                         for sm in rm.scope_metrics for m in sm.metrics
                         if m.name == "poolscope.connection.created")
            points.append((i, rss_kb(), series))
    return points


def child():
    case, arg = sys.argv[2], json.load(sys.stdin)
    result = requests_case(*arg) if case == "requests" else origins_case(arg)
    print(json.dumps(result))


def run_child(case, arg):
    out = subprocess.run([sys.executable, __file__, "--child", case], input=json.dumps(arg),
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"memory case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(smoke=False):
    total = 20_000 if smoke else 1_000_000
    side = 12 if smoke else 100  # addresses × ports = origins
    with nginx() as listen:
        host, port = listen[0]
        points = run_child("requests", [f"http://{host}:{port}/", total])
    print(f"## {total:,} sequential requests (urllib3, poolscope default mode)\n")
    print("| requests | RSS MiB |\n|---:|---:|")
    for n, rss in points:
        print(f"| {n:,} | {rss / 1024:.1f} |")
    growth = (points[-1][1] - points[0][1]) / 1024
    print(f"\nRSS from the first checkpoint to the last: {growth:+.1f} MiB\n")

    addresses = [f"127.0.0.{i}" for i in range(1, side + 1)]
    with nginx(addresses, ports=None if side == 1 else _ports(side)) as listen:
        points = run_child("origins", listen)
    print(f"## {len(listen):,} origins, one request each (urllib3 PoolManager keeping 10 pools, "
          "POOLSCOPE_MAX_ORIGINS 1000)\n")
    print("| origins | RSS MiB | origin series exported |\n|---:|---:|---:|")
    for n, rss, series in points:
        print(f"| {n:,} | {rss / 1024:.1f} | {series:,} |")


def _ports(count):
    from nginx import free_port
    ports = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child()

"""A local nginx for the benchmark: keep-alive, a tiny fixed response, on 127.0.0.1 only."""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time

CONF = """
daemon off;
master_process on;
worker_processes 1;
{affinity}pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
{listen}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def server_cpu():
    """The CPU nginx runs on (the last one), or None on a single-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return cpus[-1] if len(cpus) > 1 else None


def _affinity():
    cpu = server_cpu()
    return "" if cpu is None else f"worker_cpu_affinity {1 << cpu:b};\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nginx(addresses=("127.0.0.1",), ports=None):
    """Run nginx listening on every address × port given (default: one free port on 127.0.0.1);
    yields the list of (address, port) it listens on."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise SystemExit("nginx is not installed: apt-get install nginx-light "
                         "(the benchmark starts its own, on 127.0.0.1)")
    ports = ports or [free_port()]
    listen = [(a, p) for a in addresses for p in ports]
    with tempfile.TemporaryDirectory(prefix="poolscope-bench-") as tmp:
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(CONF.format(dir=tmp, affinity=_affinity(), listen="\n".join(
                f"        listen {a}:{p};" for a, p in listen)))
        process = subprocess.Popen([binary, "-p", tmp, "-c", conf, "-e", "stderr"],
                                   stdout=subprocess.DEVNULL)
        try:
            _wait_until_listening(listen[-1], process)
            yield listen
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_listening(address, process):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"nginx exited with {process.returncode}")
        try:
            socket.create_connection(address, timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nginx did not start listening within 10 s")

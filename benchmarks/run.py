"""poolscope's overhead per request, measured against a local nginx.

    python benchmarks/run.py                      # every library, case and mode (~25 min)
    python benchmarks/run.py --libraries urllib3 --modes default --rounds 5
    python benchmarks/run.py --smoke              # seconds: proves the benchmark runs
    python benchmarks/run.py --memory             # peak RSS over 1M requests; 10,000 origins

Each mode compares a baseline run with an instrumented run of the same workload, each in a
fresh process, interleaved A B A B ... for several rounds; the figure is the median of the
paired ratios B/A (with their spread), and the median difference in µs per request.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys

from nginx import nginx, server_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARIES = ["urllib3", "requests", "httpx", "httpx-async", "aiohttp", "pycurl"]
# not in the default run: niquests' urllib3-future replaces urllib3 where it is installed, so it
# runs from its own venv (the version matrix's: .nox/urllib3-future-newest/bin/python);
# curl_cffi and httpx2 (the openai and anthropic SDKs' client) run on their own
# (--libraries curl_cffi,httpx2,httpx2-async)
OPTIONAL = ["niquests", "niquests-async", "curl_cffi", "httpx2", "httpx2-async"]
CASES = ["sequential", "saturated"]
# mode -> (baseline setup, instrumented setup)
# "sdk" is the OpenTelemetry SDK set up and nothing instrumented, as in a service that already
# uses OpenTelemetry; "bare" compares with a process that does not even import it.
MODES = {
    "default": ("sdk", "poolscope"),
    "bare": ("plain", "poolscope"),
    "detailed": ("sdk", "detailed"),
    "tracing": ("traced", "traced+poolscope"),
    "official": ("sdk", "official"),
}
# requests per run: about half a second of work on a slow machine
REQUESTS = {"urllib3": 4000, "requests": 2000, "httpx": 3000, "httpx-async": 1500,
            "aiohttp": 4000, "pycurl": 8000, "niquests": 1500, "niquests-async": 1500,
            "curl_cffi": 1500, "httpx2": 3000, "httpx2-async": 1500}


def _fixed_layout():
    """``setarch -R`` where it works: without address randomisation, two runs of the same
    process differ by about 1 % instead of 4 %, so a few rounds resolve a few per cent."""
    command = ["setarch", platform.machine(), "-R"]
    try:
        subprocess.run(command + ["true"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return command


def _client_cpus():
    """Every CPU but nginx's, so the server does not take the client's."""
    server = server_cpu()
    return None if server is None else sorted(os.sched_getaffinity(0) - {server})


def pin_client():
    """Pin this process to the client's CPUs (see ``_client_cpus``), where there are two or more."""
    cpus = _client_cpus()
    if cpus:
        os.sched_setaffinity(0, cpus)


PREFIX = _fixed_layout()


def one_run(library, case, setup, requests, url):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("POOLSCOPE_DETAILED_TIMINGS", None)
    cpus = _client_cpus()
    out = subprocess.run(PREFIX + [sys.executable, os.path.join(HERE, "client.py"), library,
                                   case, setup, str(requests), url],
                         capture_output=True, text=True, env=env, timeout=600,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if out.returncode != 0:
        raise SystemExit(f"benchmark run {library} {case} {setup} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(library, case, mode, rounds, scale, url):
    baseline, instrumented = MODES[mode]
    requests = max(int(REQUESTS[library] * scale), 16)
    ratios, deltas, base, cpu_ratios = [], [], [], []
    errors, waited = [0, 0], []
    for _ in range(rounds):
        a = one_run(library, case, baseline, requests, url)
        b = one_run(library, case, instrumented, requests, url)
        ratios.append(b["us_per_request"] / a["us_per_request"])
        deltas.append(b["us_per_request"] - a["us_per_request"])
        base.append(a["us_per_request"])
        cpu_ratios.append(b["cpu_us_per_request"] / a["cpu_us_per_request"])
        if b["waited_share"] is not None:
            waited.append(b["waited_share"])
        for i, run in enumerate((a, b)):
            errors[i] += run["errors"]
            if run["errors"]:
                print(f"# {library} {case} {(baseline, instrumented)[i]}: {run['errors']} "
                      f"failed requests, first {run['first_error']}", flush=True)
    return {"library": library, "case": case, "mode": mode, "rounds": rounds,
            "requests": requests, "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "us_baseline": statistics.median(base), "us_added": statistics.median(deltas),
            "cpu_ratio": statistics.median(cpu_ratios), "errors": errors,
            "waited": statistics.median(waited) if waited else None}


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for dist in ("poolscope", "opentelemetry-sdk", "wrapt", "urllib3", "requests", "httpx",
                 "httpcore", "httpx2", "httpcore2", "aiohttp", "pycurl", "urllib3-future",
                 "niquests", "curl_cffi"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            + ", ".join(versions))


def print_row(r):
    print(f"| {r['library']} | {r['case']} | {r['mode']} | {r['us_baseline']:.1f} | "
          f"{r['us_added']:+.1f} | **{r['ratio']:.3f}** | "
          f"{r['ratio_min']:.3f}–{r['ratio_max']:.3f} | {r['cpu_ratio']:.3f} | "
          f"{'–' if r['waited'] is None else format(r['waited'], '.1%')} | "
          f"{r['errors'][0]}/{r['errors'][1]} |", flush=True)


def overhead(args):
    with nginx() as listen:
        host, port = listen[0]
        url = f"http://{host}:{port}/"
        print(f"# {machine()}")
        print(f"# nginx on {url} (CPU {server_cpu()}), client on CPU {_client_cpus()}, "
              f"address randomisation {'off' if PREFIX else 'on'}; "
              f"{args.rounds} rounds A B A B per row\n")
        print("| library | case | mode | baseline µs/req | added µs/req | ratio (median) | spread "
              "| CPU ratio | waited | failed A/B |")
        print("|---|---|---|---:|---:|---:|---|---:|---:|---:|", flush=True)
        results = []
        for library in args.libraries:
            for case in args.cases:
                for mode in args.modes:
                    if mode == "official" and library == "pycurl":
                        continue  # there is no official instrumentation of pycurl
                    results.append(compare(library, case, mode, args.rounds, args.scale, url))
                    print_row(results[-1])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "results": results}, f, indent=1)


def add_selection(parser, modes):
    """``--libraries``, ``--cases`` and ``--modes``, comma-separated (``modes``: the default)."""
    parser.add_argument("--libraries", type=lambda s: s.split(","), default=LIBRARIES)
    parser.add_argument("--cases", type=lambda s: s.split(","), default=CASES)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=modes)


def check_selection(parser, args):
    """A clear error for a library, case or mode the benchmark does not know."""
    for name, values, known in (("library", args.libraries, LIBRARIES + OPTIONAL),
                                ("case", args.cases, CASES),
                                ("mode", args.modes, MODES)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(known)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_selection(parser, modes=["default", "detailed", "tracing", "official"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply requests per run")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="one short round of everything: checks that it runs, not speed")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory over 1M requests and with 10,000 origins")
    args = parser.parse_args()
    check_selection(parser, args)
    if args.smoke:
        args.rounds, args.scale = 1, 0.02
    if args.memory:
        import memory
        memory.main(smoke=args.smoke)
    else:
        overhead(args)


if __name__ == "__main__":
    main()

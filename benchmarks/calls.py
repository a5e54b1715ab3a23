"""Where poolscope's time goes on a library's healthy request: the Python calls it makes.

    python benchmarks/calls.py urllib3 [--case sequential] [--requests 3000]

One process, poolscope instrumented, the benchmark's workload against the local nginx under
cProfile. Prints each poolscope function called, how many times per request and its share of
the time profiled in poolscope. cProfile makes every call slower, so the shares tell where the
time goes, not how much it is: `inprocess.py` gives the µs.
"""

import argparse
import cProfile
import os
import pstats
import threading

import client
from nginx import nginx
from run import CASES, LIBRARIES, OPTIONAL, pin_client

_OURS = os.sep + "poolscope" + os.sep


def _profiled_threads():
    """[the main thread's profile], to which every thread started from now on adds its own
    (the sync clients run their requests in worker threads)."""
    profiles = [cProfile.Profile()]
    run = threading.Thread.run

    def profiled(thread):
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            run(thread)
        finally:
            profile.disable()
    threading.Thread.run = profiled
    return profiles


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", choices=LIBRARIES + OPTIONAL)
    parser.add_argument("--case", choices=CASES, default="sequential")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    pin_client()
    _, meter_provider, tracer_provider = client._providers("sdk")
    import poolscope
    poolscope.instrument(meter_provider=meter_provider, tracer_provider=tracer_provider)
    with nginx() as listen:
        url = "http://%s:%d/" % listen[0]
        client.run(args.library, args.case, 200, url)  # warm: pools, connections, caches
        profiles = _profiled_threads()
        profiles[0].enable()
        client.run(args.library, args.case, args.requests, url)
        profiles[0].disable()
    n = args.requests + client.WARMUP
    ours = [(calls, inner, f"{os.path.basename(file)}:{line}({name})")
            for (file, line, name), (_, calls, inner, _, _) in pstats.Stats(*profiles).stats.items()
            if _OURS in file]
    total = sum(inner for _, inner, _ in ours) or 1.0
    print(f"{args.library} {args.case}: poolscope's Python calls per request ({n} requests)")
    print("| calls/request | share | function |\n|---:|---:|---|")
    for calls, inner, where in sorted(ours, key=lambda row: -row[1]):
        if calls / n >= 0.01:
            print(f"| {calls / n:.2f} | {inner / total:.0%} | `{where}` |")


if __name__ == "__main__":
    main()

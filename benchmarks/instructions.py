"""poolscope's cost per request in CPU instructions, a figure a VM's stolen time does not move.

    python benchmarks/instructions.py              # every library and case, default mode (~10 min)
    python benchmarks/instructions.py --libraries urllib3 --cases sequential --modes detailed

run.py times requests, and on a VM whose neighbours steal time its rounds spread by ±15 to
±45 %. This runs run.py's workloads (benchmarks/client.py, the same libraries, cases and modes)
under valgrind's cachegrind, which counts the instructions the client process executes (every
thread, user space: the kernel's socket work and nginx are not in it). Each setup runs twice,
with N and 2N requests after the same warm-up; the difference over N is the instructions of one
request, start-up and warm-up taken out. The ratio is the instrumented setup's over its
baseline's, as run.py's ratios. An instruction is not a nanosecond (a cache miss costs more than
an addition), so this tracks poolscope's work exactly and its time approximately.

What depends on time still moves a count: in a saturated case, how often the library's queue
turns over under valgrind. So does the process's layout, the same from run to run here: which
attribute look-ups collide in CPython's method cache and miss on every request (a class added
anywhere moved urllib3's sequential request by 13,600 instructions, 1.7 %). With ``--rounds R``
each row runs R rounds, baseline and instrumented in turn (A B A B), round r in client.py's
layout r (``BENCH_LAYOUT``), and gives the median of the rounds' ratios and their range.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

from nginx import nginx
from run import HERE, MODES, REQUESTS, add_selection, check_selection

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def cachegrind(arguments, what, layout=0):
    """(instructions, standard output) of ``python arguments…`` under cachegrind, every thread
    of the process in user space; ``what`` names the run if it fails; ``layout``: client.py's
    ``BENCH_LAYOUT``."""
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no",
               "--cachegrind-out-file=/dev/null", sys.executable, *arguments]
    env = {**os.environ, "PYTHONHASHSEED": "0", "BENCH_LAYOUT": str(layout)}  # as run.py
    env.pop("POOLSCOPE_DETAILED_TIMINGS", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    found = _REFS.search(done.stderr)
    if done.returncode or found is None:
        raise SystemExit(f"{what}: the run failed\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", "")), done.stdout


def instructions(library, case, setup, requests, url, layout):
    """The client process's instruction count for one run of ``requests`` requests, and
    client.py's figures for it (failed requests, the share poolscope counted as waiting)."""
    count, out = cachegrind([os.path.join(HERE, "client.py"), library, case, setup,
                             str(requests), url], f"{library} {case} {setup}", layout)
    return count, json.loads(out.splitlines()[-1])


def per_request(library, case, setup, requests, url, layout):
    """Instructions per request, both runs in the process layout ``layout``; the requests that
    failed in the two runs (httpx saturated: httpcore#1110, with or without poolscope); the
    share that waited in the longer one."""
    (small, one), (large, two) = (instructions(library, case, setup, n, url, layout)
                                  for n in (requests, 2 * requests))
    return (large - small) / requests, one["errors"] + two["errors"], two["waited_share"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_selection(parser, modes=["default"])
    parser.add_argument("--scale", type=float, default=0.1,
                        help="requests per run, as a share of run.py's (default: 0.1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds per row, baseline and instrumented in turn; the ratio is the "
                             "median of the rounds' (default: 1)")
    args = parser.parse_args()
    check_selection(parser, args)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    print("| library | case | mode | baseline instructions/req | added | ratio | waited | "
          "failed A/B | range |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    with nginx() as listen:
        url = "http://%s:%d/" % listen[0]
        for library in args.libraries:
            requests = max(50, int(REQUESTS[library] * args.scale))
            for case in args.cases:
                for mode in args.modes:
                    rounds = [[per_request(library, case, setup, requests, url, layout)
                               for setup in MODES[mode]] for layout in range(args.rounds)]
                    ratios = sorted(b[0] / a[0] for a, b in rounds)
                    base = statistics.median(a[0] for a, _ in rounds)
                    added = statistics.median(b[0] - a[0] for a, b in rounds)
                    failed, more = (sum(run[1] for run in side) for side in zip(*rounds))
                    waited = rounds[-1][1][2]
                    spread = f"{ratios[0]:.3f}–{ratios[-1]:.3f}" if len(ratios) > 1 else ""
                    print(f"| {library} | {case} | {mode} | {base:,.0f} | {added:+,.0f} | "
                          f"**{statistics.median(ratios):.3f}** | "
                          f"{'' if waited is None else f'{waited:.1%}'} | {failed}/{more} | "
                          f"{spread} |", flush=True)


if __name__ == "__main__":
    main()

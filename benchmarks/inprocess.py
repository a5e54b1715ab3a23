"""poolscope's CPU cost per request inside one process: the closer look behind run.py.

    python benchmarks/inprocess.py urllib3 sequential [--rounds 10] [--requests 3000] [--hooks-only]

One process, pinned like run.py's clients, alternates phases with and without poolscope
(``instrument()`` / ``uninstrument()``, a fresh client each phase, the order swapped every
round) and reports the median CPU time added per request. Separate processes (run.py) give
the figure that counts; this one has less noise, for comparing two versions of the hot path.

``--hooks-only`` makes the recorder's per-request events (``acquired``, ``released``) return at
once: what is left is the cost of poolscope's hooks and adapters alone, the floor under any
recorder for these hooks.
"""

import argparse
import gc
import statistics
import time

import client
from nginx import nginx
from run import CASES, LIBRARIES, OPTIONAL, pin_client


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", choices=LIBRARIES + OPTIONAL)
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--hooks-only", action="store_true",
                        help="the recorder's per-request events do nothing")
    args = parser.parse_args()
    if args.hooks_only:
        from poolscope._recorder import Recorder
        Recorder.acquired = lambda self, conn, wait=None, context=None: False
        Recorder.released = lambda self, conn, close_reason=None: None
    pin_client()
    reader, meter_provider, tracer_provider = client._providers("sdk")
    import poolscope

    def phase(url, instrumented):
        if instrumented:
            poolscope.instrument(meter_provider=meter_provider, tracer_provider=tracer_provider)
        gc.collect()
        cpu = time.process_time()
        client.run(args.library, args.case, args.requests, url)
        cpu = time.process_time() - cpu
        if instrumented:
            poolscope.uninstrument()
        return cpu / (args.requests + client.WARMUP) * 1e6

    with nginx() as listen:
        url = "http://%s:%d/" % listen[0]
        base, added = [], []
        for r in range(args.rounds):
            order = (False, True) if r % 2 else (True, False)
            us = dict(zip(order, (phase(url, i) for i in order)))
            base.append(us[False])
            added.append(us[True] - us[False])
    hooks = " (hooks only)" if args.hooks_only else ""
    print(f"{args.library} {args.case}{hooks}: {statistics.median(base):.1f} µs CPU per request, "
          f"poolscope {statistics.median(added):+.1f} µs (spread {min(added):+.1f} to "
          f"{max(added):+.1f}), {args.rounds} rounds of {args.requests}; failed requests "
          f"{len(client.errors)}")


if __name__ == "__main__":
    main()

"""python -m bench.publish: where a ``delay()`` spends its time, by broker.

Each measurement is a fresh process that makes ``--calls`` ``noop.delay()`` calls
(results enabled, Celery's defaults) after one that opens the connections, on this
bench's own redis-server:

- ``memory``: ``memory://`` broker, ``sheppy://`` result backend (the enqueue ceiling's
  Celery part);
- ``sheppy``: ``sheppy://`` broker and backend, redis-py with hiredis when installed;
- ``sheppy-python-parser``: the same with hiredis hidden (only when it is installed):
  what the ``hiredis`` extra is worth;
- ``stock``: ``redis://`` broker and backend.

Configurations are interleaved, ``--reps`` times; it prints the median rate and CPU
time per call (the process's own CPU: less noisy than wall time on a shared machine).
``--profile`` adds one cProfile run of ``sheppy`` (and of ``memory``): the profiler's
own time summed by layer (Celery, kombu, redis-py, celery-sheppy, waiting for the
socket, ...) and the functions with the most cumulative time.
"""

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
from importlib.util import find_spec
from statistics import median

from .procs import ROOT, BenchServer

CONFIGS = ("memory", "sheppy", "sheppy-python-parser", "stock")

#: Layers of the profile, by the path of the function's file (first match wins).
LAYERS = [
    ("celery-sheppy", "/celery_sheppy/"),
    ("kombu", "/kombu/"),
    ("celery", "/celery/"),
    ("redis-py", "/redis/"),
    ("hiredis", "hiredis"),
    ("json", "/json/"),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.publish",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="delay() calls per run (5000)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each configuration (3)")
    parser.add_argument("--profile", action="store_true", help="add one cProfile run")
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile (25)")
    return parser.parse_args(argv)


def child():
    """In the measuring process: ``CONFIG PORT CALLS [PROFILE_OUT]`` from argv."""
    config, port, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    profile_out = sys.argv[4] if len(sys.argv) > 4 else None
    import redis.utils

    from .app import NOOP, make_app

    sheppy, stock = f"sheppy://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"
    broker, backend = {"memory": ("memory://", sheppy), "stock": (stock, stock)}.get(
        config, (sheppy, sheppy))
    app = make_app(broker, backend, current=False)
    noop = app.tasks[NOOP]
    noop.delay()
    profiler = cProfile.Profile() if profile_out else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    for _ in range(calls):
        noop.delay()
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile_out)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    app.close()
    print(json.dumps({"rate": calls / wall, "cpu_us": cpu / calls * 1e6,
                      "hiredis": redis.utils.HIREDIS_AVAILABLE}))


def run_child(config, server, calls, profile_out=None):
    server.reset()
    # hiredis hidden before redis-py is imported: it then picks its pure-Python parser.
    hide = "sys.modules['hiredis'] = None; " if config == "sheppy-python-parser" else ""
    code = f"import sys; {hide}from bench.publish import child; child()"
    args = [sys.executable, "-c", code, config, str(server.port), str(calls)]
    if profile_out:
        args.append(profile_out)
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{config}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def layer_of(path, name):
    if path == "~":
        if "socket" in name or "select" in name or "poll" in name:
            return "socket (waiting for Redis)"
        return "builtins"
    for layer, marker in LAYERS:
        if marker in path:
            return layer
    return "other Python (stdlib)"


def by_layer(stats):
    """``{layer: own seconds}`` of a pstats.Stats, biggest first."""
    totals = {}
    for (path, _, name), (_, _, own, _, _) in stats.stats.items():
        layer = layer_of(path, name)
        totals[layer] = totals.get(layer, 0.0) + own
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def show_profile(config, path, calls, top):
    """Own time by layer and the top cumulative functions, per call; ``path`` may be a list."""
    stats = pstats.Stats(*path) if isinstance(path, list) else pstats.Stats(path)
    total = sum(by_layer(stats).values())
    print(f"\nprofile of {config}, {calls} tasks: {total / calls * 1e6:.0f} µs per task "
          "under the profiler; own time by layer:")
    for layer, seconds in by_layer(stats).items():
        print(f"  {layer:<28} {seconds / calls * 1e6:6.1f} µs  {seconds / total:6.1%}")
    print(f"functions with the most cumulative time ({config}):")
    stats.sort_stats("cumulative")
    width = len(str(ROOT)) + 1
    for func in stats.fcn_list[:top]:
        _, ncalls, _, cumulative, _ = stats.stats[func]
        path, line, name = func
        where = path[width:] if path.startswith(str(ROOT)) else path.split("site-packages/")[-1]
        print(f"  {cumulative / calls * 1e6:7.1f} µs/call  {ncalls / calls:4.1f}x  "
              f"{where}:{line}({name})")


def main(argv=None):
    args = parse_args(argv)
    configs = [c for c in CONFIGS if c != "sheppy-python-parser" or find_spec("hiredis")]
    server = BenchServer()
    results = {config: [] for config in configs}
    try:
        for rep in range(args.reps):
            for config in configs:
                out = run_child(config, server, args.calls)
                results[config].append(out)
                print(f"[{rep + 1}/{args.reps}] {config:<21} {out['rate']:6.0f} tasks/s  "
                      f"{out['cpu_us']:5.0f} µs CPU/call", flush=True)
        profiles = {}
        if args.profile:
            for config in ("memory", "sheppy"):
                profiles[config] = os.path.join(server.dir, f"{config}.prof")
                run_child(config, server, args.calls, profiles[config])
            for config, path in profiles.items():
                show_profile(config, path, args.calls, args.top)
    finally:
        server.close()

    print(f"\nmedians of {args.reps} runs of {args.calls} delay() calls:")
    rates = {c: median(r["rate"] for r in runs) for c, runs in results.items()}
    for config, runs in results.items():
        cpu = median(r["cpu_us"] for r in runs)
        print(f"  {config:<21} {rates[config]:6.0f} tasks/s  {cpu:5.0f} µs CPU/call  "
              f"{rates[config] / rates['stock']:.2f}x stock")
    if "sheppy-python-parser" in rates:
        gain = rates["sheppy"] / rates["sheppy-python-parser"] - 1
        print(f"  hiredis: {gain:+.1%} enqueue rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())

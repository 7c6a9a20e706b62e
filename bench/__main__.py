"""python -m bench: the same Celery workload on stock ``redis://`` and on ``sheppy://``.

Starts its own redis-server, measures this machine's ceilings (ceilings.py), runs
every scenario (scenarios.py) for each side, interleaved (stock, sheppy, stock,
sheppy, ...) so that both see the same load on the machine, repeats that ``--reps``
times, then prints medians, the ratios sheppy/stock and sheppy's fraction of each
ceiling against the targets of the performance issues, writes
bench/results/<time>.json and PNG plots. RabbitMQ (``amqp://`` with ``rpc://``)
joins as a third side when one listens on localhost:5672; otherwise its row says
"not measured". ``--cluster`` adds ``sheppy+cluster://`` (broker and backend) on a local
3-master Redis Cluster as one more side, with its ratios to both others.

The idle grid (workers × queues, with a cost model) is a run of its own, ``python -m
bench.idle`` (bench/idle.py): about 45 minutes. ``--smoke`` runs its smallest point.

Exit status: 0 when every scenario ran, 1 when one crashed (or, with ``--check``,
missed its target).
"""

import argparse
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import ceilings, report, scenarios
from . import idle as idle_grid
from .procs import ROOT, BenchServer, ClusterBenchServer
from .scenarios import RetentionWindow, Side

RESULTS = ROOT / "bench" / "results"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"

#: Sizes of a ``--smoke`` run: every scenario once, within a minute, to keep the bench working.
#: The retention window is not waited for (its row then shows the burst again).
SMOKE = dict(reps=1, tasks=40, round_trips=20, canvas=20, idle_seconds=1.0, window=False)


def installed(name):
    """The version of an installed distribution, None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of every scenario (5)")
    parser.add_argument("--tasks", type=int, default=3000,
                        help="tasks enqueued, then drained, per drain run (3000)")
    parser.add_argument("--round-trips", type=int, default=500,
                        help="sequential delay().get() calls per repetition (500)")
    parser.add_argument("--canvas", type=int, default=1000, help="tasks in the group and the chord (1000)")
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="how long the idle worker's commands are counted (30: whole "
                        "periods of the transport's upkeep)")
    parser.add_argument("--no-window", dest="window", action="store_false",
                        help="measure the steady-state memory without waiting for the finished "
                        "stream's retention window (its row then shows the burst again)")
    parser.add_argument("--cluster", action="store_true",
                        help="also run sheppy+cluster:// on a local 3-master Redis Cluster")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny sizes, targets not checked: {SMOKE}")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--plots", default=str(RESULTS),
                        help="directory of the PNG plots (bench/results; docs/img for the docs)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def sheppy_broker_resolves():
    """Whether kombu resolves ``sheppy://`` in a fresh process: (ok, why not).

    The transport registers its scheme when Celery imports kombu.serialization; a
    subprocess keeps a missing or half-written transport out of this one.
    """
    check = ("from celery import Celery\n"
             "from kombu import Connection\n"
             "Connection('sheppy://127.0.0.1:1/0').transport\n")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    return proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[-1]


def rabbitmq_listens():
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def rabbitmq_absent_why():
    if shutil.which("rabbitmq-server"):
        return "rabbitmq-server is installed but nothing listens on localhost:5672"
    return "no RabbitMQ server installed"


def choose_sides(server, cluster=None):
    notes = []
    sides = [Side("stock", server.url_for("redis"), server.url_for("redis"))]
    ok, why = sheppy_broker_resolves()
    if ok:
        sides.append(Side("sheppy", server.url_for("sheppy"), server.url_for("sheppy")))
    else:
        sides.append(Side("sheppy", server.url_for("redis"), server.url_for("sheppy")))
        notes.append(f"sheppy:// does not resolve as a broker here ({why}): the sheppy side "
                     "runs the stock redis:// broker with the sheppy:// result backend")
    if cluster is not None:
        url = cluster.url_for("sheppy")
        sides.append(Side("cluster", url, url, cluster=True))
    rabbitmq = None
    if rabbitmq_listens():
        sides.append(Side("rabbitmq", RABBITMQ_URL, "rpc://", on_redis=False))
    else:
        rabbitmq = rabbitmq_absent_why()
        notes.append(f"{rabbitmq}: amqp:// + rpc:// not measured")
    return sides, notes, rabbitmq


def scenario_plan(args):
    """(name, function of a side) in the order each repetition runs them."""
    timeout = 120 + args.tasks / 20  # seconds: generous, a loaded machine is slow
    return [
        ("drain prefork -c 2", partial(scenarios.drain, pool="prefork", concurrency=2,
                                       tasks=args.tasks, timeout=timeout)),
        ("drain threads -c 8", partial(scenarios.drain, pool="threads", concurrency=8,
                                       tasks=args.tasks, timeout=timeout)),
        ("warm worker", partial(scenarios.warm_worker, round_trips=args.round_trips,
                                canvas=args.canvas, idle_seconds=args.idle_seconds,
                                timeout=timeout)),
    ]


def run_one(errors, what, fun, *args):
    """``fun(*args)``, or None with the error noted (the run goes on)."""
    try:
        return fun(*args)
    except Exception as exc:
        traceback.print_exc()
        errors.append(f"{what}: {exc!r}")
        return None


def record(samples, side, out):
    for metric, value in out.items():
        samples.setdefault(side, {}).setdefault(metric, []).append(value)


def progress(rep, args, name, side, out, seconds):
    shown = {k: v for k, v in out.items() if isinstance(v, (int, float))}
    values = ", ".join(f"{k} {report.fmt(v)}" for k, v in shown.items())
    print(f"[{rep + 1}/{args.reps}] {name:<19} {side.name:<8} {seconds:5.1f} s  {values}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    # A SIGTERM'd run still stops its redis-server and workers (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(timezone.utc)
    server = BenchServer()
    cluster = None
    try:
        cluster = ClusterBenchServer() if args.cluster else None
        sides, notes, rabbitmq = choose_sides(server, cluster)
        for note in notes:
            print(f"note: {note}")
        samples = {side.name: {} for side in sides}
        errors = []
        timeout = 120 + args.tasks / 20
        load_before = os.getloadavg()
        for rep in range(args.reps):
            began = time.perf_counter()
            out = run_one(errors, f"ceilings (repetition {rep + 1})", ceilings.measure, server,
                          args.tasks, timeout)
            if out is not None:
                record(samples, report.CEILING, out)
                progress(rep, args, "ceilings", Side("-", "", ""), out, time.perf_counter() - began)
            windows = []  # their wait overlaps the scenarios below
            for side in sides:
                if side.on_redis and not side.cluster:  # the window starts a redis-server
                    window = RetentionWindow(side, args.tasks, timeout, wait=args.window)
                    if run_one(errors, f"retention window on {side.name} (repetition {rep + 1})",
                               window.begin) is not None:
                        windows.append(window)
            for name, run in scenario_plan(args):
                for side in sides:
                    began = time.perf_counter()
                    out = run_one(errors, f"{name} on {side.name} (repetition {rep + 1})",
                                  run, side, cluster if side.cluster else server)
                    if out is not None:
                        progress(rep, args, name, side, out, time.perf_counter() - began)
                        record(samples, side.name, out)
            for window in windows:
                began = time.perf_counter()
                out = run_one(errors, f"retention window on {window.side.name} "
                              f"(repetition {rep + 1})", window.end)
                if out is not None:
                    progress(rep, args, "retention window", window.side, out,
                             time.perf_counter() - began)
                    record(samples, window.side.name, out)
        idle_smoke = None
        if args.smoke:  # the idle grid's code, on its smallest point
            idle_smoke = idle_grid.smoke(
                server, [side for side in sides if side.on_redis and not side.cluster], errors)
        load_after = os.getloadavg()
        redis_version = server.version
    finally:
        server.close()
        if cluster is not None:
            cluster.close()

    side_names = [side.name for side in sides]
    rows = report.summarize(samples, args.canvas)
    limits = report.ceiling_rows(samples, rabbitmq)
    print()
    print(report.ceilings_table(limits))
    print()
    print(report.table(rows, side_names, checked=not args.smoke))
    if cluster is not None:
        print()
        print(report.side_table(rows, "cluster", ["sheppy", "stock"]))
    for side in side_names:
        by_name = report.commands_by_name(samples, side, "commands_prefork")
        if by_name:
            calls = ", ".join(f"{name} {n:.2f}" for name, n in by_name.items() if n >= 0.01)
            print(f"commands per task, {side} (prefork run): {calls}")
        idle = report.commands_by_name(samples, side, "idle_commands")
        if idle:
            print(f"idle commands per second, {side}: "
                  + ", ".join(f"{name} {n:.2f}" for name, n in idle.items()))
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    for note in notes:
        print(f"note: {note}")

    data = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "params": {k: v for k, v in vars(args).items() if k not in ("smoke", "check", "plots")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_before": load_before,
                    "load_after": load_after},
        "versions": {"redis-server": redis_version,
                     **{name: installed(name) for name in ("celery", "kombu", "redis", "hiredis",
                                                            "celery-sheppy")}},
        "sides": {side.name: {"broker": side.broker, "backend": side.backend} for side in sides},
        "notes": notes,
        "errors": errors,
        "table": rows,
        "ceilings": limits,
        "markdown_table": report.markdown_table(rows, side_names),
        "markdown_ceilings": report.markdown_ceilings(limits),
        "cluster_table": report.side_table(rows, "cluster", ["sheppy", "stock"]) if cluster else None,
        "samples": samples,
        "idle_smoke": idle_smoke and {side: {f"{w}x{q}": runs for (w, q), runs in by_point.items()}
                                      for side, by_point in idle_smoke.items()},
    }
    path = RESULTS / f"{started:%Y%m%dT%H%M%SZ}{'-smoke' if args.smoke else ''}.json"
    report.write_json(path, data)
    print(f"results: {path.relative_to(ROOT)}")
    plots = report.plots(Path(args.plots), samples, args.canvas)
    if plots:
        print("plots: " + ", ".join(str(p) for p in plots))
    else:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")

    for error in errors:
        print(f"FAILED: {error}", file=sys.stderr)
    if errors:
        return 1
    if args.check and not args.smoke and any(row["met"] is False for row in rows):
        print("a target was missed (--check)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

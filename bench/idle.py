"""python -m bench.idle: what an idle deployment costs, stock ``redis://`` against ``sheppy://``.

For each point of a grid, workers × queues ({1, 10, 20} × {1, 20, 200} by default), each
side in turn (stock, then sheppy) on a fresh redis-server of the bench's own: start that many
``celery worker -Q q0,...,q<queues-1>`` with Celery's default flags (mingle, gossip and
heartbeats on), wait until every one is ready, let them settle, then count over a window:

- ``commands_per_s``: Redis commands per second (``INFO commandstats`` calls, the bench's own
  ``INFO`` left out), and per command name (``commands``);
- ``redis_cpu_pct``: redis-server's CPU time (``INFO cpu``, user + system) over the window's
  wall time, in % of one core;
- ``worker_cpu_pct``: the CPU time of every worker's process tree (from /proc) over the
  window's wall time, in % of one core; ``worker_rss_mb``: their resident memory at its end.

Nothing but the workers talks to Redis meanwhile: no client, no task. Then every worker is
stopped by its PID. Large points (``--reps``) are repeated and their medians reported; each
repetition starts the deployment anew, the two sides interleaved so both see the same load.

A cost model, ``a + b·workers + c·workers² + d·workers·queues + e·queues``, is fitted to the
medians of each side and metric (least squares of the relative errors, no negative
coefficient) and projected to deployments larger than the machine can hold (``PROJECT``).
Method and numbers: docs/performance.md, "Idle cost".
"""

import argparse
import os
import re
import signal
import sys
import time
from datetime import datetime, timezone
from statistics import median

from . import report
from .procs import ROOT, BenchServer, Worker, process_tree_usage

RESULTS = ROOT / "bench" / "results"

WORKERS = (1, 10, 20)
QUEUES = (1, 20, 200)
#: Seconds counted: whole periods of both transports' timers (Celery's heartbeat every 2 s;
#: sheppy's upkeep every 5, 15 and 30 s), so a window does not catch a timer once or twice by luck.
WINDOW = 30.0
#: Seconds between the last worker's ``ready`` and the window: a worker's mingle asks the
#: others, and gossip reacts to each new worker's first heartbeats, just after it started.
SETTLE = 5.0
#: Seconds between two worker starts: 20 Celery processes importing at once on 2 CPUs
#: take longer together than one after the other, and each start is then a clean mingle.
STAGGER = 0.5
#: The pool of every worker. Not the default prefork pool (as many children as CPUs): 20
#: workers would be 60 processes on a 2-CPU machine. An idle pool does not talk to Redis;
#: the broker connection, heartbeats, gossip, mingle and remote control all live in the
#: worker's main process whatever the pool, so threads measure the same Redis traffic.
POOL, CONCURRENCY = "threads", 2
#: Points repeated ``--reps`` times: the ones whose CPU figures matter and vary most.
LARGE_WORKERS, LARGE_QUEUES = 10, 200
#: Deployments the model projects to: (workers, queues).
PROJECT = ((100, 500), (500, 500))
#: The model's terms: (name, what it stands for, its value at a point).
TERMS = (
    ("a", "1", lambda workers, queues: 1.0),
    ("b", "workers", lambda workers, queues: float(workers)),
    ("c", "workers²", lambda workers, queues: float(workers * workers)),
    ("d", "workers·queues", lambda workers, queues: float(workers * queues)),
    ("e", "queues", lambda workers, queues: float(queues)),
)
METRICS = (("commands_per_s", "Redis commands/s"), ("redis_cpu_pct", "Redis CPU %"),
           ("worker_cpu_pct", "workers' CPU %"))


def queue_names(queues):
    return [f"q{i}" for i in range(queues)]


def measure(side, server, workers, queues, window=WINDOW, settle=SETTLE, stagger=STAGGER):
    """One idle deployment of ``workers`` × ``queues`` on ``side``, on a fresh ``server``."""
    server.reset()
    started = []
    try:
        for _ in range(workers):
            started.append(Worker(side.broker, side.backend, POOL, CONCURRENCY,
                                  queues=queue_names(queues)))
            time.sleep(stagger)
        deadline = time.monotonic() + 60 + 10 * workers  # generous: a loaded machine is slow
        while not all(worker.is_ready() for worker in started):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sum(not w.is_ready() for w in started)} of {workers} "
                                   "workers not ready")
            time.sleep(0.1)
        time.sleep(settle)

        pids = [worker.process.pid for worker in started]
        redis_cpu, (worker_cpu, _) = server.cpu_seconds(), process_tree_usage(pids)
        calls, begin = server.commandstats(), time.monotonic()
        time.sleep(window)
        calls_after, end = server.commandstats(), time.monotonic()
        redis_cpu_after, (worker_cpu_after, rss) = server.cpu_seconds(), process_tree_usage(pids)
        clients = server.admin.info("clients")["connected_clients"] - 1  # not the bench's own
        load = os.getloadavg()[0]  # at the end: the 1-minute average then is mostly the window's
        for worker in started:
            worker.check()  # a worker that died in the window spoils the count
    except BaseException:
        for worker in started:
            if worker.process.poll() is not None:
                print(f"worker log (end):\n{worker.tail()}", file=sys.stderr)
                break
        raise
    finally:
        for worker in started:  # all warm shutdowns at once, then wait for each
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in started:
            worker.stop()
        server.drop_clients()

    seconds = end - begin
    delta = {name: n - calls.get(name, 0) for name, n in calls_after.items()}
    return {
        "commands_per_s": sum(delta.values()) / seconds,
        "commands": {name: n / seconds for name, n in delta.items() if n},
        "redis_cpu_pct": 100 * (redis_cpu_after - redis_cpu) / seconds,
        "worker_cpu_pct": 100 * (worker_cpu_after - worker_cpu) / seconds,
        "worker_rss_mb": rss / 2**20,
        "clients": clients,
        "load": load,  # 1-minute load average at the window's end
    }


# -- the cost model ---------------------------------------------------------------------------

def fit(points):
    """Coefficients ``{name: value}`` of :data:`TERMS` fitted to ``[(workers, queues, value)]``.

    Weighted least squares with weights 1/value: the fit minimises relative errors, so that a
    point of 1.5 commands/s counts as much as one of 3 000 (plain least squares would fit the
    largest points and miss the small ones by more than they are worth). No coefficient may be
    negative: each term is a cost. An unconstrained fit gives a cost that does not exist a
    small negative value out of noise, which a projection to 500 workers multiplies by 250 000
    (workers²); so this is the best fit over the subsets of terms whose own fit has no negative
    coefficient (the non-negative least-squares solution), terms left out at 0. None when
    there are fewer points than terms or a value is not positive.
    """
    if len(points) < len(TERMS) or any(value <= 0 for _, _, value in points):
        return None
    rows = [[term(w, q) / value for _, _, term in TERMS] for w, q, value in points]
    best, best_error = None, None
    for used in range(1, 2 ** len(TERMS)):  # every non-empty subset of the terms, as bits
        columns = [j for j in range(len(TERMS)) if used >> j & 1]
        solution = _least_squares([[row[j] for j in columns] for row in rows])
        if solution is None or min(solution) < 0:
            continue
        coefficients = [0.0] * len(TERMS)
        for j, x in zip(columns, solution):
            coefficients[j] = x
        error = sum((sum(x * c for x, c in zip(row, coefficients)) - 1) ** 2 for row in rows)
        if best_error is None or error < best_error - 1e-15:
            best, best_error = coefficients, error
    return None if best is None else {name: x for (name, _, _), x in zip(TERMS, best)}


def _least_squares(rows):
    """``x`` minimising ``sum((row · x - 1)²)`` (rows already divided by their value), by the
    normal equations; None when they are singular."""
    n = len(rows[0])
    # Columns scaled to 1 at their largest, for the normal equations' sake.
    scale = [max(abs(row[j]) for row in rows) or 1.0 for j in range(n)]
    rows = [[x / s for x, s in zip(row, scale)] for row in rows]
    normal = [[sum(row[i] * row[j] for row in rows) for j in range(n)]
              + [sum(row[i] for row in rows)] for i in range(n)]
    solution = _solve(normal)
    return None if solution is None else [x / s for x, s in zip(solution, scale)]


def _solve(augmented):
    """Gaussian elimination with partial pivoting of an n × (n+1) matrix; None when singular."""
    m = [row[:] for row in augmented]
    n = len(m)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def predict(coefficients, workers, queues):
    return sum(coefficients[name] * term(workers, queues) for name, _, term in TERMS)


# -- running and reporting -------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.idle",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default=",".join(map(str, WORKERS)),
                        help=f"worker counts of the grid ({','.join(map(str, WORKERS))})")
    parser.add_argument("--queues", default=",".join(map(str, QUEUES)),
                        help=f"queue counts of the grid ({','.join(map(str, QUEUES))})")
    parser.add_argument("--window", type=float, default=WINDOW,
                        help=f"seconds counted per point ({WINDOW:g})")
    parser.add_argument("--settle", type=float, default=SETTLE,
                        help=f"seconds between the last worker ready and the window ({SETTLE:g})")
    parser.add_argument("--reps", type=int, default=3,
                        help=f"repetitions of the large points (>= {LARGE_WORKERS} workers or "
                        f">= {LARGE_QUEUES} queues); the others run once (3)")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the tables as Markdown (docs/performance.md)")
    args = parser.parse_args(argv)
    args.workers = [int(n) for n in args.workers.split(",")]
    args.queues = [int(n) for n in args.queues.split(",")]
    return args


def repetitions(workers, queues, reps):
    return reps if workers >= LARGE_WORKERS or queues >= LARGE_QUEUES else 1


def run(server, sides, grid, reps, window, settle, errors, log=print):
    """``{side: {(workers, queues): [sample, ...]}}`` over ``grid``, sides interleaved."""
    samples = {side.name: {} for side in sides}
    for rep in range(max(repetitions(w, q, reps) for w, q in grid)):
        for workers, queues in grid:
            if rep >= repetitions(workers, queues, reps):
                continue
            for side in sides:
                began = time.monotonic()
                try:
                    out = measure(side, server, workers, queues, window, settle)
                except Exception as exc:
                    errors.append(f"idle {workers}x{queues} on {side.name} "
                                  f"(repetition {rep + 1}): {exc!r}")
                    log(f"FAILED: {errors[-1]}")
                    continue
                samples[side.name].setdefault((workers, queues), []).append(out)
                log(f"[{rep + 1}] idle {workers:>3} workers x {queues:>3} queues {side.name:<7}"
                    f"{time.monotonic() - began:6.1f} s  {out['commands_per_s']:9.2f} cmd/s  "
                    f"Redis CPU {out['redis_cpu_pct']:5.2f} %  workers' CPU "
                    f"{out['worker_cpu_pct']:6.2f} %  RSS {out['worker_rss_mb']:6.0f} MB  "
                    f"load {out['load']:.2f}")
    return samples


def medians(samples):
    """``{side: {point: {metric: median, "commands": {name: median}, "n": reps}}}``."""
    out = {}
    for side, by_point in samples.items():
        for point, runs in by_point.items():
            names = {name for r in runs for name in r["commands"]}
            out.setdefault(side, {})[point] = {
                **{metric: median(r[metric] for r in runs)
                   for metric in ("commands_per_s", "redis_cpu_pct", "worker_cpu_pct",
                                  "worker_rss_mb", "clients")},
                "commands": dict(sorted(((name, median(r["commands"].get(name, 0.0) for r in runs))
                                         for name in names), key=lambda item: -item[1])),
                "n": len(runs),
            }
    return out


def models(table):
    """``{side: {metric: coefficients or None}}`` fitted to the medians."""
    return {side: {metric: fit([(w, q, m[metric]) for (w, q), m in by_point.items()])
                   for metric, _ in METRICS}
            for side, by_point in table.items()}


def grid_rows(table, sides):
    head = ["workers x queues", *(f"{s} cmd/s" for s in sides), f"{sides[-1]}/{sides[0]}",
            *(f"{s} Redis CPU %" for s in sides), *(f"{s} workers' CPU %" for s in sides),
            *(f"{s} RSS MB" for s in sides), "reps"]
    body = []
    points = sorted({p for s in sides for p in table.get(s, {})})
    for point in points:
        got = [table.get(s, {}).get(point) for s in sides]
        first, last = got[0], got[-1]
        ratio = (last["commands_per_s"] / first["commands_per_s"]
                 if first and last and first["commands_per_s"] else None)
        body.append([f"{point[0]} x {point[1]}",
                     *(report.fmt(g and g["commands_per_s"]) for g in got),
                     "-" if ratio is None else f"{ratio:.1f}x",
                     *(report.fmt(g and g["redis_cpu_pct"]) for g in got),
                     *(report.fmt(g and g["worker_cpu_pct"]) for g in got),
                     *(report.fmt(g and g["worker_rss_mb"]) for g in got),
                     "/".join(str(g["n"]) if g else "-" for g in got)])
    return head, body


def top_commands(by_name, count=6):
    total = sum(by_name.values()) or 1.0
    return ", ".join(f"{name} {n:.2f} ({100 * n / total:.0f} %)"
                     for name, n in list(by_name.items())[:count])


def model_rows(fitted, sides):
    head = ["side", "metric", *(f"{name} ({what})" for name, what, _ in TERMS),
            *(f"{w} x {q}" for w, q in PROJECT)]
    body = []
    for side in sides:
        for metric, label in METRICS:
            coefficients = fitted.get(side, {}).get(metric)
            if coefficients is None:
                continue
            body.append([side, label, *(f"{coefficients[name]:.4g}" for name, _, _ in TERMS),
                         *(report.fmt(predict(coefficients, w, q)) for w, q in PROJECT)])
    return head, body


def fit_check_rows(table, fitted, sides):
    """Measured against fitted commands/s at each point: how well the model holds."""
    head = ["workers x queues", *(f"{s} measured / fitted" for s in sides)]
    body = []
    if not any(fitted.get(side, {}).get("commands_per_s") for side in sides):
        return head, body
    for point in sorted({p for s in sides for p in table.get(s, {})}):
        cells = []
        for side in sides:
            got, coefficients = table.get(side, {}).get(point), fitted.get(side, {}).get(
                "commands_per_s")
            cells.append("-" if not got or not coefficients else
                         f"{report.fmt(got['commands_per_s'])} / "
                         f"{report.fmt(predict(coefficients, *point))}")
        body.append([f"{point[0]} x {point[1]}", *cells])
    return head, body


def markdown(head, body):
    def cell(text):  # "20 x 200", "2.4x" as "20 × 200", "2.4×"
        return re.sub(r"(\d)x\b", r"\1×", str(text).replace(" x ", " × "))

    lines = ["| " + " | ".join(map(cell, head)) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in body]
    return "\n".join(lines)


def show(table, fitted, sides, md=False, log=print):
    tables = [("grid", grid_rows(table, sides)), ("model", model_rows(fitted, sides)),
              ("fit", fit_check_rows(table, fitted, sides))]
    for _, (head, body) in tables:
        if body:
            log("")
            log(report._columns(head, body))
    for point in sorted({p for s in sides for p in table.get(s, {})}):
        for side in sides:
            got = table.get(side, {}).get(point)
            if got:
                log(f"top commands/s, {point[0]} x {point[1]}, {side}: "
                    + top_commands(got["commands"]))
    if md:
        for _, (head, body) in tables:
            if body:
                log("")
                log(markdown(head, body))
    return {name: markdown(head, body) for name, (head, body) in tables}


def smoke(server, sides, errors, log=print):
    """The smallest point, 1 worker × 1 queue over 2 s: keeps this code working in CI."""
    samples = run(server, sides, [(1, 1)], 1, window=2.0, settle=0.5, errors=errors, log=log)
    table = medians(samples)
    show(table, {}, [side.name for side in sides], log=log)
    return samples


def main(argv=None):
    from .__main__ import choose_sides, installed  # the bench's own side selection

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(timezone.utc)
    grid = [(w, q) for w in args.workers for q in args.queues]
    server = BenchServer()
    errors = []
    try:
        sides, notes, _ = choose_sides(server)
        sides = [side for side in sides if side.on_redis and not side.cluster]
        for note in notes:
            if "rabbitmq" not in note.lower():
                print(f"note: {note}")
        load_before = os.getloadavg()
        samples = run(server, sides, grid, args.reps, args.window, args.settle, errors)
        load_after = os.getloadavg()
        redis_version = server.version
    finally:
        server.close()

    names = [side.name for side in sides]
    table = medians(samples)
    fitted = models(table)
    tables = show(table, fitted, names, md=args.markdown)
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    data = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": {**vars(args), "pool": POOL, "concurrency": CONCURRENCY, "stagger": STAGGER},
        "machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after},
        "versions": {"redis-server": redis_version,
                     **{name: installed(name) for name in ("celery", "kombu", "redis",
                                                            "celery-sheppy")}},
        "sides": {side.name: {"broker": side.broker, "backend": side.backend} for side in sides},
        "errors": errors,
        "samples": {side: {f"{w}x{q}": runs for (w, q), runs in by_point.items()}
                    for side, by_point in samples.items()},
        "medians": {side: {f"{w}x{q}": m for (w, q), m in by_point.items()}
                    for side, by_point in table.items()},
        "models": fitted,
        "markdown": tables,
    }
    path = RESULTS / f"idle-{started:%Y%m%dT%H%M%SZ}.json"
    report.write_json(path, data)
    print(f"results: {path.relative_to(ROOT)}")
    for error in errors:
        print(f"FAILED: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m bench.worker_profile: where a draining worker's main process spends its time.

For each side (stock ``redis://``, ``sheppy://``, and RabbitMQ ``amqp://`` + ``rpc://`` when
one listens on localhost:5672): ``--tasks`` noops are enqueued with no
worker running, then ``celery worker -P prefork -c 2`` (Celery's defaults, as in the
bench) starts under cProfile and drains them while the bench waits on the results, as
in the drain scenario. Printed per side: the drain rate, the CPU seconds of the main
process and of the pool children against the drain's wall time (a process near 100 %
is the bottleneck), and the own time by layer (Celery, kombu, redis-py, celery-sheppy,
...) of the main process and of the pool children, with the most expensive functions.
The profiler slows Python down, so its rates are lower than the bench's; the shares are
what it is for.
"""

import argparse
import glob
import os
import sys
import time

from celery.result import ResultSet

from . import __main__ as bench
from .app import make_app
from .procs import BenchServer, Worker
from .publish import show_profile
from .scenarios import Side, enqueue


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.worker_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000, help="tasks drained per side (3000)")
    parser.add_argument("--top", type=int, default=25, help="functions shown per side (25)")
    args = parser.parse_args(argv)
    server = BenchServer()
    try:
        sides = [Side(name, server.url_for(scheme), server.url_for(scheme))
                 for name, scheme in (("stock", "redis"), ("sheppy", "sheppy"))]
        if bench.rabbitmq_listens():
            sides.append(Side("rabbitmq", bench.RABBITMQ_URL, "rpc://", on_redis=False))
        for side in sides:
            name = side.name
            server.reset()
            app = make_app(side.broker, side.backend, current=False)
            if not side.on_redis:
                app.control.purge()  # RabbitMQ is not ours to flush: empty the bench's queue
            results, _ = enqueue(app, args.tasks)
            path = os.path.join(server.dir, f"{name}-worker.prof")
            with Worker(side.broker, side.backend, "prefork", 2, profile_to=path) as worker:
                start = time.perf_counter()
                ResultSet(results, app=app).get(timeout=600, on_interval=worker.check)
                wall = time.perf_counter() - start
                main_cpu, children_cpu = worker.cpu_seconds()
            app.close()
            server.drop_clients()
            done = sorted(result.date_done for result in results)
            rate = (len(done) - 1) / (done[-1] - done[0]).total_seconds()
            print(f"\n{name}: {rate:,.0f} tasks/s under the profiler; from worker start to the "
                  f"last result {wall:.1f} s: main process {main_cpu:.1f} s CPU "
                  f"({main_cpu / wall:.0%}), pool children {children_cpu:.1f} s "
                  f"({children_cpu / wall / 2:.0%} of each)")
            show_profile(f"{name} worker main process", path, len(results), args.top)
            children = sorted(glob.glob(os.path.join(server.dir, "child-*.prof")))
            if children:
                show_profile(f"{name} pool children (both)", children, len(results), args.top)
            for child in children:
                os.unlink(child)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

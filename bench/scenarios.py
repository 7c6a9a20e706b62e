"""The measurements. Each one runs one side (a broker and a result backend) on an empty server.

Times are wall-clock seconds from ``time.perf_counter`` in the bench process,
except drain rates, which come from the workers' own completion times.
"""

import random
import time
from dataclasses import dataclass, replace
from statistics import mean
from urllib.parse import urlsplit

from celery import chord, group, states
from celery.result import ResultSet
from celery.utils import uuid

from celery_sheppy.backend.stores import STREAM_KEEP_SECONDS

from .app import COUNT, NOOP, make_app
from .procs import BenchServer, Worker

#: Calls before the round-trip samples: connections opened, pool children warm.
WARM_UP_CALLS = 20
#: Result keys whose MEMORY USAGE is read after a drain.
KEY_SAMPLE = 100
#: Seconds the worker is left alone after the canvas work before idle counting starts.
IDLE_SETTLE = 2.0


@dataclass(frozen=True)
class Side:
    name: str
    broker: str
    backend: str
    on_redis: bool = True  # False for RabbitMQ + rpc://: no Redis counters, no chords
    cluster: bool = False  # runs on the local Redis Cluster, not the bench's redis-server

    def on(self, server):
        """The same side on another of our redis-servers (its URLs' port changed)."""
        def moved(url):
            parts = urlsplit(url)
            return parts._replace(netloc=f"{parts.hostname}:{server.port}").geturl()

        return replace(self, broker=moved(self.broker), backend=moved(self.backend))


def _app(side, server):
    if side.on_redis:
        server.reset()
    app = make_app(side.broker, side.backend, current=False)
    if not side.on_redis:
        app.control.purge()  # RabbitMQ is not ours to flush: empty the bench's queue
    return app


def _finish(side, server, app):
    if side.on_redis:
        server.drop_clients()
    app.close()


def drain(side, server, pool, concurrency, tasks, timeout):
    """Enqueue ``tasks`` noops with no worker running, then start a worker and get every result.

    - ``enqueue_rate``: tasks / duration of the ``delay()`` loop; one publish before
      it opens the connections.
    - ``drain_rate_<pool>``: (results - 1) / (last - first ``date_done``): the worker's
      own rate from first to last completion, its start-up left out. Meanwhile the
      bench waits on ``ResultSet.get()``, as an application would.
    - ``commands_per_task_<pool>`` (and by command, ``commands_<pool>``): the
      ``INFO commandstats`` calls of the whole run, enqueue to worker stop, per task.
    - ``memory_per_result``: ``MEMORY USAGE`` summed over every key left right after
      the run (a burst), per task: result records plus whatever else a result leaves
      (streams, counters, bindings); :class:`RetentionWindow` reads it again later.
      ``result_key_bytes``: mean ``MEMORY USAGE`` of sampled result keys alone.
      ``used_memory_per_result``: ``used_memory`` after the run (worker stopped, every
      connection closed) minus before it, per task; it also counts the growth of
      Redis's own hash tables (keys, expiries, pub/sub channels).
    """
    app = _app(side, server)
    memory_before = server.used_memory() if side.on_redis else None
    results, enqueued = enqueue(app, tasks)
    _drain(side, app, results, pool, concurrency, timeout)
    done = sorted(result.date_done for result in results)
    out = {"enqueue_rate": tasks / enqueued,
           f"drain_rate_{pool}": (len(done) - 1) / (done[-1] - done[0]).total_seconds()}
    if side.on_redis:
        calls = server.commandstats()
        sample = random.sample(results, min(KEY_SAMPLE, len(results)))
        key_bytes = [server.key_bytes(app.backend.get_key_for_task(result.id))
                     for result in sample]
    _finish(side, server, app)  # before used_memory: open connections hold buffers
    if side.on_redis:
        out.update({
            f"commands_per_task_{pool}": sum(calls.values()) / len(results),
            f"commands_{pool}": {name: n / len(results) for name, n in calls.items()},
            "memory_per_result": server.keyspace_bytes() / len(results),
            "result_key_bytes": mean(key_bytes),
            "used_memory_per_result": (server.used_memory() - memory_before) / len(results),
        })
    return out


def enqueue(app, tasks):
    """``(results, seconds)``: one ``delay()`` to open the connections, then ``tasks`` timed."""
    noop = app.tasks[NOOP]
    results = [noop.delay()]
    start = time.perf_counter()
    results += [noop.delay() for _ in range(tasks)]
    return results, time.perf_counter() - start


def _drain(side, app, results, pool, concurrency, timeout):
    with Worker(side.broker, side.backend, pool, concurrency) as worker:
        ResultSet(results, app=app).get(timeout=timeout, on_interval=worker.check)


class RetentionWindow:
    """Memory per stored result once the finished stream's retention window has passed.

    :meth:`begin` stores a burst of results on a redis-server of its own (enqueue,
    drain with ``-P prefork -c 2``, worker stopped); the other scenarios of the
    repetition run meanwhile. :meth:`end` waits until the window (sheppy's
    ``STREAM_KEEP_SECONDS``, plus a second) has passed since the last result, stores one
    more result through the backend (a terminal result trims the finished stream, as it
    does in production), and reads ``MEMORY USAGE`` over every key per stored result:
    ``memory_per_result_window``, the steady state of a queue that keeps working.
    ``wait=False`` (smoke runs) skips the wait: the figure is then the burst's.
    """

    def __init__(self, side, tasks, timeout, wait=True):
        self.side, self.tasks, self.timeout, self.wait = side, tasks, timeout, wait
        self.server = self.app = self.results = self.last_done = None

    def begin(self):
        self.server = BenchServer()
        try:
            side = self.side.on(self.server)
            self.app = make_app(side.broker, side.backend, current=False)
            self.results, _ = enqueue(self.app, self.tasks)
            _drain(side, self.app, self.results, "prefork", 2, self.timeout)
            self.last_done = time.monotonic()
            self.server.drop_clients()
        except BaseException:
            self.close()
            raise
        return self

    def end(self):
        try:
            if self.wait:  # else (smoke runs) only the code is exercised
                time.sleep(max(0.0, self.last_done + STREAM_KEEP_SECONDS + 1 - time.monotonic()))
            self.app.backend.store_result(uuid(), None, states.SUCCESS)
            self.app.close()
            self.app = None
            self.server.drop_clients()
            return {"memory_per_result_window":
                    self.server.keyspace_bytes() / (len(self.results) + 1)}
        finally:
            self.close()

    def close(self):
        if self.app is not None:
            self.app.close()
            self.app = None
        if self.server is not None:
            self.server.close()
            self.server = None


def warm_worker(side, server, round_trips, canvas, idle_seconds, timeout):
    """Round trips, a group, a chord, then idleness, on one warm ``-P prefork -c 2`` worker.

    - ``round_trip_ms``: every ``delay().get()`` time of ``round_trips`` sequential
      calls; ``rtt_p50_ms`` / ``rtt_p99_ms`` their percentiles.
    - ``group_s``: ``group`` of ``canvas`` noops given as a generator, from ``apply_async``
      to ``get()`` returned; ``group_list_s``: the same given as a list (sheppy:// sends
      a list group in batches, a generator group task by task, as Celery does).
    - ``chord_s``: the same with a body that counts the header results.
    - ``idle_per_s`` (and by command, ``idle_commands``): Redis commands per second while
      nothing is sent, over ``idle_seconds``; the worker consumes one queue, so it is
      also the rate per queue. The bench's client connections are open and idle.
    """
    app = _app(side, server)
    noop, count = app.tasks[NOOP], app.tasks[COUNT]
    out = {}
    with Worker(side.broker, side.backend, "prefork", 2) as worker:
        worker.wait_ready(timeout)
        for _ in range(WARM_UP_CALLS):
            noop.delay().get(timeout=timeout)
        latencies = []
        for _ in range(round_trips):
            start = time.perf_counter()
            noop.delay().get(timeout=timeout)
            latencies.append((time.perf_counter() - start) * 1000)
        out.update(round_trip_ms=latencies, rtt_p50_ms=percentile(latencies, 50),
                   rtt_p99_ms=percentile(latencies, 99))

        start = time.perf_counter()
        group(noop.s() for _ in range(canvas)).apply_async().get(timeout=timeout)
        out["group_s"] = time.perf_counter() - start

        start = time.perf_counter()
        group([noop.s() for _ in range(canvas)]).apply_async().get(timeout=timeout)
        out["group_list_s"] = time.perf_counter() - start

        if side.on_redis:  # the rpc:// backend has no chords
            start = time.perf_counter()
            got = chord(noop.s() for _ in range(canvas))(count.s()).get(timeout=timeout)
            out["chord_s"] = time.perf_counter() - start
            if got != canvas:
                raise AssertionError(f"chord body saw {got} header results, not {canvas}")

            time.sleep(IDLE_SETTLE)
            server.reset_stats()
            time.sleep(idle_seconds)
            calls = server.commandstats()
            out.update(idle_per_s=sum(calls.values()) / idle_seconds,
                       idle_commands={name: n / idle_seconds for name, n in calls.items()})
    _finish(side, server, app)
    return out


def percentile(values, pct):
    """Nearest-rank percentile: a value that was measured, no interpolation."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * pct // 100) - 1)]

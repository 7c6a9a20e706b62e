"""What Celery lacks across workers, in sheppy's layout: global rate limits, unique
tasks, a leaderless beat (docs/features.md holds the figures these tests measure).

Every test starts its own redis-server and real ``celery worker`` / ``celery beat``
processes with Celery's defaults; runs are counted in a side Redis the system under
test never touches.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from celery_sheppy import keys
from conftest import ROOT, Worker, client_app

TASKS = "t.integration.tasks"
QUEUE = "celery"

#: The side Redis that tasks count their runs in (set by the ``counter`` fixture).
COUNTER_URL = []


@pytest.fixture(autouse=True)
def counter(side_redis):
    client = side_redis.client()
    client.flushdb()
    COUNTER_URL[:] = [side_redis.url]
    yield client
    client.close()


@pytest.fixture
def workers():
    started = []
    yield started
    for worker in started:
        worker.stop()


def start_worker(server, concurrency=4, pool="threads", conf=None):
    url = server.sheppy_url()
    return Worker(url, url, pool=pool, concurrency=concurrency,
                  extra_env={"CELERY_SHEPPY_CONF": json.dumps(conf or {}),
                             "CELERY_SHEPPY_COUNTER_URL": COUNTER_URL[0]})


def sig(app, name, *args, **options):
    return app.signature(f"{TASKS}.{name}", args=args, **options)


def starts(client, key):
    """Start times recorded by ``limited``-style tasks, sorted."""
    return sorted(json.loads(item)[0] for item in client.lrange(key, 0, -1))


def max_in_window(times, window=1.0):
    """The most of ``times`` in any half-open window ``[t, t + window)``."""
    best, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def wait_until(predicate, timeout, interval=0.2, message="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# -- global rate limits ------------------------------------------------------------------------

RATE = 20  # per second: t.integration.tasks.limited
LOAD_SECONDS = 30


@pytest.mark.slow
def test_global_rate_limit_holds_across_three_workers_and_uses_95_percent_of_it(
        make_redis_server, workers, counter):
    # Given a task limited to 20/s globally, far more of it waiting than the limit
    # allows in LOAD_SECONDS, and 3 workers x 4 threads
    server = make_redis_server()
    client = server.client()
    app = client_app(server.sheppy_url(), server.sheppy_url())
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(RATE * LOAD_SECONDS + 300):
                sig(app, "limited", "runs").apply_async(producer=producer)
        # When the workers run it
        workers.extend(start_worker(server) for _ in range(3))
        wait_until(lambda: counter.llen("runs") and
                   time.time() - starts(counter, "runs")[0] > LOAD_SECONDS + 1,
                   LOAD_SECONDS + 30, message="the load to run")

        # Then no 1 s window holds more than 20 starts, and at least 95 % of the allowed
        # starts happened
        times = starts(counter, "runs")
        span = [at for at in times if at < times[0] + LOAD_SECONDS]
        rate = len(span) / LOAD_SECONDS
        print(f"rate limit 20/s over {LOAD_SECONDS} s: {rate:.2f}/s, "
              f"max {max_in_window(span)} in a 1 s window")
        assert max_in_window(times) <= RATE
        assert rate >= 0.95 * RATE
        # and each worker ran its share (the limit is global, not per worker)
        hosts = Counter(json.loads(item)[1] for item in counter.lrange("runs", 0, -1))
        assert len(hosts) == 3
        # and the messages over the limit waited in the scheduled set, not in prefetch
        assert client.zcard(keys.scheduled_set(QUEUE)) > 100
        assert not client.exists(keys.dead_letter_stream(QUEUE))
    finally:
        app.close()


def test_celery_per_worker_rate_limit_still_applies(make_redis_server, workers, counter):
    # Given a worker and a task with Celery's own rate_limit="4/s"
    server = make_redis_server()
    workers.append(start_worker(server, concurrency=2))
    app = client_app(server.sheppy_url(), server.sheppy_url())
    try:
        # When 9 are sent at once
        results = [sig(app, "worker_limited", "w").delay() for _ in range(9)]
        for result in results:
            result.get(timeout=30)
        # Then they start at Celery's pace: 9 starts take about 2 s, not a moment
        times = starts(counter, "w")
        assert times[-1] - times[0] >= 1.5
    finally:
        app.close()

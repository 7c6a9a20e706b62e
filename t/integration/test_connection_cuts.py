"""Connection cuts and Redis restarts while a default worker holds tasks (issue 19).

A worker with Celery's defaults keeps countdown tasks in memory until they are due,
prefetches, and sends its acks without waiting. Each test cuts its connections
(``CLIENT KILL``) or restarts Redis (SIGKILL, then the append-only file) at such a
moment and counts every run in a side Redis the server under test never touches.
Workers use a short lease (LEASE seconds) so the tests finish quickly.
"""

import json
import time
from collections import Counter

import pytest

from conftest import Worker, client_app

pytestmark = pytest.mark.usefixtures("counter")

TASKS = "t.integration.tasks"
LEASE = 4  # seconds: the workers' visibility_timeout in these tests


def settings(**conf):
    return dict({"broker_transport_options": {"visibility_timeout": LEASE}}, **conf)


def start(server, pool="prefork", concurrency=2, **conf):
    url = server.sheppy_url()
    return Worker(url, url, pool=pool, concurrency=concurrency,
                  extra_env={"CELERY_SHEPPY_CONF": json.dumps(settings(**conf))})


def runs(counter, key):
    """``[(value, worker, time), ...]`` that the ``tracked`` tasks recorded."""
    return [tuple(json.loads(item)) for item in counter.lrange(key, 0, -1)]


def wait_until(predicate, timeout, message, interval=0.2):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
def test_countdown_tasks_held_by_a_worker_whose_connection_is_cut_run_once_when_due(
        make_redis_server, workers, counter, pool, acks_late):
    # Given a default worker holding 5 countdown tasks in memory (due in 8 s)
    server = make_redis_server()
    worker = start(server, pool=pool)
    workers.append(worker)
    url = server.sheppy_url()
    app = client_app(url, url, **settings())
    task = "tracked" if acks_late else "tracked_early_ack"
    sent = time.time()
    results = [app.signature(f"{TASKS}.{task}", args=("eta", n)).apply_async(countdown=8)
               for n in range(5)]
    wait_until(lambda: worker.output().count("] received") >= 5, 30, "the worker to hold them")

    # When its connections are cut 2 s later (it reconnects and lives on)
    time.sleep(2)
    assert server.client().client_kill_filter(_type="normal", skipme=True) >= 1

    # Then each runs exactly once, when due and within one lease of it
    assert [r.get(timeout=8 + 3 * LEASE) for r in results] == list(range(5))
    time.sleep(2 * LEASE)  # a second run (a reclaim of a lease nobody renews) comes by now
    recorded = runs(counter, "eta")
    assert Counter(value for value, _, _ in recorded) == {n: 1 for n in range(5)}
    assert all(sent + 8 - 0.5 <= at <= sent + 8 + LEASE for _, _, at in recorded), recorded
    app.close()

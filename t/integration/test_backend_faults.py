"""The sheppy:// result backend when Redis restarts, goes away or refuses a value."""

import threading
import time
import uuid

import pytest
import redis
from celery import chord, states
from celery.exceptions import BackendStoreError

from celery_sheppy import keys
from t.helpers import client_app, sig, start_worker

#: Result stores retried through a Redis restart
RETRY_STORES = {"result_backend_always_retry": True, "result_backend_max_retries": 100}
QUICK_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def wait_for_started(results, count, timeout=20):
    """Wait (at most ``timeout`` s) until ``count`` of ``results`` are STARTED."""
    deadline = time.monotonic() + timeout
    while sum(r.state == states.STARTED for r in results) < count and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def durable_server(make_redis_server):
    """A server that keeps its data across a SIGKILL (append-only file, fsync always)."""
    return make_redis_server("--appendonly", "yes", "--appendfsync", "always")


@pytest.mark.slow
def test_redis_restart_while_waiters_block_loses_no_result(durable_server):
    # Given 20 waiters blocked on 20 running tasks of a worker that retries result writes
    # (all 20 run at once: the stock redis:// broker used here would hold back prefetched
    # messages for its hour-long visibility timeout after a restart)
    broker = durable_server.url.replace("/0", "/1")
    backend = durable_server.sheppy_url()
    worker = start_worker(broker, RETRY_STORES, backend=backend, pool="threads", concurrency=20)
    app = client_app(broker, backend)
    try:
        results = [sig(app, "sleep", 3.0).delay() for _ in range(20)]
        wait_for_started(results, 20)
        got, errors = [], []

        def wait(result):
            try:
                got.append(result.get(timeout=60))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=wait, args=(r,)) for r in results]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        # When Redis is killed and comes back two seconds later, while the tasks still run
        durable_server.restart(downtime=2.0)
        for thread in threads:
            thread.join(90)
        # Then every waiter has its result
        assert not errors
        assert got == [3.0] * 20
    finally:
        worker.stop()
        app.close()


@pytest.mark.slow
def test_redis_restart_while_a_prefork_worker_stores_results_loses_none(durable_server):
    # Given a prefork worker (its children send result stores without waiting for the
    # reply: celery_sheppy/backend/deferred_stores.py) running 8 tasks, 4 at a time
    url = durable_server.sheppy_url()
    worker = start_worker(url, RETRY_STORES, pool="prefork", concurrency=4)
    app = client_app(url, url)
    try:
        results = [sig(app, "sleep", 1.5).delay() for _ in range(8)]
        wait_for_started(results, 4)
        # When Redis is killed and comes back a second later, while 4 of them run
        durable_server.restart(downtime=1.0)
        # Then every result is stored
        assert [r.get(timeout=60) for r in results] == [1.5] * 8
    finally:
        worker.stop()
        app.close()


def test_a_store_redis_refuses_in_a_prefork_child_is_logged_with_its_task_id(make_redis_server):
    # Given a prefork worker whose result backend is a server of its own
    broker, backend = make_redis_server(), make_redis_server()
    worker = start_worker(broker.sheppy_url(), backend=backend.sheppy_url(), pool="prefork",
                          concurrency=1)
    app = client_app(broker.sheppy_url(), backend.sheppy_url())
    try:
        add = sig(app, "add", 1, 1)
        assert add.delay().get(timeout=30) == 2
        # When the backend's server refuses writes (maxmemory reached, noeviction) for a task
        backend.client().config_set("maxmemory", 1)
        refused = add.delay()
        text = f"the result of task {refused.id} was not stored: command not allowed when used memory"
        worker.wait_for_log(text, timeout=30)
        # Then the refusal is logged with the task's id, nothing is stored for it, and
        # the worker stores the next results once the server takes writes again
        backend.client().config_set("maxmemory", 0)
        assert refused.state == states.PENDING
        assert add.delay().get(timeout=30) == 2
        assert worker.process.poll() is None
    finally:
        worker.stop()
        app.close()


def test_get_raises_a_clear_error_when_redis_is_down_instead_of_hanging(make_redis_server):
    server = make_redis_server()
    app = client_app(server.url.replace("/0", "/1"), server.sheppy_url(),
                     result_backend_transport_options={"retry_policy": QUICK_RETRY})
    result = app.AsyncResult(str(uuid.uuid4()))
    server.close()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="onnect"):
        result.get(timeout=None)
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_waiter_blocked_when_redis_dies_gets_an_error_after_the_retry_policy(make_redis_server):
    server = make_redis_server()
    app = client_app(server.url.replace("/0", "/1"), server.sheppy_url(),
                     result_backend_transport_options={"retry_policy": QUICK_RETRY})
    result = app.AsyncResult(str(uuid.uuid4()))  # never runs: the waiter blocks on the stream
    failure = []

    def wait():
        try:
            result.get(timeout=None)
        except Exception as exc:  # checked below
            failure.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(1.5)
    server.close()
    waiter.join(20)
    assert not waiter.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], redis.ConnectionError)
    assert "could not reconnect" in str(failure[0]) and server.sheppy_url()[:-2] in str(failure[0])


def test_result_over_the_servers_value_limit_gets_backend_store_error_and_keeps_the_connection(
        make_redis_server):
    server = make_redis_server("--proto-max-bulk-len", "1mb")
    app = client_app(server.url.replace("/0", "/1"), server.sheppy_url())
    try:
        backend = app.backend
        task_id = str(uuid.uuid4())
        with pytest.raises(BackendStoreError, match="proto-max-bulk-len"):
            backend.store_result(task_id, "x" * (2 * 1024 * 1024), states.SUCCESS)
        assert backend.client.ping()
        backend.store_result(task_id, "small", states.SUCCESS)
        assert app.AsyncResult(task_id).get(timeout=5) == "small"
    finally:
        app.close()
        server.close()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_task_with_an_oversize_result_fails_with_a_clear_error(make_redis_server, pool):
    server = make_redis_server("--proto-max-bulk-len", "1mb")
    broker, backend = server.url.replace("/0", "/1"), server.sheppy_url()
    worker = start_worker(broker, backend=backend, pool=pool, concurrency=2)
    app = client_app(broker, backend)
    try:
        result = sig(app, "big", 2 * 1024 * 1024).delay()
        with pytest.raises(BackendStoreError, match="value limit"):
            result.get(timeout=30)
        assert sig(app, "add", 1, 1).delay().get(timeout=30) == 2
    finally:
        worker.stop()
        app.close()
        server.close()


def test_result_write_is_not_retried_forever_for_a_non_connection_error(redis_server):
    # A script error is a bug, not an outage: it surfaces at once.
    app = client_app(redis_server.url, redis_server.sheppy_url())
    client = redis_server.client()
    task_id = str(uuid.uuid4())
    client.set(keys.finished_stream("celery"), "not a stream")
    try:
        with pytest.raises(redis.ResponseError):
            app.backend.store_result(task_id, 1, states.SUCCESS)
    finally:
        client.delete(keys.finished_stream("celery"))
        app.close()


def test_unreadable_record_fails_its_own_get_and_spares_other_waiters(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url())
    client = redis_server.client()
    bad, good = str(uuid.uuid4()), str(uuid.uuid4())
    bad_result, good_result = app.AsyncResult(bad), app.AsyncResult(good)
    outcome = {}

    def wait(name, result):
        try:
            outcome[name] = result.get(timeout=20 if name == "good" else 3)
        except Exception as exc:  # checked below
            outcome[name] = exc

    threads = [threading.Thread(target=wait, args=("bad", bad_result)),
               threading.Thread(target=wait, args=("good", good_result))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    # a foreign writer puts garbage where a record belongs, and announces it
    client.set(keys.task_record("celery", bad), b"\x00not json")
    client.xadd(keys.finished_stream("celery"), {"task_id": bad})
    client.xadd(keys.finished_stream("celery"), {"no_task_id": "x"})
    app.backend.store_result(good, "fine", states.SUCCESS)
    threads[1].join(20)
    assert outcome["good"] == "fine"
    with pytest.raises(Exception, match="not a JSON task record"):
        bad_result.get(timeout=1)
    threads[0].join(10)
    app.close()


@pytest.mark.slow
def test_chord_body_sent_while_the_brokers_redis_restarts_goes_once_it_is_back(
        make_redis_server, workers):
    # Given a worker of one thread that has sent a chord's body before (its producer
    # connection is open), the results on a second server, up all along. (A prefork child
    # sending the body here waited for the broker through its own reconnect in every run,
    # with or without the backend's retry: the threads pool is where the send failed.)
    pool = "threads"
    broker_server = make_redis_server("--appendonly", "yes", "--appendfsync", "always")
    broker, backend = broker_server.sheppy_url(), make_redis_server().sheppy_url()
    workers.start(broker, backend=backend, pool=pool, concurrency=1)
    app = client_app(broker, backend)
    try:
        assert chord([sig(app, "add", 1, 1)])(sig(app, "tsum")).get(timeout=30) == 2

        # When a chord's last part returns while the broker's Redis is down: killed 0.5 s
        # after the chord is sent, back 3 s later (Celery's own publish retries give up
        # within a second)
        result = chord([sig(app, "sleep", 1.0), sig(app, "sleep", 1.5)])(sig(app, "tsum"))
        time.sleep(0.5)
        broker_server.restart(downtime=3.0)

        # Then the body is sent once the broker is back, and runs: the chord is not failed
        assert result.get(timeout=60) == 2.5
    finally:
        app.close()

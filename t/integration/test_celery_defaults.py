"""Celery run the way users run it: `celery worker` with no extra flags (mingle, gossip
and heartbeat on), the `celery` commands, a restricted ACL user, events receivers that
stop. Each test is a regression test of a defect that only showed with these defaults.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from celery_sheppy import keys
from t.helpers import (RESTRICTED_ACL_USERS, ROOT, celery_cli, celery_command, client_app, sig,
                       start_worker, task_env, wait_until)


@pytest.fixture
def server(make_redis_server):
    return make_redis_server()


# -- the first task, and the first task after a reconnect ------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_worker_with_celery_defaults_runs_its_first_task_within_3_s_of_ready(server, pool):
    # Given a worker started with no extra flags (mingle asks its neighbours first)
    url = server.sheppy_url()
    worker = start_worker(url, pool=pool)
    ready = time.monotonic()
    app = client_app(url, url)
    try:
        # When the first task is sent
        result = sig(app, "add", 2, 2).delay()
        # Then it runs at once, not after the read that mingle left behind timed out
        assert result.get(timeout=60) == 4
        assert time.monotonic() - ready < 3
        assert "mingle: all alone" in worker.output()
        assert "no reply in time" not in worker.output()
    finally:
        app.close()
        worker.stop()


def test_worker_runs_tasks_within_3_s_after_its_connections_are_killed(server):
    # Given a worker with Celery's defaults that ran a task
    url = server.sheppy_url()
    worker = start_worker(url, pool="threads", concurrency=2)
    app = client_app(url, url)
    try:
        assert sig(app, "add", 1, 1).delay().get(timeout=20) == 2

        # When every client connection is killed (the worker reconnects and mingles again)
        assert server.client().client_kill_filter(_type="normal", skipme=True) >= 1
        wait_until(lambda: worker.output().count("mingle: all alone") >= 2, 30,
                   "the worker to reconnect")

        # Then the next task runs within 3 s
        started = time.monotonic()
        assert sig(app, "add", 2, 3).delay().get(timeout=60) == 5
        assert time.monotonic() - started < 3
    finally:
        app.close()
        worker.stop()


# -- a warm shutdown while tasks are prefetched ------------------------------------------------


@pytest.mark.parametrize("task", ["tracked_early_ack", "tracked"])  # acked at start / acks_late
def test_warm_shutdown_hands_its_prefetched_tasks_to_the_next_worker_at_once(
        server, counter, task):
    # Given a worker with Celery's defaults (prefetch 4 per process) holding more tasks
    # than it runs at once
    url = server.sheppy_url()
    worker = start_worker(url, pool="prefork", concurrency=2)
    app = client_app(url, url)
    successor = None
    try:
        results = [sig(app, task, "runs", n, 1.0).delay() for n in range(12)]
        wait_until(lambda: counter.llen("runs") >= 2, 30, "the first tasks to start")
        # When it is stopped the usual way (SIGTERM: warm shutdown, running tasks finish)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(30) == 0
        # Then the next worker runs the rest at once, not after a lease (30 s) ran out,
        # and every task ran exactly once
        successor = start_worker(url, pool="prefork", concurrency=2)
        started = time.monotonic()
        assert [r.get(timeout=60) for r in results] == list(range(12))
        assert time.monotonic() - started < 15
        values = sorted(json.loads(item)[0] for item in counter.lrange("runs", 0, -1))
        assert values == list(range(12))
    finally:
        app.close()
        worker.stop()
        if successor is not None:
            successor.stop()


# -- a restricted ACL user -------------------------------------------------------------------


@pytest.mark.parametrize("user", sorted(RESTRICTED_ACL_USERS))
def test_worker_runs_with_a_restricted_acl_user(restricted_acl_server, user):
    # Given a user denied @dangerous (no CLIENT UNBLOCK, CONFIG GET, INFO), or granted
    # only the categories docs/transport.md lists
    server = restricted_acl_server
    url = f"sheppy://{user}:{user}-pw@127.0.0.1:{server.port}/0"
    worker = start_worker(url, pool="threads", concurrency=2)
    ready = time.monotonic()
    app = client_app(url, url)
    try:
        # Then tasks run from the start, remote control answers, and the worker says why
        # its reads are short
        assert sig(app, "add", 2, 2).delay().get(timeout=60) == 4
        assert time.monotonic() - ready < 3
        assert sig(app, "big", 10).delay().get(timeout=20) == "y" * 10
        replies = app.control.inspect(timeout=2).ping()
        assert replies and all(reply == {"ok": "pong"} for reply in replies.values())
        if "-@dangerous" in RESTRICTED_ACL_USERS[user]:
            assert "CLIENT UNBLOCK is not allowed" in worker.output()
        assert worker.process.poll() is None
    finally:
        app.close()
        worker.stop()


# -- results ack their messages when broker and backend are one server ----------------------------


def test_result_acks_its_message_when_broker_and_backend_urls_name_the_server_differently(
        server, side_redis):
    # Given broker and backend on one server, named localhost and 127.0.0.1
    broker = f"sheppy://localhost:{server.port}/0"
    backend = f"sheppy://127.0.0.1:{server.port}/0"
    worker = start_worker(broker, backend=backend, pool="threads",
                          env={"CELERY_SHEPPY_COUNTER_URL": side_redis.url})
    app = client_app(broker, backend)
    key = f"pending-{os.getpid()}"
    try:
        # When an acks_late task stores its own result
        sig(app, "pending_after_own_result", key).delay().get(timeout=20)
        # Then its message was acked by the store itself (one atomic script); get() returns
        # once the result is stored, which is before the task records what it saw
        reply = side_redis.client().blpop(key, timeout=10)
        assert reply is not None, "the task recorded nothing"
        value, _, _ = json.loads(reply[1])
        assert value is False
    finally:
        app.close()
        worker.stop()


# -- events receivers that stop ------------------------------------------------------------------


def test_stopped_events_receiver_stops_collecting_and_its_queue_expires(server):
    # Given a worker sending events and a `celery events` receiver whose queue expires in 3 s
    url = server.sheppy_url()
    conf = {"event_queue_expires": 3}
    client = server.client()
    worker = start_worker(url, conf, pool="threads", args=("-E",))
    app = client_app(url, url, event_queue_expires=3)
    before = set(client.scan_iter(keys.pending_stream("celeryev.*")))
    receiver = subprocess.Popen(celery_command("events", "--dump"), cwd=str(ROOT),
                                env=task_env(url, conf), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def receiver_queue():
            return set(client.scan_iter(keys.pending_stream("celeryev.*"))) - before

        wait_until(receiver_queue, 30, "the receiver's queue")
        (stream,) = receiver_queue()
        assert sig(app, "add", 1, 1).delay().get(timeout=20) == 2

        # When the receiver is killed while tasks (and their events) keep flowing
        os.killpg(receiver.pid, signal.SIGKILL)
        receiver.wait()
        killed = time.monotonic()
        gone = None
        while time.monotonic() - killed < 12:
            sig(app, "add", 1, 1).delay().get(timeout=20)
            if gone is None and not client.exists(stream):
                gone = time.monotonic() - killed
            if gone is not None:
                assert not client.exists(stream)  # publishes never bring it back
            time.sleep(0.2)

        # Then its queue expired within its stated time (3 s) and stayed gone
        assert gone is not None and gone <= 3 + 1.5
    finally:
        if receiver.poll() is None:
            os.killpg(receiver.pid, signal.SIGKILL)
        app.close()
        worker.stop()


# -- celery purge, celery report -------------------------------------------------------------


def test_celery_purge_also_deletes_the_queues_scheduled_tasks(server):
    # Given a plain, a priority 9 and a countdown=120 task queued, and no worker
    url = server.sheppy_url()
    client = server.client()
    app = client_app(url, url)
    try:
        plain = sig(app, "add", 1, 1).apply_async(queue="purgeq")
        urgent = sig(app, "add", 2, 2).apply_async(queue="purgeq", priority=9)
        later = sig(app, "add", 3, 3).apply_async(queue="purgeq", countdown=120)
    finally:
        app.close()
    assert client.zscore(keys.scheduled_set("purgeq"), later.id) is not None

    # When the queue is purged
    done = celery_cli(url, "purge", "-f", "-Q", "purgeq")

    # Then all three are gone, the scheduled one with its payload and its sheppy record
    assert done.returncode == 0, done.stderr
    assert "Purged 3 messages" in done.stdout, done.stdout
    assert client.zcard(keys.scheduled_set("purgeq")) == 0
    assert not client.exists(keys.delayed_message("purgeq", later.id))
    assert not client.exists(keys.task_record("purgeq", later.id))
    assert plain.id and urgent.id


def test_celery_report_names_the_celery_sheppy_version(server):
    import celery_sheppy

    done = celery_cli(server.sheppy_url(), "report")
    assert f"celery-sheppy:{celery_sheppy.__version__}" in done.stdout, done.stdout

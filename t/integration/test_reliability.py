"""Fault injection against real redis-server and real Celery workers (issue: reliability).

Every test starts its own redis-server and workers, breaks something (kill -9 of a
worker, SIGKILL of Redis, poison entries, a task that kills its worker...), and
asserts counts: what ran, how often, what ended in the dead letters. The measured
figures are in docs/delivery.md. Workers use a short lease (LEASE seconds) so the
tests finish quickly; production keeps the default.
"""

import json
import os
import threading
import time
from collections import Counter

import pytest
import redis
from celery import chord
from kombu.exceptions import OperationalError

from celery_sheppy import keys, transport
from t.helpers import TASKS, client_app, runs, sig, start_worker, wait_until

# Slow; tasks count their runs in the side Redis (conftest's ``counter``).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("counter")]

LEASE = 4  # seconds: the workers' visibility_timeout in these tests
QUEUE = "celery"


def options(**extra):
    return dict({"visibility_timeout": LEASE}, **extra)


def settings(conf=None, **transport_options):
    """The workers' settings: a lease of LEASE s (and ``transport_options``), prefetch 4,
    then ``conf``."""
    return dict({"broker_transport_options": options(**transport_options),
                 "worker_prefetch_multiplier": 4}, **(conf or {}))


def app_for(server, **transport_options):
    url = server.sheppy_url()
    return client_app(url, url, broker_transport_options=options(**transport_options))


def pending_count(client, stream=keys.pending_stream(QUEUE)):
    try:
        return client.xpending(stream, keys.CONSUMER_GROUP)["pending"]
    except redis.ResponseError:
        return 0


# -- 1. kill -9 of a worker holding 100 acks_late tasks -------------------------------------


def test_worker_killed_with_100_acks_late_tasks_loses_none_and_recovers_within_two_leases(
        make_redis_server, workers, counter):
    # Given a worker holding 100 acks_late tasks, some running, the rest reserved
    server = make_redis_server()
    client = server.client()
    app = app_for(server)
    doomed = workers.start(server.sheppy_url(), settings({"worker_prefetch_multiplier": 25}),
                           pool="threads", concurrency=4)
    results = [sig(app, "tracked", "runs", i, 1.0).delay() for i in range(100)]
    wait_until(lambda: pending_count(client) == 100 and len(runs(counter, "runs")) >= 4, 60,
               message="the first worker to hold all 100 tasks")
    rescuer = workers.start(server.sheppy_url(), settings({"worker_prefetch_multiplier": 5}),
                            pool="threads", concurrency=20)

    # When it is killed with SIGKILL
    killed_at = time.time()
    doomed.kill()
    before = runs(counter, "runs")
    started_on_doomed = {value for value, _, at in before if at <= killed_at}

    # Then every task completes on the other worker, none lost
    assert sorted(result.get(timeout=180) for result in results) == list(range(100))
    after = runs(counter, "runs")
    taken_over = [at for value, worker, at in after
                  if at > killed_at and worker != before[0][1]]
    recovery = min(taken_over) - killed_at
    counts = Counter(value for value, _, _ in after)
    duplicates = {value for value, count in counts.items() if count > 1}
    print(f"\nkill -9: {len(started_on_doomed)} started before the kill, "
          f"{100 - len(started_on_doomed)} reserved; recovery {recovery:.1f}s "
          f"(lease {LEASE}s); {len(duplicates)} ran twice")
    assert set(counts) == set(range(100))
    assert recovery <= 2 * LEASE
    assert duplicates <= started_on_doomed  # only tasks that had started run twice
    assert pending_count(client) == 0
    app.close()


# -- 2. a countdown longer than the lease --------------------------------------------------------


def test_countdown_of_three_leases_runs_exactly_once_with_two_workers(make_redis_server, workers,
        counter):
    # Given two live workers
    server = make_redis_server()
    client = server.client()
    for _ in range(2):
        workers.start(server.sheppy_url(), settings(), pool="threads", concurrency=2)
    held = app_for(server)  # default delay_threshold: the eta task waits in a worker
    scheduled = app_for(server, delay_threshold=LEASE / 2)  # waits in sheppy:scheduled:<q>

    # When tasks are due in three leases
    started = time.monotonic()
    in_memory = sig(held, "tracked", "runs", "in-memory").apply_async(countdown=3 * LEASE)
    delayed = sig(scheduled, "tracked", "runs", "scheduled").apply_async(countdown=3 * LEASE)
    record = json.loads(client.get(keys.task_record(QUEUE, delayed.id)))
    assert record["status"] == "scheduled"
    assert client.zscore(keys.scheduled_set(QUEUE), delayed.id) is not None

    # Then each runs exactly once, after its countdown, and no later lease steals it
    assert in_memory.get(timeout=60) == "in-memory"
    assert delayed.get(timeout=60) == "scheduled"
    assert time.monotonic() - started >= 3 * LEASE - 0.5
    time.sleep(1.5 * LEASE)
    counts = Counter(value for value, _, _ in runs(counter, "runs"))
    assert counts == {"in-memory": 1, "scheduled": 1}
    assert client.zcard(keys.scheduled_set(QUEUE)) == 0
    assert not client.exists(keys.delayed_message(QUEUE, delayed.id))
    held.close()
    scheduled.close()


def test_task_running_for_many_leases_on_a_live_worker_is_never_stolen(make_redis_server, workers,
        counter):
    # Given two live workers and an acks_late task that runs for four leases
    server = make_redis_server()
    client = server.client()
    for _ in range(2):
        workers.start(server.sheppy_url(), settings(), pool="threads", concurrency=2)
    app = app_for(server)
    result = sig(app, "tracked", "long", "long", 4 * LEASE).delay()

    # Then it finishes once: its worker renewed the lease, the other took nothing over
    assert result.get(timeout=60) == "long"
    time.sleep(LEASE)
    assert [value for value, _, _ in runs(counter, "long")] == ["long"]
    assert pending_count(client) == 0
    app.close()


# -- 3. Redis SIGKILL and restart while tasks flow --------------------------------------------------

FLOW_TASKS = int(os.environ.get("CELERY_SHEPPY_FLOW_TASKS", 10000))


def test_redis_killed_and_restarted_while_tasks_flow_loses_no_published_task(
        make_redis_server, workers, counter):
    # Given Redis with appendonly, two workers and a producer publishing FLOW_TASKS tasks
    server = make_redis_server("--appendonly", "yes", "--appendfsync", "everysec")
    client = server.client()
    app = app_for(server)
    app.conf.task_publish_retry_policy = {"max_retries": 30, "interval_start": 0,
                                          "interval_step": 0.2, "interval_max": 0.5}
    for _ in range(2):
        workers.start(server.sheppy_url(), settings({"worker_prefetch_multiplier": 8}),
                      pool="threads", concurrency=8)
    published, failed = [], []

    def produce():
        for i in range(FLOW_TASKS):
            try:
                sig(app, "tracked", "flow", i).apply_async(ignore_result=True)
                published.append(i)
            except (OperationalError, redis.RedisError) as exc:
                failed.append((i, exc))

    producer = threading.Thread(target=produce)
    began = time.monotonic()
    producer.start()

    # When Redis is killed with SIGKILL mid-flow and restarted
    wait_until(lambda: len(published) >= FLOW_TASKS // 3, 120, interval=0.05,
               message="a third of the tasks to be published")
    server.restart(downtime=1.0)
    restarted = time.monotonic()
    producer.join(300)

    # Then every task whose publish succeeded runs, the workers resume by themselves,
    # and a publish that did not succeed raised
    def ran():
        return {value for value, _, _ in runs(counter, "flow")}

    wait_until(lambda: set(published) <= ran(), 300, interval=1.0,
               message="every published task to run")
    elapsed = time.monotonic() - began
    counts = Counter(value for value, _, _ in runs(counter, "flow"))
    duplicates = sum(count - 1 for count in counts.values())
    print(f"\nRedis SIGKILL: {len(published)} published, {len(failed)} publishes raised, "
          f"0 lost, {duplicates} duplicate runs; all done {elapsed:.1f}s after start, "
          f"{time.monotonic() - restarted:.1f}s after the restart")
    assert len(published) + len(failed) == FLOW_TASKS
    assert set(published) <= ran()
    for worker in workers:
        assert worker.process.poll() is None, worker.output()[-6000:]  # resumed without a restart
    app.close()


# -- 3b. connection loss while acks_late tasks drain ---------------------------------------------------

DRAIN_TASKS = 2000


@pytest.mark.parametrize("pool", ["threads", "prefork"])
@pytest.mark.parametrize("fault", ["client-kill", "redis-kill-9"])
def test_connection_loss_while_acks_late_tasks_drain_loses_none_and_runs_none_twice(
        make_redis_server, workers, counter, fault, pool):
    # Given a worker (Celery's defaults, prefetch 16) draining 2 000 acks_late tasks
    server = make_redis_server("--appendonly", "yes", "--appendfsync", "always")
    app = app_for(server)
    workers.start(server.sheppy_url(), settings(), pool=pool, concurrency=4)
    ids = [sig(app, "tracked", "drain", i, 0.005).apply_async(ignore_result=True).id
           for i in range(DRAIN_TASKS)]
    wait_until(lambda: counter.llen("drain") >= DRAIN_TASKS // 4, 120, interval=0.05,
               message="a quarter of the tasks to run")

    # When its connections are lost: killed by the server, or the server killed and restarted
    if fault == "client-kill":
        assert server.client().client_kill_filter(_type="normal", skipme=True) >= 1
    else:
        server.restart(downtime=1.0)
    faulted = time.monotonic()

    # Then every task runs exactly once, also the ones the worker held at that moment
    def ran():
        return {value for value, _, _ in runs(counter, "drain")}

    wait_until(lambda: len(ran()) == DRAIN_TASKS, 180, interval=0.5, message="every task to run")
    done = time.monotonic() - faulted
    time.sleep(2 * LEASE)  # a run that a lease reclaim would repeat comes within this
    counts = Counter(value for value, _, _ in runs(counter, "drain"))
    twice = sorted(value for value, count in counts.items() if count > 1)
    print(f"\n{fault} ({pool}): {len(counts)}/{DRAIN_TASKS} ran, {len(twice)} twice; "
          f"all done {done:.1f}s after the fault")
    assert set(counts) == set(range(DRAIN_TASKS))
    assert twice == [], "\n".join(line for line in workers[0].output().splitlines()
                                  if any(ids[value] in line for value in twice)
                                  or "sheppy" in line)
    assert workers[0].process.poll() is None
    assert "dropped" not in workers[0].output()
    app.close()


def test_results_stored_while_redis_restarts_are_not_lost_with_default_settings(
        make_redis_server, workers, counter):
    # Given tasks (acked when they start, Celery's default) running when Redis is killed
    server = make_redis_server("--appendonly", "yes", "--appendfsync", "always")
    app = app_for(server)
    worker = workers.start(server.sheppy_url(), settings(), pool="threads", concurrency=8)
    results = [sig(app, "sleep", 0.4).delay() for _ in range(60)]
    wait_until(lambda: worker.output().count("succeeded in") >= 8, 60, message="tasks to run")

    # When Redis is down for 2 s while their results are being stored
    server.restart(downtime=2.0)

    # Then every result is stored (the backend retries as the stock one does) and read
    assert [result.get(timeout=120) for result in results] == [0.4] * 60
    app.close()


# -- 4. a chord part whose worker dies after it reported ---------------------------------------------


@pytest.mark.parametrize("crashing_task", [
    "store_then_crash",  # dies after storing its result and counting itself in the chord
    "complete_chord_then_crash",  # completes the chord, dies before the body is sent
])
def test_chord_part_whose_worker_dies_after_reporting_is_redelivered_and_the_body_fires_once(
        make_redis_server, workers, counter, crashing_task):
    # Given two workers and a chord one of whose parts reports to it, then kills its worker
    server = make_redis_server()
    app = app_for(server)
    for _ in range(2):
        workers.start(server.sheppy_url(), settings(), pool="threads", concurrency=2)
    header = [sig(app, "tracked", "parts", i) for i in range(4)]
    header.append(sig(app, crashing_task, 99, "crashing-part"))
    body = app.signature(f"{TASKS}.record_run", kwargs={"key": "body"})

    # When the chord runs
    result = chord(header)(body)

    # Then the crashing part runs twice (its message was not acked: redelivered), the body once
    assert sorted(result.get(timeout=60)) == [0, 1, 2, 3, 99]
    wait_until(lambda: len(runs(counter, "crashing-part")) == 2, 60,
               message="the crashed part to be redelivered")
    time.sleep(2)
    assert counter.llen("body") == 1
    assert sum(1 for worker in workers if worker.process.poll() is not None) == 1
    app.close()


# -- 5. malformed entries mixed with good ones -----------------------------------------------------------

MALFORMED = 1000
GOOD = 200


def malformed_entry(i):
    kind = i % 5
    if kind == 0:
        return {"data": f"not json {i}"}
    if kind == 1:
        return {"data": json.dumps({"status": "pending"})}  # no id
    if kind == 2:
        return {"data": json.dumps({"id": f"{i}", "status": "pending"})}  # no message
    if kind == 3:  # a Celery task in a content type nobody decodes
        message = {"headers": {"task": f"{TASKS}.add", "id": f"bad-{i}"}, "properties": {},
                   "content-type": "application/x-unknown", "content-encoding": "utf-8",
                   "body": "?"}
        return {"data": json.dumps({"id": f"{i}", "status": "pending",
                                    "celery": {"message": message}})}
    return {"other": "no data field"}


def test_malformed_entries_go_to_the_dead_letters_and_good_tasks_all_run(make_redis_server, workers):
    # Given one worker consuming a queue
    server = make_redis_server()
    client = server.client()
    app = app_for(server)
    worker = workers.start(server.sheppy_url(), settings(), pool="threads", concurrency=4)

    # When 1 000 malformed entries are mixed with 200 good tasks
    results = []
    stream = keys.pending_stream(QUEUE)
    for i in range(MALFORMED):
        client.xadd(stream, malformed_entry(i))
        if i % (MALFORMED // GOOD) == 0:
            results.append(sig(app, "tracked", "good", len(results)).delay())

    # Then every good task runs, every bad entry is a dead letter, the worker never restarts
    assert sorted(result.get(timeout=120) for result in results) == list(range(GOOD))
    dead = keys.dead_letter_stream(QUEUE)
    wait_until(lambda: client.xlen(dead) == MALFORMED, 60, message="1000 dead letters")
    with app.connection_for_write() as conn:
        letters = transport.dead_letters(conn, QUEUE, count=MALFORMED)
    assert Counter(letter["reason"].split(":")[0] for letter in letters) == {
        "undecodable": MALFORMED}
    assert sum("unknown content type" in letter["reason"] for letter in letters) == MALFORMED // 5
    assert letters[0]["data"] == "not json 0" and letters[0]["deliveries"] == 1
    assert worker.process.poll() is None
    assert worker.output().count("ready.") == 1
    assert client.xlen(stream) == 0 and pending_count(client) == 0

    # and dead letters can be replayed and purged
    with app.connection_for_write() as conn:
        assert transport.replay_dead_letters(conn, QUEUE, ids=[letters[0]["id"]]) == 1
        wait_until(lambda: client.xlen(dead) == MALFORMED, 30, message="the replayed letter back")
        assert transport.purge_dead_letters(conn, QUEUE) == MALFORMED
    assert not client.exists(dead)
    app.close()


# -- 6. a task that kills its worker ---------------------------------------------------------------------

MAX_DELIVERIES = 3


def test_task_that_kills_its_worker_ends_in_the_dead_letters_and_the_queue_keeps_flowing(
        make_redis_server, workers, counter):
    # Given two workers that a supervisor restarts when they die; each holds one message
    # at a time (a reserved message dies with its worker and counts a delivery too)
    server = make_redis_server()
    client = server.client()
    app = app_for(server)

    def worker():
        return start_worker(server.sheppy_url(), settings({"worker_prefetch_multiplier": 1},
                                                          max_deliveries=MAX_DELIVERIES),
                            pool="threads", concurrency=1)

    workers.extend([worker(), worker()])

    # When a task kills its worker process on every delivery, among good tasks
    crashing = sig(app, "crash", "crashes").delay()
    good = [sig(app, "tracked", "good", i).delay() for i in range(50)]
    dead = keys.dead_letter_stream(QUEUE)
    deadline = time.monotonic() + 180
    restarts = 0
    while not client.xlen(dead) and time.monotonic() < deadline:
        for index, running in enumerate(workers):
            if running.process.poll() is not None and len(workers) < 20:
                workers[index] = worker()
                restarts += 1
        time.sleep(0.3)

    # Then after max_deliveries runs it is a dead letter, and every good task ran
    letters = client.xrange(dead)
    assert len(letters) == 1
    fields = letters[0][1]
    assert fields[b"reason"] == b"max_deliveries exceeded"
    assert int(fields[b"deliveries"]) == MAX_DELIVERIES
    assert crashing.id.encode() in fields[b"data"]
    assert len(runs(counter, "crashes")) == MAX_DELIVERIES
    assert sorted(result.get(timeout=120) for result in good) == list(range(50))
    print(f"\ncrashing task: {MAX_DELIVERIES} runs, {restarts} worker restarts, then dead-lettered")
    app.close()


# -- 7. revoke while no worker runs ------------------------------------------------------------------------


def test_task_revoked_while_every_worker_is_stopped_never_runs(make_redis_server, workers,
        counter):
    # Given tasks waiting in the stream and in the scheduled set, and no worker
    server = make_redis_server()
    client = server.client()
    app = app_for(server, delay_threshold=1)
    waiting = sig(app, "tracked", "runs", "waiting").delay()
    later = sig(app, "tracked", "runs", "later").apply_async(countdown=4)

    # When both are revoked, then workers start
    app.control.revoke(waiting.id)
    app.control.revoke(later.id)
    for _ in range(2):
        workers.start(server.sheppy_url(), settings(), pool="threads", concurrency=2)
    marker = sig(app, "tracked", "runs", "marker").apply_async(countdown=5)

    # Then neither ever runs
    assert marker.get(timeout=60) == "marker"
    time.sleep(2)
    assert [value for value, _, _ in runs(counter, "runs")] == ["marker"]
    assert waiting.state == "REVOKED" and later.state == "REVOKED"
    assert client.xlen(keys.pending_stream(QUEUE)) == 0
    app.close()


# -- 8. configuration faults --------------------------------------------------------------------------------


def publish_error(url, **transport_options):
    app = client_app(url, None, broker_transport_options=dict(
        {"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1},
        **transport_options), broker_connection_timeout=2)
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0,
                                          "interval_step": 0.1, "interval_max": 0.1}
    try:
        with pytest.raises(Exception) as raised:
            sig(app, "add", 1, 1).delay()
    finally:
        app.close()
    return raised.value


def test_wrong_password_unreachable_host_and_tls_mismatch_fail_clearly_without_secrets(
        make_redis_server, caplog):
    secret = "s3cret-Pa55"
    protected = make_redis_server(password="right-password")
    tls = make_redis_server(tls=True)
    closed_port = protected.port + 1 if protected.port < 65000 else protected.port - 1

    wrong = publish_error(f"sheppy://:{secret}@127.0.0.1:{protected.port}/0")
    unreachable = publish_error(f"sheppy://:{secret}@127.0.0.1:{closed_port}/0")
    plain_to_tls = publish_error(f"sheppy://127.0.0.1:{tls.port}/0", socket_timeout=2)
    untrusted = publish_error(f"sheppys://127.0.0.1:{tls.port}/0")

    assert "password" in str(wrong).lower()
    assert "refused" in str(unreachable).lower() or "connect" in str(unreachable).lower()
    assert any(word in str(plain_to_tls).lower() for word in ("closed", "timeout", "timed out",
                                                               "reset", "connection"))
    assert "certificate" in str(untrusted).lower()
    for error in (wrong, unreachable, plain_to_tls, untrusted):
        assert secret not in str(error) and secret not in repr(error)
    assert secret not in caplog.text

    # a worker with the wrong password says why, and never prints the secret
    url = f"sheppy://:{secret}@127.0.0.1:{protected.port}/0"
    log = worker_log_until(url, "password", timeout=30)
    assert "invalid username-password pair" in log
    assert secret not in log


def worker_log_until(url, text, timeout):
    """Start a worker that cannot become ready; its log once ``text`` shows (or timeout)."""
    worker = start_worker(url, {"broker_connection_max_retries": 2,
                                "broker_connection_timeout": 2}, pool="solo", wait_ready=False)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and worker.process.poll() is None:
            if text in worker.output():
                break
            time.sleep(0.2)
    finally:
        worker.kill()
    return worker.output()


# -- acks_late and results together -----------------------------------------------------------------


def test_terminal_result_and_the_ack_of_its_message_are_one_step(make_redis_server, workers, counter):
    # Given broker and result backend on the same Redis, and an acks_late task
    server = make_redis_server()
    client = server.client()
    app = app_for(server)
    workers.start(server.sheppy_url(), settings(), pool="prefork", concurrency=1)

    # When the task stores its result
    result = sig(app, "pending_after_own_result", "acked").delay()

    # Then its message is already acked and gone at that moment, before the worker's ack
    assert result.get(timeout=60) == "stored"
    wait_until(lambda: counter.llen("acked"), 30, message="the task's report")
    assert [pending for pending, _, _ in runs(counter, "acked")] == [False]
    assert client.xlen(keys.pending_stream(QUEUE)) == 0
    app.close()

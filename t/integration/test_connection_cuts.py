"""Connection cuts and Redis restarts while a default worker holds tasks (issue 19).

A worker with Celery's defaults keeps countdown tasks in memory until they are due,
prefetches, and sends its acks without waiting. Each test cuts its connections
(``CLIENT KILL``) or restarts Redis (SIGKILL, then the append-only file) at such a
moment and counts every run in a side Redis the server under test never touches.
Workers use a short lease (LEASE seconds) so the tests finish quickly.
"""

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
from celery import chord, group

from celery_sheppy import keys
from t.helpers import client_app, runs, sig, start_worker, wait_until

pytestmark = pytest.mark.usefixtures("counter")

LEASE = 4  # seconds: the workers' visibility_timeout in these tests


def settings(**conf):
    return dict({"broker_transport_options": {"visibility_timeout": LEASE}}, **conf)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
def test_countdown_tasks_held_by_a_worker_whose_connection_is_cut_run_once_when_due(
        make_redis_server, workers, counter, pool, acks_late):
    # Given a default worker holding 5 countdown tasks in memory (due in 8 s)
    server = make_redis_server()
    url = server.sheppy_url()
    worker = workers.start(url, settings(), pool=pool)
    app = client_app(url, url, **settings())
    task = "tracked" if acks_late else "tracked_early_ack"
    sent = time.time()
    results = [sig(app, task, "eta", n).apply_async(countdown=8)
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


def test_task_written_to_a_pool_process_that_had_not_taken_it_when_the_connection_is_cut_runs_once(
        make_redis_server, workers, counter):
    # Given a default prefork worker of one process, stopped (SIGSTOP) once it is idle
    server = make_redis_server()
    url = server.sheppy_url()
    worker = workers.start(url, settings(), pool="prefork", concurrency=1)
    app = client_app(url, url, **settings())
    task = sig(app, "tracked")
    assert task.clone(args=("warm", 0)).delay().get(timeout=30) == 0
    [child] = subprocess.check_output(["pgrep", "-P", str(worker.process.pid)]).split()
    child = int(child)
    os.kill(child, signal.SIGSTOP)
    try:
        # When a task is written to that process (it cannot take it) and the worker's
        # connections are cut: Celery's pool.flush() discards the job no process accepted
        result = task.clone(args=("written", 1)).delay()
        wait_until(lambda: f"[{result.id}] received" in worker.output(), 30, "the worker to get it")
        time.sleep(0.5)
        assert server.client().client_kill_filter(_type="normal", skipme=True) >= 1
        wait_until(lambda: worker.output().count("Connected to") >= 2, 30, "a reconnect")
        time.sleep(2)  # the orphan ledger's upkeep has dealt with the discarded job by now
    finally:
        os.kill(child, signal.SIGCONT)

    # Then the process runs it, and it runs once: not put back in its stream as well
    assert result.get(timeout=30) == 1
    time.sleep(2 * LEASE)  # a copy put back, or a lease recovery, would have run by now
    assert Counter(value for value, _, _ in runs(counter, "written")) == {1: 1}, worker.output()
    app.close()


# -- acks Redis never applied ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("pool,task", [("prefork", "tracked_early_ack"), ("threads", "tracked")])
def test_acks_redis_held_unapplied_when_it_was_killed_are_sent_again_and_nothing_runs_twice(
        make_redis_server, workers, counter, pool, task):
    # Given a default worker draining 600 tasks from Redis with an append-only file
    server = make_redis_server("--appendonly", "yes", "--appendfsync", "always")
    url = server.sheppy_url()
    workers.start(url, settings(), pool=pool, concurrency=4)
    app = client_app(url, url, **settings())
    tasks = sig(app, task)
    group(tasks.clone(args=("acked", n, 0.05)) for n in range(600)).apply_async(ignore_result=True)

    # When, three times, Redis holds every write for a second (CLIENT PAUSE WRITE: the acks
    # the worker sends meanwhile are not applied) and is then killed and restarted
    for ran in (120, 240, 360):
        wait_until(lambda ran=ran: counter.llen("acked") >= ran, 120, "tasks to run")
        server.client().execute_command("CLIENT", "PAUSE", 5000, "WRITE")
        time.sleep(1.0)
        server.restart(downtime=0.5)

    # Then every task runs once: the worker sent those acks again after each restart
    wait_until(lambda: len({value for value, _, _ in runs(counter, "acked")}) == 600, 180,
               "every task to run")
    time.sleep(2 * LEASE)  # an entry left unacked is taken over and run again by now
    counts = Counter(value for value, _, _ in runs(counter, "acked"))
    assert sorted(value for value, count in counts.items() if count > 1) == []
    app.close()


# -- a dead worker's messages, however many ---------------------------------------------------


@pytest.mark.slow
def test_worker_killed_holding_1000_messages_hands_them_all_to_workers_with_little_room(
        make_redis_server, workers, counter):
    # Given a worker (prefetch 1 000) whose one thread is busy with a long task, holding
    # 1 000 acks_late tasks
    server = make_redis_server()
    url = server.sheppy_url()
    greedy = start_worker(url, settings(worker_prefetch_multiplier=1001), pool="threads",
                          concurrency=1)
    workers.append(greedy)
    app = client_app(url, url, **settings())
    sig(app, "sleep", 600).delay()
    tasks = sig(app, "tracked")
    group(tasks.clone(args=("held", n)) for n in range(1000)).apply_async(ignore_result=True)
    client, stream = server.client(), keys.pending_stream("celery")
    wait_until(lambda: client.xlen(stream) > 900 and client.xlen(stream) == client.xpending(
        stream, keys.CONSUMER_GROUP)["pending"], 60, "the greedy worker to hold them all")

    # When it is killed, next to two workers that take 4 messages at a time
    for _ in range(2):
        workers.start(url, settings(worker_prefetch_multiplier=1), pool="threads", concurrency=4)
    killed = time.time()
    greedy.kill()

    # Then all of them run on the others within a few leases (XAUTOCLAIM gave each of
    # them its prefetch room, 4, every half lease: 1 000 took 250 s), each once
    wait_until(lambda: counter.llen("held") >= 1000, 60, "the others to run them all")
    took = time.time() - killed
    print(f"\n1 000 held messages of a killed worker: all run elsewhere {took:.1f} s after "
          f"the kill (lease {LEASE} s)")
    assert took < 4 * LEASE + 10
    time.sleep(LEASE)
    assert Counter(value for value, _, _ in runs(counter, "held")) == {n: 1 for n in range(1000)}
    app.close()


# -- chaos: worker kills, connection cuts and Redis restarts together --------------------------

CHAOS_TASKS = 3000
CHAOS_CHORDS = 20  # of 5 parts each
CHAOS_COUNTDOWNS = 10
IN_FLIGHT_BEFORE_KILL = 5.0  # s: a run this close before its worker's SIGKILL may repeat


@pytest.mark.slow
def test_chaos_of_worker_kills_connection_cuts_and_redis_restarts_loses_nothing(
        make_redis_server, workers, counter):
    # Given three default workers (two prefork, one threads) on Redis with an append-only
    # file, and plain, chord and countdown tasks (acks_late: a worker kill loses none)
    server = make_redis_server("--appendonly", "yes", "--appendfsync", "always")
    url = server.sheppy_url()
    pools = ["prefork", "prefork", "threads"]
    live = [start_worker(url, settings(), pool=pool, concurrency=2 if pool == "prefork" else 4)
            for pool in pools]
    workers.extend(live)
    app = client_app(url, url, **settings())
    scheduled = client_app(url, url, **settings(broker_transport_options={
        "visibility_timeout": LEASE, "delay_threshold": 4}))  # these wait in Redis, not a worker
    tracked = sig(app, "tracked")
    plain = group(tracked.clone(args=("plain", n, 0.03)) for n in range(CHAOS_TASKS)).apply_async()
    chords = [chord(tracked.clone(args=("parts", f"{c}.{p}", 0.03)) for p in range(5))(
        sig(app, "record_run", "bodies")) for c in range(CHAOS_CHORDS)]
    countdowns = [sig(scheduled if n % 2 else app, "tracked", "countdown", n).apply_async(
        countdown=3 + n)
        for n in range(CHAOS_COUNTDOWNS)]
    began = time.time()

    # When workers are SIGKILLed (and replaced), connections cut and Redis restarted
    kills = {}  # node name -> when it was killed

    def kill_worker(index):
        victim = live[index]
        kills[victim.name] = time.time()
        victim.kill()
        live[index] = start_worker(url, settings(), pool=victim.pool,
                                   concurrency=victim.concurrency)
        workers.append(live[index])

    def cut_connections():
        server.client().client_kill_filter(_type="normal", skipme=True)

    for delay, fault in [(1.5, lambda: kill_worker(0)), (1.5, cut_connections),
                         (1.5, lambda: server.restart(downtime=1.0)), (2.0, lambda: kill_worker(2)),
                         (1.5, cut_connections), (1.5, lambda: server.restart(downtime=1.0)),
                         (1.0, cut_connections)]:
        time.sleep(delay)
        fault()
    faults_ended = time.time()

    # Then every result is readable, every chord body ran once, every countdown task ran
    # once, and a task ran twice only when its worker was killed while running it
    assert plain.get(timeout=300) == list(range(CHAOS_TASKS))
    assert [c.get(timeout=120) for c in chords] == [
        [f"{c}.{p}" for p in range(5)] for c in range(CHAOS_CHORDS)]
    assert [r.get(timeout=120) for r in countdowns] == list(range(CHAOS_COUNTDOWNS))
    settled = time.time()
    time.sleep(2 * LEASE)  # a repeat of anything unacked comes within this

    def repeats(key):
        seen, repeated = {}, []
        for value, node, at in runs(counter, key):
            if value in seen:
                first_node, first_at = seen[value]
                in_flight = (first_node in kills
                             and kills[first_node] - IN_FLIGHT_BEFORE_KILL <= first_at
                             <= kills[first_node])
                repeated.append((value, in_flight))
            else:
                seen[value] = (node, at)
        return seen, repeated

    report = {}
    for key, expected in [("plain", set(range(CHAOS_TASKS))),
                          ("parts", {f"{c}.{p}" for c in range(CHAOS_CHORDS) for p in range(5)}),
                          ("countdown", set(range(CHAOS_COUNTDOWNS)))]:
        seen, repeated = repeats(key)
        assert set(seen) == expected, f"{key}: lost {sorted(expected - set(seen))[:20]}"
        unexplained = [value for value, in_flight in repeated if not in_flight]
        report[key] = (len(repeated), unexplained)
    bodies = [json.loads(item) for item in counter.lrange("bodies", 0, -1)]
    print(f"\nchaos: kills at {[round(at - began, 1) for at in kills.values()]} s, faults "
          f"ended at {faults_ended - began:.1f} s, all settled at {settled - began:.1f} s; "
          f"re-runs (total, unexplained): {report}; chord bodies {len(bodies)}")
    assert len(bodies) == CHAOS_CHORDS
    assert all(not unexplained for _, unexplained in report.values()), report
    for worker in live:
        assert worker.process.poll() is None, worker.output()[-4000:]
    app.close()
    scheduled.close()

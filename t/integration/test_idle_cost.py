"""What idle workers cost Redis, and that the fan-out which made it cheap still fans out
(issue 21): heartbeats, events and remote control by pub/sub, durable revokes.

Workers run with Celery's defaults (mingle, gossip, heartbeat). Commands are counted from
``INFO commandstats`` of the test's own redis-server: a count of the mechanism, not a
timing.
"""

import os
import signal
import threading
import time
from collections import Counter

import pytest

from t.helpers import client_app, sig, wait_until


def command_counts(client):
    return {name[len("cmdstat_"):]: stats["calls"]
            for name, stats in client.info("commandstats").items()}


def commands_over(client, seconds):
    """{command: calls} the server ran during the next ``seconds``."""
    before = command_counts(client)
    time.sleep(seconds)
    after = command_counts(client)
    return {name: calls - before.get(name, 0) for name, calls in after.items()
            if calls - before.get(name, 0)}


#: Commands per second an idle worker may cost, whatever the number of queues it
#: consumes. The stock redis:// transport costs 1.5 (a heartbeat every 2 s, a BRPOP
#: timeout a second); the target is at most 1.5 times that.
IDLE_BUDGET_PER_WORKER = 2.25


@pytest.mark.slow  # ten workers start one after another: about a minute
def test_ten_idle_workers_on_twenty_queues_each_stay_within_the_command_budget(
        make_redis_server, workers):
    # Given ten default workers, each consuming 20 queues, settled
    server = make_redis_server()
    url = server.sheppy_url()
    queues = ",".join(f"q{n}" for n in range(20))
    for _ in range(10):
        workers.start(url, pool="threads", concurrency=2, queues=queues)
    time.sleep(5)  # mingle, the first heartbeats and gossip, the first upkeep runs

    # When nothing is sent for 30 s
    calls = commands_over(server.client(), 30)

    # Then the deployment costs no more than the budget, linear in the workers
    per_second = sum(calls.values()) / 30
    print(f"\n10 idle workers x 20 queues: {per_second:.1f} commands/s: "
          f"{dict(Counter(calls).most_common(8))}")
    assert per_second <= 10 * IDLE_BUDGET_PER_WORKER, calls
    assert "xadd" not in calls  # heartbeats are published, not written to streams


def test_heartbeats_events_and_remote_control_reach_every_worker_and_monitor(
        make_redis_server, workers):
    # Given three default workers sending task events (-E) and a monitor receiving events
    server = make_redis_server()
    url = server.sheppy_url()
    for _ in range(3):
        workers.start(url, pool="threads", concurrency=2, args=("-E",))
    app = client_app(url, url)
    seen = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=30),
                                  daemon=True)
        thread.start()
        try:
            # Then each worker's heartbeats reach the monitor, a task's events reach it ...
            wait_until(lambda: {e["hostname"] for e in seen if e["type"] == "worker-heartbeat"}
                       >= {w.name for w in workers}, 20, "a heartbeat of every worker")
            result = sig(app, "add", 2, 3).delay()
            assert result.get(timeout=20) == 5
            wait_until(lambda: {"task-received", "task-started", "task-succeeded"} <= {
                e["type"] for e in seen if e.get("uuid") == result.id}, 10, "the task's events")
            # ... and every worker answers remote control
            replies = app.control.inspect(timeout=2).ping() or {}
            assert set(replies) == {w.name for w in workers}
            stats = app.control.inspect(timeout=2).stats() or {}
            assert set(stats) == {w.name for w in workers}
        finally:
            receiver.should_stop = True
            thread.join(5)
            app.close()


def test_broadcast_revoke_reaches_a_worker_that_was_disconnected_when_it_was_sent(
        make_redis_server, workers, counter):
    # Given a default worker holding a countdown task (due in 6 s)
    server = make_redis_server()
    url = server.sheppy_url()
    worker = workers.start(url, pool="prefork", concurrency=2)  # counts in the side Redis
    app = client_app(url, url)
    result = sig(app, "tracked_early_ack", "revoked", 1).apply_async(
        countdown=6)
    wait_until(lambda: "] received" in worker.output(), 20, "the worker to hold it")

    # When the worker is cut off (stopped, its connections closed) while the revoke is
    # broadcast, then comes back
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        server.client().client_kill_filter(_type="pubsub")
        server.client().client_kill_filter(_type="normal", skipme=True)
        app.control.revoke(result.id)
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)

    # Then the task never runs, and its state says REVOKED
    wait_until(lambda: result.state == "REVOKED", 30, "the task to be revoked")
    time.sleep(8)  # past its countdown, and past the two seconds a held task may take
    assert counter.lrange("revoked", 0, -1) == []
    assert worker.process.poll() is None
    app.close()


def test_finished_stream_goes_once_results_stop(make_redis_server, workers):
    # Given results stored, then none for a while
    from celery_sheppy import keys
    from celery_sheppy.backend import stores

    server = make_redis_server()
    url = server.sheppy_url()
    workers.start(url, pool="threads", concurrency=2)
    app = client_app(url, url)
    assert [sig(app, "add", n, n).delay().get(timeout=20)
            for n in range(20)] == [2 * n for n in range(20)]
    stream = keys.finished_stream("celery")
    # Then the finished stream has a time to live that outlasts its entries' minute ...
    ttl = server.client().ttl(stream)
    assert stores.STREAM_KEEP_SECONDS < ttl <= stores.STREAM_KEEP_SECONDS + \
        2 * stores.FINISHED_TTL_EVERY
    # ... so an idle stream goes as a whole, and comes back with the next result
    server.client().expire(stream, 1)
    wait_until(lambda: not server.client().exists(stream), 5, "the stream to expire")
    assert sig(app, "add", 1, 1).delay().get(timeout=20) == 2
    app.close()

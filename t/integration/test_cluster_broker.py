"""Broker and result backend both on a Redis Cluster (``sheppy+cluster://``).

A local 3-master + 3-replica cluster (``redis_cluster``); real workers started with
Celery's defaults (mingle, gossip, heartbeat on): their task queue, pidbox and event
queues are sheppy queues ``{q}``, each in a slot of its own (docs/deployment.md).
Task runs are counted in a side Redis the system under test never touches.
"""

import json
import time
from collections import Counter

import pytest
from celery import chord, group

from celery_sheppy import keys
from t.helpers import client_app, sig, start_worker, wait_until
from t.redis_server import RedisCluster

LEASE = 4  # seconds: the kill test's visibility_timeout, so it finishes quickly
#: ETA tasks due later than 1 s wait in sheppy's scheduled set (default 60 s: a slow test)
CONF = {"broker_transport_options": {"delay_threshold": 1}}


@pytest.fixture(scope="module")
def cluster_url(redis_cluster):
    return redis_cluster.sheppy_url()


@pytest.fixture(scope="module")
def worker(cluster_url, side_redis):
    worker = start_worker(cluster_url, CONF, pool="threads", concurrency=4,
                          env={"CELERY_SHEPPY_COUNTER_URL": side_redis.url})
    yield worker
    worker.stop()
    log = worker.output()
    # no command mixed slots, and the worker never lost its broker connection
    assert "CROSSSLOT" not in log and "Connection to broker lost" not in log, log[-4000:]


@pytest.fixture(scope="module")
def app(cluster_url):
    app = client_app(cluster_url, cluster_url, **CONF)
    yield app
    app.close()


def test_tasks_groups_and_chords_run_with_broker_and_backend_on_a_cluster(worker, app):
    assert sig(app, "add", 2, 3).delay().get(timeout=20) == 5
    with pytest.raises(ValueError):
        sig(app, "fail").delay().get(timeout=20)
    assert group(sig(app, "add", i, i) for i in range(100))().get(timeout=30) == [
        2 * i for i in range(100)]
    assert chord([sig(app, "add", i, 1) for i in range(100)], sig(app, "tsum"))().get(
        timeout=60) == sum(range(1, 101))
    assert sig(app, "add", 1, 1).apply_async(priority=9).get(timeout=20) == 2


def test_the_broker_queue_is_hash_tagged_and_listed_for_sheppy(worker, app, redis_cluster):
    assert sig(app, "add", 20, 22).delay().get(timeout=20) == 42
    client = redis_cluster.client()
    assert client.exists(keys.pending_stream("{celery}"))
    assert client.hexists(keys.queue_registry(), "{celery}")
    assert not client.exists(keys.pending_stream("celery"))


def test_remote_control_ping_mingle_and_gossip_work_on_a_cluster(worker, app, cluster_url,
                                                                 workers):
    # a second worker (Celery's defaults) syncs with the first at start (mingle)
    second = workers.start(cluster_url, pool="threads", concurrency=2)
    assert "mingle: sync with 1 nodes" in second.output()
    replies = app.control.inspect(timeout=5).ping()
    assert len(replies) == 2 and all(reply == {"ok": "pong"} for reply in replies.values()), \
        replies
    # worker events (what gossip and heartbeats ride on) reach an event receiver's queue
    seen = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={
            "worker-heartbeat": lambda event: seen.append(event["hostname"])})
        receiver.capture(limit=2, timeout=20)
    assert set(seen) <= set(replies) and seen, seen


def test_eta_task_waits_in_the_scheduled_set_and_runs_on_a_cluster(worker, app, redis_cluster):
    # Given an ETA task due in 3 s (later than delay_threshold): it waits in the scheduled
    # set of its queue's slot (schedule.lua), then the worker promotes it (promote.lua)
    started = time.monotonic()
    result = sig(app, "add", 4, 4).apply_async(countdown=3)
    client = redis_cluster.client()
    assert client.zscore(keys.scheduled_set("{celery}"), result.id) is not None
    assert result.get(timeout=45) == 8
    assert time.monotonic() - started >= 2.5
    assert client.zscore(keys.scheduled_set("{celery}"), result.id) is None


def test_acks_late_tasks_of_a_killed_worker_run_on_another_none_lost(
        cluster_url, side_redis, redis_cluster):
    # Given a worker holding acks_late tasks (short lease) on a cluster broker
    counter = side_redis.client()
    counter.delete("cluster-kill")
    conf = {"broker_transport_options": {"visibility_timeout": LEASE}}
    env = {"CELERY_SHEPPY_COUNTER_URL": side_redis.url}
    doomed = start_worker(cluster_url, conf, pool="threads", concurrency=4, env=env)
    app = client_app(cluster_url, cluster_url, **conf)
    try:
        results = [sig(app, "tracked", "cluster-kill", i, 0.5).delay() for i in range(60)]
        deadline = time.monotonic() + 30
        while counter.llen("cluster-kill") < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        # When it is killed with SIGKILL and another worker starts
        doomed.kill()
        rescuer = start_worker(cluster_url, conf, pool="threads", concurrency=8, env=env)
        try:
            # Then every task completes: none lost
            assert sorted(r.get(timeout=120) for r in results) == list(range(60))
        finally:
            rescuer.stop()
        counts = Counter(json.loads(item)[0] for item in counter.lrange("cluster-kill", 0, -1))
        twice = sum(1 for n in counts.values() if n > 1)
        print(f"\ncluster kill -9: 0 lost, {twice} ran twice (started before the kill)")
        assert set(counts) == set(range(60))
    finally:
        doomed.kill()
        app.close()


def test_status_reads_the_hash_tagged_queue_and_its_result_shards(worker, app):
    from celery_sheppy.ops import queue_stats

    group(sig(app, "add", i, i) for i in range(20))().get(timeout=30)
    stats = {s.queue: s for s in queue_stats(app)}
    assert "{celery}" in stats and not any(name.startswith("{celery.") for name in stats), stats
    assert stats["{celery}"].completed >= 20
    assert [s.queue for s in queue_stats(app, ["celery"])] == ["{celery}"]


def test_a_worker_started_while_the_cluster_is_down_waits_and_then_works():
    # Given a cluster of its own whose slots are not all served: a master without a
    # replica is down, so every node answers CLUSTERDOWN
    cluster = RedisCluster(masters=3, replicas=0)
    worker = None
    try:
        url = cluster.sheppy_url()
        down = cluster.nodes[2]
        down.kill()
        wait_until(lambda: b"cluster_state:fail" in cluster.nodes[0].client().execute_command(
            "CLUSTER", "INFO"), 30, "the cluster to fail")

        # When a worker starts (Celery's defaults: mingle declares a reply queue first)
        worker = start_worker(url, pool="threads", wait_ready=False)  # returns as it runs

        # Then it meets the down cluster, and waits and retries instead of exiting
        wait_until(lambda: "ClusterDownError" in worker.output()
                   or worker.process.poll() is not None, 120, "the worker to meet the down cluster")
        time.sleep(2)  # an unrecoverable error ends the process within this
        log = worker.output()
        assert worker.process.poll() is None and "Unrecoverable error" not in log, log[-3000:]
        assert "Trying to re-establish the connection" in log, log[-3000:]

        # And once the cluster serves again it is ready and runs tasks
        down.start()
        cluster.wait_until_ok()
        worker.wait_for_log("ready.", timeout=120)
        app = client_app(url, url)
        try:
            assert sig(app, "add", 2, 3).delay().get(timeout=30) == 5
        finally:
            app.close()
    finally:
        if worker is not None:
            worker.stop()
        cluster.close()


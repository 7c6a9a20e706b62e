"""Failovers while tasks drain: Sentinel (broker and backend), Redis Cluster (results; and
broker and results both on the cluster).

Tasks count their runs in a side Redis the system under test never touches, so a
failover cannot lose a count. Workers run with Celery's defaults and the transport's
defaults (no short lease): the figures are the ones a project would see. The stock
``sentinel://`` broker and backend run the same drain in the same test. Measured
figures are in docs/deployment.md.
"""

import contextlib
import json
import os
import subprocess
import time
from collections import Counter

import pytest
from celery import chord

from t.helpers import client_app, needs_cluster, sig, start_worker, wait_until
from t.redis_server import RedisCluster, RedisServer, SentinelSet, cli_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DRAIN_TASKS = 2000
CHORD_PARTS = 50


def drain_through(fault, app, counter, timeout=120, results=False, tasks=DRAIN_TASKS):
    """Send ``tasks`` acks_late tasks (storing their ``results`` or not) and a chord, call
    ``fault()`` once a quarter ran; returns {lost, twice, chord_bodies, stall (s: the longest
    pause between two runs after the fault), done (s: fault to the last first run), ids}."""
    ids = [sig(app, "tracked", "drain", i, 0.005).apply_async(ignore_result=not results).id
           for i in range(tasks)]
    chord([sig(app, "tracked", "parts", i) for i in range(CHORD_PARTS)],
                 sig(app, "record_run", "chord-body"))()
    wait_until(lambda: counter.llen("drain") >= tasks // 4, 120, "a quarter to run", interval=0.05)
    faulted = time.time()
    fault()

    def ran():
        return {json.loads(item)[0] for item in counter.lrange("drain", 0, -1)}

    # at most timeout: the stock broker may lose some, which the figures count
    with contextlib.suppress(AssertionError):
        wait_until(lambda: len(ran()) == tasks and counter.llen("chord-body") >= 1, timeout,
                   interval=0.5)
    time.sleep(5)  # a second run of anything held at the fault comes within this
    runs = [json.loads(item) for item in counter.lrange("drain", 0, -1)]
    counts = Counter(value for value, _, _ in runs)
    first_runs = sorted(t for t in {v: t for v, _, t in reversed(runs)}.values())
    after = [faulted] + [t for t in first_runs if t >= faulted]
    return {
        "lost": tasks - len(counts),
        "twice": sum(1 for n in counts.values() if n > 1),
        "chord_bodies": counter.llen("chord-body"),
        "stall": max((b - a for a, b in zip(after, after[1:])), default=None),
        "done": (after[-1] - faulted) if len(after) > 1 else None,
        "ids": ids,
    }


def sentinel_run(side_redis, counter, stock):
    sentinels = SentinelSet()
    try:
        options = {"master_name": sentinels.master_name}
        if stock:
            broker, backend = sentinels.stock_url(), sentinels.stock_url(db=1)
        else:
            broker, backend = sentinels.sheppy_url(), sentinels.sheppy_url(short=True)
        conf = {"broker_transport_options": options,
                "result_backend_transport_options": options}
        worker = start_worker(broker, conf, backend=backend, pool="threads", concurrency=4,
                              env={"CELERY_SHEPPY_COUNTER_URL": side_redis.url})
        app = client_app(broker, backend, **conf)
        try:
            # the stock worker may exit after a failover: then do not wait long for it
            figures = drain_through(lambda: sentinels.failover(crash=True), app, counter,
                                    timeout=60 if stock else 120)
            del figures["ids"]
            figures["worker_alive"] = worker.process.poll() is None
            # the worker goes on by itself: a task sent now runs
            try:
                figures["after"] = sig(app, "add", 1, 2).delay().get(timeout=20 if stock else 60)
            except Exception as exc:  # pylint: disable=broad-except  (recorded, for stock)
                figures["after"] = repr(exc)
        finally:
            worker.stop()
            app.close()
        return figures
    finally:
        sentinels.close()


def test_sentinel_failover_while_2000_acks_late_tasks_drain_loses_none_and_runs_none_twice(
        side_redis, counter):
    # Given the stock sentinel:// broker and backend, then sheppy+sentinel://, each draining
    # 2 000 acks_late tasks and a chord; When Sentinel fails the primary over mid-drain
    stock = sentinel_run(side_redis, counter, stock=True)
    print(f"\nsentinel failover, stock sentinel://: {stock}")
    counter.flushdb()
    ours = sentinel_run(side_redis, counter, stock=False)
    print(f"\nsentinel failover, sheppy+sentinel://: {ours}")

    # Then with sheppy+sentinel:// every task ran exactly once and the chord body once,
    # and the worker went on by itself
    assert (ours["lost"], ours["twice"], ours["chord_bodies"]) == (0, 0, 1), ours
    assert ours["worker_alive"] and ours["after"] == 3


@needs_cluster
def test_cluster_failover_while_results_are_stored_loses_none_and_fires_chords_once(
        side_redis, counter):
    # Given a worker whose 2 000 acks_late tasks store their results on a 3+3 Redis Cluster
    # (broker: one server)
    cluster = RedisCluster()
    broker = RedisServer()
    try:
        worker = start_worker(broker.sheppy_url(), backend=cluster.sheppy_url(), pool="threads",
                              concurrency=4, env={"CELERY_SHEPPY_COUNTER_URL": side_redis.url})
        app = client_app(broker.sheppy_url(), cluster.sheppy_url())
        try:
            # When a replica takes over its master (CLUSTER FAILOVER) while results flow
            def failover():
                replica = next(node for node in cluster.nodes
                               if node.client().execute_command("ROLE")[0] == b"slave")
                replica.client().execute_command("CLUSTER", "FAILOVER")
            figures = drain_through(failover, app, counter, results=True)
            cluster.wait_until_ok()
            # Then every result is there and the chord body ran once
            ids = figures.pop("ids")
            assert app.GroupResult("drain", [app.AsyncResult(i) for i in ids]).get(
                timeout=60) == list(range(DRAIN_TASKS))
            print(f"\ncluster failover (results): {figures}")
            assert (figures["lost"], figures["twice"], figures["chord_bodies"]) == (0, 0, 1)
            assert worker.process.poll() is None
        finally:
            worker.stop()
            app.close()
    finally:
        broker.close()
        cluster.close()


@needs_cluster
def test_resharding_while_results_are_stored_loses_none_and_fires_chords_once(
        side_redis, counter):
    # Given a worker whose 2 000 acks_late tasks store their results on a 3+3 Redis Cluster
    cluster = RedisCluster()
    broker = RedisServer()
    try:
        worker = start_worker(broker.sheppy_url(), backend=cluster.sheppy_url(), pool="threads",
                              concurrency=4, env={"CELERY_SHEPPY_COUNTER_URL": side_redis.url})
        app = client_app(broker.sheppy_url(), cluster.sheppy_url())
        try:
            # When 2 000 slots (holding result shards) move to another master mid-drain
            # (MOVED and ASK replies while their keys migrate)
            def reshard():
                nodes = {line.split()[1].split("@")[0].split(":")[1]: line.split()[0]
                         for line in cluster.nodes[0].client(decode_responses=True)
                         .execute_command("CLUSTER", "NODES").splitlines()
                         if "master" in line.split()[2]}
                source, target = sorted(nodes)[:2]
                subprocess.run([cli_binary(), "--cluster", "reshard", f"127.0.0.1:{source}",
                                "--cluster-from", nodes[source], "--cluster-to", nodes[target],
                                "--cluster-slots", "2000", "--cluster-yes"],
                               check=True, capture_output=True, timeout=120)
            figures = drain_through(reshard, app, counter, results=True)
            cluster.wait_until_ok()
            # Then every result is there, the chord body ran once, nothing ran twice
            ids = figures.pop("ids")
            assert app.GroupResult("drain", [app.AsyncResult(i) for i in ids]).get(
                timeout=60) == list(range(DRAIN_TASKS))
            print(f"\nresharding (results): {figures}")
            assert (figures["lost"], figures["twice"], figures["chord_bodies"]) == (0, 0, 1)
            assert worker.process.poll() is None
        finally:
            worker.stop()
            app.close()
    finally:
        broker.close()
        cluster.close()


#: Tasks of the drills with broker and backend on the cluster (500 keeps CI short; set
#: CELERY_SHEPPY_CLUSTER_DRILL_TASKS=2000 for the size the Sentinel drills use).
BROKER_FAILOVER_TASKS = int(os.environ.get("CELERY_SHEPPY_CLUSTER_DRILL_TASKS", "500"))


def node_ids(cluster):
    """{port: node id} of the cluster's masters."""
    return {int(line.split()[1].split("@")[0].split(":")[1]): line.split()[0]
            for line in cluster.nodes[0].client(decode_responses=True)
            .execute_command("CLUSTER", "NODES").splitlines() if "master" in line.split()[2]}


def migrate_slot(cluster, slot):
    """Move ``slot`` and its keys to another master, as ``redis-cli --cluster reshard``
    does (IMPORTING/MIGRATING, MIGRATE in batches: ASK replies meanwhile, then MOVED)."""
    source = cluster.client().nodes_manager.get_node_from_slot(slot).port
    ids = node_ids(cluster)
    target = next(port for port in sorted(ids) if port != source)
    src, dst = cluster.node_by_port(source).client(), cluster.node_by_port(target).client()
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    while True:
        batch = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)
        if not batch:
            break
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *batch)
        time.sleep(0.05)  # a slow migration: the worker meets ASK replies meanwhile
    for port in ids:
        cluster.node_by_port(port).client().execute_command(
            "CLUSTER", "SETSLOT", slot, "NODE", ids[target])


def broker_on_cluster_drill(side_redis, counter, fault):
    """Drain BROKER_FAILOVER_TASKS acks_late tasks (and a chord) with broker and backend on a
    3+3 cluster, ``fault(cluster)`` mid-drain; returns the figures (asserted by the caller)."""
    cluster = RedisCluster()
    try:
        url = cluster.sheppy_url()
        worker = start_worker(url, pool="threads", concurrency=4,
                              env={"CELERY_SHEPPY_COUNTER_URL": side_redis.url})
        app = client_app(url, url)
        try:
            figures = drain_through(lambda: fault(cluster), app, counter, results=True,
                                    tasks=BROKER_FAILOVER_TASKS)
            cluster.wait_until_ok()
            ids = figures.pop("ids")
            print(f"\n{fault.__name__} (broker and results on the cluster): {figures}")
            assert worker.process.poll() is None, worker.output()[-3000:]
            assert app.GroupResult("drain", [app.AsyncResult(i) for i in ids]).get(
                timeout=60) == list(range(BROKER_FAILOVER_TASKS))
            figures["after"] = sig(app, "add", 1, 2).delay().get(timeout=30)
            return figures
        finally:
            worker.stop()
            app.close()
    finally:
        cluster.close()


@needs_cluster
def test_moving_the_queues_slot_while_acks_late_tasks_drain_loses_none(side_redis, counter):
    # Given broker and backend on a cluster; When the slot of {celery} (every key of the
    # broker queue) migrates to another master mid-drain
    from celery_sheppy import keys

    def reshard_queue_slot(cluster):
        migrate_slot(cluster, keys.slot_of(keys.pending_stream("{celery}")))

    figures = broker_on_cluster_drill(side_redis, counter, reshard_queue_slot)
    # Then every task ran once, the chord body once, the worker went on
    assert (figures["lost"], figures["twice"], figures["chord_bodies"]) == (0, 0, 1), figures
    assert figures["after"] == 3


@needs_cluster
def test_cluster_failover_of_the_queues_master_while_acks_late_tasks_drain_loses_none(
        side_redis, counter):
    # Given broker and backend on a cluster; When the replica of the master holding
    # {celery} (sheppy's name of queue celery: one slot) takes over (CLUSTER FAILOVER)
    from celery_sheppy import keys

    def failover_queue_master(cluster):
        slot = keys.slot_of(keys.pending_stream("{celery}"))
        master = cluster.client().nodes_manager.get_node_from_slot(slot)
        replica = next(node for node in cluster.nodes
                       if node.client().execute_command("ROLE")[0] == b"slave"
                       and int(node.client().execute_command("ROLE")[2]) == master.port)
        replica.client().execute_command("CLUSTER", "FAILOVER")

    figures = broker_on_cluster_drill(side_redis, counter, failover_queue_master)
    # Then every task ran once, the chord body once, the worker went on
    assert (figures["lost"], figures["twice"], figures["chord_bodies"]) == (0, 0, 1), figures
    assert figures["after"] == 3

"""Broker and result backend behind Redis Sentinel, result backend on a Redis Cluster.

Sentinel: a primary, a replica and 3 Sentinels (``sentinel_set``). Cluster: 3 masters
+ 3 replicas (``redis_cluster``); here the broker is a standalone server of its own
(results on the cluster, the broker elsewhere); broker and backend both on the cluster:
test_cluster_broker.py.
"""

import json
import uuid

import kombu
import pytest
from celery import chord, group
from celery.exceptions import ImproperlyConfigured

from celery_sheppy import keys, records
from t.helpers import celery_cli, client_app, sig, start_worker
from t.redis_server import RedisServer

SENTINEL_OPTIONS = {"master_name": "mymaster"}


def sentinel_conf():
    return {"broker_transport_options": SENTINEL_OPTIONS,
            "result_backend_transport_options": SENTINEL_OPTIONS}


# -- Sentinel -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_worker(sentinel_set, side_redis):
    worker = start_worker(sentinel_set.sheppy_url(), sentinel_conf(),
                          backend=sentinel_set.sheppy_url(short=True), pool="threads",
                          concurrency=4, env={"CELERY_SHEPPY_COUNTER_URL": side_redis.url})
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def sentinel_app(sentinel_set):
    app = client_app(sentinel_set.sheppy_url(), sentinel_set.sheppy_url(short=True),
                     **sentinel_conf())
    yield app
    app.close()


def test_tasks_groups_and_chords_run_with_broker_and_backend_behind_sentinel(
        sentinel_worker, sentinel_app, sentinel_set):
    app = sentinel_app
    assert sig(app, "add", 2, 3).delay().get(timeout=20) == 5
    assert group(sig(app, "add", i, i) for i in range(20))().get(timeout=30) == [
        2 * i for i in range(20)]
    assert chord([sig(app, "add", i, 1) for i in range(50)], sig(app, "tsum"))().get(
        timeout=30) == sum(range(1, 51))
    # the data is on the primary the Sentinels name, in sheppy's layout
    primary = sentinel_set.primary().client()
    assert primary.hexists(keys.queue_registry(), "celery")


def test_acks_late_result_acks_its_message_in_the_same_script_behind_sentinel(
        sentinel_worker, sentinel_app, sentinel_set):
    # broker and backend reach one primary through different URLs: the backend asks the
    # servers (a token) and acks acks_late messages with their result
    assert sig(sentinel_app, "add_acks_late", 1, 1).delay().get(timeout=20) == 2
    assert sentinel_app.backend.writer.broker_is_here is True
    primary = sentinel_set.primary().client()
    assert primary.xpending(keys.pending_stream("celery"), keys.CONSUMER_GROUP)["pending"] == 0


def test_plain_sheppy_url_at_a_sentinel_names_the_sentinel_url(sentinel_set):
    port = sentinel_set.sentinels[0].port
    app = client_app("memory://", f"sheppy://127.0.0.1:{port}/0")
    with pytest.raises(ImproperlyConfigured,
                       match=rf"use sheppy\+sentinel://127.0.0.1:{port}/0 with the transport "
                             "option master_name"):
        app.backend.client
    app.close()


def test_sentinel_backend_without_master_name_is_refused_by_name(sentinel_set):
    app = client_app("memory://", sentinel_set.sheppy_url())
    with pytest.raises(ImproperlyConfigured, match="master_name"):
        app.backend
    app.close()


def test_sentinel_auth_and_an_acl_user_on_the_primary(sentinel_set):
    # an ACL user on the primary (and its replica), named in the URL as with sentinel://
    for server in sentinel_set.servers:
        server.client().acl_setuser("carol", enabled=True, passwords=["+carol-pw"],
                                    keys=["*"], channels=["*"], commands=["+@all"])
    url = ";".join(f"sheppy+sentinel://carol:carol-pw@127.0.0.1:{s.port}"
                   for s in sentinel_set.sentinels) + "/0"
    with kombu.Connection(url, transport_options=SENTINEL_OPTIONS) as conn:
        assert conn.default_channel.client.acl_whoami() in ("carol", b"carol")
    app = client_app("memory://", url, result_backend_transport_options=SENTINEL_OPTIONS)
    assert app.backend.client.acl_whoami() in ("carol", b"carol")
    app.close()


# -- Cluster: the result backend ----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_broker():
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def cluster_worker(redis_cluster, cluster_broker, side_redis):
    worker = start_worker(cluster_broker.sheppy_url(), backend=redis_cluster.sheppy_url(),
                          pool="threads", concurrency=4,
                          env={"CELERY_SHEPPY_COUNTER_URL": side_redis.url})
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def cluster_app(redis_cluster, cluster_broker):
    app = client_app(cluster_broker.sheppy_url(), redis_cluster.sheppy_url())
    yield app
    app.close()


def record_keys_per_master(cluster):
    counts = {}
    for node in cluster.masters():
        counts[node.port] = sum(1 for _ in node.client().scan_iter(
            match=f"{keys.PREFIX}:tasks:*", count=1000))
    return counts


def test_3000_results_spread_over_every_master_and_each_is_found_from_its_bare_id(
        redis_cluster):
    app = client_app("memory://", redis_cluster.sheppy_url(),
                     result_backend_transport_options={"queue": "spread"})
    ids = [str(uuid.uuid4()) for _ in range(3000)]
    for task_id in ids:
        app.backend.store_result(task_id, task_id[:8], "SUCCESS")
    counts = {port: n for port, n in record_keys_per_master(redis_cluster).items()}
    print(f"\nrecords per master: {sorted(counts.values())}")
    assert len(counts) == 3
    assert all(0.20 * 3000 <= n <= 0.50 * 3000 for n in counts.values()), counts

    # another process knows nothing but the id
    other = client_app("memory://", redis_cluster.sheppy_url(),
                       result_backend_transport_options={"queue": "spread"})
    assert [other.AsyncResult(task_id).get(timeout=5) for task_id in ids[:50]] == [
        task_id[:8] for task_id in ids[:50]]
    assert [r.result for r in other.GroupResult(str(uuid.uuid4()), [
        other.AsyncResult(task_id) for task_id in ids[:200]]).results] == [
        task_id[:8] for task_id in ids[:200]]
    app.close()
    other.close()


def test_tasks_groups_and_chords_run_with_results_on_a_cluster(cluster_worker, cluster_app):
    app = cluster_app
    assert sig(app, "add", 2, 3).delay().get(timeout=20) == 5
    with pytest.raises(ValueError):
        sig(app, "fail").delay().get(timeout=20)
    assert group(sig(app, "add", i, i) for i in range(100))().get(timeout=30) == [
        2 * i for i in range(100)]
    assert chord([sig(app, "add", i, 1) for i in range(200)], sig(app, "tsum"))().get(
        timeout=60) == sum(range(1, 201))
    assert chord((sig(app, "add", i, 0) for i in range(30)), sig(app, "tsum"))().get(
        timeout=60) == sum(range(30))


def test_chord_part_reporting_twice_fires_the_body_once_on_a_cluster(
        cluster_worker, cluster_app, side_redis):
    key = f"chord-{uuid.uuid4()}"
    counter = side_redis.client()
    result = chord([sig(cluster_app, "store_twice", i) for i in range(20)],
                   sig(cluster_app, "record_run", key))()
    result.get(timeout=30)
    assert len(counter.lrange(key, 0, -1)) == 1


def test_progress_states_reach_on_message_on_a_cluster(cluster_worker, cluster_app):
    seen = []
    result = sig(cluster_app, "progress", 3, 0.2).delay()
    assert result.get(timeout=20, on_message=lambda meta: seen.append(meta["status"])) == 3
    assert "PROGRESS" in seen


def test_stored_records_are_sheppy_records_in_hash_tagged_shards(cluster_worker, cluster_app,
                                                                 redis_cluster):
    result = sig(cluster_app, "add", 20, 22).delay()
    assert result.get(timeout=20) == 42
    sid = records.sheppy_id(result.id)
    shard = cluster_app.backend.queue_for(sid)
    assert shard.startswith("{celery.") and shard.endswith("}")
    record = json.loads(redis_cluster.client().get(keys.task_record(shard, sid)))
    assert record["status"] == "completed" and record["result"] == 42
    assert redis_cluster.client().hexists(keys.queue_registry(), shard)


def test_status_command_sums_result_counters_over_the_shards(cluster_worker, cluster_app,
                                                             cluster_broker, redis_cluster):
    group(sig(cluster_app, "add", i, i) for i in range(30))().get(timeout=30)
    from celery_sheppy.ops import queue_stats

    stats = {s.queue: s for s in queue_stats(cluster_app, ["celery"])}
    assert stats["celery"].completed >= 30
    out = celery_cli(cluster_broker.sheppy_url(), "sheppy", "status", "--json",
                     backend=redis_cluster.sheppy_url())
    assert out.returncode == 0, out.stderr
    queues = {q["queue"]: q for q in json.loads(out.stdout)["queues"]}
    assert queues["celery"]["completed"] >= 30


def test_plain_sheppy_url_at_a_cluster_node_names_the_cluster_url(redis_cluster):
    port = redis_cluster.ports[0]
    app = client_app("memory://", f"sheppy://127.0.0.1:{port}/0")
    with pytest.raises(ImproperlyConfigured, match=rf"use sheppy\+cluster://127.0.0.1:{port}/"):
        app.backend.client
    app.close()
    with pytest.raises(Exception, match=rf"use sheppy\+cluster://127.0.0.1:{port}/"):
        kombu.Connection(f"sheppy://127.0.0.1:{port}/0").default_channel


def test_cluster_url_as_broker_makes_a_channel_on_the_cluster(redis_cluster):
    # (broker and backend both on the cluster: t/integration/test_cluster_broker.py)
    from redis.cluster import RedisCluster

    with kombu.Connection(redis_cluster.sheppy_url()) as conn:
        assert isinstance(conn.default_channel.client, RedisCluster)
    with pytest.raises(Exception, match="database 0 only"):
        kombu.Connection(redis_cluster.sheppy_url() + "1").default_channel

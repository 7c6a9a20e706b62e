"""Sentinel and Cluster URLs -> connection parameters, and the result shards' slots (no Redis)."""

import uuid
from collections import Counter

import pytest
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from celery_sheppy import keys
from celery_sheppy.connect import topology_of, urls
from t.helpers import needs_cluster

SENTINEL = {"master_name": "mymaster"}


@pytest.mark.parametrize("url", [
    "sheppy+sentinel://h1:26379;sheppy+sentinel://h2:26380/3",
    "sheppy+sentinel://h1:26379;h2:26380/3",
    "sentinel://h1;sheppy+sentinel://h2:26380/3",  # what Celery's backend loader passes on
])
def test_sentinel_url_forms_name_every_sentinel_and_the_db(url):
    params = urls.connection_kwargs(url, topology_options=SENTINEL)
    assert params["sentinel"].nodes == (("h1", 26379), ("h2", 26380))
    assert params["sentinel"].master_name == "mymaster"
    assert params["db"] == 3
    assert "host" not in params and "port" not in params


def test_sentinel_url_user_and_password_are_the_primarys_and_options_reach_the_sentinels():
    params = urls.connection_kwargs(
        "sheppy+sentinel://alice:p%40ss@h1:26379;h2/0", {"socket_timeout": 7},
        dict(SENTINEL, sentinel_kwargs={"password": "sentinel-pw"}, min_other_sentinels="1"))
    assert (params["username"], params["password"], params["socket_timeout"]) == (
        "alice", "p@ss", 7.0)
    assert dict(params["sentinel"].sentinel_kwargs) == {"password": "sentinel-pw"}
    assert params["sentinel"].min_other_sentinels == 1


def test_sheppys_sentinel_connects_to_the_primary_with_tls():
    params = urls.connection_kwargs("sheppys+sentinel://h1:26379/0",
                                         topology_options=SENTINEL)
    assert params["connection_class"] is SentinelManagedSSLConnection
    loader_cut = urls.connection_kwargs("sentinel://h1:26379/0", topology_options=SENTINEL,
                                             tls=True)
    assert loader_cut["connection_class"] is SentinelManagedSSLConnection
    pool = topology_of(urls.connection_kwargs(
        "sheppy+sentinel://h1/0", topology_options=SENTINEL)).pool()
    assert pool.connection_class is SentinelManagedConnection


def test_sentinel_url_without_master_name_is_refused_by_name():
    with pytest.raises(ValueError, match="master_name"):
        urls.connection_kwargs("sheppy+sentinel://h1:26379/0")


def test_sentinel_options_with_a_plain_url_point_to_the_sentinel_url():
    with pytest.raises(ValueError, match=r"Sentinel options: use a sheppy\+sentinel://"):
        urls.connection_kwargs("sheppy://h/0", topology_options=SENTINEL)


@needs_cluster
def test_cluster_url_names_its_seed_nodes_and_refuses_a_database():
    params = urls.connection_kwargs("sheppy+cluster://h1:7000;h2:7001/")
    assert params["cluster"].nodes == (("h1", 7000), ("h2", 7001))
    assert urls.describe(params) == "Redis Cluster h1:7000,h2:7001"
    with pytest.raises(ValueError, match="database 0 only"):
        urls.connection_kwargs("sheppy+cluster://h1:7000/2")
    with pytest.raises(ValueError, match="mix"):
        urls.connection_kwargs("sheppy+cluster://h1:7000;sheppy+sentinel://h2/")


def test_urls_of_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="not a sheppy URL"):
        urls.kind_of("redis+cluster://h/0")


def test_result_shards_hash_to_evenly_spread_slots_and_each_id_has_one_shard():
    shards = keys.result_shards("celery")
    slots = [keys.slot_of(keys.task_record(shard, "x")) for shard in shards]
    width = 16384 / len(shards)
    assert [int(slot // width) for slot in slots] == list(range(len(shards)))
    sid = str(uuid.uuid4())
    shard = keys.result_shard(shards, sid)
    # a record, its stream entry and its counters share a slot: one script stores them
    assert len({keys.slot_of(key) for key in (
        keys.task_record(shard, sid), keys.finished_stream(shard), keys.state_stream(shard),
        keys.completed_counter(shard), keys.failed_counter(shard),
        keys.chord_pending_set(shard, sid), keys.lazy_chord_done(shard, sid))}) == 1


def test_results_of_3000_ids_spread_over_three_masters_slot_ranges():
    shards = keys.result_shards("celery")
    masters = Counter()
    for _ in range(3000):
        slot = keys.slot_of(keys.task_record(keys.result_shard(shards, str(uuid.uuid4())), "x"))
        masters[min(slot // 5462, 2)] += 1  # redis-cli --cluster create's three ranges
    assert all(600 <= count <= 1500 for count in masters.values()), masters


def test_a_hash_tagged_backend_queue_gets_shards_with_one_tag_each():
    shards = keys.result_shards("{celery}")
    assert all(shard.count("{") == 1 and shard.startswith("{celery.") for shard in shards)


@pytest.mark.parametrize("url", [
    "sheppy+sentinel://h1:1;sheppy+sentinel://h2:2/0",
    "sheppy+sentinel://h1:1;h2:2/0",
])
def test_kombu_keeps_every_sentinel_also_after_failing_over_to_the_next_url_part(url):
    import kombu

    import celery_sheppy  # noqa: F401  (registers the schemes with kombu)

    conn = kombu.Connection(url)
    for _ in range(3):
        params = urls.connection_kwargs(urls.kombu_url(conn), topology_options=SENTINEL)
        assert params["sentinel"].nodes == (("h1", 1), ("h2", 2))
        conn.maybe_switch_next()  # what kombu does after a failed connect
    assert urls.kombu_url(kombu.Connection("sheppy://h:1/0")) is None


def test_redact_masks_the_password_of_every_part():
    assert urls.redact("sheppy+sentinel://u:pw@h1:1;u:pw@h2:2/0") == (
        "sheppy+sentinel://u:**@h1:1;u:**@h2:2/0")

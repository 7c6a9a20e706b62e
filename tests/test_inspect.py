"""ops/stats.py, ops/tables.py and ops/metrics.py on a real redis-server, without workers.

Streams and groups are made here with the commands the transport uses (XADD,
XREADGROUP, XCLAIM, XACK + XDEL), so each rule of the counts is seen on its own.
The same counts against real workers: t/integration/test_ops_cli.py.
"""

import time

import pytest
import redis
from kombu import Queue

from celery_sheppy import keys
from celery_sheppy.ops import metrics
from celery_sheppy.transport import presence
from celery_sheppy.ops.stats import ALIVE, DEAD, Inspector, Settings, collect
from celery_sheppy.ops.tables import Column, duration, render
from t.helpers import client_app

GROUP = keys.CONSUMER_GROUP
PENDING = keys.pending_stream("q")


def server_version(client):
    return tuple(int(part) for part in client.info("server")["redis_version"].split(".")[:2])


def stats_of(client, queue="q", **settings):
    return collect(client, [queue], Settings(**settings))[0]


def test_ready_in_flight_and_oldest_age_come_from_the_group_and_its_first_undelivered_entry(
        redis_client):
    # Given five entries, two of them read by consumer c1, and one in a priority stream
    # that no group reads yet
    redis_client.xgroup_create(PENDING, GROUP, "0", mkstream=True)
    for i in range(5):
        redis_client.xadd(PENDING, {"data": str(i)})
        time.sleep(0.01)
    redis_client.xreadgroup(GROUP, "c1", {PENDING: ">"}, count=2)
    third = redis_client.xrange(PENDING, count=3)[2][0].decode()
    redis_client.xadd(keys.priority_stream("q", 3), {"data": "x"})
    time.sleep(0.2)

    # When the queue's stats are read
    stats = stats_of(redis_client)
    now_ms = sum(t * f for t, f in zip(redis_client.time(), (1000, 0.001)))

    # Then the 3 + 1 undelivered entries are ready, the 2 read ones in flight for c1,
    # and the oldest ready one is the third entry
    assert (stats.ready, stats.in_flight) == (4, 2)
    assert [(c.name, c.in_flight, c.state) for c in stats.consumers] == [("c1", 2, ALIVE)]
    expected_age = (now_ms - int(third.split("-")[0])) / 1000
    assert expected_age - 0.05 <= stats.oldest_ready_age <= expected_age + 0.05
    assert stats.oldest_ready_age >= 0.2


def test_ready_falls_back_to_length_minus_pending_when_redis_cannot_tell_the_lag(redis_client):
    # Given a group whose lag Redis cannot compute: an entry after its last-delivered id
    # was deleted (as ``celery purge`` does)
    redis_client.xgroup_create(PENDING, GROUP, "0", mkstream=True)
    ids = [redis_client.xadd(PENDING, {"data": str(i)}) for i in range(6)]
    redis_client.xreadgroup(GROUP, "c1", {PENDING: ">"}, count=2)
    redis_client.xack(PENDING, GROUP, ids[0])
    redis_client.xdel(PENDING, ids[0], ids[3])
    assert redis_client.xinfo_groups(PENDING)[0]["lag"] is None

    stats = stats_of(redis_client)

    # Then ready = XLEN (4) - pending (1): acked entries are deleted by every ack
    assert (stats.ready, stats.in_flight) == (3, 1)


def test_a_consumer_holding_messages_is_dead_once_idle_past_the_lease_and_alive_when_it_renews(
        redis_client):
    redis_client.xgroup_create(PENDING, GROUP, "0", mkstream=True)
    for i in range(3):
        redis_client.xadd(PENDING, {"data": str(i)})
    held = [entry_id for entry_id, _ in
            redis_client.xreadgroup(GROUP, "c1", {PENDING: ">"}, count=2)[0][1]]
    assert stats_of(redis_client, lease=0.5).consumers[0].state == ALIVE

    time.sleep(0.7)
    stats = stats_of(redis_client, lease=0.5)
    assert [(c.name, c.state) for c in stats.consumers] == [("c1", DEAD)]
    assert stats.stuck == 2

    # renew.lua's XCLAIM … 0 <ids> JUSTID of its own entries resets the idle time
    redis_client.xclaim(PENDING, GROUP, "c1", 0, held, justid=True)
    stats = stats_of(redis_client, lease=0.5)
    assert (stats.consumers[0].state, stats.stuck) == (ALIVE, 0)


def test_a_consumer_holding_nothing_is_alive_while_registered_whatever_its_reads(
        redis_client):
    # Given a consumer that read and acked its one entry, then only reads nothing
    redis_client.xgroup_create(PENDING, GROUP, "0", mkstream=True)
    entry_id = redis_client.xadd(PENDING, {"data": "1"})
    redis_client.xreadgroup(GROUP, "c1", {PENDING: ">"}, count=1)
    redis_client.xack(PENDING, GROUP, entry_id)
    redis_client.xdel(PENDING, entry_id)
    redis_client.xreadgroup(GROUP, "c1", {PENDING: ">"}, count=1)  # an empty read

    # When it is registered for 500 ms (as its worker is every quarter lease), it is alive
    presence.register(redis_client, ["c1"], 500)
    consumer = stats_of(redis_client, lease=0.5).consumers[0]
    assert (consumer.name, consumer.state, consumer.in_flight) == ("c1", ALIVE, 0)

    # When its registration ends (Redis 7.2+ counts the empty read in its idle time; the
    # state does not depend on it), it is dead: gone, holding nothing
    time.sleep(0.7)
    redis_client.xreadgroup(GROUP, "c1", {PENDING: ">"}, count=1)
    assert stats_of(redis_client, lease=0.5).consumers[0].state == DEAD
    assert stats_of(redis_client, lease=0.5).stuck == 0


def test_scheduled_dead_letters_and_result_counters_are_read_per_queue(redis_client):
    redis_client.zadd(keys.scheduled_set("q"), {"a": time.time() + 60, "b": time.time() + 90})
    redis_client.xadd(keys.dead_letter_stream("q"), {"reason": "rejected", "data": "{}"})
    redis_client.set(keys.completed_counter("q"), 5)
    redis_client.set(keys.failed_counter("q"), 2)
    redis_client.set(keys.completed_counter("only-successes"), 3)

    q, never, ok = collect(redis_client, ["q", "never-used", "only-successes"], Settings())

    assert (q.scheduled, q.dead_letters, q.completed, q.failed) == (2, 1, 5, 2)
    assert (q.ready, q.in_flight, q.oldest_ready_age, q.consumers) == (0, 0, None, [])
    assert (never.completed, never.failed) == (None, None)  # no result stored there, ever
    assert (ok.completed, ok.failed) == (3, 0)  # the failed counter starts with a failure


def test_queues_are_the_configured_ones_and_sheppys_registry_unless_named(redis_server,
                                                                          redis_client):
    app = client_app(redis_server.sheppy_url(), redis_server.sheppy_url(),
                     task_queues=[Queue("a"), Queue("celery")])
    redis_client.hset(keys.queue_registry(), mapping={"b": "{}", "x:y": "{}"})
    with app.connection_for_read() as conn:
        view = Inspector(app, conn)
        assert view.queues() == ["a", "b", "celery"]  # "x:y" cannot be in sheppy's layout
        assert view.queues(["z", "a", "z"]) == ["z", "a"]
        with pytest.raises(keys.InvalidQueueName, match="'bad:name'"):
            view.queues(["bad:name"])
    app.close()


def test_stats_cost_a_fixed_number_of_commands_per_stream_and_never_a_scan(make_redis_server):
    server = make_redis_server()
    client = server.client()
    queues = [f"q{i}" for i in range(10)]
    for queue in queues:
        client.xgroup_create(keys.pending_stream(queue), GROUP, "0", mkstream=True)
        for i in range(20):
            client.xadd(keys.pending_stream(queue), {"data": str(i)})
        client.set(keys.task_record(queue, "x"), "{}")  # records are never looked at
    client.config_resetstat()

    stats = collect(client, queues, Settings())

    commands = {name: info["calls"] for name, info in client.info("commandstats").items()}
    streams = len(Settings().streams.of("q0"))
    assert [s.ready for s in stats] == [20] * 10
    # TIME, then per stream XLEN + XINFO GROUPS + XINFO CONSUMERS (+ XRANGE if ready),
    # per queue ZCARD + XLEN + 2 GET; the config_resetstat and info calls count too
    assert sum(commands.values()) <= 1 + 10 * (4 * streams + 4) + 2
    assert not {"cmdstat_scan", "cmdstat_keys", "cmdstat_mget"} & set(commands)
    assert not any(name.startswith("cmdstat_get") and calls > 20 for name, calls in commands.items())


def test_tables_fit_80_columns_by_cutting_the_flexible_columns_widest_first():
    columns = [Column("QUEUE", flex=True, least=6), Column("COUNT", right=True),
               Column("NOTE", flex=True, least=10)]
    lines = render(columns, [["a-very-long-queue-name-" * 3, 1234567, "n" * 70],
                             ["short", None, "fine"]])
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].split() == ["QUEUE", "COUNT", "NOTE"]
    assert "1,234,567" in lines[1] and lines[1].count("…") == 2
    assert lines[2].split()[:2] == ["short", "-"]


def test_durations_read_as_seconds_minutes_hours_and_days():
    assert [duration(s) for s in (None, 0.42, 12.9, 185, 7980, 273600, -30)] == [
        "-", "0.4s", "12s", "3m05s", "2h13m", "3d04h", "-30s"]


def test_exposition_parses_and_matches_what_prometheus_client_writes_for_the_same_stats(
        redis_client):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    redis_client.xgroup_create(PENDING, GROUP, "0", mkstream=True)
    for i in range(3):
        redis_client.xadd(PENDING, {"data": str(i)})
    redis_client.xreadgroup(GROUP, "c1", {PENDING: ">"}, count=1)
    redis_client.set(keys.completed_counter("q"), 12_345_678)  # written as 1.2345678e+07
    stats = collect(redis_client, ["q", "empty"], Settings())

    text = metrics.exposition(stats)

    registry = CollectorRegistry()
    registry.register(type("Fixed", (), {"collect": lambda self: metrics.families(stats)})())
    assert text == generate_latest(registry).decode()
    values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
              for family in text_string_to_metric_families(text) for sample in family.samples}
    assert values[("sheppy_queue_ready", (("queue", "q"),))] == 2
    assert values[("sheppy_queue_in_flight", (("queue", "q"),))] == 1
    assert values[("sheppy_queue_completed_total", (("queue", "q"),))] == 12_345_678
    assert values[("sheppy_queue_consumers", (("queue", "q"), ("state", "alive")))] == 1
    assert ("sheppy_queue_completed_total", (("queue", "empty"),)) not in values  # unknown
    assert values[("sheppy_queue_oldest_ready_age_seconds", (("queue", "empty"),))] == 0


def test_an_error_other_than_a_missing_stream_is_raised_not_counted_as_empty(redis_client):
    redis_client.set(PENDING, "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        stats_of(redis_client)

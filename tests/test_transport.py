"""The sheppy:// kombu transport against a real redis-server: kombu-level behaviour."""

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing, nullcontext

import kombu
import pytest
from kombu import Consumer, Exchange, Producer, Queue

from celery_sheppy import keys
from t.helpers import client_app

GROUP = keys.CONSUMER_GROUP


#: Producer.batch() came with kombu 5.7.
needs_producer_batch = pytest.mark.skipif(not hasattr(Producer, "batch"),
                                          reason="Producer.batch() needs kombu 5.7+")


@pytest.fixture
def url(redis_server, redis_client):
    return redis_server.sheppy_url(0)


@pytest.fixture
def connection(url):
    with kombu.Connection(url) as conn:
        yield conn


def publish(conn, queue, bodies, **kwargs):
    with conn.channel() as channel:
        producer = Producer(channel)
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                             declare=[queue], **kwargs)


def drain(conn, queues, ack=True, limit=None, timeout=0.5, **consumer_options):
    """Bodies received until ``timeout`` passes without a message (or ``limit`` is reached)."""
    received = []

    def on_message(body, message):
        received.append((body, message))
        if ack:
            message.ack()

    with Consumer(conn, queues, callbacks=[on_message], **consumer_options):
        while limit is None or len(received) < limit:
            try:
                conn.drain_events(timeout=timeout)
            except socket.timeout:
                break
    return received


def entries(redis_client, queue):
    return redis_client.xrange(keys.pending_stream(queue))


# -- publish, consume, ack, reject --------------------------------------------------------


def test_published_messages_are_consumed_in_order_and_acked_messages_leave_the_stream(
        connection, redis_client):
    queue = Queue("basic", routing_key="basic")
    publish(connection, queue, [{"n": n} for n in range(5)])
    assert redis_client.xlen(keys.pending_stream("basic")) == 5

    received = drain(connection, [queue])

    assert [body for body, _ in received] == [{"n": n} for n in range(5)]
    assert redis_client.xlen(keys.pending_stream("basic")) == 0
    assert redis_client.xpending(keys.pending_stream("basic"), GROUP)["pending"] == 0


def test_rejected_message_without_requeue_is_gone(connection, redis_client):
    with closing(connection.SimpleQueue("reject-drop")) as queue:
        queue.put({"a": 1})
        queue.get(timeout=1).reject(requeue=False)
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.3)
    assert redis_client.xlen(keys.pending_stream("reject-drop")) == 0


def test_rejected_message_with_requeue_comes_back_marked_redelivered(connection, redis_client):
    with closing(connection.SimpleQueue("reject-requeue")) as queue:
        queue.put({"a": 1})
        first = queue.get(timeout=1)
        assert not first.delivery_info.get("redelivered")
        first.reject(requeue=True)
        second = queue.get(timeout=1)
        assert second.payload == {"a": 1}
        assert second.delivery_info["redelivered"] is True
        second.ack()
    assert redis_client.xlen(keys.pending_stream("reject-requeue")) == 0


def test_unacked_messages_return_to_their_stream_when_the_channel_closes(url, redis_client):
    queue = Queue("restore", routing_key="restore")
    with kombu.Connection(url) as conn:
        publish(conn, queue, [{"n": n} for n in range(3)])
        received = drain(conn, [queue], ack=False)
        assert len(received) == 3
        assert redis_client.xpending(keys.pending_stream("restore"), GROUP)["pending"] == 3

    stream = keys.pending_stream("restore")
    assert redis_client.xpending(stream, GROUP)["pending"] == 0
    assert redis_client.xlen(stream) == 3
    with kombu.Connection(url) as conn:
        again = drain(conn, [queue])
    assert sorted(body["n"] for body, _ in again) == [0, 1, 2]
    assert all(message.delivery_info["redelivered"] for _, message in again)
    assert redis_client.xlen(stream) == 0


def test_closed_channel_removes_its_consumer_from_the_group(url, redis_client):
    queue = Queue("consumers", routing_key="consumers")
    with kombu.Connection(url) as conn:
        publish(conn, queue, [1])
        drain(conn, [queue])
    assert redis_client.xinfo_consumers(keys.pending_stream("consumers"), GROUP) == []


# -- QoS --------------------------------------------------------------------------------------


def test_consumer_never_holds_more_messages_than_its_prefetch_count(connection, redis_client):
    queue = Queue("qos", routing_key="qos")
    publish(connection, queue, list(range(10)))
    held = []

    def on_message(body, message):
        held.append(message)

    stream = keys.pending_stream("qos")
    with Consumer(connection, [queue], callbacks=[on_message], prefetch_count=3):
        for _ in range(6):
            try:
                connection.drain_events(timeout=0.2)
            except socket.timeout:
                pass
        assert len(held) == 3
        # Nothing more was taken from Redis than the budget allowed.
        assert redis_client.xpending(stream, GROUP)["pending"] == 3

        held.pop(0).ack()
        connection.drain_events(timeout=1)
        assert len(held) == 3
        for message in held:
            message.ack()


# -- exchanges ------------------------------------------------------------------------------


def test_fanout_message_is_one_publish_and_reaches_every_consuming_queue_once(url, redis_client):
    # Given three connections consuming queues bound to one fanout exchange, and a fourth
    # queue bound but not consumed
    exchange = Exchange("broadcast", type="fanout")
    queues = [Queue(f"listener{n}", exchange=exchange) for n in range(3)]
    connections = [kombu.Connection(url) for _ in queues]
    received = {queue.name: [] for queue in queues}
    try:
        consumers = []
        for conn, queue in zip(connections, queues):
            consumer = Consumer(conn, [queue], no_ack=True,
                                callbacks=[lambda body, _, name=queue.name:
                                           received[name].append(body)])
            consumer.consume()
            consumers.append(consumer)
        idle = kombu.Connection(url)
        Queue("listener-idle", exchange=exchange)(idle.default_channel).declare()
        redis_client.config_resetstat()

        # When one message is published to the exchange
        with kombu.Connection(url) as producer_conn:
            with producer_conn.channel() as channel:
                Producer(channel, exchange=exchange).publish({"hello": "all"})

        # Then it cost one PUBLISH, and each consuming queue gets it once
        for conn in connections:
            try:
                conn.drain_events(timeout=2)
            except socket.timeout:
                pass
        assert received == {queue.name: [{"hello": "all"}] for queue in queues}
        stats = redis_client.info("commandstats")
        assert stats["cmdstat_publish"]["calls"] == 1
        assert "cmdstat_xadd" not in stats
        # (as with the stock redis:// transport, a queue nobody consumes gets nothing)
        assert not redis_client.exists(keys.pending_stream("listener-idle")) or \
            redis_client.xlen(keys.pending_stream("listener-idle")) == 0
        idle.close()
    finally:
        for conn in connections:
            conn.close()


def test_topic_exchange_routes_by_pattern(connection):
    exchange = Exchange("topics", type="topic")
    wanted = Queue("topic-wanted", exchange=exchange, routing_key="stock.*")
    other = Queue("topic-other", exchange=exchange, routing_key="news.#")
    with connection.channel() as channel:
        Producer(channel, exchange=exchange).publish(
            {"price": 1}, routing_key="stock.nyse", declare=[wanted, other])
    assert [body for body, _ in drain(connection, [wanted])] == [{"price": 1}]
    assert drain(connection, [other]) == []


def test_publisher_follows_bindings_made_and_removed_by_another_process(url, redis_client):
    exchange = Exchange("routes", type="direct")
    first = Queue("route-first", exchange=exchange, routing_key="k")
    second = Queue("route-second", exchange=exchange, routing_key="k")
    with kombu.Connection(url) as publisher, kombu.Connection(url) as other:
        channel = publisher.channel()
        producer = Producer(channel, exchange=exchange)
        producer.publish({"n": 1}, routing_key="k", declare=[first])  # table cached: first

        second(other.default_channel).declare()  # bound by another process
        producer.publish({"n": 2}, routing_key="k")
        first(other.default_channel).unbind_from(exchange, routing_key="k")
        producer.publish({"n": 3}, routing_key="k")
        channel.close()

        assert [b["n"] for b, _ in drain(other, [Queue("route-first", no_declare=True)])] == [1, 2]
        assert [b["n"] for b, _ in drain(other, [Queue("route-second", no_declare=True)])] == [2, 3]


# -- priorities ------------------------------------------------------------------------------


def test_lower_priority_number_is_delivered_first_as_with_the_stock_transport(connection):
    queue = Queue("prio", routing_key="prio")
    publish(connection, queue, ["low-1"], priority=9)
    publish(connection, queue, ["default"])
    publish(connection, queue, ["high"], priority=3)
    publish(connection, queue, ["low-2"], priority=9)

    assert [body for body, _ in drain(connection, [queue])] == ["default", "high", "low-1", "low-2"]


def test_queue_order_strategy_priority_drains_the_first_queue_first(url, redis_client):
    first, second = Queue("order-a", routing_key="order-a"), Queue("order-b", routing_key="order-b")
    with kombu.Connection(url, transport_options={"queue_order_strategy": "priority"}) as conn:
        publish(conn, second, ["b1", "b2"])
        publish(conn, first, ["a1", "a2"])
        bodies = [body for body, _ in drain(conn, [first, second])]
    assert bodies == ["a1", "a2", "b1", "b2"]


def test_priority_steps_without_zero_keep_unprioritised_messages_in_sheppys_pending_stream(
        url, redis_client):
    options = {"priority_steps": [1, 5]}
    queue = Queue("steps", routing_key="steps")
    with kombu.Connection(url, transport_options=options) as conn:
        publish(conn, queue, ["urgent"], priority=5)
        publish(conn, queue, ["plain"])
        assert redis_client.xlen(keys.pending_stream("steps")) == 1
        assert redis_client.xlen(keys.priority_stream("steps", 5)) == 1
        assert not redis_client.exists(keys.priority_stream("steps", 1))
        assert [body for body, _ in drain(conn, [queue])] == ["plain", "urgent"]


def test_expiring_queue_with_priority_steps_without_zero_is_consumed(url, redis_client):
    options = {"priority_steps": [1, 5]}
    exchange = Exchange("steps-x", type="direct")
    queue = Queue("steps-expiring", exchange=exchange, routing_key="k", expires=10)
    with kombu.Connection(url, transport_options=options) as conn:
        with conn.channel() as channel:
            Producer(channel, exchange=exchange).publish("hi", routing_key="k", declare=[queue])
        assert [body for body, _ in drain(conn, [queue])] == ["hi"]


def test_basic_get_skips_buffered_entries_that_are_dropped(url, redis_client):
    # Given a consumer whose read buffered two undecodable entries it had no room for
    queue = Queue("getbuf", routing_key="getbuf")
    with kombu.Connection(url) as conn:
        publish(conn, queue, ["good"])
        for step in (3, 6):
            redis_client.xadd(keys.priority_stream("getbuf", step), {"data": "not json"})
        channel = conn.channel()
        got = []
        consumer = Consumer(channel, [queue], callbacks=[lambda body, m: got.append(m)])
        consumer.qos(prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=2)
            assert [m.body for m in got] == [b'"good"'] or [m.payload for m in got] == ["good"]
            # When basic_get meets them first, then Then they are dead-lettered, not a crash
            assert channel.basic_get("getbuf") is None
        assert redis_client.xlen(keys.dead_letter_stream("getbuf")) == 2
        got[0].ack()
        channel.close()


# -- expiry ----------------------------------------------------------------------------------


def test_message_past_its_expiration_is_dropped_instead_of_delivered(connection, redis_client):
    queue = Queue("ttl", routing_key="ttl")
    publish(connection, queue, ["stale"], expiration=0.2)
    publish(connection, queue, ["fresh"])
    time.sleep(0.4)
    assert [body for body, _ in drain(connection, [queue])] == ["fresh"]
    assert redis_client.xlen(keys.pending_stream("ttl")) == 0


def test_expiring_queue_and_its_binding_expire_in_redis(connection, redis_client):
    exchange = Exchange("replies", type="direct")
    queue = Queue("short-lived", exchange=exchange, routing_key="me", expires=1)
    with connection.channel() as channel:
        Producer(channel, exchange=exchange).publish({"x": 1}, routing_key="me", declare=[queue])
    stream = keys.pending_stream("short-lived")
    assert 0 < redis_client.pttl(stream) <= 1000
    assert redis_client.ttl(keys.exchange_bindings("replies")) > 0
    assert not redis_client.exists(keys.priority_stream("short-lived", 3))
    time.sleep(1.2)
    assert not redis_client.exists(stream)


def test_auto_delete_queue_and_binding_go_when_the_consumer_is_cancelled(connection, redis_client):
    exchange = Exchange("auto", type="fanout")
    queue = Queue("auto-q", exchange=exchange, auto_delete=True, expires=30)
    drain(connection, [queue])
    assert not redis_client.exists(keys.pending_stream("auto-q"))
    assert not redis_client.exists(keys.exchange_bindings("auto"))


# -- size and purge --------------------------------------------------------------------------


def test_size_counts_waiting_messages_and_purge_leaves_delivered_ones(connection, redis_client):
    queue = Queue("purge", routing_key="purge")
    publish(connection, queue, list(range(5)))
    publish(connection, queue, ["urgent"], priority=6)
    channel = connection.channel()
    assert queue(channel).queue_declare().message_count == 6

    message = queue(channel).get()  # delivered, not acked
    assert queue(channel).queue_declare().message_count == 5
    assert queue(channel).purge() == 5
    assert queue(channel).queue_declare().message_count == 0
    assert redis_client.xpending(keys.pending_stream("purge"), GROUP)["pending"] == 1
    message.ack()
    channel.close()


def test_queue_delete_removes_its_streams(connection, redis_client):
    queue = Queue("doomed", routing_key="doomed")
    publish(connection, queue, [1])
    channel = connection.channel()
    assert queue(channel).queue_declare(passive=True)
    queue(channel).delete()
    assert not redis_client.keys("*doomed*")
    channel.close()


# -- volume ---------------------------------------------------------------------------------


def test_message_of_ten_megabytes_round_trips(connection):
    queue = Queue("big", routing_key="big")
    body = "x" * (10 * 1024 * 1024)
    publish(connection, queue, [body])
    received = drain(connection, [queue], limit=1, timeout=5)
    assert len(received) == 1 and received[0][0] == body


def test_ten_thousand_messages_across_five_queues_are_each_delivered_exactly_once(
        url, redis_client):
    queues = [Queue(f"bulk{n}", routing_key=f"bulk{n}") for n in range(5)]
    with kombu.Connection(url) as conn:
        with conn.channel() as channel:
            producer = Producer(channel)
            for queue in queues:
                queue(channel).declare()
            # Batched where kombu has Producer.batch() (5.7+), so quicker, not different.
            with producer.batch() if hasattr(producer, "batch") else nullcontext():
                for n in range(10000):
                    queue = queues[n % 5]
                    producer.publish({"n": n}, routing_key=queue.routing_key)
        seen = [body["n"] for body, _ in drain(conn, queues, timeout=1, prefetch_count=200)]
    assert len(seen) == 10000
    assert sorted(seen) == list(range(10000))
    for queue in queues:
        assert redis_client.xlen(keys.pending_stream(queue.name)) == 0


@needs_producer_batch
def test_batch_is_one_transaction_and_survives_a_lost_connection_exactly_once(
        connection, redis_client):
    queue = Queue("batched", routing_key="batched")
    calls = lambda name: redis_client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0)  # noqa: E731
    multi_before = calls("multi")
    with connection.channel() as channel:
        producer = Producer(channel)
        queue(channel).declare()
        with producer.batch():
            for n in range(50):
                producer.publish({"n": n}, routing_key="batched")
            assert redis_client.xlen(keys.pending_stream("batched")) == 0  # still buffered
            # Every other client's connection dies before the flush, the producer's too.
            redis_client.client_kill_filter(_type="normal", skipme=True)
    assert calls("multi") - multi_before in (1, 2)  # 2: the first EXEC never arrived
    bodies = [body["n"] for body, _ in drain(connection, [queue])]
    assert sorted(bodies) == list(range(50))


# -- sheppy's view ----------------------------------------------------------------------------


@pytest.mark.sheppy_tools
def test_pending_celery_tasks_are_valid_sheppy_records_that_sheppy_lists(redis_server,
                                                                          redis_client):
    from sheppy import Queue as SheppyQueue
    from sheppy.models import Task

    app = client_app(redis_server.sheppy_url(0), redis_server.sheppy_url(0))
    try:
        result = app.send_task("t.integration.tasks.add", args=(2, 3), kwargs={"z": 1},
                               countdown=60)
        app.send_task("t.integration.tasks.add", args=(1, 1), priority=6)
    finally:
        app.close()
    raw = entries(redis_client, "celery")
    assert len(raw) == 1  # the priority 6 one is in its priority stream
    record = json.loads(raw[0][1][b"data"])
    task = Task.model_validate(record)
    assert str(task.id) == result.id
    assert task.status == "pending"
    assert list(task.spec.args) == [2, 3] and task.spec.kwargs == {"z": 1}
    assert task.scheduled_at is not None

    async def pending():
        queue = SheppyQueue(f"redis://127.0.0.1:{redis_server.port}/0", name="celery")
        return await queue.get_pending(10)

    listed = asyncio.run(pending())
    assert [str(t.id) for t in listed] == [result.id]
    assert redis_client.hget(keys.queue_registry(), "celery") == b"{}"


@pytest.mark.sheppy_tools
def test_remote_control_replies_are_valid_sheppy_records_too(connection, redis_client):
    # (the broadcasts themselves are pub/sub messages: fanout.py)
    from sheppy.models import Task

    exchange = Exchange("reply.control", type="direct")
    queue = Queue("host.reply", exchange=exchange, routing_key="host.reply", expires=10)
    with connection.channel() as channel:
        Producer(channel, exchange=exchange).publish(
            {"ok": "pong"}, routing_key="host.reply", declare=[queue], serializer="pickle")
    (_, fields), = entries(redis_client, "host.reply")
    Task.model_validate(json.loads(fields[b"data"]))
    assert redis_client.hget(keys.queue_registry(), "host.reply") is None


# -- URLs, credentials, TLS, scheme resolution -------------------------------------------------


def test_password_is_masked_when_the_connection_is_shown(redis_server):
    conn = kombu.Connection(f"sheppy://bob:s3cret@127.0.0.1:{redis_server.port}/0")
    assert "s3cret" not in conn.as_uri()
    assert "bob:**@" in conn.as_uri()


def test_acl_username_and_password_from_the_url_are_used(acl_server):
    queue = Queue("acl", routing_key="acl")
    with kombu.Connection(f"sheppy://alice:s3cret-pw@127.0.0.1:{acl_server.port}/0") as conn:
        publish(conn, queue, ["secret"])
        assert [body for body, _ in drain(conn, [queue])] == ["secret"]
    with pytest.raises(Exception) as info:
        kombu.Connection(f"sheppy://alice:wrong@127.0.0.1:{acl_server.port}/0").connect()
    assert "wrong" not in str(info.value)


def test_sheppys_url_talks_tls_with_the_stock_ssl_options(tls_server):
    queue = Queue("tls", routing_key="tls")
    url = f"sheppys://127.0.0.1:{tls_server.port}/0"
    with kombu.Connection(url, ssl={"ssl_ca_certs": tls_server.ca_file}) as conn:
        publish(conn, queue, ["private"])
        assert [body for body, _ in drain(conn, [queue])] == ["private"]
    with pytest.raises(Exception):
        kombu.Connection(url).connect()  # unknown CA: refused


def test_unsupported_layout_options_are_refused(url):
    conn = kombu.Connection(url, transport_options={"global_keyprefix": "x:"})
    with pytest.raises(Exception, match="global_keyprefix"):
        conn.channel()
    conn.close()


def test_scheme_resolves_in_a_fresh_process_that_only_imports_celery(url, redis_client):
    code = (
        "import sys\n"
        "from celery import Celery\n"
        "app = Celery(broker=sys.argv[1])\n"
        "with app.connection_for_write() as conn:\n"
        "    conn.ensure_connection(max_retries=1)\n"
        "    print(type(conn.transport).__module__)\n"
        "app.send_task('anything', queue='fresh')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "celery_sheppy.transport"
    assert redis_client.xlen(keys.pending_stream("fresh")) == 1


def test_publish_retries_per_the_transport_retry_policy_while_redis_restarts(make_redis_server):
    server = make_redis_server()
    queue = Queue("retried", routing_key="retried")
    options = {"max_retries": 20, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 0.5}
    with kombu.Connection(server.sheppy_url(), transport_options=options) as conn:
        producer = Producer(conn.channel())
        producer.publish("before", routing_key="retried", declare=[queue])
        server.kill()
        restarter = threading.Timer(1.0, server.start)
        restarter.start()
        started = time.monotonic()
        producer.publish("during", routing_key="retried")  # fails at first, then goes through
        restarter.join()
        assert time.monotonic() - started >= 0.5
        assert [body for body, _ in drain(conn, [queue])] == ["during"]  # no persistence


def test_publish_raises_a_clear_error_once_the_retry_policy_is_spent(make_redis_server):
    server = make_redis_server()
    queue = Queue("spent", routing_key="spent")
    options = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.1, "interval_max": 0.1}
    with kombu.Connection(server.sheppy_url(), transport_options=options) as conn:
        producer = Producer(conn.channel())
        producer.publish("first", routing_key="spent", declare=[queue])
        server.kill()
        started = time.monotonic()
        with pytest.raises(Exception, match="onnect"):
            producer.publish("lost", routing_key="spent")
        assert time.monotonic() - started < 10


# -- what a queue leaves in Redis ----------------------------------------------------------------


def test_declared_queue_has_its_priority_streams_from_the_start_and_an_expiring_one_has_not(
        connection, redis_client):
    # A reader then reads every stream of the queue and never looks for new ones
    queue = Queue("lean", routing_key="lean")
    reply = Queue("lean.reply", routing_key="lean.reply", expires=10)
    with connection.channel() as channel:
        queue(channel).declare()
        reply(channel).declare()
    streams = sorted(key for key in redis_client.scan_iter("*lean*")
                     if b"stream" == redis_client.type(key))
    assert streams == sorted([*(keys.priority_stream("lean", step).encode() for step in (0, 3, 6, 9)),
                              keys.pending_stream("lean.reply").encode()])
    assert all(redis_client.xinfo_groups(stream)[0]["name"] == keys.CONSUMER_GROUP.encode()
               for stream in streams)
    publish(connection, queue, ["urgent"], priority=6)
    assert [body for body, _ in drain(connection, [queue])] == ["urgent"]


def test_a_producer_declares_a_queue_once_and_a_transient_queue_every_time(
        connection, redis_client):
    # Given a producer on a sheppy:// channel
    with connection.channel() as channel:
        # Bound to the channel: kombu 5.3's maybe_declare(retry=True) needs a bound entity.
        durable = Queue("once", routing_key="once")(channel)
        transient = Queue("every", routing_key="every", auto_delete=True)(channel)
        producer = Producer(channel)
        # When it is asked twice to make sure of each queue
        first = [producer.maybe_declare(queue, retry=True) for queue in (durable, transient)]
        redis_client.delete(keys.pending_stream("every"))
        second = [producer.maybe_declare(queue, retry=True) for queue in (durable, transient)]
    # Then the durable one is declared once (kombu's cache), the transient one again
    assert first == [True, True] and second == [False, True]
    assert redis_client.exists(keys.pending_stream("once"), keys.pending_stream("every")) == 2


def test_publish_after_the_server_closed_the_publish_connection_arrives_once(
        connection, redis_client):
    # Given a producer whose publish connection the server has closed since its last publish
    queue = Queue("dropped", routing_key="dropped")
    with connection.channel() as channel:
        producer = Producer(channel)
        producer.publish("before", routing_key="dropped", declare=[queue])
        redis_client.client_kill_filter(_type="normal", skipme=True)
        # When it publishes again
        producer.publish("after", routing_key="dropped", declare=[queue])
    # Then the message is in the stream once, after the first
    assert [body for body, _ in drain(connection, [queue])] == ["before", "after"]


def test_priority_message_published_while_a_consumer_reads_reaches_it_at_once(url, redis_client):
    # Given a consumer already reading a queue that has had no message of priority 9
    queue = Queue("joins", routing_key="joins")
    received = []
    with kombu.Connection(url) as consuming, kombu.Connection(url) as producing:
        with Consumer(consuming, [queue], callbacks=[lambda b, m: (received.append(b), m.ack())]):
            with pytest.raises(socket.timeout):
                consuming.drain_events(timeout=0.3)  # its read is now outstanding
            # When another process publishes the first message of that priority
            publish(producing, queue, ["urgent"], priority=9)
            consuming.drain_events(timeout=3)
    # Then the read, which names every priority stream of the queue, gets it
    assert received == ["urgent"]
    assert redis_client.exists(*[keys.priority_stream("joins", step) for step in (0, 3, 6, 9)]) == 4


def test_entry_without_a_data_field_is_dead_lettered_with_a_clear_reason(connection, redis_client):
    queue = Queue("nodata", routing_key="nodata")
    publish(connection, queue, ["good"])
    redis_client.xadd(keys.pending_stream("nodata"), {"other": "x"})
    assert [body for body, _ in drain(connection, [queue])] == ["good"]
    (letter,) = redis_client.xrange(keys.dead_letter_stream("nodata"))
    assert b"no 'data' field" in letter[1][b"reason"]


# -- configuration that cannot work: refused by name, with the way out ----------------------------------


def test_unknown_transport_option_is_refused_by_name(url):
    conn = kombu.Connection(url, transport_options={"visibilty_timeout": 10})
    with pytest.raises(Exception, match="visibilty_timeout"):
        conn.default_channel


def test_stock_redis_options_that_mean_nothing_here_are_accepted(url):
    options = {"fanout_prefix": True, "fanout_patterns": True, "unacked_restore_limit": 10}
    with kombu.Connection(url, transport_options=options) as conn:
        assert conn.default_channel.client.ping()


def test_sentinel_options_urls_and_ports_that_do_not_fit_are_refused_with_a_clear_error(url):
    from t.redis_server import SentinelServer

    with pytest.raises(Exception, match="master_name.*Sentinel options: use a sheppy"):
        kombu.Connection(url, transport_options={"master_name": "mymaster"}).default_channel
    with pytest.raises(Exception, match="needs the transport option 'master_name'"):
        kombu.Connection("sheppy+sentinel://127.0.0.1:26379;sheppy+sentinel://127.0.0.1:26380/0"
                         ).default_channel

    sentinel = SentinelServer()
    try:
        with pytest.raises(Exception, match=rf"is a Redis Sentinel.*use sheppy\+sentinel://"
                                            rf"127.0.0.1:{sentinel.port}/0 with the transport "
                                            "option master_name"):
            kombu.Connection(f"sheppy://127.0.0.1:{sentinel.port}/0").default_channel
    finally:
        sentinel.close()

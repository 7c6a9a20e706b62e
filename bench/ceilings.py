"""What this machine allows, measured in the same run as the sides: the ceilings.

- ``memory_enqueue_rate``: ``delay()`` calls per second through Celery's ``memory://``
  broker with the same ``sheppy://`` result backend: Celery and kombu with a broker
  that costs nothing.
- ``xadd_rtt_us``: one redis-py ``XADD`` of a real pending record (a noop task's, as
  sheppy:// writes it), sequential calls on a client with the connection settings
  sheppy:// uses (``celery_sheppy.connect.params``): mean microseconds per call.
- ``enqueue_ceiling``: ``1 / (memory:// cost per call + one XADD round trip)``: the
  fastest a publish that waits for Redis can be, with Celery's own work as it is.
- ``pipeline_xadd_rate``, ``pipeline_read_rate``, ``pipeline_ack_rate``: messages per
  second through Redis alone, ``PIPELINE`` messages per round trip: ``XADD``;
  ``XREADGROUP COUNT PIPELINE``; ``XACK`` + ``XDEL`` (the transport's ack).
  ``pipeline_ceiling``: a message through all three, ``1 / (sum of the three costs)``:
  the most any consumer on one connection could drain.
"""

import time

import redis

from celery_sheppy.connect import params as sheppy_connection
from celery_sheppy import keys

from . import scenarios
from .app import NOOP, make_app

#: Messages per round trip of the pipeline ceiling (the transport's read size, max_batch).
PIPELINE = 100
STREAM = "bench:ceiling"
GROUP = keys.CONSUMER_GROUP


def measure(server, calls, timeout):
    """Every ceiling once, on a fresh server; ``calls`` sizes each loop."""
    out = {"memory_enqueue_rate": memory_enqueue(server, calls)}
    record = sample_record(server, timeout)
    client = redis.Redis(**sheppy_connection.connection_kwargs(server.url_for("sheppy"), {}))
    try:
        out["xadd_rtt_us"] = xadd_round_trip(client, record, calls)
        out.update(pipeline(client, record, max(calls, 10 * PIPELINE)))
    finally:
        client.close()
    out["enqueue_ceiling"] = 1 / (1 / out["memory_enqueue_rate"] + out["xadd_rtt_us"] / 1e6)
    server.drop_clients()
    return out


def memory_enqueue(server, calls):
    """``calls`` ``delay()`` per second with ``memory://`` + the sheppy result backend."""
    server.reset()
    app = make_app("memory://", server.url_for("sheppy"), current=False)
    try:
        _, seconds = scenarios.enqueue(app, calls)  # the drain scenario's loop, results kept
        return calls / seconds
    finally:
        app.close()


def sample_record(server, timeout):
    """The bytes of a noop task's pending entry, as sheppy:// writes them."""
    server.reset()
    app = make_app(server.url_for("sheppy"), server.url_for("sheppy"), current=False)
    try:
        app.tasks[NOOP].delay()
        (_, fields), = server.client().xrange(keys.pending_stream("celery"), count=1)
        return fields[b"data"]
    finally:
        app.close()


def xadd_round_trip(client, record, calls):
    """Mean microseconds of one sequential ``XADD`` (reply read) of ``record``."""
    client.delete(STREAM)
    client.xadd(STREAM, {"data": record})  # connects
    start = time.perf_counter()
    for _ in range(calls):
        client.xadd(STREAM, {"data": record})
    elapsed = time.perf_counter() - start
    client.delete(STREAM)
    return elapsed / calls * 1e6


def pipeline(client, record, messages):
    """Messages per second of pipelined XADD, XREADGROUP and XACK + XDEL, and of all three."""
    client.delete(STREAM)
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    start = time.perf_counter()
    for _ in range(messages // PIPELINE):
        with client.pipeline(transaction=False) as pipe:
            for _ in range(PIPELINE):
                pipe.xadd(STREAM, {"data": record})
            pipe.execute()
    added = time.perf_counter() - start

    ids, read = [], 0.0
    while True:
        start = time.perf_counter()
        reply = client.xreadgroup(GROUP, "ceiling", {STREAM: ">"}, count=PIPELINE)
        read += time.perf_counter() - start
        got = [entry_id for _, entries in reply for entry_id, _ in entries] if reply else []
        if not got:
            break
        ids.append(got)

    start = time.perf_counter()
    for batch in ids:
        with client.pipeline(transaction=False) as pipe:
            pipe.xack(STREAM, GROUP, *batch)
            pipe.xdel(STREAM, *batch)
            pipe.execute()
    acked = time.perf_counter() - start
    done = sum(map(len, ids))
    client.delete(STREAM)
    if done != messages // PIPELINE * PIPELINE:
        raise AssertionError(f"pipeline ceiling read {done} of {messages} messages")
    return {"pipeline_xadd_rate": done / added, "pipeline_read_rate": done / read,
            "pipeline_ack_rate": done / acked, "pipeline_ceiling": done / (added + read + acked)}

"""Bulk operations at the size deployments reach: 50 000 waiting, scheduled and dead tasks.

Lua's ``unpack()`` stops at about 8 000 values: a script that unpacks one id per entry
works at test size and fails at deployment size. Each test here crosses that limit
through the command an operator runs (``celery purge``, ``celery sheppy dead …``).
The waiting and dead entries are copies of one real entry (a task the app published,
a letter a worker dead-lettered): what the transport writes, 50 000 times over.
"""

import json
import time

import pytest
from celery import group

from celery_sheppy import keys, scripts
from t.helpers import celery_cli, client_app, sig, wait_until

QUEUE = "bulk"
MANY = 50_000
COMMAND_TIMEOUT = 300  # seconds: a command on 50 000 entries, on a busy machine


@pytest.fixture
def server(make_redis_server):
    return make_redis_server()


def published_entry(app, client, **options):
    """The data of the entry the app writes for one task sent to QUEUE (then removed)."""
    sig(app, "add", 1, 1, queue=QUEUE).apply_async(**options)
    stream = keys.priority_stream(QUEUE, 9 if options.get("priority") else 0)
    (entry_id, fields), = client.xrange(stream)
    client.xdel(stream, entry_id)
    return fields[b"data"]


def add_copies(client, stream, field_values, count):
    with client.pipeline(transaction=False) as pipe:
        for _ in range(count):
            pipe.xadd(stream, field_values)
        pipe.execute()


def test_celery_purge_empties_a_queue_of_50000_waiting_tasks_and_keeps_delivered_ones(server):
    # Given 50 000 waiting tasks, 5 000 more of priority 9, and 3 delivered to a consumer
    url, client = server.sheppy_url(), server.client()
    app = client_app(url, url)
    try:
        plain = published_entry(app, client)
        urgent = published_entry(app, client, priority=9)
    finally:
        app.close()
    pending, priority = keys.pending_stream(QUEUE), keys.priority_stream(QUEUE, 9)
    add_copies(client, pending, {"data": plain}, 3)
    client.xreadgroup(keys.CONSUMER_GROUP, "a-worker", {pending: ">"}, count=3)
    add_copies(client, pending, {"data": plain}, MANY)
    add_copies(client, priority, {"data": urgent}, 5_000)

    # When the queue is purged as users purge it
    done = celery_cli(url, "purge", "-f", "-Q", QUEUE, timeout=COMMAND_TIMEOUT)

    # Then every waiting task is gone, and the delivered ones stay with their consumer
    assert done.returncode == 0, done.stderr
    assert f"Purged {MANY + 5_000} messages" in done.stdout, done.stdout + done.stderr
    assert client.xlen(priority) == 0
    assert client.xlen(pending) == 3
    assert client.xpending(pending, keys.CONSUMER_GROUP)["pending"] == 3


@pytest.mark.slow  # publishing 50 000 countdown tasks takes ~30 s
def test_celery_purge_deletes_50000_scheduled_tasks_with_their_records(server):
    # Given 50 000 countdown tasks waiting in sheppy's scheduled set
    url, client = server.sheppy_url(), server.client()
    app = client_app(url, url)
    try:
        later = sig(app, "add", queue=QUEUE, countdown=3600)
        for start in range(0, MANY, 5_000):
            group(later.clone(args=(n, n)) for n in range(start, start + 5_000)).apply_async()
    finally:
        app.close()
    assert client.zcard(keys.scheduled_set(QUEUE)) == MANY

    # When the queue is purged
    done = celery_cli(url, "purge", "-f", "-Q", QUEUE, timeout=COMMAND_TIMEOUT)

    # Then the set, the delayed messages and their "scheduled" records are gone
    assert done.returncode == 0, done.stderr
    assert f"Purged {MANY} messages" in done.stdout, done.stdout + done.stderr
    assert client.zcard(keys.scheduled_set(QUEUE)) == 0
    left = [key for key in client.scan_iter(match=f"sheppy:*{QUEUE}*", count=10_000)
            if b":delayed:" in key or b":tasks:" in key]
    assert left == []


def test_50000_dead_letters_are_listed_replayed_to_their_stream_and_purged(
        server, workers):
    # Given one real dead letter (an undecodable entry a worker moved there) ...
    url, client = server.sheppy_url(), server.client()
    dead, pending = keys.dead_letter_stream(QUEUE), keys.pending_stream(QUEUE)
    app = client_app(url, url)
    try:
        task = published_entry(app, client)
    finally:
        app.close()
    client.xadd(pending, {"data": "not a task record"})
    worker = workers.start(url, pool="threads", queues=QUEUE)
    wait_until(lambda: client.xlen(dead) == 1, 30, "the worker to dead-letter the entry")
    worker.stop()
    (_, letter), = client.xrange(dead)
    client.delete(dead)
    # ... copied 50 000 times, with a real task as their data
    add_copies(client, dead, dict(letter, data=task), MANY)

    listed = celery_cli(url, "sheppy", "dead", "list", "-Q", QUEUE, "--json",
                        timeout=COMMAND_TIMEOUT)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 20  # a listing is bounded (--count)

    # When all of them are replayed
    replayed = celery_cli(url, "sheppy", "dead", "replay", "--yes", "-Q", QUEUE,
                          timeout=COMMAND_TIMEOUT)

    # Then they are back in their stream, each once, and none is left dead
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {MANY} dead letter(s)" in replayed.stdout, replayed.stdout
    assert client.xlen(dead) == 0
    assert client.xlen(pending) == MANY

    # And 50 000 dead letters are purged too
    add_copies(client, dead, dict(letter, data=task), MANY)
    purged = celery_cli(url, "sheppy", "dead", "purge", "--yes", "-Q", QUEUE,
                        timeout=COMMAND_TIMEOUT)
    assert purged.returncode == 0, purged.stderr
    assert f"purged {MANY} dead letter(s)" in purged.stdout, purged.stdout
    assert client.xlen(dead) == 0


def test_lease_renewal_of_10000_entries_held_by_one_consumer(redis_client):
    # Given one consumer holding 10 000 entries (an orphan ledger renews all it holds
    # in one call), idle for a while
    stream = keys.pending_stream(QUEUE)
    redis_client.xgroup_create(stream, keys.CONSUMER_GROUP, id="0", mkstream=True)
    add_copies(redis_client, stream, {"data": "x"}, 10_000)
    redis_client.xreadgroup(keys.CONSUMER_GROUP, "holder", {stream: ">"}, count=10_000)
    ids = [entry_id for entry_id, _ in redis_client.xrange(stream)]
    time.sleep(0.2)

    # When their lease is renewed in one call
    lost = scripts.registry()["renew"](redis_client, keys=[stream],
                                       args=[keys.CONSUMER_GROUP, "holder", *ids])

    # Then every entry is renewed (none reported lost), still the holder's
    assert lost == []
    rows = redis_client.xpending_range(stream, keys.CONSUMER_GROUP, min="-", max="+",
                                       count=10_000)
    assert len(rows) == 10_000
    assert all(row["consumer"] == b"holder" and row["time_since_delivered"] < 200
               for row in rows)

"""Bounded listings of what sits in a queue's side structures, for ``celery sheppy``.

Each listing reads at most ``count`` items per queue (plus one command per item to
describe it): dead letters (through the transport's dead-letter API), scheduled
messages, stuck messages (in flight past the lease) and revoked task ids. Every item
is a plain dict, so the CLI prints it as a table or as JSON.
"""

import json

import redis
from kombu.utils.encoding import bytes_to_str

from .. import keys, records
from .. import transport as sheppy_transport


def describe(data):
    """``{task, task_id, args}`` of an entry's data (a sheppy record); ``task`` is None
    for a message that is not a Celery task or cannot be decoded."""
    try:
        _, message = records.record_to_message(bytes_to_str(data))
    except (records.RecordError, AttributeError, TypeError, ValueError):
        return {"task": None, "task_id": None, "args": None}
    headers = message.get("headers") or {}
    args = headers.get("argsrepr")
    if args is not None and headers.get("kwargsrepr") not in (None, "{}"):
        args = f"{args} {headers['kwargsrepr']}"
    return {"task": headers.get("task"), "task_id": headers.get("id"), "args": args}


def entry_ms(entry_id):
    """The time part of a stream entry id: when it was added, in epoch ms."""
    return int(str(entry_id).split("-", 1)[0])


# -- dead letters ----------------------------------------------------------------------


def dead_letters(view, queue, count):
    """The oldest ``count`` dead letters of ``queue``: the transport's dicts plus ``queue``,
    ``age`` (s) and :func:`describe`'s fields."""
    now = view.now()
    letters = sheppy_transport.dead_letters(view.connection, queue, count=count)
    return [_letter(queue, letter, now) for letter in letters]


def find_dead_letters(view, queues, ids):
    """{id: letter} of those ``ids`` found in the dead-letter streams of ``queues``."""
    now, found, channel = view.now(), {}, view.connection.default_channel
    for entry_id in ids:
        for queue in queues:
            # the transport's listing from ``entry_id`` on: its first letter, if it is that one
            letters = channel.dead_letters(queue, count=1, start=entry_id)
            if letters and letters[0]["id"] == entry_id:
                found[entry_id] = _letter(queue, letters[0], now)
                break
    return found


def _letter(queue, letter, now):
    return dict(letter, queue=queue, age=max(now - entry_ms(letter["id"]) / 1000, 0.0),
                **describe(letter["data"]))


# -- scheduled ---------------------------------------------------------------------------


def scheduled(view, queue, count):
    """The first ``count`` scheduled messages of ``queue`` by due time: ``{queue, id (sheppy
    id), due (epoch s), due_in (s), stream, task, task_id, args, revoked}``."""
    now = view.now()
    rows = view.client.zrange(keys.scheduled_set(queue), 0, count - 1, withscores=True)
    with view.client.pipeline(transaction=False) as pipe:
        for member, _ in rows:
            pipe.hmget(keys.delayed_message(queue, bytes_to_str(member)), "stream", "data")
        held = pipe.execute(raise_on_error=False)
    items = []
    for (member, due), fields in zip(rows, held):
        stream, data = fields if isinstance(fields, list) else (None, None)
        items.append({"queue": queue, "id": bytes_to_str(member), "due": due,
                      "due_in": due - now, "stream": bytes_to_str(stream) if stream else None,
                      **describe(data)})
    # a revoked task stays in the set until due, then it is dropped at delivery
    with view.client.pipeline(transaction=False) as pipe:
        for item in items:
            pipe.zscore(keys.revoked_set(), item["task_id"] or item["id"])
        for item, score in zip(items, pipe.execute()):
            item["revoked"] = score is not None
    return items


# -- stuck -----------------------------------------------------------------------------


def stuck(view, queue, count, consumer_states):
    """Up to ``count`` in-flight messages of ``queue`` idle longer than the lease: their
    consumer stopped renewing (``consumer_states``: {name: state} to show beside them).
    ``{queue, stream, id, consumer, consumer_state, idle (s), deliveries, task, ...}``."""
    lease_ms = int(view.settings.lease * 1000)
    found = []
    for stream in view.settings.streams.of(queue):
        if len(found) >= count:
            break
        try:
            rows = view.client.xpending_range(stream, keys.CONSUMER_GROUP, min="-", max="+",
                                              count=count - len(found), idle=lease_ms)
        except redis.ResponseError as exc:
            if "nogroup" in str(exc).lower() or "no such key" in str(exc).lower():
                continue  # a stream or group not made yet: nothing in flight there
            raise
        found.extend((stream, row) for row in rows)
    with view.client.pipeline(transaction=False) as pipe:
        for stream, row in found:
            entry_id = bytes_to_str(row["message_id"])
            pipe.xrange(stream, min=entry_id, max=entry_id)
        entries = pipe.execute(raise_on_error=False)
    items = []
    for (stream, row), entry in zip(found, entries):
        data = entry[0][1].get(b"data") if isinstance(entry, list) and entry else None
        consumer = bytes_to_str(row["consumer"])
        items.append({"queue": queue, "stream": stream, "id": bytes_to_str(row["message_id"]),
                      "consumer": consumer, "consumer_state": consumer_states.get(consumer),
                      "idle": row["time_since_delivered"] / 1000,
                      "deliveries": row["times_delivered"], **describe(data)})
    return items


# -- revoked ---------------------------------------------------------------------------


def revoked(view, count):
    """``(total, [{task_id, revoked_at (epoch s), age (s)}])``, newest first."""
    now = view.now()
    with view.client.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.revoked_set())
        pipe.zrevrange(keys.revoked_set(), 0, count - 1, withscores=True)
        total, rows = pipe.execute()
    return total, [{"task_id": bytes_to_str(member), "revoked_at": score / 1000,
                    "age": max(now - score / 1000, 0.0)} for member, score in rows]


def pretty_data(data):
    """An entry's data for display: indented JSON, or the text as it is."""
    text = bytes_to_str(data)
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True)
    except ValueError:
        return text

"""Dead letters: messages that cannot or should not be delivered again.

An entry goes to its queue's ``sheppy:dead:<q>`` stream (``dead_letter.lua``, acked in
the same step) when it cannot be decoded, was delivered more than ``max_deliveries``
times, or was rejected without requeue. Each dead letter keeps the original entry's
``data``, its ``stream`` and ``entry`` id, the ``reason`` and the ``deliveries`` count.
The functions at the end are the public API (``celery_sheppy.transport``).
"""

from kombu.utils.encoding import bytes_to_str

from .. import keys, records, scripts
from . import claims

GROUP = keys.CONSUMER_GROUP

#: Dead letters one round trip replays (a replay of 50 000 letters is 50 round trips).
REPLAY_BATCH = 1000


class DeadLetters:
    """A channel's dead-letter streams: moving entries there, listing, replay and purge."""

    def __init__(self, conns, groups, maxlen):
        self.conns = conns
        self.groups = groups
        self.maxlen = maxlen  # approximate most entries kept per queue

    def move(self, queue, stream, entry_id, reason, deliveries, data):
        """Move one delivered entry to its queue's dead-letter stream (acked in the same step)."""
        queue = keys.queue_of_stream(stream) or queue  # its sheppy name ({q} on a Cluster)
        client = self.conns.client
        if queue is None:  # not a queue stream we know: just ack it
            with client.pipeline(transaction=False) as pipe:
                pipe.xack(stream, GROUP, entry_id)
                pipe.xdel(stream, entry_id)
                pipe.execute()
            return
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        claims.release_of_entry(client, data)  # a unique task's key is free again
        scripts.registry()["dead_letter"](
            client, keys=[stream, keys.dead_letter_stream(queue)],
            args=[GROUP, entry_id, reason, int(deliveries), data or "", self.maxlen])

    def _named(self, queue):
        return self.groups.queues.named(keys.check_queue(queue))

    def list(self, queue, count=100, start="-"):
        """Dead letters of ``queue``, oldest first: dicts with ``id``, ``reason``,
        ``deliveries`` (int), ``stream``, ``entry``, ``data`` (the original entry; "" if
        none) and ``other_fields`` (any other field of the entry)."""
        rows = self.conns.client.xrange(keys.dead_letter_stream(self._named(queue)),
                                        min=start, count=count)
        return [_letter(entry_id, fields) for entry_id, fields in rows]

    def replay(self, queue, ids=None):
        """Put dead letters of ``queue`` (all, or those ``ids``) back in their streams, with
        their delivery count cleared. Returns how many went back."""
        name = self._named(queue)
        dead = keys.dead_letter_stream(name)
        self.groups.ensure(queue)
        script = scripts.registry()["replay"]
        replayed = 0
        calls = []
        for letter in self._letters(queue, ids):
            stream = letter["stream"]
            if keys.queue_of_stream(stream) != name:
                stream = keys.pending_stream(name)
            calls.append(([dead, stream],
                          [letter["id"], records.reset_deliveries(letter["data"]), GROUP]))
            if len(calls) == REPLAY_BATCH:
                replayed += sum(1 for reply in script.many(self.conns.client, calls) if reply)
                calls = []
        replayed += sum(1 for reply in script.many(self.conns.client, calls) if reply)
        return replayed

    def purge(self, queue, ids=None):
        """Delete dead letters of ``queue`` (all, or those ``ids``). Returns how many."""
        dead = keys.dead_letter_stream(self._named(queue))
        client = self.conns.client
        if ids is None:
            count = client.xlen(dead)
            client.delete(dead)
            return count
        return client.xdel(dead, *ids) if ids else 0

    def _letters(self, queue, ids):
        """The letters ``ids``, or all of them up to the newest one now: a letter a
        replayed message becomes meanwhile is not replayed again by the same call."""
        client = self.conns.client
        dead = keys.dead_letter_stream(self._named(queue))
        if ids is not None:
            with client.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xrange(dead, min=entry_id, max=entry_id)
                rows = [row for reply in pipe.execute() for row in reply]
            yield from (_letter(entry_id, fields) for entry_id, fields in rows)
            return
        newest = client.xrevrange(dead, count=1)
        if not newest:
            return
        start, end = "-", newest[0][0]
        while True:
            rows = client.xrange(dead, min=start, max=end, count=REPLAY_BATCH)
            yield from (_letter(entry_id, fields) for entry_id, fields in rows)
            if len(rows) < REPLAY_BATCH:
                return
            start = "(" + bytes_to_str(rows[-1][0])


_LETTER_FIELDS = ("reason", "deliveries", "stream", "entry", "data")


def _letter(entry_id, fields):
    fields = {bytes_to_str(key): bytes_to_str(value) for key, value in (fields or {}).items()}
    try:
        deliveries = int(fields.get("deliveries") or 0)
    except ValueError:
        deliveries = 0
    return {"id": bytes_to_str(entry_id), "reason": fields.get("reason", ""),
            "deliveries": deliveries, "stream": fields.get("stream", ""),
            "entry": fields.get("entry", ""), "data": fields.get("data", ""),
            # an entry someone else added to the stream may hold anything
            "other_fields": {name: value for name, value in fields.items()
                             if name not in _LETTER_FIELDS}}


def dead_letters(connection, queue, count=100):
    """Dead letters of ``queue`` on a ``sheppy://`` kombu connection (see DeadLetters.list).

    With Celery: ``with app.connection_for_write() as conn: dead_letters(conn, "celery")``.
    """
    return connection.default_channel.dead_letters(queue, count=count)


def replay_dead_letters(connection, queue, ids=None):
    """Put dead letters of ``queue`` back in their streams; returns how many."""
    return connection.default_channel.replay_dead_letters(queue, ids=ids)


def purge_dead_letters(connection, queue, ids=None):
    """Delete dead letters of ``queue`` (all, or ``ids``); returns how many."""
    return connection.default_channel.purge_dead_letters(queue, ids=ids)

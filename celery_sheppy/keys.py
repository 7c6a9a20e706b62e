"""Every Redis key name celery_sheppy reads or writes, built here and nowhere else.

Sheppy's layout (sheppy 0.0.7; the ``sheppy`` prefix is fixed in sheppy itself):

==========================================  ======  ==============================================
key                                          type    content
==========================================  ======  ==============================================
``sheppy:tasks:<q>:<id>``                    string  JSON task record (see ``records/``)
``sheppy:pending:<q>``                       stream  field ``data`` = task record JSON; group
                                                     ``workers``
``sheppy:finished:<q>``                      stream  field ``task_id``; one entry per record that
                                                     got ``finished_at``; trimmed to ~60 s
``sheppy:scheduled:<q>``                     zset    task id -> due time (epoch seconds)
``sheppy:completed:<q>``                     string  count of records that got ``finished_at``
``sheppy:_queues``                           hash    queue name -> ``"{}"``; sheppy lists queues
``sheppy:workflows:<q>:<wf>:pending``        set     ids still pending in a workflow step; we use
                                                     it for a chord's header task ids
==========================================  ======  ==============================================

Celery data that has no place in sheppy's layout lives under ``sheppy:celery:<q>:``,
a namespace sheppy never scans:

==========================================  ======  ==============================================
``sheppy:celery:<q>:group:<gid>``            string  saved ``GroupResult`` (Celery's encoding)
``sheppy:celery:<q>:group:<gid>:added``      list    ids ``Task.add_to_chord`` added to chord
                                                     ``gid``; their results follow the header's
``sheppy:celery:<q>:chord:<gid>:done``       zset    a generator-header chord's finished part ids,
                                                     score = ``group_index`` (header order)
``sheppy:celery:<q>:chord:<gid>:size``       string  its header size: -1 until Celery calls
                                                     ``set_chord_size``; gone once the body fired
``sheppy:celery:<q>:chord:<gid>:body``       string  ``firing:<task id>`` from the part that
                                                     completed chord ``gid`` until its body is
                                                     sent, then ``sent``
``sheppy:celery:<q>:states``                 stream  field ``task_id``; non-terminal state changes
                                                     (STARTED, RETRY, custom), for
                                                     ``get(on_message=...)``; trimmed to ~60 s
``sheppy:celery:<q>:priority:<n>``           stream  the broker's messages of priority step ``n``
                                                     (> 0; step 0 is ``sheppy:pending:<q>``), same
                                                     entries and group as the pending stream
``sheppy:celery:<q>:failed``                 string  count of FAILURE results stored (the part of
                                                     ``sheppy:completed:<q>`` that failed)
==========================================  ======  ==============================================

Broker routing, which belongs to an exchange rather than a queue (an empty queue
segment, so it can never collide with a queue's keys):

==========================================  ======  ==============================================
``sheppy:celery::exchange:<x>``              zset    bindings of exchange ``x``: member
                                                     ``routing_key SEP pattern SEP queue SEP
                                                     expires_ms``, score = deadline (epoch ms, inf:
                                                     permanent); member ``VERSION`` scores the last
                                                     change (negative epoch µs)
==========================================  ======  ==============================================

Every key of one queue contains the queue name, and no multi-key command mixes
queues: a hash-tagged queue name such as ``{celery}`` puts a queue's keys in one
Redis Cluster slot.

Redis Cluster slots (``sheppy+cluster://``, docs/deployment.md):

=============================================  ==============================================
key family                                      slot
=============================================  ==============================================
results of backend queue ``q``: records,        one of :data:`RESULT_SHARDS` result shards,
finished and states streams, counters           queue ``{q.<k>}`` (:func:`result_shards`),
                                                chosen by the task id (:func:`result_shard`):
                                                a record, its stream entry and its counters
                                                share a slot, so storing one stays one script
group and chord keys of group ``g``             the result shard of ``g``'s id (the same
                                                function), so a chord part's count is one
                                                script
broker queue ``q`` (``sheppy+cluster://``        sheppy queue ``{q}`` (:func:`broker_queue`):
broker): its streams, scheduled set, delayed    ``sheppy:pending:{q}``, ``sheppy:tasks:{q}:<id>``,
messages and their records, dead letters,       ``sheppy:celery:{q}:priority:<n>`` ... share
rate limit, unique and beat claims, cron table  the slot of tag ``q``, so each broker script
                                                (requeue, promote, claim_publish, ...) names
                                                keys of one slot
``sheppy:_queues``                              its own slot (written apart from any script)
``sheppy:celery::exchange:<x>``                 its own slot (``bind.lua`` names it alone;
                                                read in the publish pipeline, not atomic with
                                                the XADDs)
``sheppy:celery::revoked``                      its own slot (single-key commands)
``sheppy:celery::due``                          its own slot (single-key commands, apart
                                                from the scripts of the scheduled sets)
``sheppy:celery::consumers``                    its own slot (single-key commands)
``sheppy:celery::probe:<token>``                its own slot (one key per command)
=============================================  ==============================================

The shards' tags are picked so their slots lie evenly over the 16 384 slots: with
the slots split evenly among the masters, as ``redis-cli --cluster create`` does,
every master holds a similar part of the results.
"""

import zlib

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

PREFIX = "sheppy"

#: Consumer group sheppy's workers read ``sheppy:pending:<q>`` with.
CONSUMER_GROUP = "workers"

# sheppy uses the queue name raw inside SCAN MATCH patterns (``sheppy:tasks:<q>:*``),
# so glob characters and ':' would make one queue's scan match another queue's keys.
_FORBIDDEN_IN_QUEUE = frozenset(":*?[]\\")


class InvalidQueueName(ValueError):
    """A queue name that cannot be used in Sheppy's layout."""


def check_queue(queue):
    """Return ``queue`` if it is usable as a sheppy queue name, else raise InvalidQueueName."""
    if not isinstance(queue, str) or not queue:
        raise InvalidQueueName(f"queue name must be a non-empty string, got {queue!r}")
    bad = sorted(set(queue) & _FORBIDDEN_IN_QUEUE)
    if bad or any(ch.isspace() for ch in queue):
        raise InvalidQueueName(
            f"queue name {queue!r} cannot be used in Sheppy's layout: it contains "
            f"{''.join(bad) or 'white space'!r}; sheppy's tools use queue names inside "
            "SCAN patterns, where ':', '*', '?', '[', ']' and '\\' leak across queues"
        )
    return queue


def broker_queue(queue, cluster=False):
    """The sheppy queue name the broker keeps Celery queue ``queue`` under: on a Redis
    Cluster ``{<queue>}``, a hash tag that puts all of the queue's keys in one slot (a name
    that holds a tag already is kept: ``{q}`` stays ``{q}``); else ``queue`` itself."""
    if not cluster or has_hash_tag(queue):
        return queue
    return f"{{{queue}}}"


def celery_queue(queue, cluster=False):
    """The Celery queue whose broker keys are those of sheppy queue ``queue`` (as sheppy's
    registry names it): the inverse of :func:`broker_queue`, ``{<q>}`` is ``q`` on a Redis
    Cluster; else ``queue`` itself."""
    inner = queue[1:-1]
    if cluster and queue.startswith("{") and queue.endswith("}") and inner \
            and "{" not in inner and "}" not in inner:
        return inner
    return queue


def has_hash_tag(name):
    """True when ``name`` holds a Redis Cluster hash tag (a non-empty ``{...}``)."""
    start = name.find("{")
    return start >= 0 and name.find("}", start + 1) > start + 1


def task_record(queue, sheppy_id):
    return f"{PREFIX}:tasks:{queue}:{sheppy_id}"


def pending_stream(queue):
    return f"{PREFIX}:pending:{queue}"


def finished_stream(queue):
    return f"{PREFIX}:finished:{queue}"


def scheduled_set(queue):
    return f"{PREFIX}:scheduled:{queue}"


def completed_counter(queue):
    return f"{PREFIX}:completed:{queue}"


def queue_registry():
    return f"{PREFIX}:_queues"


def chord_pending_set(queue, group_id):
    return f"{PREFIX}:workflows:{queue}:{group_id}:pending"


def group_record(queue, group_id):
    return f"{PREFIX}:celery:{queue}:group:{group_id}"


def chord_added_list(queue, group_id):
    return f"{PREFIX}:celery:{queue}:group:{group_id}:added"


def lazy_chord_done(queue, group_id):
    return f"{PREFIX}:celery:{queue}:chord:{group_id}:done"


def lazy_chord_size(queue, group_id):
    return f"{PREFIX}:celery:{queue}:chord:{group_id}:size"


def chord_body_state(queue, group_id):
    return f"{PREFIX}:celery:{queue}:chord:{group_id}:body"


def state_stream(queue):
    return f"{PREFIX}:celery:{queue}:states"


def failed_counter(queue):
    """Count of FAILURE results stored in ``queue``'s namespace (sheppy counts only finishes)."""
    return f"{PREFIX}:celery:{queue}:failed"


def priority_stream(queue, step):
    """The broker's stream for ``queue`` and priority step ``step``; step 0 is the pending stream."""
    if not step:
        return pending_stream(queue)
    return f"{PREFIX}:celery:{queue}:priority:{step}"


def exchange_bindings(exchange):
    return f"{PREFIX}:celery::exchange:{exchange}"


# Pub/sub channels (not keys: no slot, no memory) of fanout exchanges (transport/fanout.py):
# a message to exchange ``x`` with routing key ``w.rest`` is one PUBLISH on
# ``sheppy:celery::fanout:<x>/<w>`` (its first word); receivers SUBSCRIBE to the channels of
# their bindings' first words, or PSUBSCRIBE to :func:`fanout_pattern` for all of them.

def fanout_channel(exchange, first_word):
    """The pub/sub channel of fanout exchange ``exchange`` for routing keys whose first
    word (before the first ``.``) is ``first_word``."""
    return f"{PREFIX}:celery::fanout:{exchange}/{first_word}"


_GLOB_SPECIAL = str.maketrans({ch: f"\\{ch}" for ch in "*?[]\\"})


def fanout_pattern(exchange):
    """The PSUBSCRIBE pattern of every channel of fanout exchange ``exchange``."""
    return f"{PREFIX}:celery::fanout:{exchange.translate(_GLOB_SPECIAL)}/*"


# -- reliability (leases, delayed delivery, dead letters, durable revokes) --------------
#
# ``sheppy:dead:<q>``                      stream  dead letters of queue ``q``: fields
#                                                  ``reason``, ``deliveries``, ``stream``,
#                                                  ``entry``, ``data`` (the original payload)
# ``sheppy:celery:<q>:delayed:<id>``       hash    a message waiting in ``sheppy:scheduled:<q>``:
#                                                  ``stream`` (where it goes when due) and
#                                                  ``data`` (the entry); the sheppy record
#                                                  ``sheppy:tasks:<q>:<id>`` may be overwritten
#                                                  by a result, this copy cannot
# ``sheppy:celery::revoked``               zset    revoked Celery task ids, score = revoke time
#                                                  (epoch ms); entries older than the revoke
#                                                  expiry are dropped
# ``sheppy:celery::due``                   zset    sheppy queue -> earliest due time of its
#                                                  ``sheppy:scheduled:<q>`` (epoch s): lowered
#                                                  by whoever schedules, reset by whoever
#                                                  promotes (upkeep.Promotion)
# ``sheppy:celery::consumers``             zset    consumer name (as in the groups) -> when
#                                                  its registration ends (epoch ms): alive
#                                                  until then; its channel renews it every
#                                                  quarter lease (transport/presence.py)
# ``sheppy:celery::probe:<token>``         string  a random token, for 10 s: the result backend
#                                                  writes it and reads it through the broker's
#                                                  connection to learn whether both are one db
#
# -- features (docs/features.md) ---------------------------------------------------------
#
# ``sheppy:celery:<q>:ratelimit:<task>``   string  global rate limit of task ``task`` in ``q``:
#                                                  its next free slot (epoch ms); expires
#                                                  when idle
# ``sheppy:celery:<q>:unique:<key>``       string  the id of the pending, scheduled or
#                                                  running task holding unique key ``key``
# ``sheppy:celery:<q>:beat:<id>``          string  occurrence ``id`` of a beat entry was
#                                                  published (its task id); expires
# ``sheppy:cron:<q>``                      hash    sheppy's cron table: deterministic id ->
#                                                  TaskCron JSON (beat entries)


def server_probe(token):
    """A short-lived string written through one connection and read through another, to
    tell whether two connections reach the same server and database."""
    return f"{PREFIX}:celery::probe:{token}"


def rate_limit(queue, task_name):
    """The global rate limit state of task ``task_name`` in ``queue`` (next free slot)."""
    return f"{PREFIX}:celery:{queue}:ratelimit:{task_name}"


def unique_lock(queue, unique_key):
    """The task id holding ``unique_key`` in ``queue`` while that task is not finished."""
    return f"{PREFIX}:celery:{queue}:unique:{unique_key}"


def beat_occurrence(queue, occurrence_id):
    """Marks occurrence ``occurrence_id`` of a beat entry as published."""
    return f"{PREFIX}:celery:{queue}:beat:{occurrence_id}"


def cron_table(queue):
    """sheppy's cron table of ``queue``: deterministic id -> TaskCron JSON."""
    return f"{PREFIX}:cron:{queue}"


def dead_letter_stream(queue):
    return f"{PREFIX}:dead:{queue}"


def delayed_message(queue, sheppy_id):
    return f"{PREFIX}:celery:{queue}:delayed:{sheppy_id}"


def revoked_set():
    return f"{PREFIX}:celery::revoked"


def due_index():
    """Sheppy queue name -> the earliest due time in its scheduled set (epoch seconds), as
    its writers last left it: a hint that saves a look at every queue's set."""
    return f"{PREFIX}:celery::due"


def consumer_registry():
    """Consumer name -> when its registration ends (epoch ms): alive until then
    (transport/presence.py)."""
    return f"{PREFIX}:celery::consumers"


def queue_of_stream(stream):
    """The queue whose broker stream ``stream`` is (pending or priority), else None."""
    head = f"{PREFIX}:pending:"
    if stream.startswith(head):
        return stream[len(head):] or None
    head = f"{PREFIX}:celery:"
    if stream.startswith(head):
        queue, sep, step = stream[len(head):].partition(":priority:")
        if sep and queue and step.isdigit():
            return queue
    return None


# A broker message's kombu delivery tag names its stream entry: ``<entry id> <stream>``
# (entry ids hold no space). Built by the transport, split by the result backend, which
# acks an acks_late task's message in the script that stores its result.

def delivery_tag(stream, entry_id):
    return f"{entry_id} {stream}"


def entry_of_tag(tag):
    """``(stream, entry id)`` of a delivery tag built by :func:`delivery_tag`, else None."""
    if not isinstance(tag, str) or " " not in tag:
        return None
    entry_id, stream = tag.split(" ", 1)
    return stream, entry_id

# -- Redis Cluster: result shards ---------------------------------------------------------

#: Result shards of a backend on a Redis Cluster: enough to spread the records over
#: a few masters (with 16 shards on 3 masters each holds 5 or 6 of them).
RESULT_SHARDS = 16

_shard_cache = {}


def result_shards(queue, count=RESULT_SHARDS):
    """The hash-tagged queue names ``{<q>.<k>}`` of ``queue``'s result shards: shard ``i``
    has the smallest ``k`` whose slot lies in the ``i``-th of ``count`` equal slot ranges.
    Braces already in ``queue`` are dropped from the tag (a tag cannot nest)."""
    cached = _shard_cache.get((queue, count))
    if cached is None:
        base = queue.replace("{", "").replace("}", "")
        width = REDIS_CLUSTER_HASH_SLOTS / count
        cached, k = [], 0
        for index in range(count):
            while int(key_slot(f"{base}.{k}".encode()) // width) != index:
                k += 1
            cached.append(f"{{{base}.{k}}}")
            k = 0
        cached = _shard_cache[(queue, count)] = tuple(cached)
    return cached


def result_shard(shards, sheppy_id):
    """The shard (of :func:`result_shards`) holding the results of ``sheppy_id``."""
    return shards[zlib.crc32(sheppy_id.encode()) % len(shards)]


def slot_of(key):
    """The Redis Cluster slot of ``key``."""
    return key_slot(key.encode() if isinstance(key, str) else key)

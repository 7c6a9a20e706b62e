"""Claimed publishes: a message that is sent only if its claim is free.

A message whose headers carry ``sheppy_claim = {"kind": ..., "key": ..., "ttl": s}``
is published by ``scripts/claim_publish.lua``: the claim key (in the queue's key
family) is set to the task id and the entry added in one step, or nothing is added
when another task id holds the claim. Two kinds:

* ``unique`` (``celery_sheppy.unique``): ``sheppy:celery:<q>:unique:<key>``; the same
  task id may take its own claim again (a retry of the holder). The holder's id of a
  refused publish is kept for the publishing thread (:func:`take_refusal`).
* ``beat`` (``celery_sheppy.beat``): ``sheppy:celery:<q>:beat:<occurrence id>``; each
  occurrence of a beat entry is sent once, whichever beat process sends it first.

The transport writes the queue a copy went to into the copy's claim (``queue``: its
sheppy name, ``{q}`` on a Redis Cluster), so a worker can release the right key.
"""

import threading

from kombu.log import get_logger

from .. import keys, records, scripts

logger = get_logger(__name__)

#: The message header naming a claim.
HEADER = "sheppy_claim"

_KEYS = {"unique": keys.unique_lock, "beat": keys.beat_occurrence}

_refusals = threading.local()


def of(message):
    """The claim a message's headers carry, or None."""
    claim = (message.get("headers") or {}).get(HEADER)
    if isinstance(claim, dict) and claim.get("kind") in _KEYS and claim.get("key"):
        return claim
    return None


def key_of(claim, queue=None):
    """The Redis key of ``claim`` in ``queue`` (default: the queue written into it)."""
    return _KEYS[claim["kind"]](queue or claim["queue"], str(claim["key"]))


def take_refusal(task_id):
    """The holder's task id if the last publish of ``task_id`` by this thread was
    refused, else None (and forget it)."""
    refused = getattr(_refusals, "by_id", None)
    return refused.pop(str(task_id), None) if refused else None


def publish(publisher, exchange, routing_key, out, claim):
    """Send ``out`` (a ``publish.Outgoing``) to every queue ``exchange`` routes it to
    whose claim is free; a message due later goes to the scheduled set instead."""
    message = out.message
    task_id = str((message.get("headers") or {}).get("id"))
    router, queues = publisher.router, publisher.queues
    if exchange:
        routed = router.route(exchange, routing_key, router.load(exchange)[1])
    else:
        routed = {routing_key: queues.expires.get(routing_key, 0)}
    ttl_ms = max(int(float(claim.get("ttl") or 86400) * 1000), 1)
    for queue, expires in routed.items():
        keys.check_queue(queue)
        name = queues.named(queue)  # the claim's key shares the stream's slot
        headers = dict(message["headers"], **{HEADER: dict(claim, queue=name)})
        copy = publisher.outgoing(dict(message, headers=headers))
        stream = queues.stream_for(queue, copy.priority, expires)
        delayed = copy.due is not None and not expires
        published, value = scripts.registry()["claim_publish"](
            publisher.conns.client, keys=[key_of(claim, name), stream],
            args=[task_id, ttl_ms, "" if delayed else copy.text,
                  "1" if claim["kind"] == "unique" else "0", keys.CONSUMER_GROUP,
                  "1" if stream != keys.pending_stream(name) else "0"])
        if not published:
            holder = value.decode() if isinstance(value, bytes) else str(value)
            logger.debug("sheppy: %s claim %s in %s is held by %s: %s not sent",
                         claim["kind"], claim["key"], queue, holder, task_id)
            if not hasattr(_refusals, "by_id"):
                _refusals.by_id = {}
            _refusals.by_id[task_id] = holder
        elif delayed:
            publisher._schedule(queue, copy)


def release(client, claim, task_id):
    """Free ``claim`` if ``task_id`` holds it; True if it did."""
    return bool(scripts.registry()["release_claim"](
        client, keys=[key_of(claim)], args=[str(task_id), "release", 0]))


def renew(client, claim, task_id, ttl):
    """Keep ``claim`` for ``ttl`` more seconds if ``task_id`` holds it; True if it does."""
    return bool(scripts.registry()["release_claim"](
        client, keys=[key_of(claim)], args=[str(task_id), "renew", max(int(ttl * 1000), 1)]))


def release_of_entry(client, data):
    """Free the unique claim of a pending entry's message (it was dead-lettered)."""
    try:
        record, message = records.record_to_message(data)
    except records.RecordError:
        return
    claim = of(message)
    if claim is not None and claim["kind"] == "unique" and claim.get("queue"):
        release(client, claim, (message.get("headers") or {}).get("id"))

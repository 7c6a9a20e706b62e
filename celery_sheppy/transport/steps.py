"""The steps that decide what becomes of an entry a channel read, before Celery sees it.

In order (:meth:`reading.Reader.receive` runs them and carries out what they decide):

1. :func:`decode`: the entry's data must be a record carrying a kombu message a
   serializer of this process decodes; else it goes to the dead letters;
2. :func:`count_delivery`: an entry delivered more than ``max_deliveries`` times goes to the
   dead letters;
3. the global rate limit (limits.py, in Redis): over it, the entry leaves for the scheduled
   set until its slot;
4. in flight: the entry gets its delivery tag (acks.py's ledger);
5. :func:`revoked`: a revoked task's message is dropped (acked), or handed to Celery in a
   worker, which stores REVOKED;
6. :func:`expired`: a message past its TTL is dropped (acked).

Steps 1, 2, 5 and 6 need no Redis: each takes what it decides on and returns a verdict
(tests/test_steps.py).
"""

from dataclasses import dataclass
from time import time

from .. import records


@dataclass(frozen=True)
class DeadLetter:
    """The entry goes to its queue's dead letters, with ``reason``."""

    reason: str
    deliveries: int
    #: the record error (a records.RecordError), when the entry could not be decoded
    error: object = None


def decode(data):
    """``(record, kombu message)`` of an entry's data, or a :class:`DeadLetter`."""
    try:
        record, message = records.record_to_message(data)
        records.check_content_type(message)
    except records.RecordError as exc:
        return DeadLetter(f"undecodable: {exc}", 1, exc)
    return record, message


def count_delivery(record, max_deliveries):
    """The deliveries of the entry, this one included (earlier ones are kept in its
    record, requeue.lua), or a :class:`DeadLetter` past ``max_deliveries``."""
    deliveries = records.prior_deliveries(record) + 1
    if deliveries > max_deliveries:
        return DeadLetter("max_deliveries exceeded", deliveries - 1)
    return deliveries


def revoked(message, is_revoked):
    """The task id of a message whose task is revoked (``is_revoked(task_id)``), else None."""
    task_id = (message.get("headers") or {}).get("id")
    if task_id is not None and is_revoked(task_id):
        return task_id
    return None


def expired(entry_id, ttl, now=None):
    """True when the entry (its id is its publish time, ms) is older than ``ttl`` ms (a
    message's ``expiration`` or its queue's message TTL; None: no TTL)."""
    if ttl is None:
        return False
    published_ms = int(entry_id.split("-", 1)[0])
    try:
        return (time() if now is None else now) * 1000 - published_ms > float(ttl)
    except (TypeError, ValueError):
        return False

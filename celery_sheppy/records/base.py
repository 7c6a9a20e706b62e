"""What every record shares: ids, statuses, the head fields, JSON text. No Redis.

The result side (results.py) and the broker side (messages.py) build on these; the
package's ``__init__`` names the whole mapping.
"""

import hashlib
import re
from datetime import datetime, timezone
from uuid import UUID

from celery import states
from kombu.utils import json as kombu_json


#: ``spec.func`` of every record we write. sheppy imports it on every read and
#: checks ``result`` against its return annotation; it has none, so any result passes.
SPEC_FUNC = "celery_sheppy:celery_task"

#: Namespace of the UUIDv5 ids that stand for Celery task ids which are not UUIDs.
CELERY_ID_NAMESPACE = UUID("6f1c6d1e-52f4-4b0e-9a57-0c3d8e1b7a11")

#: Celery state -> sheppy status; any state not listed (custom ones such as
#: PROGRESS, REJECTED, IGNORED) maps to ``processing``.
STATUS_BY_STATE = {
    states.PENDING: "pending",
    states.RECEIVED: "pending",
    states.STARTED: "processing",
    states.RETRY: "retrying",
    states.SUCCESS: "completed",
    states.FAILURE: "failed",
    states.REVOKED: "cancelled",
}
DEFAULT_STATUS = "processing"

#: sheppy status -> Celery state, for records sheppy itself wrote.
STATE_BY_STATUS = {
    "new": states.PENDING,
    "scheduled": states.PENDING,
    "pending": states.PENDING,
    "processing": states.STARTED,
    "retrying": states.RETRY,
    "completed": states.SUCCESS,
    "failed": states.FAILURE,
    "cancelled": states.REVOKED,
    "unknown": states.PENDING,
}

#: Celery states whose record gets ``finished_at`` (sheppy: terminal).
TERMINAL_STATES = frozenset(states.READY_STATES)


#: Seconds sheppy keeps the records it writes (its ``RedisBackend`` ``ttl``): given back to
#: a Celery record that sheppy's ``task retry`` rewrote without one.
SHEPPY_RECORD_TTL = 30 * 24 * 3600


class RecordError(ValueError):
    """Bytes that are not a task record we can read."""


class RequeuedBySheppy(RecordError):
    """A Celery task's record that sheppy put in a queue again (``sheppy task retry``,
    ``Queue.retry``): sheppy dropped the Celery message it came from."""

    def __init__(self, sheppy_id):
        super().__init__(
            f"record {sheppy_id} is a Celery task's record that sheppy queued again (sheppy "
            "task retry): sheppy cannot retry a Celery task; send it again with Celery")
        self.sheppy_id = sheppy_id


class CeleryTaskInSheppyWorker(SystemExit):
    """Raised in a sheppy worker that took a Celery task's entry. A SystemExit: the worker
    stops at once, before it stores a result or acks what it took (an Exception would have
    it store the Celery task as failed and ack its message: the task would be lost). A
    Celery worker takes the entries over after their lease."""


def celery_task(*args, **kwargs):
    """Stands in ``spec.func`` of Celery task records so sheppy can import it."""
    raise CeleryTaskInSheppyWorker(
        "this sheppy record belongs to a Celery task: run it with a Celery worker "
        "(broker_url = 'sheppy://...'), not with a sheppy worker"
    )


# What str(UUID(...)) writes: a Celery task id of this form is its own sheppy id.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def sheppy_id(task_id):
    """The sheppy record id for a Celery task (or group) id."""
    if isinstance(task_id, bytes):
        task_id = task_id.decode()
    task_id = str(task_id)
    if _CANONICAL_UUID.fullmatch(task_id):
        return task_id
    return str(_uuid5(CELERY_ID_NAMESPACE, task_id))


def _uuid5(namespace, name):
    """``uuid.uuid5``, with hashlib imported up front: uuid5 imports it at each call, which
    fails at interpreter exit, when Celery's ``AsyncResult.__del__`` still asks for ids."""
    digest = hashlib.sha1(namespace.bytes + name.encode("utf-8")).digest()
    return UUID(bytes=digest[:16], version=5)


def status_for(state):
    return STATUS_BY_STATE.get(state, DEFAULT_STATUS)


def aware_iso(value):
    """``value`` (datetime or ISO string) as a timezone-aware ISO-8601 string; naive means UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def compact_utc(text):
    """An ISO time in UTC written with ``Z`` (5 bytes less per timestamp, per record)."""
    return text[:-6] + "Z" if text and text.endswith("+00:00") else text


def expand_utc(text):
    """Undo :func:`compact_utc`: the exact text Celery wrote (``isoformat()`` never uses Z)."""
    return text[:-1] + "+00:00" if text and text.endswith("Z") else text


#: A record's first keys, in this order, in every record we write: the Lua scripts read
#: ``status`` and ``created_at`` in a record's first 200 bytes instead of decoding it
#: (store_result.lua, schedule.lua, promote.lua, purge_scheduled.lua).
HEAD_FIELDS = ("id", "status", "created_at")


def record_head(rid, status, created_at):
    """A new record holding :data:`HEAD_FIELDS`: the start of every record we write."""
    return dict(zip(HEAD_FIELDS, (rid, status, created_at)))


#: kombu's encoder (datetimes, UUIDs, Decimals survive), made once: a publish encodes
#: its record with it, the only JSON encoding of the publish after Celery's own.
_ENCODER = kombu_json.JSONEncoder(separators=(",", ":"))


def dumps(record):
    """A record as compact JSON text."""
    return _ENCODER.encode(record)


def loads(raw):
    """A record from its JSON text; bad bytes raise RecordError."""
    try:
        record = kombu_json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise RecordError(f"not a JSON task record: {exc}") from exc
    if not isinstance(record, dict) or "id" not in record or "status" not in record:
        raise RecordError("not a task record: 'id' and 'status' are required")
    return record

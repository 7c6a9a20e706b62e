"""Celery result meta <-> sheppy 0.0.7 task records. Pure functions, no Redis.

A record is a sheppy task record (what ``sheppy.models.Task.model_validate``
accepts) with the Celery data sheppy has no field for kept in the top-level
``celery`` key, which sheppy accepts and drops::

    {"id": "<uuid>", "status": "completed", "result": 42,
     "spec": {"func": "celery_sheppy:celery_task"},
     "finished_at": "2026-11-22T05:00:00.123456+00:00",
     "celery": {...}}

``id`` is the Celery task id when it is a canonical lower-case UUID, else the
UUIDv5 of it in :data:`CELERY_ID_NAMESPACE` (sheppy accepts UUID ids only); the
Celery id is then kept as ``celery.task_id``.

With the json result serializer the Celery meta is stored natively: a
successful result is sheppy's ``result``, everything else sits in ``celery``
and fields sheppy already holds are not repeated. With any other serializer
(or result compression) ``celery.payload`` holds Celery's own encoding of the
whole meta in base64; sheppy's fields are still filled in for its tools.
"""

import base64
import json
import re
from datetime import datetime, timezone
from uuid import UUID, uuid4, uuid5

from celery import states
from kombu import serialization
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

# Meta keys dropped when they hold these values, and restored on read.
_META_DEFAULTS = {"traceback": None, "children": []}


class RecordError(ValueError):
    """Bytes that are not a task record we can read."""


def celery_task(*args, **kwargs):
    """Stands in ``spec.func`` of Celery task records so sheppy can import it."""
    raise RuntimeError(
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
    return str(uuid5(CELERY_ID_NAMESPACE, task_id))


def status_for(state):
    return STATUS_BY_STATE.get(state, DEFAULT_STATUS)


def error_text(exc):
    """sheppy's ``error``: ``"ExceptionClass: message"``, from an exception or Celery's dict."""
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, dict):
        message = exc.get("exc_message", "")
        if isinstance(message, (list, tuple)):
            message = ", ".join(str(part) for part in message)
        return f"{exc.get('exc_type', 'Exception')}: {message}"
    return None if exc is None else f"Exception: {exc}"


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


# Celery's Retry says when in its text: "Retry in 5s" or "Retry at 2026-11-22 05:00:00+00:00".
_RETRY_WHEN = re.compile(r"Retry (?:in (?P<seconds>[0-9.]+)s|at (?P<at>\d{4}-\d\d-\d\d[ T][0-9:.+-]+))")


def compact_utc(text):
    """An ISO time in UTC written with ``Z`` (5 bytes less per timestamp, per record)."""
    return text[:-6] + "Z" if text and text.endswith("+00:00") else text


def expand_utc(text):
    """Undo :func:`compact_utc`: the exact text Celery wrote (``isoformat()`` never uses Z)."""
    return text[:-1] + "+00:00" if text and text.endswith("Z") else text


def _retry_due(traceback, now):
    """When a RETRY is due. Celery stores the retried exception, not the Retry, so the
    only trace of ``when`` is the Retry's text at the end of the traceback."""
    match = _RETRY_WHEN.search((traceback or "")[-300:])
    if match is None:
        return None
    if match["seconds"]:
        return datetime.fromtimestamp(now.timestamp() + float(match["seconds"]), timezone.utc).isoformat()
    return aware_iso(match["at"])


#: A record's first keys, in this order, in every record we write: the Lua scripts read
#: ``status`` and ``created_at`` in a record's first 200 bytes instead of decoding it
#: (store_result.lua, schedule.lua, promote.lua, purge_scheduled.lua).
HEAD_FIELDS = ("id", "status", "created_at")


def _head(rid, status, created_at):
    """A new record holding :data:`HEAD_FIELDS`: the start of every record we write."""
    return dict(zip(HEAD_FIELDS, (rid, status, created_at)))


def build_record(task_id, meta, request=None, payload=None, now=None):
    """The sheppy record for Celery ``meta`` of ``task_id``, as a dict.

    ``payload``, when given, is Celery's own encoding of ``meta`` (bytes); the
    record then keeps it instead of the meta's fields.
    """
    now = now or datetime.now(timezone.utc)
    state = meta["status"]
    rid = sheppy_id(task_id)
    finished_at = None
    if state in TERMINAL_STATES:
        finished_at = compact_utc(aware_iso(meta.get("date_done")) or now.isoformat())
    # sheppy shows created_at and sorts ``task list`` by it; a record without one is
    # "created" whenever it is read. The store script keeps the created_at of the
    # record already stored, so it is the task's first report.
    record = _head(rid, status_for(state), finished_at or compact_utc(now.isoformat()))
    result = meta.get("result")
    if state in states.EXCEPTION_STATES:
        record["error"] = error_text(result)
    if state == states.SUCCESS and payload is None and result is not None:
        record["result"] = result  # None is sheppy's default: not written
    record["spec"] = _spec(meta, payload)
    if finished_at is not None:
        record["finished_at"] = finished_at
    if state == states.RETRY:
        record["retry_count"] = (getattr(request, "retries", None) or 0) + 1
        record["last_retry_at"] = now.isoformat()
        record["next_retry_at"] = _retry_due(meta.get("traceback"), now)
    elif request is not None and getattr(request, "retries", None):
        record["retry_count"] = request.retries

    if payload is not None:
        extras = {"status": state, "payload": base64.b64encode(payload).decode("ascii")}
    else:
        extras = _compact_meta(meta, rid, str(task_id), finished_at, record["spec"])
    if extras:  # a record without them reads back as the same meta (see _meta_from_sheppy)
        record["celery"] = extras
    return record


def _spec(meta, payload):
    spec = {"func": SPEC_FUNC}
    # args/kwargs are only known with result_extended, and only JSON-safe on the json path.
    if payload is None:
        if isinstance(meta.get("args"), (list, tuple)):
            spec["args"] = list(meta["args"])
        if isinstance(meta.get("kwargs"), dict):
            spec["kwargs"] = meta["kwargs"]
    return spec


def _compact_meta(meta, rid, task_id, finished_at, spec):
    extras = {}
    for key, value in meta.items():
        if key in ("args", "kwargs") and key in spec:
            continue  # kept once, in sheppy's spec
        if key == "result" and meta["status"] == states.SUCCESS:
            continue  # stored as sheppy's result
        if key == "status" and value == STATE_BY_STATUS[status_for(value)]:
            continue
        if key == "task_id" and value == rid:
            continue
        if key == "date_done" and value is not None and value == expand_utc(finished_at):
            continue
        if key in _META_DEFAULTS and value == _META_DEFAULTS[key]:
            continue
        extras[key] = value
    if "task_id" not in extras and task_id != rid:
        extras["task_id"] = task_id
    return extras


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


def meta_from_record(record, decode_payload):
    """Celery meta from a record dict; ``decode_payload(bytes)`` decodes Celery's encoding."""
    extras = record.get("celery")
    if not isinstance(extras, dict):
        return _meta_from_sheppy(record)
    if "payload" in extras:
        try:
            payload = base64.b64decode(extras["payload"])
        except (ValueError, TypeError) as exc:
            raise RecordError(f"bad Celery payload in record {record['id']}: {exc}") from exc
        return decode_payload(payload)
    meta = {"status": extras.get("status") or STATE_BY_STATUS.get(record["status"], states.PENDING)}
    meta["result"] = record.get("result") if meta["status"] == states.SUCCESS else None
    for key, value in _META_DEFAULTS.items():
        meta[key] = list(value) if isinstance(value, list) else value
    meta["date_done"] = expand_utc(record.get("finished_at"))
    spec = record.get("spec") or {}
    for key in ("args", "kwargs"):
        if key in spec:
            meta[key] = spec[key]
    meta.update(extras)
    meta.setdefault("task_id", record["id"])
    return meta


def _meta_from_sheppy(record):
    """Celery meta for a record a sheppy worker wrote (no Celery extras)."""
    state = STATE_BY_STATUS.get(record["status"], states.PENDING)
    result = record.get("result")
    if state in states.EXCEPTION_STATES:
        exc_type, _, message = (record.get("error") or "Exception: ").partition(": ")
        result = {"exc_type": exc_type or "Exception", "exc_message": [message], "exc_module": None}
    return {
        "status": state,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": expand_utc(record.get("finished_at")),
        "task_id": record["id"],
    }


# -- broker: kombu messages <-> pending entries ---------------------------------------
#
# A pending entry's ``data`` is a sheppy record that carries the whole kombu message in
# ``celery.message``. For a Celery task with a JSON body (protocol 2: ``[args, kwargs,
# embed]``) the arguments live once, in sheppy's ``spec``, and ``celery.embed`` holds
# the rest of the body; any other body stays in the message (base64 when binary)::
#
#     {"id": "<uuid>", "status": "pending", "created_at": "...",
#      "spec": {"func": ..., "args": [2, 2], "kwargs": {}}, "scheduled_at": null, "retry_count": 0,
#      "celery": {"message": {"headers": {...}, "properties": {...}, "content-type": ...},
#                 "embed": {"callbacks": null, ...}}}
#
# Messages that are not tasks (remote control, events) get a fresh UUID and no arguments.

_JSON = "application/json"


def pending_record(message, now=None):
    """The pending-entry record (a dict; :func:`dumps` makes the entry's ``data``) for a
    kombu message dict (as kombu's virtual channel publishes it: body already encoded,
    ``properties`` with ``delivery_info``)."""
    now = now or datetime.now(timezone.utc)
    message = dict(message)
    headers = message.get("headers") or {}
    properties = dict(message.get("properties") or {})
    properties.pop("delivery_tag", None)
    message["properties"] = properties
    body = message.get("body")
    if isinstance(body, (bytes, bytearray, memoryview)):
        message["body"] = base64.b64encode(bytes(body)).decode("ascii")
        properties["body_encoding"] = "base64"

    task_id = headers.get("id") if headers.get("task") else None
    record = _head(sheppy_id(task_id) if task_id else str(uuid4()), "pending", now.isoformat())
    spec = {"func": SPEC_FUNC}
    extras = {}
    parts = _task_body(message, headers) if task_id else None
    if parts is not None:
        spec["args"], spec["kwargs"], extras["embed"] = parts
        del message["body"]
    record["spec"] = spec
    if task_id:
        record["scheduled_at"] = aware_iso(headers.get("eta"))
        if headers.get("retries"):
            record["retry_count"] = headers["retries"]
    extras["message"] = message
    record["celery"] = extras
    return record


def _task_body(message, headers):
    """``(args, kwargs, embed)`` of a protocol 2 JSON task body, or None."""
    body = message.get("body")
    if (message.get("content-type") != _JSON or not isinstance(body, str)
            or headers.get("compression") or message["properties"].get("body_encoding")):
        return None
    try:
        # The standard decoder, without kombu's object hook: the parts go back into JSON
        # as they came (a {"__type__": ...} stays that dict and is written the same way),
        # and the worker's kombu decodes them from the rebuilt body.
        parts = json.loads(body)
    except ValueError:
        return None
    if (isinstance(parts, list) and len(parts) == 3 and isinstance(parts[0], list)
            and isinstance(parts[1], dict) and isinstance(parts[2], (dict, type(None)))):
        return parts
    return None


def record_to_message(raw):
    """``(record, kombu message dict)`` from a pending entry's ``data``; RecordError if bad."""
    if raw is None:
        raise RecordError("the stream entry has no 'data' field (not written by celery-sheppy "
                          "or sheppy)")
    record = loads(raw)
    extras = record.get("celery")
    message = extras.get("message") if isinstance(extras, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
        raise RecordError(f"record {record.get('id')} carries no Celery message")
    message = dict(message, properties=dict(message["properties"]))
    if "body" not in message:
        spec = record.get("spec") or {}
        message["body"] = kombu_json.dumps(
            [spec.get("args", []), spec.get("kwargs", {}), extras.get("embed")])
    return record, message


#: Content types kombu passes through without a serializer.
RAW_CONTENT_TYPES = ("application/data", "application/text")


def check_content_type(message):
    """Raise RecordError for a Celery task message whose content type no serializer of
    this process decodes (Celery would drop it). Other messages pass: kombu hands their
    bodies over raw."""
    if not (message.get("headers") or {}).get("task"):
        return
    content_type = message.get("content-type")
    if content_type and content_type not in RAW_CONTENT_TYPES and content_type not in getattr(
            serialization.registry, "_decoders", {content_type: None}):
        raise RecordError(f"unknown content type {content_type!r}")


def mark_redelivered(record, deliveries=None):
    """A copy of a pending record whose message says ``redelivered``, as text.

    ``deliveries``, when given, is how often the message was delivered so far; it is
    kept in ``celery.deliveries`` so the count survives the entry being re-added.
    """
    extras = dict(record["celery"])
    if deliveries is not None:
        extras["deliveries"] = int(deliveries)
    message = dict(extras["message"])
    message["headers"] = dict(message.get("headers") or {}, redelivered=True)
    properties = dict(message["properties"])
    properties["delivery_info"] = dict(properties.get("delivery_info") or {}, redelivered=True)
    message["properties"] = properties
    extras["message"] = message
    return dumps(dict(record, celery=extras))


def flag_redelivered(raw):
    """A pending entry's ``raw`` data, its message marked redelivered (bad data unchanged)."""
    try:
        return mark_redelivered(loads(raw))
    except (RecordError, KeyError, TypeError, AttributeError, ValueError):
        return raw


# -- reliability: delivery counts, delayed messages ---------------------------------------


def prior_deliveries(record):
    """Deliveries of a pending record before its current entry (``celery.deliveries``)."""
    extras = record.get("celery")
    try:
        return max(int((extras or {}).get("deliveries") or 0), 0)
    except (TypeError, ValueError, AttributeError):
        return 0


def reset_deliveries(raw):
    """The entry ``raw`` with its delivery count cleared (a replayed dead letter); bad
    bytes come back unchanged."""
    try:
        record = loads(raw)
    except RecordError:
        return raw
    extras = record.get("celery")
    if not isinstance(extras, dict) or "deliveries" not in extras:
        return raw
    extras = dict(extras)
    del extras["deliveries"]
    return dumps(dict(record, celery=extras))


def scheduled_record(record):
    """The sheppy record (status ``scheduled``, as text) of a delayed message's pending
    ``record`` (a dict, see :func:`pending_record`)."""
    return dumps(dict(record, status="scheduled"))

"""kombu messages <-> pending entries (the broker's side). No Redis.

A pending entry's ``data`` is a sheppy record that carries the whole kombu message in
``celery.message``. For a Celery task with a JSON body (protocol 2: ``[args, kwargs,
embed]``) the arguments live once, in sheppy's ``spec``, and ``celery.embed`` holds
the rest of the body; any other body stays in the message (base64 when binary)::

    {"id": "<uuid>", "status": "pending", "created_at": "...",
     "spec": {"func": ..., "args": [2, 2], "kwargs": {}}, "scheduled_at": null, "retry_count": 0,
     "celery": {"message": {"headers": {...}, "properties": {...}, "content-type": ...},
                "embed": {"callbacks": null, ...}}}

Messages that are not tasks (remote control, events) get a fresh UUID and no arguments.
"""

import base64
import json
from datetime import datetime, timezone
from uuid import uuid4

from kombu import serialization
from kombu.utils import json as kombu_json

from .base import (SPEC_FUNC, RecordError, RequeuedBySheppy, aware_iso, dumps, loads,
                   record_head, sheppy_id)


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
    record = record_head(sheppy_id(task_id) if task_id else str(uuid4()), "pending", now.isoformat())
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


class FieldsWithoutData(str):
    """Stands in the ``data`` of a stream entry that has none: its fields as JSON text,
    so that the dead letter it becomes shows what the entry held."""

    @classmethod
    def of(cls, fields):
        return cls(json.dumps({_text(key): _text(value) for key, value in fields.items()},
                              sort_keys=True))


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def record_to_message(raw):
    """``(record, kombu message dict)`` from a pending entry's ``data``; RecordError if bad."""
    if raw is None or isinstance(raw, FieldsWithoutData):
        raise RecordError("the stream entry has no 'data' field (not written by celery-sheppy "
                          "or sheppy)" + ("; its fields are kept as JSON in the dead letter's "
                                          "data" if raw else ""))
    record = loads(raw)
    extras = record.get("celery")
    message = extras.get("message") if isinstance(extras, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
        if (record.get("spec") or {}).get("func") == SPEC_FUNC and extras is None:
            raise RequeuedBySheppy(record.get("id"))
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


def due_time(message):
    """When the Celery task in kombu message dict ``message`` is due (its ``eta`` header,
    epoch seconds), or None: no eta, not a task, or an eta that cannot be read."""
    headers = message.get("headers") or {}
    eta = headers.get("eta")
    if not eta or not headers.get("task") or not headers.get("id"):
        return None
    try:
        return datetime.fromisoformat(aware_iso(eta)).timestamp()
    except (TypeError, ValueError):
        return None


def scheduled_record(record):
    """The sheppy record (status ``scheduled``, as text) of a delayed message's pending
    ``record`` (a dict, see :func:`pending_record`)."""
    return dumps(dict(record, status="scheduled"))

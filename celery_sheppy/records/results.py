"""Celery result meta <-> sheppy task records (the result backend's side). No Redis.

With the json result serializer the Celery meta is stored natively: a successful
result is sheppy's ``result``, everything else sits in ``celery`` and fields sheppy
already holds are not repeated. With any other serializer (or result compression)
``celery.payload`` holds Celery's own encoding of the whole meta in base64; sheppy's
fields are still filled in for its tools.
"""

import base64
import re
from datetime import datetime, timezone

from celery import states

from .base import (SPEC_FUNC, STATE_BY_STATUS, TERMINAL_STATES, RecordError, aware_iso,
                   compact_utc, expand_utc, record_head, sheppy_id, status_for)


# Meta keys dropped when they hold these values, and restored on read.
_META_DEFAULTS = {"traceback": None, "children": []}


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


# Celery's Retry says when in its text: "Retry in 5s" or "Retry at 2026-11-22 05:00:00+00:00".
_RETRY_WHEN = re.compile(r"Retry (?:in (?P<seconds>[0-9.]+)s|at (?P<at>\d{4}-\d\d-\d\d[ T][0-9:.+-]+))")


def _retry_due(traceback, now):
    """When a RETRY is due. Celery stores the retried exception, not the Retry, so the
    only trace of ``when`` is the Retry's text at the end of the traceback."""
    match = _RETRY_WHEN.search((traceback or "")[-300:])
    if match is None:
        return None
    if match["seconds"]:
        return datetime.fromtimestamp(now.timestamp() + float(match["seconds"]), timezone.utc).isoformat()
    return aware_iso(match["at"])


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
    record = record_head(rid, status_for(state), finished_at or compact_utc(now.isoformat()))
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

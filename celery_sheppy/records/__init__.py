"""Celery <-> sheppy 0.0.7 task records: the whole mapping, in this package. No Redis.

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

- ``base``: ids, statuses, the head fields the Lua scripts read, JSON text;
- ``results``: Celery result meta <-> records (the result backend);
- ``messages``: kombu messages <-> pending entries (the broker).
"""

from .base import (CELERY_ID_NAMESPACE, HEAD_FIELDS, SHEPPY_RECORD_TTL, SPEC_FUNC,
                   STATE_BY_STATUS, STATUS_BY_STATE, TERMINAL_STATES, RecordError,
                   RequeuedBySheppy, aware_iso, celery_task, compact_utc, dumps,
                   expand_utc, loads, sheppy_id, status_for)
from .messages import (RAW_CONTENT_TYPES, FieldsWithoutData, check_content_type, due_time,
                       flag_redelivered, mark_redelivered, pending_record, prior_deliveries,
                       record_to_message, reset_deliveries, scheduled_record)
from .results import build_record, error_text, meta_from_record

__all__ = [
    "CELERY_ID_NAMESPACE", "HEAD_FIELDS", "SPEC_FUNC", "STATE_BY_STATUS", "STATUS_BY_STATE",
    "TERMINAL_STATES", "RecordError", "RequeuedBySheppy", "SHEPPY_RECORD_TTL", "aware_iso",
    "celery_task", "compact_utc", "dumps", "expand_utc", "loads", "sheppy_id", "status_for",
    "RAW_CONTENT_TYPES", "FieldsWithoutData", "check_content_type", "due_time",
    "flag_redelivered", "mark_redelivered",
    "pending_record", "prior_deliveries", "record_to_message", "reset_deliveries",
    "scheduled_record",
    "build_record", "error_text", "meta_from_record",
]

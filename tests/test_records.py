"""celery_sheppy.records: Celery meta <-> sheppy task records, without Redis."""

import json
import pickle
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from celery import states
from kombu.serialization import dumps as kombu_dumps, loads as kombu_loads

from celery_sheppy import records

NOW = datetime(2026, 11, 22, 5, 0, tzinfo=timezone.utc)
TASK_ID = str(uuid.UUID(int=7))


def meta(state, result=None, **extra):
    base = {"status": state, "result": result, "traceback": None, "children": [],
            "date_done": NOW.isoformat() if state in states.READY_STATES else None,
            "task_id": TASK_ID}
    base.update(extra)
    return base


def sheppy_reads(text):
    """sheppy's own model of a record's JSON text (tests marked sheppy_tools)."""
    from sheppy.models import Task

    return Task.model_validate_json(text)


def json_round_trip(m, request=None):
    text = records.dumps(records.build_record(m["task_id"], m, request, now=NOW))
    return text, records.meta_from_record(records.loads(text), decode_payload=None)


EVERY_STATE = [
    meta(states.PENDING),
    meta(states.RECEIVED),
    meta(states.STARTED, {"pid": 12, "hostname": "w1"}),
    meta(states.SUCCESS, {"nested": [1, 2.5, "x", None]}),
    meta(states.SUCCESS, None),
    meta(states.FAILURE, {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"},
         traceback="Traceback ...\nValueError: boom\n"),
    meta(states.RETRY, {"exc_type": "Retry", "exc_message": ["Retry in 5s", 5], "exc_module": "celery.exceptions"}),
    meta(states.REVOKED, {"exc_type": "TaskRevokedError", "exc_message": ["revoked"],
                          "exc_module": "celery.exceptions"}),
    meta("PROGRESS", {"step": 3, "of": 10}),
    meta(states.SUCCESS, 1, children=[[["c1", None], None]], group_id="g1", parent_id="p1",
         name="app.add", args=[1, 2], kwargs={"z": 3}, worker="w@h", retries=2, queue="celery"),
    meta(states.SUCCESS, {"when": datetime(2020, 1, 1, tzinfo=timezone.utc), "id": uuid.UUID(int=1)}),
]


@pytest.mark.parametrize("m", EVERY_STATE, ids=lambda m: m["status"])
def test_every_celery_meta_round_trips_exactly_through_a_json_record(m):
    _, back = json_round_trip(m)
    assert back == m


@pytest.mark.sheppy_tools
@pytest.mark.parametrize("m", EVERY_STATE, ids=lambda m: m["status"])
def test_every_record_is_a_valid_sheppy_task(m):
    text, _ = json_round_trip(m)
    task = sheppy_reads(text)
    assert str(task.id) == TASK_ID
    assert task.status == records.status_for(m["status"])
    assert (task.finished_at is not None) == (m["status"] in states.READY_STATES)


def test_status_mapping_follows_the_project_table():
    assert records.status_for(states.PENDING) == "pending"
    assert records.status_for(states.RECEIVED) == "pending"
    assert records.status_for(states.STARTED) == "processing"
    assert records.status_for(states.RETRY) == "retrying"
    assert records.status_for(states.SUCCESS) == "completed"
    assert records.status_for(states.FAILURE) == "failed"
    assert records.status_for(states.REVOKED) == "cancelled"
    assert records.status_for("PROGRESS") == "processing"


def test_failed_record_has_sheppy_error_text_and_no_result():
    m = meta(states.FAILURE, {"exc_type": "KeyError", "exc_message": ["missing"], "exc_module": "builtins"})
    record = records.build_record(TASK_ID, m, now=NOW)
    assert record["error"] == "KeyError: missing"
    assert "result" not in record


def test_successful_json_result_is_sheppys_result():
    record = records.build_record(TASK_ID, meta(states.SUCCESS, [1, 2]), now=NOW)
    assert record["result"] == [1, 2]


@pytest.mark.sheppy_tools
def test_sheppy_reads_a_json_result_a_non_uuid_id_a_pickled_failure_and_utc_times():
    assert sheppy_reads(records.dumps(records.build_record(
        TASK_ID, meta(states.SUCCESS, [1, 2]), now=NOW))).result == [1, 2]
    assert sheppy_reads(records.dumps(records.build_record(
        "my-id", meta(states.SUCCESS, 1, task_id="my-id"), now=NOW)))
    failure = meta(states.FAILURE, ValueError("boom"))
    assert sheppy_reads(records.dumps(records.build_record(
        TASK_ID, failure, payload=pickle.dumps(failure), now=NOW))).error == "ValueError: boom"
    done = meta(states.SUCCESS, None, date_done="2026-11-22T05:00:00.123456+00:00")
    assert sheppy_reads(records.dumps(records.build_record(TASK_ID, done, now=NOW))).finished_at == (
        datetime(2026, 11, 22, 5, 0, 0, 123456, tzinfo=timezone.utc))


def test_retry_record_counts_retries_and_says_when_the_next_one_is_due():
    m = meta(states.RETRY, None, traceback="Traceback...\ncelery.exceptions.Retry: Retry in 5s\n")
    record = records.build_record(TASK_ID, m, SimpleNamespace(retries=1), now=NOW)
    assert record["retry_count"] == 2
    assert record["next_retry_at"] == "2026-11-22T05:00:05+00:00"
    at = meta(states.RETRY, None, traceback="celery.exceptions.Retry: Retry at 2026-11-23 01:02:03+00:00\n")
    assert records.build_record(TASK_ID, at, now=NOW)["next_retry_at"] == "2026-11-23T01:02:03+00:00"


def test_non_uuid_task_id_gets_a_stable_uuid5_and_keeps_the_celery_id():
    m = meta(states.SUCCESS, 1, task_id="my-id")
    record = records.build_record("my-id", m, now=NOW)
    assert record["id"] == records.sheppy_id("my-id") == str(uuid.uuid5(records.CELERY_ID_NAMESPACE, "my-id"))
    assert record["celery"]["task_id"] == "my-id"
    _, back = json_round_trip(m)
    assert back["task_id"] == "my-id"


def test_upper_case_uuid_is_not_canonical_and_is_mapped():
    lower = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    assert records.sheppy_id(lower) == lower
    assert records.sheppy_id(lower.upper()) != lower.upper()


@pytest.mark.parametrize("form", ["{%s}", "urn:uuid:%s", "%s\n"])
def test_other_spellings_of_a_uuid_are_not_canonical_either(form):
    lower = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    assert records.sheppy_id(form % lower) == str(uuid.uuid5(records.CELERY_ID_NAMESPACE, form % lower))
    assert records.sheppy_id(lower.replace("-", "")) != lower.replace("-", "")


def test_task_arguments_of_kombu_types_reach_the_worker_as_the_producer_sent_them():
    # Given a protocol 2 task whose arguments kombu's JSON encodes with type markers
    args = [datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), uuid.UUID(int=3)]
    kwargs = {"at": datetime(2020, 1, 1), "tag": {"__type__": "mine", "v": 1}}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    _, _, body = kombu_dumps([args, kwargs, embed], serializer="json")
    message = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"task": "app.t", "id": TASK_ID},
               "properties": {"delivery_info": {"exchange": "", "routing_key": "celery"},
                              "delivery_tag": "tag-1", "body_encoding": None}}
    # When it goes through a pending record and back
    text = records.dumps(records.pending_record(message, now=NOW))
    _, back = records.record_to_message(text)
    # Then sheppy sees the arguments as JSON and the worker decodes the producer's values
    spec = json.loads(text)["spec"]
    assert spec["args"][1]["__type__"] == "uuid"
    assert spec["kwargs"]["tag"] == {"__type__": "mine", "v": 1}
    assert kombu_loads(back["body"], "application/json", "utf-8") == [args, kwargs, embed]
    assert "delivery_tag" not in back["properties"] and message["properties"]["delivery_tag"] == "tag-1"


def test_pickled_meta_is_kept_as_celerys_payload_and_round_trips():
    m = meta(states.FAILURE, ValueError("boom"))
    payload = pickle.dumps(m)
    record = records.build_record(TASK_ID, m, payload=payload, now=NOW)
    assert record["error"] == "ValueError: boom"
    assert record["celery"]["status"] == states.FAILURE
    back = records.meta_from_record(records.loads(records.dumps(record)), pickle.loads)
    assert back["status"] == states.FAILURE and str(back["result"]) == "boom"


def test_other_serializers_round_trip_through_the_payload():
    m = meta(states.SUCCESS, {"a": (1, 2)})
    _, _, payload = kombu_dumps(m, serializer="yaml") if _has_yaml() else kombu_dumps(m, serializer="pickle")
    payload = payload.encode() if isinstance(payload, str) else payload
    record = records.build_record(TASK_ID, m, payload=payload, now=NOW)
    assert record["status"] == "completed" and "result" not in record
    content_type = "application/x-yaml" if _has_yaml() else "application/x-python-serialize"
    back = records.meta_from_record(
        records.loads(records.dumps(record)),
        lambda p: kombu_loads(p, content_type, "utf-8" if _has_yaml() else "binary",
                              accept={content_type}))
    assert back["status"] == states.SUCCESS


def _has_yaml():
    try:
        import yaml  # noqa: F401
    except ImportError:
        return False
    return True


def test_record_written_by_a_sheppy_worker_reads_as_celery_meta():
    completed = {"id": TASK_ID, "status": "completed", "result": 5, "spec": {"func": "m:f"},
                 "finished_at": NOW.isoformat()}
    failed = {"id": TASK_ID, "status": "failed", "error": "ValueError: nope", "spec": {"func": "m:f"},
              "finished_at": NOW.isoformat()}
    assert records.meta_from_record(completed, None)["result"] == 5
    m = records.meta_from_record(failed, None)
    assert m["status"] == states.FAILURE
    assert m["result"]["exc_type"] == "ValueError" and m["result"]["exc_message"] == ["nope"]


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'{"id": "x"}', b"\xff\xfe"])
def test_bytes_that_are_not_a_record_raise_record_error(raw):
    with pytest.raises(records.RecordError):
        records.loads(raw)


def test_naive_date_done_becomes_an_aware_finished_at():
    m = meta(states.SUCCESS, 1, date_done="2026-11-22T05:00:00")
    record = records.build_record(TASK_ID, m, now=NOW)
    assert record["finished_at"] == "2026-11-22T05:00:00Z"
    _, back = json_round_trip(m)
    assert back["date_done"] == "2026-11-22T05:00:00"


def test_utc_times_are_written_with_z_and_read_back_exactly():
    m = meta(states.SUCCESS, None, date_done="2026-11-22T05:00:00.123456+00:00")
    record = records.build_record(TASK_ID, m, now=NOW)
    assert record["finished_at"] == "2026-11-22T05:00:00.123456Z"
    assert "result" not in record and "celery" not in record
    _, back = json_round_trip(m)
    assert back == m


@pytest.mark.sheppy_tools
def test_spec_func_is_importable_and_refuses_to_run_under_sheppy():
    from sheppy._utils.functions import resolve_function

    func = resolve_function(records.SPEC_FUNC)
    with pytest.raises(SystemExit, match="Celery worker"):  # stops the sheppy worker
        func()

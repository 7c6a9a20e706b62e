"""The delivery steps (celery_sheppy/transport/steps.py): what becomes of an entry read,
decided without Redis."""

import json

from celery_sheppy import records
from celery_sheppy.transport import steps


def task_entry(deliveries=None, **headers):
    message = {"headers": dict({"task": "proj.add", "id": "4ab0c2b4-0000-4000-8000-000000000001"},
                               **headers),
               "properties": {"delivery_info": {}}, "content-type": "application/json",
               "content-encoding": "utf-8", "body": "[[1, 2], {}, {}]"}
    record = records.pending_record(message)
    if deliveries is not None:
        record["celery"]["deliveries"] = deliveries
    return records.dumps(record)


def test_an_entry_that_is_not_a_record_goes_to_the_dead_letters_as_undecodable():
    verdict = steps.decode(b"not json")
    assert isinstance(verdict, steps.DeadLetter)
    assert verdict.reason.startswith("undecodable: ") and verdict.deliveries == 1


def test_an_entry_without_a_data_field_says_so():
    verdict = steps.decode(None)
    assert isinstance(verdict, steps.DeadLetter)
    assert "no 'data' field" in verdict.reason


def test_a_task_in_a_content_type_nobody_decodes_is_undecodable():
    record = json.loads(task_entry())
    record["celery"]["message"]["content-type"] = "application/x-unknown"
    verdict = steps.decode(json.dumps(record))
    assert isinstance(verdict, steps.DeadLetter) and "unknown content type" in verdict.reason


def test_a_task_record_decodes_to_its_kombu_message():
    record, message = steps.decode(task_entry())
    assert message["headers"]["task"] == "proj.add"
    assert json.loads(message["body"])[0] == [1, 2]


def test_deliveries_count_the_ones_kept_in_the_record_and_stop_past_the_limit():
    record, _ = steps.decode(task_entry(deliveries=2))
    assert steps.count_delivery(record, max_deliveries=5) == 3
    record, _ = steps.decode(task_entry(deliveries=5))
    verdict = steps.count_delivery(record, max_deliveries=5)
    assert verdict == steps.DeadLetter("max_deliveries exceeded", 5)


def test_a_revoked_task_is_told_by_its_id_and_other_messages_pass():
    _, message = steps.decode(task_entry())
    revoked = {"4ab0c2b4-0000-4000-8000-000000000001"}
    assert steps.revoked(message, revoked.__contains__) == "4ab0c2b4-0000-4000-8000-000000000001"
    assert steps.revoked(message, set().__contains__) is None
    assert steps.revoked({"headers": {}}, revoked.__contains__) is None


def test_an_entry_older_than_its_ttl_has_expired():
    published = "1700000000000-0"  # its id: published at that epoch ms
    assert steps.expired(published, 1000, now=1700000002.0)
    assert not steps.expired(published, 5000, now=1700000002.0)
    assert not steps.expired(published, None, now=1800000000.0)
    assert not steps.expired(published, "not a number", now=1800000000.0)

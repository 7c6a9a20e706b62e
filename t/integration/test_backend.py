"""The sheppy:// result backend with real Celery workers and a real redis-server.

The broker is the stock redis:// transport on db 1 of the same private server;
results live on db 0 in Sheppy's layout.
"""

import json
import re
import subprocess
import sys
import threading
import time
import uuid

import celery
import pytest
from celery import chord, group
from celery.exceptions import ChordError, TimeoutError as CeleryTimeoutError
from celery.result import GroupResult

from celery_sheppy import keys, records
from t.helpers import ROOT, TASKS, client_app, sig, start_worker


def record_of(client, task_id, queue="celery"):
    raw = client.get(keys.task_record(queue, records.sheppy_id(task_id)))
    return None if raw is None else json.loads(raw)


@pytest.fixture(scope="module", params=["prefork", "threads"])
def worker(request, redis_server):
    pool = request.param
    w = start_worker(redis_server.url.replace("/0", "/1"), backend=redis_server.sheppy_url(),
                     pool=pool, concurrency=2 if pool == "prefork" else 8,
                     env={"CELERY_SHEPPY_COUNTER_URL": redis_server.url.replace("/0", "/2")})
    yield w
    w.stop()


@pytest.fixture(scope="module")
def app(redis_server):
    app = client_app(redis_server.url.replace("/0", "/1"), redis_server.sheppy_url())
    yield app
    app.close()


@pytest.fixture
def client(redis_server):
    return redis_server.client()


@pytest.fixture
def counter(redis_server):
    """Db 2 of the test server, where record_run counts the runs of a task."""
    return redis_server.client(db=2)


# -- single tasks ---------------------------------------------------------------------


def test_task_result_is_returned_and_stored_as_a_completed_sheppy_record(worker, app, client):
    result = sig(app, "add", 2, 3).delay()
    assert result.get(timeout=20) == 5
    record = record_of(client, result.id)
    assert record["status"] == "completed" and record["result"] == 5
    assert record["finished_at"] and record["spec"]["args"] == [2, 3]


def test_failure_raises_the_original_exception_type_with_traceback(worker, app, client):
    result = sig(app, "fail", "boom").delay()
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=20)
    assert "ValueError: boom" in result.traceback
    record = record_of(client, result.id)
    assert record["status"] == "failed" and record["error"] == "ValueError: boom"


def test_custom_states_reach_on_message_before_the_result(worker, app, client):
    seen = []
    result = sig(app, "progress", 3, 0.3).delay()
    assert result.get(timeout=20, on_message=seen.append) == 3
    progress = [m["result"] for m in seen if m["status"] == "PROGRESS"]
    assert progress and progress[-1] == {"step": 2, "of": 3}
    assert seen[-1]["status"] == "SUCCESS"


def test_custom_state_is_readable_while_the_task_runs(worker, app, client):
    result = sig(app, "progress", 5, 0.4).delay()
    deadline = time.monotonic() + 20
    while result.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert result.state == "PROGRESS" and result.info["of"] == 5
    assert record_of(client, result.id)["status"] == "processing"
    assert result.get(timeout=20) == 5


def test_retried_task_succeeds_and_counts_its_retries(worker, app, client):
    result = sig(app, "retry_once", "ok").delay()
    assert result.get(timeout=20) == "ok"
    assert result.retries == 1
    assert record_of(client, result.id)["retry_count"] == 1


def test_retrying_task_record_is_retrying_with_next_retry_at(worker, app, client):
    result = sig(app, "retry_forever").delay()
    deadline = time.monotonic() + 20
    while result.state != "RETRY" and time.monotonic() < deadline:
        time.sleep(0.05)
    record = record_of(client, result.id)
    assert record["status"] == "retrying" and record["retry_count"] == 1 and record["next_retry_at"]
    app.control.revoke(result.id)


def test_extended_results_keep_name_args_kwargs_worker_and_queue(worker, app):
    result = app.signature(f"{TASKS}.add", args=(4,), kwargs={"y": 5}).delay()
    assert result.get(timeout=20) == 9
    assert result.name == f"{TASKS}.add" and result.args == [4] and result.kwargs == {"y": 5}
    assert result.worker and result.queue == "celery" and result.retries == 0
    assert result.date_done is not None


def test_non_uuid_task_ids_work_for_celery(worker, app, client):
    task_id = f"my-id-{uuid.uuid4().hex[:6]}"
    result = sig(app, "add", 1, 1).apply_async(task_id=task_id)
    assert result.get(timeout=20) == 2
    assert app.AsyncResult(task_id).result == 2
    record = record_of(client, task_id)
    assert record["id"] == records.sheppy_id(task_id) and record["celery"]["task_id"] == task_id


def test_a_revoke_never_overwrites_a_stored_result(app):
    # Given a task that failed (as Celery's chord error handler fails a group body's tasks)
    # and one that has no result yet
    failed, waiting = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.mark_as_failure(failed, ValueError("the chord's error"))

    # When both are revoked as a worker's revoke handler does (Celery 5.6 stores REVOKED for
    # every id of a broadcast, whatever its state)
    for task_id in (failed, waiting):
        app.backend.mark_as_revoked(task_id, reason="revoked")

    # Then the failure stays, and the waiting one is revoked
    assert app.AsyncResult(failed).state == "FAILURE"
    assert isinstance(app.AsyncResult(failed).result, ValueError)
    assert app.AsyncResult(waiting).state == "REVOKED"


def test_forget_deletes_the_record(worker, app, client):
    result = sig(app, "add", 1, 2).delay()
    result.get(timeout=20)
    result.forget()
    assert record_of(client, result.id) is None
    assert app.AsyncResult(result.id).state == "PENDING"


def test_get_with_a_timeout_raises_in_time_for_a_slow_task(worker, app):
    result = sig(app, "sleep", 3).delay()
    started = time.monotonic()
    with pytest.raises(CeleryTimeoutError):
        result.get(timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert result.get(timeout=20) == 3


# -- groups and chords ------------------------------------------------------------------


def test_group_results_come_back_in_order_and_the_group_can_be_saved_and_restored(worker, app):
    result = group(sig(app, "add", i, i) for i in range(20)).delay()
    assert result.get(timeout=30) == [2 * i for i in range(20)]
    assert result.join_native(timeout=10) == [2 * i for i in range(20)]
    result.save()
    restored = GroupResult.restore(result.id, app=app)
    assert [r.id for r in restored.results] == [r.id for r in result.results]
    restored.delete()
    assert GroupResult.restore(result.id, app=app) is None


def test_chord_body_gets_header_results_in_header_order(worker, app):
    delays = [0.6, 0.3, 0.0]  # the first part finishes last
    result = chord([sig(app, "sleep", d) for d in delays], sig(app, "identity"))()
    assert result.get(timeout=30) == delays


def test_chord_of_1000_parts_fires_once(worker, app, counter):
    key = f"chord-{uuid.uuid4()}"
    result = chord((sig(app, "add", i, 0) for i in range(1000)),
                   sig(app, "record_run", key))()
    assert result.get(timeout=120) == list(range(1000))
    time.sleep(0.5)
    assert counter.llen(key) == 1


def test_chord_part_that_reports_twice_fires_the_body_once(worker, app, counter):
    key = f"chord-{uuid.uuid4()}"
    result = chord([sig(app, "store_twice", i) for i in range(5)], sig(app, "record_run", key))()
    assert result.get(timeout=30) == [0, 1, 2, 3, 4]
    time.sleep(0.5)
    assert counter.llen(key) == 1


def test_chord_with_a_failing_part_fails_the_body_with_chord_error(worker, app):
    result = chord([sig(app, "add", 1, 1), sig(app, "fail", "part broke")], sig(app, "tsum"))()
    with pytest.raises(ValueError, match="part broke"):  # get() raises the header's error first
        result.get(timeout=30)
    result.get(timeout=30, propagate=False)
    assert result.state == "FAILURE"
    assert isinstance(result.result, ChordError) and "part broke" in str(result.result)


def test_chord_error_calls_the_bodys_link_error(worker, app, counter):
    key = f"errback-{uuid.uuid4()}"
    body = sig(app, "tsum")
    body.link_error(sig(app, "record_run", key, immutable=True))
    result = chord([sig(app, "fail", "x")], body)()
    result.get(timeout=30, propagate=False)
    assert isinstance(result.result, ChordError)
    deadline = time.monotonic() + 10
    while counter.llen(key) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counter.llen(key) == 1


def test_chord_with_an_empty_header_runs_the_body_with_no_results(worker, app):
    assert chord([], sig(app, "tsum"))().get(timeout=20) == 0


def test_chord_with_a_group_in_its_header_gets_every_result(worker, app):
    header = [group(sig(app, "add", 1, 1), sig(app, "add", 2, 2)), sig(app, "add", 3, 3)]
    result = chord(header, sig(app, "identity"))()
    # Celery flattens a group in a header; the stock redis:// backend also gives [4, 2, 6]
    assert sorted(result.get(timeout=30)) == [2, 4, 6]


def test_chord_in_a_chain_passes_its_result_on(worker, app):
    workflow = chord([sig(app, "add", 1, 1), sig(app, "add", 2, 2)], sig(app, "tsum")) | sig(app, "add", 10)
    assert workflow.delay().get(timeout=30) == 16


def test_nested_chord_in_a_chord_header(worker, app):
    inner = chord([sig(app, "add", 1, 1), sig(app, "add", 2, 2)], sig(app, "tsum"))
    result = chord([inner, sig(app, "add", 5, 5)], sig(app, "tsum"))()
    assert result.get(timeout=30) == 16


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_chord_sent_by_a_task_fires_in_the_process_that_sent_it(
        make_redis_server, workers, pool):
    # Given a worker with one pool process (or thread): the chord a chain's first task
    # sends is applied there, and its parts run there too, the last one joining the header
    server = make_redis_server()
    workers.start(server.sheppy_url(), pool=pool, concurrency=1)
    app = client_app(server.sheppy_url(), server.sheppy_url())
    try:
        workflow = (sig(app, "add", 1, 0, immutable=True)
                    | group(sig(app, "add", 1), sig(app, "add", 2)) | sig(app, "tsum"))

        # Then the body gets both results (before Celery 5.7, the header joined in that
        # process timed out: Celery told only the first AsyncResult object of an id, the
        # one the chord was applied with, never the restored header's)
        assert workflow.delay().get(timeout=60) == 5
    finally:
        app.close()


# -- many waiters ------------------------------------------------------------------------


def test_500_concurrent_waiters_in_one_process_all_get_their_result(worker, app):
    results = [sig(app, "add", i, 1).delay() for i in range(500)]
    got, errors = {}, []
    barrier = threading.Barrier(500)

    def wait(result, expected):
        try:
            barrier.wait(30)
            got[result.id] = result.get(timeout=90) == expected
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(r, i + 1)) for i, r in enumerate(results)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert len(got) == 500 and all(got.values())


def test_tasks_added_to_a_chord_reach_its_body(worker, app):
    result = chord([sig(app, "extend_chord", [5, 6, 7])], sig(app, "identity"))()
    assert sorted(result.get(timeout=30)) == [0, 5, 6, 7]


def test_chord_with_a_generator_header_fires_once_in_header_order(worker, app, counter):
    key = f"generator-{uuid.uuid4()}"
    header = (sig(app, "sleep", d) for d in (0.4, 0.0, 0.2))
    result = chord(header, sig(app, "record_run", key))()
    assert result.get(timeout=30) == [0.4, 0.0, 0.2]
    time.sleep(0.5)
    assert counter.llen(key) == 1


CLIENT_WITH_NON_UUID_IDS = """
import sys
from celery import Celery

app = Celery("client", broker=sys.argv[1], backend=sys.argv[1])
result = app.send_task("t.integration.tasks.add", (1, 2), task_id="my-id")
assert result.get(timeout=30) == 3
app.send_task("t.integration.tasks.add", (2, 2), task_id="my-other-id")  # not waited for
print("done")
"""


def test_a_script_sending_tasks_with_non_uuid_ids_exits_without_a_traceback(
        make_redis_server, workers, tmp_path):
    # Given a worker, and a script that sends tasks with ids that are not UUIDs (their
    # records are kept under a UUIDv5 of the id), one waited for, one not
    server = make_redis_server()
    workers.start(server.sheppy_url())
    script = tmp_path / "client.py"
    script.write_text(CLIENT_WITH_NON_UUID_IDS)

    # When it runs to its end (its AsyncResults are freed as the interpreter shuts down)
    for _ in range(3):
        run = subprocess.run([sys.executable, str(script), server.sheppy_url()],
                             capture_output=True, text=True, timeout=120)

        # Then it says nothing on stderr
        assert (run.returncode, run.stdout, run.stderr) == (0, "done\n", "")


def documented_records():
    """The example records of docs/backend.md ("The record"), in order."""
    text = (ROOT / "docs" / "backend.md").read_text()
    section = text.split("## The record", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]


def shape(value):
    """A record's keys, nested, without its values (ids and times differ)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    return type(value).__name__


@pytest.mark.parametrize("extended", [False, True])
def test_the_documented_record_is_what_a_worker_stores(make_redis_server, workers, extended):
    # Given a worker and a client with Celery's default result_extended (False), or True
    server = make_redis_server()
    conf = {"result_extended": extended}
    workers.start(server.sheppy_url(), conf)
    app = client_app(server.sheppy_url(), server.sheppy_url(), **conf)
    try:
        # When add(40, 2) runs
        result = sig(app, "add", 40, 2).delay()
        assert result.get(timeout=30) == 42
        record = record_of(server.client(), result.id)
    finally:
        app.close()

    # Then its record has the shape docs/backend.md shows for that setting (with Celery 5.3,
    # which writes a naive date_done, plus celery.date_done, as that page says)
    documented = documented_records()[1 if extended else 0]
    if celery.VERSION < (5, 4):
        documented.setdefault("celery", {})["date_done"] = "2026-11-22T05:00:00.123456"
    assert shape(record) == shape(documented)
    assert record["spec"] == documented["spec"] and record["result"] == documented["result"]

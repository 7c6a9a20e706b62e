"""sheppy 0.0.7's own tools read what Celery tasks store with ``result_backend = "sheppy://"``.

Two real Celery workers (result serializer json, and pickle) on a private
redis-server write one record of every kind into the sheppy queue ``celery``;
the tests read them back with sheppy's ``Queue`` API, its CLI (in a subprocess,
from a directory that holds no project code) and its ``Task`` model.
What the tools show is described in docs/sheppy-tools.md.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery, chord

if sys.version_info < (3, 10):  # as conftest.py skips tests marked sheppy_tools
    pytest.skip("sheppy 0.0.7 needs Python 3.10+", allow_module_level=True)
from sheppy import Queue, Task  # noqa: E402
from sheppy.backend.redis import RedisBackend  # noqa: E402

from celery_sheppy import keys, records  # noqa: E402
from t.helpers import start_worker  # noqa: E402

pytestmark = pytest.mark.sheppy_tools

QUEUE = "celery"
PICKLE_QUEUE = "pickled"
TASKS = "t.integration.tasks."
NON_UUID_ID = "my-id"

#: Settings of the second worker: pickled results, and no remote control, so that only
#: the json worker answers (and stores) the revoke. Task messages stay json: a worker
#: that accepts pickled messages refuses to run as root.
PICKLE_CONF = {
    "result_serializer": "pickle",
    "result_accept_content": ["json", "pickle"],
    "worker_enable_remote_control": False,
}

#: kind -> (sheppy status, error, result, terminal), what the mapping promises.
EXPECTED = {
    "completed": ("completed", None, 5, True),
    "failed": ("failed", "ValueError: boom", None, True),
    "retrying": ("retrying", "LookupError: not yet", None, False),
    "retrying_without_cause": ("retrying", None, None, False),
    "revoked": ("cancelled", "TaskRevokedError: revoked", None, True),
    "started": ("processing", None, None, False),
    "custom_state": ("processing", None, None, False),
    "non_uuid_id": ("completed", None, 2, True),
    "upper_case_uuid_id": ("completed", None, 7, True),
    "pickled": ("completed", None, None, True),
    "pickled_failure": ("failed", "ValueError: pickled boom", None, True),
}
KINDS = sorted(EXPECTED)
TERMINAL_KINDS = sorted(kind for kind, expected in EXPECTED.items() if expected[3])
PROGRESS_META = {"step": 2, "of": 5}


class CeleryRun:
    """Ids and Celery's view of the records one run left in Redis."""

    def __init__(self, redis_server, client, app):
        self.redis_url = redis_server.url  # db 0: where sheppy:// stores records
        self.client = client
        self.app = app
        self.celery_ids = {}
        self.sheppy_ids = {}
        self.celery_meta = {}
        self.started_at = datetime.now(timezone.utc)
        self.ended_at = None

    def record(self, kind):
        return json.loads(self.client.get(keys.task_record(QUEUE, self.sheppy_ids[kind])))

    def wait_for_status(self, kind, status, timeout=20):
        deadline = time.monotonic() + timeout
        key = keys.task_record(QUEUE, self.sheppy_ids[kind])
        while True:
            raw = self.client.get(key)
            if raw is not None and json.loads(raw)["status"] == status:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{kind}: record never became {status!r}: {raw!r}")
            time.sleep(0.05)


def send(app, run, kind, name, args=(), **options):
    result = app.send_task(TASKS + name, args, **options)
    run.celery_ids[kind] = result.id
    run.sheppy_ids[kind] = records.sheppy_id(result.id)
    return result


def remember(run, kind, result):
    run.celery_meta[kind] = {"state": result.state, "info": result.info,
                             "date_done": result.date_done}


def client_app(broker, backend, result_serializer):
    """A client app for one worker: Celery decodes stored results (and the chord's group
    record) with the reader's own result_serializer, as it does with redis://."""
    app = Celery("sheppy-tools-client", broker=broker, backend=backend)
    app.conf.update(result_extended=True, result_serializer=result_serializer,
                    result_accept_content=["json", result_serializer])
    return app


@pytest.fixture(scope="module")
def celery_run(redis_server):
    """Runs every kind of Celery task once, and keeps both workers up for the module.

    One run serves every test here (the tests only read), so the workers are started
    here, not with the ``workers`` fixture (which is per test).
    """
    client = redis_server.client()
    client.flushall()
    broker = f"redis://127.0.0.1:{redis_server.port}/1"
    backend = redis_server.sheppy_url()
    app = client_app(broker, backend, "json")
    pickle_app = client_app(broker, backend, "pickle")
    workers = []
    try:
        workers.append(start_worker(broker, backend=backend, queues=QUEUE))
        workers.append(start_worker(broker, PICKLE_CONF, backend=backend, queues=PICKLE_QUEUE))
        run = CeleryRun(redis_server, client, app)

        # Given one task of each kind, and a chord
        completed = send(app, run, "completed", "add", (2, 3))
        failed = send(app, run, "failed", "fail", ("boom",))
        send(app, run, "retrying", "retry_later", ("not yet",))
        send(app, run, "retrying_without_cause", "retry_forever")
        # Revoked before it is sent: the worker finds its id revoked when the message comes
        # and stores REVOKED then (Celery before 5.7 stores nothing for the revoke of a task
        # a worker holds until its ETA comes; 5.7 stores it at once)
        revoked_id = str(uuid.uuid4())
        assert app.control.revoke(revoked_id, reply=True, limit=1, timeout=10), "no reply"
        revoked = send(app, run, "revoked", "add", (1, 2), countdown=3600, task_id=revoked_id)
        send(app, run, "started", "leave_state")
        send(app, run, "custom_state", "leave_state", ("PROGRESS", PROGRESS_META))
        non_uuid = send(app, run, "non_uuid_id", "add", (1, 1), task_id=NON_UUID_ID)
        upper = send(app, run, "upper_case_uuid_id", "add", (3, 4),
                     task_id=str(uuid.uuid4()).upper())
        pickled = send(pickle_app, run, "pickled", "as_set", (1, 2), queue=PICKLE_QUEUE)
        pickled_failure = send(pickle_app, run, "pickled_failure", "fail", ("pickled boom",),
                               queue=PICKLE_QUEUE)
        header = [app.signature(TASKS + "add", (i, i)) for i in range(3)]
        chord_result = chord(header, app=app)(app.signature(TASKS + "tsum"))

        # When each has run as far as it goes
        for kind, result in (("completed", completed), ("non_uuid_id", non_uuid),
                             ("upper_case_uuid_id", upper), ("pickled", pickled)):
            result.get(timeout=20)
            remember(run, kind, result)
        for kind, result in (("failed", failed), ("pickled_failure", pickled_failure)):
            result.get(timeout=20, propagate=False)
            remember(run, kind, result)
        assert chord_result.get(timeout=20) == 6
        run.wait_for_status("revoked", "cancelled")
        remember(run, "revoked", revoked)
        for kind, status in (("retrying", "retrying"), ("retrying_without_cause", "retrying"),
                             ("started", "processing"), ("custom_state", "processing")):
            run.wait_for_status(kind, status)
            remember(run, kind, app.AsyncResult(run.celery_ids[kind]))
        run.ended_at = datetime.now(timezone.utc)
        yield run
    finally:
        for worker in workers:
            worker.process.terminate()  # both shut down at the same time
        for worker in workers:
            try:
                worker.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
            worker.stop()
        app.close()
        pickle_app.close()
        client.flushall()  # the retried and the revoked message wait in the broker db
        client.close()


@pytest.fixture(scope="module")
def sheppy_cli(tmp_path_factory, celery_run):
    """Runs ``sheppy`` in a subprocess, from an empty directory, pointed at the run's Redis."""
    cwd = tmp_path_factory.mktemp("sheppy-cli")
    # Nothing of this project on sys.path: sheppy must import spec.func from the installed package.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SHEPPY_") and k != "PYTHONPATH"}
    env.update(COLUMNS="400", NO_COLOR="1", PYTHONIOENCODING="utf-8")

    def run(*args, check=True):
        cmd = [sys.executable, "-m", "sheppy.cli", *args]
        if args[:2] != ("queue", "list"):
            cmd += ["--queue", QUEUE]
        cmd += ["--backend-url", celery_run.redis_url]
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, encoding="utf-8",
                              timeout=60)
        if check:
            assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done

    return run


def read_with_sheppy(url, coroutine_function):
    """Runs ``coroutine_function(queue)`` on a sheppy Queue of our queue, then disconnects."""
    async def main():
        backend = RedisBackend(url)
        try:
            return await coroutine_function(Queue(backend, QUEUE))
        finally:
            await backend.disconnect()

    return asyncio.run(main())


def cli_label(status, error):
    """The status word sheppy's CLI prints: anything with an error but not completed is 'failed'."""
    if status == "completed":
        return "completed"
    return "failed" if error else status


def parse_time(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- sheppy's Python API ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sheppy_get_task_shows_status_error_result_and_finish_of_celery_task(celery_run, kind):
    status, error, result, terminal = EXPECTED[kind]
    sid = celery_run.sheppy_ids[kind]

    task = read_with_sheppy(celery_run.redis_url, lambda q: q.get_task(sid))

    assert task is not None
    assert str(task.id) == sid
    assert (task.status, task.error, task.result) == (status, error, result)
    assert task.spec.func == records.SPEC_FUNC
    if terminal:
        assert celery_run.started_at <= task.finished_at <= celery_run.ended_at
        assert task.finished_at == celery_run.celery_meta[kind]["date_done"]
    else:
        assert task.finished_at is None


def test_sheppy_get_all_tasks_reads_every_celery_record_of_the_queue(celery_run):
    stored = celery_run.client.keys(keys.task_record(QUEUE, "*"))

    tasks = read_with_sheppy(celery_run.redis_url, lambda q: q.get_all_tasks())

    assert len(tasks) == len(stored) > len(KINDS)  # the chord's records are there too
    assert set(celery_run.sheppy_ids.values()) <= {str(task.id) for task in tasks}


def test_sheppy_wait_for_returns_finished_celery_tasks(celery_run):
    sids = [celery_run.sheppy_ids[kind] for kind in TERMINAL_KINDS]

    tasks = read_with_sheppy(celery_run.redis_url, lambda q: q.wait_for(sids, timeout=5))

    assert sorted(str(task_id) for task_id in tasks) == sorted(sids)


def test_sheppy_wait_for_wakes_up_when_a_celery_task_finishes(celery_run):
    # Given a Celery task that is still running when sheppy starts to wait
    result = celery_run.app.send_task(TASKS + "sleep", (0.5,))
    sid = records.sheppy_id(result.id)

    # When sheppy waits on its id
    task = read_with_sheppy(celery_run.redis_url, lambda q: q.wait_for(sid, timeout=15))

    # Then the finished-stream entry wakes it with the final record
    assert (task.status, task.result) == ("completed", 0.5)
    assert task.finished_at is not None


def test_non_uuid_celery_id_is_found_by_sheppy_under_its_uuid5_only(celery_run):
    sid = celery_run.sheppy_ids["non_uuid_id"]
    assert sid == str(uuid.uuid5(records.CELERY_ID_NAMESPACE, NON_UUID_ID))

    by_celery_id, by_sheppy_id = read_with_sheppy(
        celery_run.redis_url,
        lambda q: asyncio.gather(q.get_task(NON_UUID_ID), q.get_task(sid)))

    assert by_celery_id is None
    assert by_sheppy_id.result == 2
    assert celery_run.record("non_uuid_id")["celery"]["task_id"] == NON_UUID_ID
    assert celery_run.celery_meta["non_uuid_id"]["state"] == "SUCCESS"


def test_upper_case_uuid_celery_id_gets_a_uuid5_too(celery_run):
    celery_id = celery_run.celery_ids["upper_case_uuid_id"]

    assert celery_run.sheppy_ids["upper_case_uuid_id"] != celery_id.lower()
    assert celery_run.record("upper_case_uuid_id")["celery"]["task_id"] == celery_id


def test_custom_state_is_processing_for_sheppy_and_keeps_its_meta_for_celery(celery_run):
    record = celery_run.record("custom_state")

    assert record["status"] == "processing"
    assert record["celery"]["status"] == "PROGRESS"
    assert record["celery"]["result"] == PROGRESS_META
    assert celery_run.celery_meta["custom_state"] == {
        "state": "PROGRESS", "info": PROGRESS_META, "date_done": None}


def test_started_celery_task_is_processing_for_sheppy(celery_run):
    assert celery_run.record("started")["status"] == "processing"
    assert celery_run.celery_meta["started"]["state"] == "STARTED"


def test_pickled_result_is_null_for_sheppy_and_kept_for_celery(celery_run):
    record = celery_run.record("pickled")

    assert record.get("result") is None
    assert "payload" in record["celery"]
    assert celery_run.celery_meta["pickled"]["info"] == {1, 2}
    assert celery_run.celery_meta["pickled_failure"]["state"] == "FAILURE"
    assert isinstance(celery_run.celery_meta["pickled_failure"]["info"], ValueError)


@pytest.mark.parametrize("kind", ["retrying", "retrying_without_cause"])
def test_retrying_celery_task_tells_sheppy_its_retry_count_and_when_it_runs_next(celery_run, kind):
    task = read_with_sheppy(celery_run.redis_url,
                            lambda q: q.get_task(celery_run.sheppy_ids[kind]))

    assert task.retry_count == 1
    assert celery_run.started_at <= task.last_retry_at <= celery_run.ended_at
    due_in = task.next_retry_at - task.last_retry_at  # the task retries with countdown=3600
    assert timedelta(seconds=3590) < due_in < timedelta(seconds=3610)


def test_sheppy_shows_celery_task_created_once_and_before_it_finished(celery_run):
    sid = celery_run.sheppy_ids["completed"]

    first, again = read_with_sheppy(
        celery_run.redis_url, lambda q: asyncio.gather(q.get_task(sid), q.get_task(sid)))

    assert first.created_at == again.created_at
    assert celery_run.started_at <= first.created_at <= first.finished_at


# -- sheppy's CLI ---------------------------------------------------------------------------------


def test_sheppy_cli_queue_list_shows_the_celery_queue_with_nothing_pending(sheppy_cli):
    out = sheppy_cli("queue", "list").stdout

    assert re.search(rf"^\W*{QUEUE}\W+0\W*$", out, re.M), out


def test_sheppy_cli_task_list_shows_every_celery_task_of_the_queue(sheppy_cli, celery_run):
    out = sheppy_cli("task", "list").stdout

    # rows: task id | function | status | created | finished | scheduled
    rows = {cells[0]: cells for cells in
            ([cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines())
            if cells and re.fullmatch(r"[0-9a-f-]{36}", cells[0])}
    stored = celery_run.client.keys(keys.task_record(QUEUE, "*"))
    assert len(rows) == len(stored)
    for kind in KINDS:
        status, error, _, terminal = EXPECTED[kind]
        _, func, label, _, finished, _ = rows[celery_run.sheppy_ids[kind]]
        assert (func, label) == (records.SPEC_FUNC, cli_label(status, error)), kind
        assert (finished != "N/A") == terminal, kind


def test_sheppy_cli_task_list_json_shows_status_error_result_and_finish(sheppy_cli, celery_run):
    listing = json.loads(sheppy_cli("task", "list", "--format", "json").stdout)

    tasks = {task["id"]: task for task in listing["tasks"]}
    assert listing["queue"] == QUEUE
    for kind in KINDS:
        status, error, result, terminal = EXPECTED[kind]
        task = tasks[celery_run.sheppy_ids[kind]]
        assert (task["status"], task["error"], task["result"]) == (status, error, result), kind
        assert (task["finished_at"] is not None) == terminal, kind
        if terminal:
            assert parse_time(task["finished_at"]) == celery_run.celery_meta[kind]["date_done"]


@pytest.mark.parametrize("kind", KINDS)
def test_sheppy_cli_task_info_shows_celery_task(sheppy_cli, celery_run, kind):
    status, error, result, terminal = EXPECTED[kind]

    out = sheppy_cli("task", "info", celery_run.sheppy_ids[kind]).stdout

    assert f"ID: {celery_run.sheppy_ids[kind]}" in out
    assert f"Function: {records.SPEC_FUNC}" in out
    assert f"Status: {cli_label(status, error)}\n" in out
    assert ("Finished: " in out) == terminal
    if result is not None:
        assert f"Result:\n  {result}\n" in out
    else:
        assert "Result:" not in out
    if error is not None:
        assert f"Error:\n  {error}\n" in out
    else:
        assert "Error:" not in out


def test_sheppy_cli_task_info_shows_arguments_of_json_results(sheppy_cli, celery_run):
    out = sheppy_cli("task", "info", celery_run.sheppy_ids["completed"]).stdout

    assert "Arguments:\n  - 2\n  - 3\n" in out


def test_sheppy_cli_task_info_refuses_a_non_uuid_celery_id(sheppy_cli):
    done = sheppy_cli("task", "info", NON_UUID_ID, check=False)

    assert done.returncode == 1
    assert "Task ID must be UUID format" in done.stdout


# -- sheppy's model --------------------------------------------------------------------------------


def test_every_record_of_a_celery_run_is_a_valid_sheppy_task(celery_run):
    stored = celery_run.client.keys(keys.task_record(QUEUE, "*"))
    assert len(stored) > len(KINDS)

    for key in stored:
        raw = json.loads(celery_run.client.get(key))
        task = Task.model_validate(raw)
        assert key.decode().rsplit(":", 1)[1] == raw["id"] == str(task.id)
        assert task.status in {"pending", "processing", "retrying", "completed", "failed",
                               "cancelled"}
        assert (task.finished_at is not None) == (task.status in {"completed", "failed",
                                                                  "cancelled"})


# -- sheppy's tools writing to a Celery queue (docs/sheppy-tools.md: don't): no harm done --


def run_sheppy(server, *args, timeout=60):
    """``sheppy …`` in a subprocess, from an empty directory, on ``server``'s db 0."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SHEPPY_") and k != "PYTHONPATH"}
    env.update(COLUMNS="400", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    cwd = tempfile.mkdtemp(prefix="celery-sheppy-cli-")
    return subprocess.run([sys.executable, "-m", "sheppy.cli", *args, "--queue", QUEUE,
                           "--backend-url", server.url], cwd=cwd, env=env,
                          capture_output=True, encoding="utf-8", timeout=timeout)


def test_a_sheppy_worker_on_a_celery_queue_stops_at_once_and_celery_runs_its_tasks(
        make_redis_server, workers):
    # Given Celery tasks waiting in a sheppy:// queue, no Celery worker
    server = make_redis_server()
    url = server.sheppy_url()
    app = client_app(url, url, "json")
    try:
        results = [app.send_task(TASKS + "add", (i, 2)) for i in range(3)]

        # When a sheppy worker is started on that queue
        worker = run_sheppy(server, "work", timeout=120)

        # Then it stops at once, saying why, and stores nothing for the Celery tasks
        assert worker.returncode != 0
        assert "belongs to a Celery task" in worker.stdout + worker.stderr
        client = server.client()
        assert not any(client.exists(keys.task_record(QUEUE, r.id)) for r in results)
        # And a Celery worker takes the entries over after their lease and runs each
        workers.start(url, {"broker_transport_options": {"visibility_timeout": 4}},
                      pool="threads")
        assert [r.get(timeout=60) for r in results] == [2, 3, 4]
        assert client.xlen(keys.pending_stream(QUEUE)) == 0
    finally:
        app.close()


def test_sheppy_task_retry_of_a_celery_record_is_dead_lettered_and_the_record_expires(
        make_redis_server, workers):
    # Given a Celery task that failed, on a sheppy:// broker and result backend
    server = make_redis_server()
    url = server.sheppy_url()
    worker = workers.start(url, pool="threads")
    app = client_app(url, url, "json")
    client = server.client()
    try:
        failed = app.send_task(TASKS + "fail", ("boom",))
        with pytest.raises(ValueError):
            failed.get(timeout=30)
        record = keys.task_record(QUEUE, failed.id)
        assert client.ttl(record) > 0

        # When sheppy is told to retry it (it rewrites the record without a TTL and queues
        # a plain sheppy task where the Celery worker reads)
        retried = run_sheppy(server, "task", "retry", failed.id)
        assert retried.returncode == 0, retried.stdout + retried.stderr

        # Then the Celery worker dead-letters that entry, saying what it is, and the record
        # expires again; the worker goes on
        dead = keys.dead_letter_stream(QUEUE)
        deadline = time.monotonic() + 30
        while not client.xlen(dead):
            assert time.monotonic() < deadline, "no dead letter"
            time.sleep(0.1)
        (_, fields), = client.xrange(dead)
        assert b"sheppy queued again (sheppy task retry)" in fields[b"reason"]
        assert 0 < client.ttl(record) <= records.SHEPPY_RECORD_TTL
        assert app.send_task(TASKS + "add", (1, 1)).get(timeout=30) == 2
        assert worker.process.poll() is None
    finally:
        app.close()

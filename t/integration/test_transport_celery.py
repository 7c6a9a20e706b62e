"""Real Celery workers (prefork and threads) on the sheppy:// broker and result backend."""

import inspect
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from celery import VERSION as CELERY_VERSION, chord, group
from celery.concurrency.thread import TaskPool as ThreadsPool
from kombu import Producer

from celery_sheppy import keys, records
from celery_sheppy.patches import group_publish
from t.helpers import ROOT, TASKS, celery_cli, celery_command, client_app, sig, start_worker, task_env

DB = 5  # this module's database; the module-scoped workers outlive single tests

#: Celery 5.7's threads pool cancels the tasks it holds at a warm shutdown (their
#: messages go back); older ones run them first.
THREADS_POOL_CANCELS_ON_SHUTDOWN = "cancel_futures" in inspect.getsource(ThreadsPool.on_stop)

#: Groups are published in batches only where kombu has Producer.batch() (5.7+): with older
#: kombu, Celery's own path, one round trip per task (patches/group_publish.py).
needs_producer_batch = pytest.mark.skipif(not hasattr(Producer, "batch"),
                                          reason="Producer.batch() needs kombu 5.7+")


@pytest.fixture(scope="module")
def url(redis_server):
    return redis_server.sheppy_url(DB)


@pytest.fixture(scope="module")
def db(redis_server):
    client = redis_server.client(db=DB)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module", params=["prefork", "threads"])
def worker(request, url, db):
    worker = start_worker(url, pool=request.param, concurrency=2, args=("-E",))
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def app(url):
    app = client_app(url, url)
    yield app
    app.close()


# -- tasks ------------------------------------------------------------------------------


def test_task_runs_and_returns_its_result(worker, app):
    assert sig(app, "add", 2, 2).delay().get(timeout=20) == 4


def test_countdown_and_eta_tasks_run_after_their_delay(worker, app):
    start = time.monotonic()
    counted = sig(app, "add", 1, 2).apply_async(countdown=1)
    eta = sig(app, "add", 3, 4).apply_async(eta=datetime.now(timezone.utc) + timedelta(seconds=1))
    assert counted.get(timeout=20) == 3 and eta.get(timeout=20) == 7
    assert time.monotonic() - start >= 0.9


def test_retrying_task_succeeds_on_a_later_run(worker, app):
    assert sig(app, "retry_once", "done").delay().get(timeout=20) == "done"


def test_acks_late_task_is_acked_after_it_ran(worker, app, db):
    assert sig(app, "add_acks_late", 5, 5).delay().get(timeout=20) == 10
    stream = keys.pending_stream("celery")
    deadline = time.monotonic() + 5
    while db.xpending(stream, keys.CONSUMER_GROUP)["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert db.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0


def test_group_returns_every_result(worker, app):
    result = group(sig(app, "add", n, n) for n in range(50)).delay()
    assert result.get(timeout=30) == [2 * n for n in range(50)]


@needs_producer_batch
def test_group_published_in_one_producer_batch_returns_every_result(worker, app):
    with app.producer_or_acquire() as producer:
        with producer.batch():
            result = group(sig(app, "add", n, 2) for n in range(100)).apply_async(
                producer=producer)
    assert result.get(timeout=30) == [n + 2 for n in range(100)]


def commands_during(db, action):
    """``action()``'s result and how many times each Redis command ran meanwhile."""
    def calls():
        return {name.removeprefix("cmdstat_"): stats["calls"]
                for name, stats in db.info("commandstats").items()}

    before = calls()
    result = action()
    after = calls()
    return result, {name: count - before.get(name, 0) for name, count in after.items()}


@needs_producer_batch
def test_group_tasks_reach_redis_in_few_transactions_before_apply_async_returns(worker, app, db):
    assert sig(app, "add", 0, 0).delay().get(timeout=20) == 0  # connections open
    tasks = group([sig(app, "add", n, n) for n in range(200)])  # a generator: task by task
    result, ran = commands_during(db, tasks.apply_async)
    # One MULTI/EXEC per FLUSH_EVERY XADDs (Celery's own path: one round trip per task).
    # More XADDs may count: the worker's finished notices, for tasks done meanwhile.
    flushes = -(-200 // group_publish.FLUSH_EVERY)
    assert (ran.get("multi"), ran.get("exec")) == (flushes, flushes) and ran["xadd"] >= 200
    assert result.get(timeout=30) == [2 * n for n in range(200)]


def test_a_fresh_process_gets_every_result_of_its_first_group(worker, url):
    # Given a new client process (its garbage collector runs while it sends the group)
    code = f"""
from celery import Celery, group
app = Celery(broker={url!r}, backend={url!r})
result = group([app.signature("{TASKS}.add", (n, n)) for n in range(30)]).delay()
print(result.get(timeout=20))
"""
    # When it sends a group of 30 and waits: before Celery 5.7 a spare AsyncResult of a
    # member, collected meanwhile, ended the wait on that member (celery#4925)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT))
    # Then every result comes back
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str([2 * n for n in range(30)])


def test_slow_generator_group_sends_its_tasks_as_they_are_yielded(worker, app, db):
    ids = [str(uuid.uuid4()) for _ in range(3)]
    first_ran_early = []

    def first_done():
        # Its record, not app.AsyncResult: before 5.7, Celery never returns a result that
        # the process read while the result's group was being sent (so with redis:// too).
        record = db.get(keys.task_record("celery", ids[0]))
        return record is not None and records.loads(record)["status"] == "completed"

    def slowly():
        for n, task_id in enumerate(ids):
            time.sleep(0.5)  # a generator doing work per task (celery#3021)
            if n == len(ids) - 1:
                deadline = time.monotonic() + 5
                while not first_done() and time.monotonic() < deadline:
                    time.sleep(0.05)
                first_ran_early.append(first_done())
            yield sig(app, "add", n, n).set(task_id=task_id)

    result = group(slowly()).apply_async()
    assert result.get(timeout=30) == [0, 2, 4]
    assert first_ran_early == [True]  # sent before the generator was done


@needs_producer_batch
def test_chord_header_is_published_in_few_transactions(worker, app, db):
    assert sig(app, "add", 0, 0).delay().get(timeout=20) == 0
    header = [sig(app, "add", n, 1) for n in range(100)]
    result, ran = commands_during(db, lambda: chord(header)(sig(app, "tsum")))
    # apply_chord records the chord in one MULTI, the header's 100 tasks go in another.
    assert ran.get("multi") == 1 + -(-100 // group_publish.FLUSH_EVERY) and ran["xadd"] >= 100
    assert result.get(timeout=30) == sum(n + 1 for n in range(100))


def test_chord_body_receives_every_header_result(worker, app):
    result = chord(sig(app, "add", n, 1) for n in range(20))(sig(app, "tsum"))
    assert result.get(timeout=30) == sum(n + 1 for n in range(20))


# -- remote control and events --------------------------------------------------------------


def test_inspect_ping_active_stats_and_active_queues_answer_and_leave_no_reply_behind(
        worker, app, db):
    running = sig(app, "sleep", 4).delay()
    time.sleep(0.5)
    inspect = app.control.inspect(timeout=0.5)
    (name, pong), = inspect.ping().items()
    assert pong == {"ok": "pong"}
    active = inspect.active()[name]
    assert [task["id"] for task in active] == [running.id]
    assert "total" in inspect.stats()[name]
    assert [queue["name"] for queue in inspect.active_queues()[name]] == ["celery"]
    running.get(timeout=10)

    assert not [key for key in db.keys("*") if b"reply" in key]


def test_celery_inspect_command_line_pings_the_worker(worker, url):
    done = celery_cli(url, "inspect", "ping", "--timeout", "2")
    assert "pong" in done.stdout, done.stdout + done.stderr


def test_control_add_consumer_and_cancel_consumer_change_what_a_running_worker_reads(
        worker, app, db, url):
    # Given a running worker that consumes "celery" only, and a task waiting in another queue
    queue = f"added-{uuid.uuid4().hex[:8]}"
    waiting = sig(app, "add", 20, 22).apply_async(queue=queue)
    time.sleep(1.0)
    assert waiting.state == "PENDING" and db.xlen(keys.pending_stream(queue)) == 1
    # When `celery control add_consumer` names that queue
    done = celery_cli(url, "control", "add_consumer", queue, "--timeout", "2")
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    # Then the worker runs the waiting task, and reports the queue among its active ones
    assert waiting.get(timeout=20) == 42
    (name, active), = app.control.inspect(timeout=1).active_queues().items()
    assert {q["name"] for q in active} == {"celery", queue}
    # When `celery control cancel_consumer` names it again
    done = celery_cli(url, "control", "cancel_consumer", queue, "--timeout", "2")
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    # Then a task sent there afterwards waits in its stream, and "celery" is still served
    later = sig(app, "add", 1, 1).apply_async(queue=queue)
    assert sig(app, "add", 2, 2).delay().get(timeout=20) == 4
    time.sleep(2.0)
    assert later.state == "PENDING" and db.xlen(keys.pending_stream(queue)) == 1
    (name, active), = app.control.inspect(timeout=1).active_queues().items()
    assert {q["name"] for q in active} == {"celery"}


def test_revoked_task_never_runs_and_rate_limit_is_applied(worker, app):
    waiting = sig(app, "add", 1, 1).apply_async(countdown=2)
    app.control.revoke(waiting.id)
    with pytest.raises(Exception):
        waiting.get(timeout=10)
    assert waiting.state == "REVOKED"

    replies = app.control.rate_limit(f"{TASKS}.add", "1000/m", reply=True, timeout=2)
    assert replies and all("ok" in reply for answer in replies for reply in answer.values())
    assert sig(app, "add", 1, 2).delay().get(timeout=20) == 3


def test_task_events_reach_an_event_receiver(worker, app):
    expected = {"task-received", "task-started", "task-succeeded"}
    if worker.pool == "threads" and CELERY_VERSION < (5, 7):
        # Before 5.7 a threads pool sends task-started for its first task only (with
        # redis:// too: checked on 5.3-5.6)
        expected.remove("task-started")
    seen = []
    ready = threading.Event()

    def on_event(event):
        seen.append(event)

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})

        def capture():
            ready.set()
            receiver.capture(limit=None, timeout=15)

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        ready.wait()
        time.sleep(0.5)  # the receiver's queue is bound
        result = sig(app, "add", 4, 4).delay()
        result.get(timeout=20)

        def types():
            return {event["type"] for event in seen if event.get("uuid") == result.id}

        # All three, in any order: a threads pool sends task-started from the task's thread.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not expected <= types():
            time.sleep(0.05)
        receiver.should_stop = True
        thread.join(5)
    assert expected <= types()


# -- command line, beat, fresh processes ----------------------------------------------------


def test_celery_call_and_result_commands_send_a_task_and_print_its_result(worker, url):
    done = celery_cli(url, "call", f"{TASKS}.add", "--args", "[3, 4]")
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = done.stdout.strip()
    uuid.UUID(task_id)  # `celery call` prints the task's id, nothing else
    done = celery_cli(url, "result", task_id)
    assert (done.returncode, done.stdout.strip()) == (0, "7"), done.stdout + done.stderr


def test_celery_purge_command_empties_a_queue(url, db):
    app = client_app(url, url)
    try:
        for n in range(5):
            app.send_task(f"{TASKS}.add", args=(n, n), queue="purgeme")
    finally:
        app.close()
    assert db.xlen(keys.pending_stream("purgeme")) == 5
    done = celery_cli(url, "purge", "-f", "-Q", "purgeme")
    assert done.returncode == 0, done.stderr
    assert "5 messages" in done.stdout
    assert db.xlen(keys.pending_stream("purgeme")) == 0


def test_beat_publishes_due_tasks_through_sheppy(url, db, tmp_path):
    conf = {"beat_schedule": {"tick": {"task": f"{TASKS}.add", "schedule": 0.5, "args": [1, 2],
                                       "options": {"queue": "beatq"}}}}
    beat = subprocess.Popen(
        celery_command("beat", "-s", str(tmp_path / "schedule"), "--max-interval", "1"),
        cwd=str(ROOT), env=task_env(url, conf), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while db.xlen(keys.pending_stream("beatq")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        beat.terminate()
        beat.wait(10)
    assert db.xlen(keys.pending_stream("beatq")) >= 2


def test_plain_producer_process_publishes_without_importing_celery_sheppy(url, db):
    code = (
        f"from celery import Celery\n"
        f"app = Celery(broker={url!r})\n"
        f"app.send_task('{TASKS}.add', args=(1, 1), queue='producerq')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd="/")
    assert db.xlen(keys.pending_stream("producerq")) == 1


# -- shutdown ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_warm_shutdown_returns_reserved_messages_to_their_stream(pool, url, db):
    queue = f"shutdown-{pool}"
    first = start_worker(url, {"worker_prefetch_multiplier": 5}, pool=pool, concurrency=1,
                         queues=queue)
    app = client_app(url, url)
    try:
        running = sig(app, "sleep", 2).apply_async(queue=queue)
        waiting = [sig(app, "delivery").apply_async(queue=queue) for _ in range(4)]
        stream = keys.pending_stream(queue)
        deadline = time.monotonic() + 10
        # every waiting message handed to Celery (logged as received), not merely read:
        # one still in the transport's read-ahead may legitimately come back unflagged
        while (db.xpending(stream, keys.CONSUMER_GROUP)["pending"] < 4
               or not all(f"delivery[{r.id}] received" in first.output() for r in waiting)):
            assert time.monotonic() < deadline, "worker did not reserve the messages"
            time.sleep(0.05)
        first.stop()  # SIGTERM: warm shutdown
        assert running.get(timeout=10) == 2
        assert db.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0
        if pool == "threads" and not THREADS_POOL_CANCELS_ON_SHUTDOWN:
            # Before Celery 5.7 a threads pool runs every task it holds before it stops
            # (ThreadPoolExecutor.shutdown without cancel_futures): each ran there, once.
            assert [result.get(timeout=10) for result in waiting] == [False] * 4
            assert db.xlen(stream) == 0
            return
        assert db.xlen(stream) == 4

        second = start_worker(url, pool=pool, concurrency=1, queues=queue)
        try:
            assert [result.get(timeout=20) for result in waiting] == [True] * 4
        finally:
            second.stop()
        assert db.xlen(stream) == 0
    finally:
        first.stop()
        app.close()


def test_worker_banner_and_log_mask_the_broker_password(redis_server):
    worker_url = f"sheppy://:{uuid.uuid4().hex}@127.0.0.1:{redis_server.port}/{DB}"
    done = celery_cli(worker_url, "report")
    assert worker_url.split(":")[2].split("@")[0] not in done.stdout + done.stderr

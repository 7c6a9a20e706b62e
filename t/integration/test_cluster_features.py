"""celery-sheppy's features on a Redis Cluster (``sheppy+cluster://``): a global rate
limit, unique tasks, the leaderless beat and the operator's commands.

The local 3-master + 3-replica cluster (``redis_cluster``) is started once; every test
empties it before and after, and starts its own real ``celery worker`` / ``celery beat``
processes with Celery's defaults (mingle, gossip, heartbeat on). The rate limit, beat and
stuck tests are marked slow (about 60 s together). On a cluster the Celery queue
``celery`` is the sheppy queue ``{celery}`` (``keys.broker_queue``): every key checked
here is built for that name. Task runs are counted in a side Redis (``counter``).
"""

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from celery_sheppy import keys, unique
from conftest import ROOT, Worker, client_app
from t.integration.test_features import (Beat, beat_conf, max_in_window, starts,
                                         tick_occurrences, wait_until)

TASKS = "t.integration.tasks"
QUEUE = keys.broker_queue("celery", cluster=True)  # "{celery}"
LEASE = 4  # seconds: visibility_timeout of the unique and stuck tests


def sig(app, name, *args, **options):
    return app.signature(f"{TASKS}.{name}", args=args, **options)


@pytest.fixture(scope="module")
def cluster_url(redis_cluster):
    return redis_cluster.sheppy_url()


@pytest.fixture
def cluster(redis_cluster, counter):
    """A client of the emptied cluster (no worker of another test is running)."""
    def flush():
        for node in redis_cluster.masters():
            node.client().flushall()

    flush()
    client = redis_cluster.client()
    yield client
    client.close()
    flush()  # nothing left for a later module's workers (countdown tasks, dead letters)


def start_worker(url, conf=None, concurrency=4, pool="threads"):
    return Worker(url, url, pool=pool, concurrency=concurrency,
                  extra_env={"CELERY_SHEPPY_CONF": json.dumps(conf or {})})


def clean_log(worker):
    log = worker.output()
    assert "CROSSSLOT" not in log and "MOVED" not in log, log[-4000:]
    assert "Connection to broker lost" not in log, log[-4000:]


# -- a global rate limit --------------------------------------------------------------------

RATE = 20  # per second: t.integration.tasks.limited
RATE_SECONDS = 10


@pytest.mark.slow  # 15 s
def test_global_rate_limit_holds_across_two_workers_on_a_cluster(
        cluster_url, cluster, workers, counter):
    # Given a task limited to 20/s globally, more of it waiting than the limit allows in
    # RATE_SECONDS, and 2 workers x 4 threads on the cluster
    app = client_app(cluster_url, cluster_url)
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(RATE * RATE_SECONDS + 200):
                sig(app, "limited", "runs").apply_async(producer=producer)
        # When the workers run it (measured once both are up)
        workers.extend(start_worker(cluster_url) for _ in range(2))
        steady = time.time() + 1.0
        time.sleep(RATE_SECONDS + 2)

        # Then no 1 s window holds more than 20 starts, and most allowed starts happened
        times = [at for at in starts(counter, "runs") if steady <= at < steady + RATE_SECONDS]
        rate = len(times) / RATE_SECONDS
        print(f"cluster rate limit 20/s over {RATE_SECONDS} s: {rate:.2f}/s, "
              f"max {max_in_window(times)} in a 1 s window")
        assert max_in_window(times) <= RATE
        assert rate >= 0.85 * RATE
        # and both workers ran some (the limit is global, not per worker)
        hosts = Counter(json.loads(item)[1] for item in counter.lrange("runs", 0, -1))
        assert len(hosts) == 2, hosts
        # and the limit's state and the messages over it are in the queue's slot
        assert cluster.exists(keys.rate_limit(QUEUE, f"{TASKS}.limited"))
        assert cluster.zcard(keys.scheduled_set(QUEUE)) > 50
        assert not cluster.exists(keys.scheduled_set("celery"))
        assert not cluster.exists(keys.dead_letter_stream(QUEUE))
        for worker in workers:
            clean_log(worker)
    finally:
        app.close()


# -- unique tasks ---------------------------------------------------------------------------


def unique_app(url):
    """A client app that knows t.integration.tasks.unique_sleep by name."""
    from celery_sheppy.unique import UniqueTask

    app = client_app(url, url, broker_transport_options={"visibility_timeout": LEASE})

    def body(*args):
        """Runs in the workers (t.integration.tasks)."""

    for name in ("unique_sleep", "unique_reject"):
        app.task(name=f"{TASKS}.{name}", base=UniqueTask, sheppy_unique=True,
                 typing=False, shared=False)(body)
    return app


def test_a_unique_task_sent_again_while_pending_or_running_returns_the_first_on_a_cluster(
        cluster_url, cluster, workers, counter):
    # Given a unique task that is pending, and one with other arguments
    app = unique_app(cluster_url)
    task = app.tasks[f"{TASKS}.unique_sleep"]
    lock = keys.unique_lock(QUEUE, unique.unique_key(task.name, ["u", 1.5], {}))
    try:
        first = task.delay("u", 1.5)
        other = task.delay("u", 0.5)
        # its key is held in the queue's slot, by the first task
        assert cluster.get(lock) == first.id.encode()
        # When it is sent again while pending, then while running
        again = task.delay("u", 1.5)
        worker = start_worker(cluster_url, {"broker_transport_options":
                                            {"visibility_timeout": LEASE}})
        workers.append(worker)
        wait_until(lambda: counter.llen("u") >= 1, 30, message="the first run")
        running = task.delay("u", 1.5)
        # Then the caller gets the first task, and it runs once
        assert again.id == running.id == first.id
        assert other.id != first.id
        assert first.get(timeout=30) == 1.5
        # and once it is done its key is free: the next one is a new task and runs
        wait_until(lambda: not cluster.exists(lock), 10, message="the release")
        after = task.delay("u", 1.5)
        assert after.id != first.id and after.get(timeout=30) == 1.5
        other.get(timeout=30)
        ids = [json.loads(item)[0] for item in counter.lrange("u", 0, -1)]
        assert Counter(ids)[first.id] == 1 and len(ids) == len(set(ids)) == 3
        assert not cluster.exists(keys.unique_lock("celery", unique.unique_key(
            task.name, ["u", 1.5], {})))
        # and one due later holds its key from the scheduled set (schedule.lua, one slot)
        due = task.apply_async(("s", 1), countdown=120)
        assert task.apply_async(("s", 1), countdown=120).id == due.id
        assert task.delay("s", 1).id == due.id
        assert cluster.zrange(keys.scheduled_set(QUEUE), 0, -1) == [due.id.encode()]
        # and one rejected to the dead letters frees its key (released with the letter)
        rejected = app.tasks[f"{TASKS}.unique_reject"]
        dead = rejected.delay("x")
        wait_until(lambda: cluster.xlen(keys.dead_letter_stream(QUEUE)) == 1, 30,
                   message="the dead letter")
        wait_until(lambda: not cluster.exists(keys.unique_lock(QUEUE, unique.unique_key(
            rejected.name, ["x"], {}))), 10, message="the key to be released")
        assert rejected.delay("x").id != dead.id
        clean_log(worker)
    finally:
        app.close()


# -- the leaderless beat --------------------------------------------------------------------

BEAT_SECONDS = 16


@pytest.mark.slow  # 23 s
def test_two_beats_send_every_occurrence_once_on_a_cluster_when_one_is_killed(
        redis_cluster, cluster, workers, beats, counter):

    # Given a worker and 2 beat processes sharing a 1 s entry, on the cluster
    worker = start_worker(redis_cluster.sheppy_url(), concurrency=2)
    workers.append(worker)
    conf = beat_conf(tick={"schedule": 1.0, "args": ["ticks"]})
    beats.extend(Beat(redis_cluster, conf) for _ in range(2))
    wait_until(lambda: counter.llen("ticks") >= 3, 60, message="the first occurrences")

    # When one of them is killed with SIGKILL half way through
    first = min(json.loads(item)[1] for item in counter.lrange("ticks", 0, -1))
    time.sleep(BEAT_SECONDS / 2)
    beats[0].kill()
    time.sleep(BEAT_SECONDS / 2)
    beats[1].stop()
    last = max(json.loads(item)[1] for item in counter.lrange("ticks", 0, -1)) - 2
    time.sleep(2)  # what was sent has run

    # Then every occurrence from the first to the last ran exactly once
    entry_id, expected, runs, missed = tick_occurrences(counter, first, last)
    print(f"cluster beat: {len(expected)} occurrences expected, {len(runs)} ran, "
          f"{sum(runs.values()) - len(runs)} twice, {len(missed)} missed")
    assert len(expected) >= BEAT_SECONDS - 3
    assert not missed
    assert set(runs.values()) == {1}
    # and the occurrences' claims are in the queue's slot
    assert cluster.exists(keys.beat_occurrence(QUEUE, expected[0]))
    # and the entry is a sheppy TaskCron record in the queue's cron table
    table = cluster.hgetall(keys.cron_table(QUEUE))
    assert list(table) == [entry_id.encode()]
    assert json.loads(table[entry_id.encode()])["expression"] == "* * * * * *"
    # and sheppy's registry lists the broker's queue only, not the Celery name
    registry = {name.decode() for name in cluster.hkeys(keys.queue_registry())}
    assert QUEUE in registry and "celery" not in registry, registry
    assert not cluster.exists(keys.cron_table("celery"))
    clean_log(worker)


@pytest.fixture
def beats():
    started = []
    yield started
    for process in started:
        process.stop()


# -- the operator's commands ----------------------------------------------------------------


class Ops:
    """``celery -A t.integration.tasks sheppy …`` on the cluster, as an operator runs it."""

    def __init__(self, url, side_url, conf=None):
        self.url, self.conf = url, dict({"worker_prefetch_multiplier": 1}, **(conf or {}))
        self.env = dict(os.environ, CELERY_SHEPPY_BROKER=url, CELERY_SHEPPY_BACKEND=url,
                        CELERY_SHEPPY_CONF=json.dumps(self.conf),
                        CELERY_SHEPPY_COUNTER_URL=side_url,
                        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.app = client_app(url, url, **(conf or {}))

    def worker(self, concurrency=2):
        return start_worker(self.url, self.conf, concurrency=concurrency)

    def cli(self, *args, input=None):
        return subprocess.run([sys.executable, "-m", "celery", "-A", TASKS, "sheppy", *args],
                              env=self.env, cwd=str(ROOT), input=input, capture_output=True,
                              text=True, timeout=120)

    def json(self, *args):
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def stats(self):
        return {q["queue"]: q for q in self.json("status")["queues"]}


@pytest.fixture
def ops(cluster_url, side_redis, cluster):
    made = []

    def make(**conf):
        made.append(Ops(cluster_url, side_redis.url, conf))
        return made[-1]

    yield make
    for setup in made:
        setup.app.close()


def test_dead_letters_are_listed_replayed_and_purged_on_a_cluster(ops, cluster, workers,
                                                                  counter):
    # Given two tasks rejected to the dead letters of the queue's slot
    setup = ops()
    worker = setup.worker()
    workers.append(worker)
    rejected = [setup.app.signature(f"{TASKS}.picky", args=("flag",)).delay()
                for _ in range(2)]
    dead = keys.dead_letter_stream(QUEUE)
    wait_until(lambda: cluster.xlen(dead) == 2, 30, message="two dead letters")

    # list: both, under the queue {celery}
    letters = setup.json("dead", "list")
    assert sorted(letter["task_id"] for letter in letters) == sorted(r.id for r in rejected)
    assert {(letter["queue"], letter["reason"], letter["task"]) for letter in letters} == {
        (QUEUE, "rejected", f"{TASKS}.picky")}
    assert len(setup.cli("dead", "list").stdout.splitlines()) == 3  # header + 2
    by_celery_name = setup.json("dead", "list", "-Q", "celery")  # the Celery queue's name
    assert sorted(letter["id"] for letter in by_celery_name) == sorted(
        letter["id"] for letter in letters)

    # show
    first = next(letter["id"] for letter in letters if letter["task_id"] == rejected[0].id)
    shown = setup.cli("dead", "show", first)
    assert shown.returncode == 0, shown.stderr
    assert rejected[0].id in shown.stdout

    # replay: back to its stream, and the worker runs it
    counter.set("flag", 1)
    replayed = setup.cli("dead", "replay", first, "--yes")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed 1 dead letter(s); {QUEUE}: 1" in replayed.stdout
    assert rejected[0].get(timeout=30) == "flag"
    assert cluster.xlen(dead) == 1
    assert setup.stats()[QUEUE]["dead_letters"] == 1

    # purge
    purged = setup.cli("dead", "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 dead letter(s)" in purged.stdout
    assert cluster.xlen(dead) == 0
    assert setup.cli("dead", "list").stdout == "no dead letters\n"
    clean_log(worker)


def test_scheduled_lists_a_countdown_task_on_a_cluster(ops, cluster, workers):
    # Given two countdown tasks waiting in the queue's scheduled set, one revoked
    setup = ops()
    worker = setup.worker()
    workers.append(worker)
    later = sig(setup.app, "add", 1, 1).apply_async(countdown=7200)
    sooner = sig(setup.app, "add", 2, 2).apply_async(countdown=3600)
    setup.app.control.revoke(later.id)
    wait_until(lambda: cluster.zscore(keys.revoked_set(), later.id) is not None, 30,
               message="the revoke to be kept")
    assert cluster.zcard(keys.scheduled_set(QUEUE)) == 2

    # When the operator lists them, Then they are shown soonest first
    items = setup.json("scheduled", "list")
    assert [i["task_id"] for i in items] == [sooner.id, later.id]
    assert [i["revoked"] for i in items] == [False, True]
    assert {(i["queue"], i["task"]) for i in items} == {(QUEUE, f"{TASKS}.add")}
    assert 3500 < items[0]["due_in"] <= 3600 and 7100 < items[1]["due_in"] <= 7200
    table = setup.cli("scheduled", "list")
    assert sooner.id in table.stdout and "(revoked)" in table.stdout
    assert setup.stats()[QUEUE]["scheduled"] == 2
    clean_log(worker)


@pytest.mark.slow  # 19 s: a lease, then a take-over
def test_stuck_lists_a_killed_workers_messages_on_a_cluster_until_taken_over(
        ops, cluster, workers):
    # Given a worker holding two acks_late tasks (its whole prefetch), short lease
    setup = ops(broker_transport_options={"visibility_timeout": LEASE})
    doomed = setup.worker()
    workers.append(doomed)
    held = [sig(setup.app, "hold", 8).delay() for _ in range(2)]
    wait_until(lambda: all(r.state == "STARTED" for r in held), 30,
               message="both tasks to start")
    result = setup.cli("stuck")
    assert (result.returncode, result.stdout) == (0, "nothing stuck\n"), result.stderr

    # When the worker is killed and a lease passes
    doomed.kill()
    time.sleep(LEASE + 1)

    # Then its two messages are stuck, its consumer dead
    result = setup.cli("stuck", "--json")
    assert result.returncode == 1, result.stderr
    items = json.loads(result.stdout)
    assert sorted(i["task_id"] for i in items) == sorted(r.id for r in held)
    assert {(i["queue"], i["consumer_state"], i["task"]) for i in items} == {
        (QUEUE, "dead", f"{TASKS}.hold")}
    assert all(i["idle"] >= LEASE for i in items)
    celery = setup.stats()[QUEUE]
    assert (celery["in_flight"], celery["stuck"], celery["consumers_dead"]) == (2, 2, 1)

    # When a live worker starts, it takes them over and runs them
    rescuer = setup.worker()
    workers.append(rescuer)
    wait_until(lambda: setup.cli("stuck").returncode == 0, 30,
               message="the messages to be taken over")
    assert [r.get(timeout=60) for r in held] == [8, 8]
    clean_log(rescuer)

"""``celery -A app sheppy …`` against real workers and a real redis-server (issue 12).

Each test starts its own redis-server and worker, sets up a known state (tasks
running, waiting, scheduled, dead-lettered, stuck on a killed worker) and runs the
command as an operator would, in a subprocess, checking its counts, its table, its
JSON and its exit code. The stuck, dead letter and scheduled scenarios run once per
topology (conftest's ``topology``): on a redis-server of their own, then on the local
Redis Cluster, where Celery's queue ``celery`` is sheppy's queue ``{celery}``.
"""

import json
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from celery import VERSION as celery_version_info
from prometheus_client.parser import text_string_to_metric_families

from celery_sheppy import keys
from t.helpers import (ROOT, TASKS, OnServer, Project, assert_clean_log, celery_cli, needs_cluster,
                       wait_until)
from t.redis_server import free_port

QUEUE = "celery"  # the tests on one server; a scenario run per topology uses topology.queue
LEASE = 4  # seconds: the lease of the stuck test's workers and commands


@pytest.fixture
def ops(make_redis_server, workers):
    """Makes a Project on ``topology`` (a scenario run per topology) or, without one, on a
    redis-server of its own; its workers stop and its app closes when the test ends."""
    projects = []

    def make(topology=None, **conf):
        projects.append(Project(topology or OnServer(make_redis_server()), workers, **conf))
        return projects[-1]

    yield make
    for project in projects:
        project.close()


def poison(setup):
    setup.client.xadd(keys.pending_stream(setup.queue), {"data": "not a task record"})


def fits_80_columns(text):
    return all(len(line) <= 80 for line in text.splitlines())


# -- status ------------------------------------------------------------------------------


def test_status_counts_ready_in_flight_scheduled_dead_and_results_per_queue(ops):
    setup = ops()
    worker = setup.worker()
    # Given one success and one failure stored, one undecodable entry dead-lettered
    assert setup.sig("add", 1, 2).delay().get(timeout=30) == 3
    with pytest.raises(ValueError):
        setup.sig("fail").delay().get(timeout=30)
    poison(setup)
    wait_until(lambda: setup.client.xlen(keys.dead_letter_stream(QUEUE)) == 1, 30, "a dead letter")
    # two acks_late tasks running (the worker's whole prefetch), three waiting behind them,
    # one countdown task in sheppy's scheduled set, two tasks in a queue nobody reads
    setup.hold_two_and_wait()
    published = time.time()
    for i in range(3):
        setup.sig("add", i, i).delay()
    setup.sig("add", 5, 5).apply_async(countdown=3600)
    for _ in range(2):
        setup.sig("add", 0, 0).apply_async(queue="other")
    time.sleep(1)

    # When the operator asks for the status
    queues = setup.stats()

    # Then each count is what was set up
    celery = queues[QUEUE]
    assert (celery["ready"], celery["in_flight"], celery["scheduled"],
            celery["dead_letters"]) == (3, 2, 1, 1)
    assert (celery["completed"], celery["failed"]) == (2, 1)
    assert [(c["in_flight"], c["state"]) for c in celery["consumers"]] == [(2, "alive")]
    assert (celery["consumers_alive"], celery["consumers_dead"], celery["stuck"]) == (1, 0, 0)
    assert 1.0 <= celery["oldest_ready_age"] <= time.time() - published + 5
    other = queues["other"]  # known from sheppy's registry, not from the app's settings
    assert (other["ready"], other["in_flight"], other["consumers"]) == (2, 0, [])

    # And the table says the same, in 80 columns
    table = setup.cli("status")
    assert table.returncode == 0, table.stderr
    assert fits_80_columns(table.stdout)
    lines = table.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("QUEUE")))
    end = lines.index("", start)
    rows = {line.split()[0]: line.split() for line in lines[start:end]}  # the queues' table
    assert rows["QUEUE"] == ["QUEUE", "READY", "IN", "FLIGHT", "OLDEST", "SCHEDULED", "DEAD",
                             "DONE", "FAILED"]
    assert rows[QUEUE][1:3] == ["3", "2"] and rows[QUEUE][4:] == ["1", "1", "2", "1"]
    assert rows["other"][1:3] == ["2", "0"]
    assert "consumers: 1 alive, 0 dead; 0 message(s) stuck past the lease" in table.stdout
    # the result counters are the backend's, of every queue: the table says so
    assert "DONE, FAILED: the results of every queue's tasks, counted under celery" in \
        table.stdout
    assert setup.cli("status", "-Q", "other", "--json").stdout.count('"queue"') == 1
    worker.kill()  # its tasks run for 30 s more: no warm shutdown


def celery_purge(setup):
    """``celery -A app purge -f``, as an operator empties the app's queues."""
    result = celery_cli(setup.url, "purge", "-f", settings=setup.conf, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_ready_counts_what_waits_after_a_purge_of_a_queue_workers_read_from(ops):
    # Given a queue a worker has read from (its group has delivered entries), and no
    # worker now
    setup = ops()
    worker = setup.worker()
    assert [setup.sig("add", i, i).delay().get(timeout=30) for i in range(3)] == [0, 2, 4]
    worker.stop()

    def send_waiting():  # plain tasks, one of priority 9 (its own stream), one countdown
        for i in range(3):
            setup.sig("add", i, i).delay()
        setup.sig("add", 9, 9).apply_async(priority=9)
        setup.sig("add", 5, 5).apply_async(countdown=5)  # sooner than delay_threshold

    def ready():
        printed = setup.cli("metrics")
        assert printed.returncode == 0, printed.stderr
        metric = samples_of(printed.stdout)[("sheppy_queue_ready", (("queue", QUEUE),))]
        status = setup.stats()[QUEUE]
        assert status["ready"] == metric
        return status["ready"]

    # Then five tasks wait, and five are ready
    send_waiting()
    assert ready() == 5
    # When the operator purges the queue: nothing waits, nothing is ready
    assert "Purged 5 messages" in celery_purge(setup)
    assert sum(setup.client.xlen(keys.priority_stream(QUEUE, step)) for step in (0, 3, 6, 9)) == 0
    assert ready() == 0
    # When a worker consumes new tasks, then more wait and are purged again
    worker = setup.worker()
    assert setup.sig("add", 1, 1).delay().get(timeout=30) == 2
    assert ready() == 0
    worker.stop()
    send_waiting()
    assert ready() == 5
    assert "Purged 5 messages" in celery_purge(setup)
    assert ready() == 0


def test_status_watch_refreshes_until_interrupted(ops):
    setup = ops()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(setup.command("status", "--watch", "0.2", "--json"),
                                   env=setup.env, cwd=str(ROOT), stdout=out,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            def documents():
                out.seek(0)
                lines = out.read().split("\n")[:-1]  # the last one may be half written
                return [line for line in lines if line.startswith("{")]

            wait_until(lambda: len(documents()) >= 3, 60, "three refreshes")
            setup.sig("add", 1, 1).delay()  # seen by a later refresh
            wait_until(lambda: json.loads(documents()[-1])["queues"][0]["ready"] == 1, 30,
                       "a refresh to see the new task")
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
        finally:
            process.kill()
            process.wait()


def test_errors_name_the_fault_and_exit_with_codes_scripts_can_use(ops):
    setup = ops()
    result = setup.cli("status", env={"CELERY_SHEPPY_BROKER": setup.topology.server.url})
    assert result.returncode == 78 and "not sheppy://" in result.stderr

    nowhere = f"sheppy://alice:s3cret@127.0.0.1:{free_port()}/0"
    result = setup.cli("status", env={"CELERY_SHEPPY_BROKER": nowhere})
    assert result.returncode == 69 and "cannot reach" in result.stderr
    assert "alice:**@127.0.0.1" in result.stderr and "s3cret" not in result.stderr

    elsewhere = f"sheppy://127.0.0.1:{free_port()}/0"  # results on a server that is down
    result = setup.cli("status", env={"CELERY_SHEPPY_BACKEND": elsewhere})
    assert result.returncode == 69 and "cannot reach the sheppy:// result backend" in result.stderr

    result = setup.cli("status", "-Q", "celery,bad:name")
    assert result.returncode == 2 and "'-Q'" in result.stderr and "'bad:name'" in result.stderr

    result = setup.cli("dead", "show", "not-an-id")
    assert result.returncode == 2 and "'not-an-id' is not a stream entry id" in result.stderr

    # a queue the broker has no trace of (a typo) is named, not shown as a row of zeros
    setup.sig("add", 1, 1).apply_async(queue="mail")  # known by its stream only
    for command in (["status"], ["metrics"], ["dead", "list"], ["scheduled", "list"], ["stuck"]):
        result = setup.cli(*command, "-Q", "celery,mial")
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "no queue 'mial'" in result.stderr and "mail" in result.stderr
    assert setup.cli("status", "-Q", "celery,mail").returncode == 0


# -- stuck ------------------------------------------------------------------------------


#: A scenario that is quick on one server and slow (19 s) on the cluster.
SLOW_ON_A_CLUSTER = pytest.mark.parametrize(
    "topology", ["server", pytest.param("cluster", marks=(needs_cluster, pytest.mark.slow))],
    indirect=True)


@SLOW_ON_A_CLUSTER
def test_stuck_lists_a_killed_workers_messages_past_the_lease_and_exits_1_until_taken_over(
        topology, ops):
    # Given a worker holding two acks_late tasks (its whole prefetch), short lease
    setup = ops(topology, broker_transport_options={"visibility_timeout": LEASE})
    doomed = setup.worker()
    held = setup.hold_two_and_wait(seconds=8)
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
        (topology.queue, "dead", f"{TASKS}.hold")}
    assert all(i["idle"] >= LEASE for i in items)
    celery = setup.stats()[topology.queue]
    assert (celery["in_flight"], celery["stuck"], celery["consumers_alive"],
            celery["consumers_dead"]) == (2, 2, 0, 1)
    table = setup.cli("stuck")
    assert table.returncode == 1 and fits_80_columns(table.stdout)
    consumer = items[0]["consumer"]  # the killed worker's, <host>:<pid>:<random>
    assert len([line for line in table.stdout.splitlines() if consumer in line]) == 2

    # When a live worker starts, it takes them over (within half a lease) and runs them
    rescuer = setup.worker()
    wait_until(lambda: setup.cli("stuck").returncode == 0, 30, "the messages to be taken over")
    assert [r.get(timeout=60) for r in held] == [8, 8]
    assert_clean_log(rescuer)


def test_an_idle_worker_counts_alive_on_every_server_and_a_killed_one_dead(ops):
    # A 4 s lease, and idle consumers reaped after 2 s: a consumer that holds nothing
    # lives by its worker's registration, not by its idle time, which Redis 7.0 does not
    # reset on empty reads (7.2+ and Valkey do)
    setup = ops(broker_transport_options={"visibility_timeout": LEASE,
                                          "consumer_reap_after": 2})
    doomed = setup.worker()

    # When the worker holds nothing and reads nothing for two leases, before its first
    # task (Redis 7.0 adds a consumer to a group at its first entry) and after it
    time.sleep(2 * LEASE + 1)
    celery = setup.stats()[QUEUE]
    assert [(c["in_flight"], c["state"]) for c in celery["consumers"]] == [(0, "alive")]
    assert setup.sig("add", 1, 1).delay().get(timeout=30) == 2
    time.sleep(2 * LEASE + 1)

    # Then it is one alive consumer, in status and in the metrics
    celery = setup.stats()[QUEUE]
    assert [(c["in_flight"], c["state"]) for c in celery["consumers"]] == [(0, "alive")]
    assert (celery["consumers_alive"], celery["consumers_dead"]) == (1, 0)
    values = samples_of(setup.cli("metrics").stdout)
    assert values[("sheppy_queue_consumers", (("queue", QUEUE), ("state", "alive")))] == 1
    alive = celery["consumers"][0]["name"]

    # When it is killed, it is dead once its registration (one lease) ends
    doomed.kill()
    wait_until(lambda: setup.stats()[QUEUE]["consumers_alive"] == 0, 3 * LEASE,
               "the killed worker to count dead")
    assert [(c["name"], c["state"]) for c in setup.stats()[QUEUE]["consumers"]] == [
        (alive, "dead")]

    # And a new worker's reaper removes the dead consumer, not its own idle one
    setup.worker()
    wait_until(lambda: [c["state"] for c in setup.stats()[QUEUE]["consumers"]] == ["alive"],
               30, "the dead consumer to be reaped")
    time.sleep(2 * LEASE)
    assert [c["state"] for c in setup.stats()[QUEUE]["consumers"]] == ["alive"]


# -- dead letters ------------------------------------------------------------------------


def test_dead_letters_are_listed_shown_replayed_to_a_worker_and_purged(topology, ops, counter):
    # Broker and backend in one database: the FAILURE Celery stores for Reject(requeue=False)
    # must not ack the message, or the reject finds nothing to dead-letter
    setup = ops(topology)
    worker = setup.worker()
    rejected = [setup.sig("picky", "flag").delay() for _ in range(2)]
    poison(setup)
    dead = keys.dead_letter_stream(topology.queue)
    wait_until(lambda: setup.client.xlen(dead) == 3, 30, "three dead letters")

    # list: under the broker's queue, also when asked by the Celery queue's name
    letters = setup.json("dead", "list")
    tasks = {letter["task_id"]: letter for letter in letters if letter["task"]}
    assert sorted(tasks) == sorted(r.id for r in rejected)
    assert {(letter["queue"], letter["reason"], letter["task"]) for letter in tasks.values()} == {
        (topology.queue, "rejected", f"{TASKS}.picky")}
    bad = [letter for letter in letters if letter["task"] is None]
    assert len(bad) == 1 and bad[0]["reason"].startswith("undecodable")
    table = setup.cli("dead", "list")
    assert fits_80_columns(table.stdout) and len(table.stdout.splitlines()) == 4
    by_celery_name = setup.json("dead", "list", "-Q", "celery")
    assert sorted(letter["id"] for letter in by_celery_name) == sorted(
        letter["id"] for letter in letters)

    # show
    shown = setup.cli("dead", "show", bad[0]["id"])
    assert shown.returncode == 0
    assert re.search(r"^reason: +undecodable", shown.stdout, re.M)
    assert "not a task record" in shown.stdout
    missing = setup.cli("dead", "show", "1-1")
    assert missing.returncode == 3
    assert f"no dead letter 1-1 in queue(s) {topology.queue}" in missing.stderr
    first = tasks[rejected[0].id]["id"]
    shown = setup.cli("dead", "show", first)
    assert shown.returncode == 0, shown.stderr
    assert rejected[0].id in shown.stdout

    # replay asks first: "n" keeps the letter
    refused = setup.cli("dead", "replay", first, input="n\n")
    assert refused.returncode == 1 and "Aborted" in refused.stderr
    assert setup.client.xlen(dead) == 3

    # replay with --yes: back to its stream, and the worker runs it
    counter.set("flag", 1)
    replayed = setup.cli("dead", "replay", first, "--yes")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed 1 dead letter(s); {topology.queue}: 1" in replayed.stdout
    wait_until(lambda: rejected[0].state == "SUCCESS", 30, "the replayed task to succeed")
    assert rejected[0].get(timeout=30) == "flag"
    assert setup.client.xlen(dead) == 2
    celery = setup.stats()[topology.queue]
    assert celery["dead_letters"] == 2
    # counted in the result backend's database: Celery 5.7 stores FAILURE for each
    # Reject(requeue=False), then the replayed run's SUCCESS replaced one of them (older
    # Celery stores nothing for a reject)
    stored = (3, 2) if celery_version_info >= (5, 7) else (1, 0)
    assert (celery["completed"], celery["failed"]) == stored

    # purge of all letters: asks, then deletes with --yes
    assert setup.cli("dead", "purge", input="n\n").returncode == 1
    assert setup.client.xlen(dead) == 2
    purged = setup.cli("dead", "purge", "--yes")
    assert purged.returncode == 0 and "purged 2 dead letter(s)" in purged.stdout
    assert setup.client.xlen(dead) == 0
    assert setup.cli("dead", "list").stdout == "no dead letters\n"
    assert_clean_log(worker)


def test_dead_show_prints_what_an_entry_without_a_data_field_held(ops):
    # Given an entry without a data field in the queue's stream (not written by
    # celery-sheppy or sheppy), which a worker dead-letters, and a dead letter written
    # by hand without one
    setup = ops()
    setup.worker()
    setup.client.xadd(keys.pending_stream(QUEUE), {"note": "added by hand", "n": "7"})
    dead = keys.dead_letter_stream(QUEUE)
    wait_until(lambda: setup.client.xlen(dead) == 1, 30, "a dead letter")
    by_hand = setup.client.xadd(dead, {"reason": "moved by hand", "origin": "ops"}).decode()
    moved = setup.json("dead", "list")[0]["id"]

    # When the operator shows them, then each shows what it holds
    shown = setup.cli("dead", "show", moved)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^reason: +undecodable: .*no 'data' field", shown.stdout, re.M)
    assert '"note": "added by hand"' in shown.stdout and '"n": "7"' in shown.stdout
    shown = setup.cli("dead", "show", by_hand)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^origin: +ops$", shown.stdout, re.M)
    assert re.search(r"^data: +\(none: the entry has no data\)$", shown.stdout, re.M)


# -- scheduled, revoked -----------------------------------------------------------------


def test_scheduled_list_shows_countdown_tasks_soonest_first_and_revoked_list_the_revoked(
        topology, ops):
    # Given two countdown tasks waiting in the queue's scheduled set, one revoked
    setup = ops(topology)
    worker = setup.worker()
    later = setup.sig("add", 1, 1).apply_async(countdown=7200)
    sooner = setup.sig("add", 2, 2).apply_async(countdown=3600)
    setup.app.control.revoke(later.id)
    wait_until(lambda: setup.client.zscore(keys.revoked_set(), later.id) is not None, 30,
               "the revoke to be kept")
    assert setup.client.zcard(keys.scheduled_set(topology.queue)) == 2

    # When the operator lists them, Then they are shown soonest first
    items = setup.json("scheduled", "list")
    assert [i["task_id"] for i in items] == [sooner.id, later.id]
    assert [i["revoked"] for i in items] == [False, True]
    assert {(i["queue"], i["task"]) for i in items} == {(topology.queue, f"{TASKS}.add")}
    assert 3500 < items[0]["due_in"] <= 3600 and 7100 < items[1]["due_in"] <= 7200
    table = setup.cli("scheduled", "list")
    assert fits_80_columns(table.stdout)
    assert sooner.id in table.stdout and "(revoked)" in table.stdout
    assert setup.stats()[topology.queue]["scheduled"] == 2

    # and the revoked one is listed as revoked
    revoked = setup.json("revoked", "list")
    assert revoked["total"] == 1 and [i["task_id"] for i in revoked["revoked"]] == [later.id]
    table = setup.cli("revoked", "list")
    assert later.id in table.stdout and "1 of 1 shown" in table.stdout
    assert_clean_log(worker)


def test_revoked_list_shows_tasks_stopped_with_celery_control_terminate(ops):
    # Given a running task (prefork: a thread cannot be terminated), stopped as an
    # operator does with Celery's command line
    setup = ops()
    worker = setup.worker(pool="prefork")
    (held, _) = setup.hold_two_and_wait()
    result = celery_cli(setup.url, "control", "terminate", "SIGTERM", held.id,
                        settings=setup.conf, timeout=120)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: held.state == "REVOKED", 30, "the task to be revoked")

    # Then the revoke is kept for workers that were away, and listed
    revoked = setup.json("revoked", "list")
    assert [i["task_id"] for i in revoked["revoked"]] == [held.id]
    worker.kill()  # the other task runs for 30 s more: no warm shutdown


# -- metrics --------------------------------------------------------------------------


def samples_of(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_printed_and_served_for_prometheus_to_scrape(ops):
    setup = ops()
    worker = setup.worker()
    setup.hold_two_and_wait()
    for i in range(3):
        setup.sig("add", i, i).delay()
    setup.sig("add", 5, 5).apply_async(countdown=3600)
    celery = (("queue", QUEUE),)

    printed = setup.cli("metrics")
    assert printed.returncode == 0, printed.stderr
    values = samples_of(printed.stdout)
    assert values[("sheppy_queue_ready", celery)] == 3
    assert values[("sheppy_queue_in_flight", celery)] == 2
    assert values[("sheppy_queue_scheduled", celery)] == 1
    assert values[("sheppy_queue_consumers", celery + (("state", "alive"),))] == 1

    port = free_port()
    with tempfile.TemporaryFile("w+") as out:
        server = subprocess.Popen(setup.command("metrics", "--serve", str(port)), env=setup.env,
                                  cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            scraped = []

            def scrape():
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        scraped.append((response.headers["Content-Type"], response.read().decode()))
                    return True
                except OSError:
                    return False

            wait_until(scrape, 60, "the metrics endpoint")
            content_type, text = scraped[-1]
            assert content_type.startswith("text/plain; version=0.0.4")
            values = samples_of(text)
            assert values[("sheppy_queue_ready", celery)] == 3
            assert values[("sheppy_queue_in_flight", celery)] == 2
            assert values[("sheppy_queue_oldest_ready_age_seconds", celery)] > 0
            setup.sig("add", 9, 9).delay()  # every scrape reads Redis again
            assert scrape() and samples_of(scraped[-1][1])[("sheppy_queue_ready", celery)] == 4
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
            worker.kill()
            setup.topology.server.kill()  # a scrape while Redis is down fails, the server stays up
            with pytest.raises(urllib.error.HTTPError, match="503") as failed:
                urllib.request.urlopen(url, timeout=30)
            assert "cannot read the sheppy:// broker" in failed.value.read().decode()
            server.send_signal(signal.SIGINT)
            assert server.wait(30) == 0
            out.seek(0)
            assert f":{port}/metrics" in out.read()
        finally:
            server.kill()
            server.wait()


# -- configuration errors ------------------------------------------------------------


def test_a_misspelt_transport_option_stops_the_worker_naming_only_options_it_accepts(ops):
    setup = ops(broker_transport_options={"visibilty_timeout": 10})
    with pytest.raises(RuntimeError, match="worker exited") as failed:
        setup.worker()
    message = next(line for line in str(failed.value).splitlines() if "visibilty_timeout" in line)
    accepted = message.split("accepted: ", 1)[1].rstrip(")").split(", ")
    assert "visibility_timeout" in accepted
    # refused options (sheppy's key layout is fixed) are not offered
    assert "global_keyprefix" not in accepted and "sep" not in accepted


def test_metrics_serve_starts_while_redis_is_down_and_recovers(ops):
    # Given a broker that is down when the exporter starts
    setup = ops()
    setup.topology.server.kill()
    port = free_port()
    with tempfile.TemporaryFile("w+") as out:
        server = subprocess.Popen(setup.command("metrics", "--serve", str(port)), env=setup.env,
                                  cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            failures = []

            def answered(expect):
                assert server.poll() is None, "the exporter exited"
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        return expect == 200 and samples_of(response.read().decode())
                except urllib.error.HTTPError as exc:
                    failures.append(exc.read().decode())
                    return exc.code == expect
                except OSError:
                    return False

            # Then it serves, and a scrape says why it fails
            wait_until(lambda: answered(503), 60, "a 503 from the exporter")
            assert "cannot read the sheppy:// broker" in failures[-1]
            # And once Redis is back, scrapes succeed
            setup.topology.server.start()
            setup.sig("add", 1, 1).delay()
            wait_until(lambda: answered(200), 60, "a scrape to succeed")
            server.send_signal(signal.SIGINT)
            assert server.wait(30) == 0
            out.seek(0)
            assert "serving 503 until it answers" in out.read()
        finally:
            server.kill()
            server.wait()


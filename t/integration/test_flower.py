"""Flower's Broker page and ``/api/queues/length`` on ``sheppy://``, in a real Flower process.

Flower (2.x) is started as an operator starts it, ``celery -A app flower --port=…``,
with and without the documented line in its ``flowerconfig.py``, polled over HTTP
until it answers, and stopped by its PID.
"""

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from t.helpers import ROOT, OnServer, Project, wait_until
from t.redis_server import free_port

pytest.importorskip("flower")  # the [flower] extra; the test extra installs it

FLOWER_LINE = "import celery_sheppy.flower\n"
QUEUE = "celery"


class Flower:
    def __init__(self, setup, config_line):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="celery-sheppy-flower-")
        config = Path(self.dir, "flowerconfig.py")
        config.write_text(config_line)
        self.log = Path(self.dir, "flower.log")
        # Flower 2 serves its API only with authentication, or with this switch
        env = dict(setup.env, FLOWER_UNAUTHENTICATED_API="true")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                setup.command()[:-1] + ["flower", f"--port={self.port}", "--address=127.0.0.1",
                                        f"--conf={config}"],
                env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def get(self, path):
        """``(status, body)``, HTTP errors included; OSError while Flower is not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_answer(self, path, timeout=60):
        answers = []

        def answered():
            if self.process.poll() is not None:
                raise AssertionError(f"flower exited:\n{self.log.read_text()[-3000:]}")
            try:
                answers.append(self.get(path))
                return True
            except OSError:
                return False

        wait_until(answered, timeout, f"flower to answer {path}")
        return answers[-1]

    def stop(self):
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def flowers():
    started = []
    yield started
    for flower in started:
        flower.stop()


@pytest.fixture
def setup(make_redis_server, workers):
    setup = Project(OnServer(make_redis_server()), workers)
    yield setup
    setup.close()


def test_flower_shows_sheppy_queue_lengths_with_the_one_documented_line(setup, flowers):
    # Given a worker running two tasks (its whole prefetch) and three more waiting
    worker = setup.worker()
    setup.hold_two_and_wait()
    for i in range(3):
        setup.sig("add", i, i).delay()

    # When Flower runs with the line in its flowerconfig.py
    flower = Flower(setup, FLOWER_LINE)
    flowers.append(flower)
    status, body = flower.wait_answer("/api/queues/length")

    # Then its API gives the queue's lengths, as RabbitMQ's fields
    assert status == 200, body
    queues = {q["name"]: q for q in json.loads(body)["active_queues"]}
    celery = queues[QUEUE]
    assert (celery["messages"], celery["messages_ready"], celery["messages_unacknowledged"],
            celery["consumers"]) == (5, 3, 2, 1)
    assert celery["sheppy"]["in_flight"] == 2

    # And the Broker page shows them in its table
    status, page = flower.get("/broker")
    assert status == 200
    row = re.search(r'<tr id="celery">(.*?)</tr>', page, re.S).group(1)
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>",
                                                                          row, re.S)]
    assert cells[:5] == ["celery", "5", "2", "3", "1"]
    worker.kill()  # its tasks run for 30 s more: no warm shutdown


def test_flower_without_the_line_does_not_know_the_sheppy_broker(setup, flowers):
    setup.sig("add", 1, 1).delay()
    flower = Flower(setup, "# no celery_sheppy line\n")
    flowers.append(flower)
    status, body = flower.wait_answer("/api/queues/length")
    assert status == 404 and "'redis' broker is not supported" in body


def test_flower_refreshing_its_workers_again_later_logs_no_dropped_read(make_redis_server,
                                                                        workers, flowers):
    # Short reads (1 s) and health checks (1 s): a read is overdue after 2 s, not 35 s
    setup = Project(OnServer(make_redis_server()), workers, broker_transport_options={
        "polling_interval": 1, "health_check_interval": 1})
    try:
        setup.worker()
        flower = Flower(setup, FLOWER_LINE)
        flowers.append(flower)
        # When Flower asks its workers (4 remote-control broadcasts at once, on pooled
        # connections), and again once the reads those left are overdue
        status, body = flower.wait_answer("/api/workers?refresh=1")
        assert status == 200 and len(json.loads(body)) == 1, body
        time.sleep(4)
        status, body = flower.get("/api/workers?refresh=1")
        assert status == 200 and len(json.loads(body)) == 1, body
        time.sleep(2)

        # Then the replies those reads got were read, not dropped as lost connections
        assert "no reply in time" not in flower.log.read_text()
    finally:
        setup.close()

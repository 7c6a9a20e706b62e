"""What the tests share besides fixtures: a task's signature, waiting, the ``celery``
command line, real workers, and the topologies a feature scenario runs on.

Workers and commands run the app of ``t/integration/tasks.py``: broker and result
backend from ``CELERY_SHEPPY_BROKER`` / ``CELERY_SHEPPY_BACKEND``, further settings from
``CELERY_SHEPPY_CONF`` (JSON), run counts in the side Redis of ``CELERY_SHEPPY_COUNTER_URL``
(conftest's ``counter`` sets it). conftest.py holds the fixtures; test modules import
from here, never from each other.
"""

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from celery_sheppy import compat
from t.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
TASKS = "t.integration.tasks"


def _cluster_refused():
    try:
        compat.check_cluster_transactions()
    except ValueError as exc:
        return str(exc)
    return None


#: sheppy+cluster:// needs redis-py 6.1+: with an older one the tests on a local Redis
#: Cluster skip (tests/test_compat.py checks the error such a URL gets).
CLUSTER_REFUSED = _cluster_refused()
needs_cluster = pytest.mark.skipif(CLUSTER_REFUSED is not None, reason=str(CLUSTER_REFUSED))

#: sheppy 0.0.7, whose tools the tests marked sheppy_tools run, needs Python 3.10+ (the test
#: extra installs it there): on 3.9 those tests, and only they, are skipped.
SHEPPY_TOOLS = sys.version_info >= (3, 10)

#: ACL rules of restricted users: as managed Redis services restrict users (no CLIENT
#: UNBLOCK, CONFIG, INFO, KEYS), and the least docs/transport.md says celery-sheppy needs.
RESTRICTED_ACL_USERS = {
    "worker": ["~*", "&*", "+@all", "-@dangerous"],
    "minimal": ["resetkeys", "~sheppy:*", "resetchannels", "&sheppy:celery::fanout:*", "-@all",
                "+@read", "+@write", "+@stream", "+@scripting", "+@transaction", "+@connection",
                "+@pubsub", "+time"],
}


def sig(app, name, *args, **options):
    """The signature of ``t.integration.tasks.<name>`` (the test process calls it by name)."""
    return app.signature(f"{TASKS}.{name}", args=args, **options)


def wait_until(predicate, timeout, message="condition", interval=0.2):
    """Until ``predicate()`` is true; AssertionError naming ``message`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def runs(counter, key):
    """What the tasks recorded in the list ``key`` of the side Redis, in order, as tuples
    (``tracked``: ``(value, worker, time)``; ``limited``: ``(time, worker)``)."""
    return [tuple(json.loads(item)) for item in counter.lrange(key, 0, -1)]


def client_app(broker, backend, **conf):
    """A Celery app for the test process; it calls the tasks of t/integration/tasks.py by name."""
    from celery import Celery

    app = Celery("celery-sheppy-tests", set_as_current=False)
    settings = dict(broker_url=broker, result_backend=backend, result_extended=True,
                    broker_connection_retry_on_startup=True)
    settings.update(conf)
    app.conf.update(settings)
    return app


def task_env(url, settings=None, backend=None, env=None):
    """The environment of a ``celery -A t.integration.tasks …`` process: broker ``url``,
    result ``backend`` (default: ``url``), ``settings`` (CELERY_SHEPPY_CONF), then ``env``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    variables = dict(os.environ, CELERY_SHEPPY_BROKER=url, CELERY_SHEPPY_BACKEND=backend or url,
                     CELERY_SHEPPY_CONF=json.dumps(settings or {}), PYTHONPATH=path)
    variables.update(env or {})  # may override the ones above
    return variables


def celery_command(*args):
    return [sys.executable, "-m", "celery", "-A", TASKS, *args]


def celery_cli(url, *args, settings=None, backend=None, env=None, input=None, timeout=60):
    """``celery -A t.integration.tasks <args>`` run to its end, as a user runs it (see
    :func:`task_env`); the CompletedProcess, with text output."""
    return subprocess.run(celery_command(*args), env=task_env(url, settings, backend, env),
                          cwd=str(ROOT), input=input, capture_output=True, text=True,
                          timeout=timeout)


class Worker:
    """A ``celery worker`` process (see :func:`start_worker`), its log in a file."""

    def __init__(self, command, env, name, pool, concurrency):
        self.name = name  # tasks see it as request.hostname
        self.pool, self.concurrency = pool, concurrency
        self.log = tempfile.NamedTemporaryFile(prefix="celery-sheppy-worker-", suffix=".log",
                                               delete=False)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=env, cwd=str(ROOT), start_new_session=True)
        atexit.register(self.kill)

    def output(self):
        return Path(self.log.name).read_text(errors="replace")

    def wait_for_log(self, text, timeout=60):
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not log {text!r}:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def kill(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the worker and its pool children
        except ProcessLookupError:
            pass
        self.process.wait()

    def stop(self, timeout=30):
        """A warm shutdown (SIGTERM), SIGKILL after ``timeout`` s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stray pool children
        except ProcessLookupError:
            pass


def start_worker(url, settings=None, *, backend=None, pool="prefork", concurrency=2,
                 queues="celery", args=(), env=None, wait_ready=True):
    """``celery -A t.integration.tasks worker`` on broker ``url`` (result ``backend``,
    default ``url``) with ``settings`` (CELERY_SHEPPY_CONF), Celery's defaults otherwise
    (mingle, gossip, heartbeat); ``args`` go to the command line, ``env`` to its environment.
    Returns once the worker logged ``ready.`` (at once without ``wait_ready``)."""
    name = f"w{free_port()}@{socket.gethostname()}"
    command = celery_command("worker", "-P", pool, "-c", str(concurrency), "-Q", queues,
                             "-l", "INFO", "-n", name, *args)
    worker = Worker(command, task_env(url, settings, backend, env), name, pool, concurrency)
    if wait_ready:
        try:
            worker.wait_for_log("ready.")
        except Exception:
            worker.kill()
            raise
    return worker


class Workers(list):
    """The workers a test started (conftest's ``workers``): :meth:`start` one, or append
    one; all are stopped when the test ends."""

    def start(self, *args, **kwargs):
        """:func:`start_worker`, remembered."""
        self.append(start_worker(*args, **kwargs))
        return self[-1]

    def stop_all(self):
        for worker in self:
            worker.stop()


def assert_clean_log(worker):
    """No command of ``worker`` mixed slots or met a moved slot, and it never lost its broker."""
    log = worker.output()
    assert "CROSSSLOT" not in log and "MOVED" not in log, log[-4000:]
    assert "Connection to broker lost" not in log, log[-4000:]


# -- topologies: where a feature scenario runs (conftest's ``topology``) ---------------------


class OnServer:
    """One redis-server of the test's own, broker and result backend on its db 0."""

    name = "server"
    #: sheppy's name of Celery's queue ``celery``
    queue = "celery"

    def __init__(self, server):
        self.server = server
        self.url = server.sheppy_url()

    def client(self):
        return self.server.client()


class OnCluster:
    """The session's local Redis Cluster (3 masters + 3 replicas), emptied for the test,
    broker and result backend on it (``sheppy+cluster://``)."""

    name = "cluster"
    #: On a cluster every key of a queue is in one slot: Celery's ``celery`` is sheppy's
    #: queue ``{celery}`` (docs/deployment.md)
    queue = "{celery}"

    def __init__(self, cluster):
        self.cluster = cluster
        self.url = cluster.sheppy_url()

    def client(self):
        return self.cluster.client()

    def flush(self):
        for node in self.cluster.masters():
            node.client().flushall()


class Project:
    """A Celery project on a topology as its operator sees it: its settings (workers take
    one task at a time ahead), a client app, its workers, its ``celery`` commands.
    ``conf`` goes to the app and the workers."""

    def __init__(self, topology, workers, **conf):
        self.topology, self._workers = topology, workers
        self.url, self.queue = topology.url, topology.queue
        self.conf = dict({"worker_prefetch_multiplier": 1}, **conf)
        self.client = topology.client()
        self.app = client_app(self.url, self.url, **conf)

    @property
    def env(self):
        """The environment of the project's ``celery`` commands."""
        return task_env(self.url, self.conf)

    def worker(self, concurrency=2, pool="threads"):
        return self._workers.start(self.url, self.conf, pool=pool, concurrency=concurrency)

    def sig(self, name, *args, **options):
        return sig(self.app, name, *args, **options)

    def command(self, *args):
        """``celery -A t.integration.tasks sheppy <args>``, for a process that runs on."""
        return celery_command("sheppy", *args)

    def cli(self, *args, input=None, env=None):
        """``celery … sheppy <args>`` run to its end; ``env`` overrides variables."""
        return celery_cli(self.url, "sheppy", *args, settings=self.conf, env=env, input=input,
                          timeout=120)

    def json(self, *args):
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def stats(self):
        return {q["queue"]: q for q in self.json("status")["queues"]}

    def hold_two_and_wait(self, seconds=30):
        """Two acks_late tasks running: the whole prefetch (2) of a 2-thread worker."""
        held = [self.sig("hold", seconds).delay() for _ in range(2)]
        wait_until(lambda: all(r.state == "STARTED" for r in held), 30, "both tasks to start")
        return held

    def close(self):
        self.app.close()
        self.client.close()

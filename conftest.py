"""Fixtures shared by tests/ and t/integration/: private redis-servers and real Celery workers.

Every server is a ``redis-server`` process of our own on a free loopback port,
stopped by its PID; no test touches a server it did not start.
"""

import atexit
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
from t.redis_server import (  # noqa: F401 (re-exported)
    MissingRedisServer, NoTLS, RedisServer, free_port, server_binary, server_name)

ROOT = Path(__file__).resolve().parent


#: sheppy 0.0.7, whose tools the tests marked sheppy_tools run, needs Python 3.10+ (the test
#: extra installs it there): on 3.9 those tests, and only they, are skipped.
SHEPPY_TOOLS = sys.version_info >= (3, 10)


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


def pytest_collection_modifyitems(config, items):
    if SHEPPY_TOOLS:
        return
    skip = pytest.mark.skip(reason="sheppy 0.0.7 needs Python 3.10+")
    for item in items:
        if item.get_closest_marker("sheppy_tools"):
            item.add_marker(skip)


def pytest_report_header(config):
    """The cell under test (docs/compatibility.md): Python, Celery, kombu, redis-py, server."""
    import celery
    import kombu
    import redis

    try:
        name = server_name()
        banner = subprocess.run([server_binary(), "--version"], capture_output=True,
                                text=True).stdout.strip()
    except MissingRedisServer as exc:  # the tests that need no server still run
        name, banner = "none", str(exc)
    return (f"celery {celery.__version__}, kombu {kombu.__version__}, redis-py "
            f"{redis.__version__}; server under test ({name}): {banner}")


def needs_server():
    """Fails the test that asked for a server, naming what to install, when the server
    binary is missing (tests that need none run without it)."""
    try:
        server_binary()
        return
    except MissingRedisServer as exc:
        missing = str(exc)
    pytest.fail(f"this test needs a redis-server: {missing}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server():
    needs_server()
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def make_redis_server():
    """Starts servers with extra arguments; all of them stop when the test ends."""
    needs_server()
    servers = []

    def make(*args, **kwargs):
        try:
            servers.append(RedisServer(*args, **kwargs))
        except NoTLS as exc:  # tls=True, on the Valkey wheels
            pytest.skip(str(exc))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def acl_server():
    """A server whose only user is alice (password s3cret-pw); the default user is off."""
    needs_server()
    server = RedisServer("--user", "default", "off", "--user", "alice", "on", ">s3cret-pw",
                         "~*", "&*", "+@all", username="alice", password="s3cret-pw")
    yield server
    server.close()


@pytest.fixture(scope="session")
def tls_server():
    """A server that speaks TLS only, with a throw-away CA (``tls_server.ca_file``)."""
    needs_server()
    try:
        server = RedisServer(tls=True)
    except NoTLS as exc:  # the Valkey wheels
        pytest.skip(str(exc))
    yield server
    server.close()


@pytest.fixture(scope="session")
def side_redis():
    """A server only the tests use, to count task runs: the system under test never
    touches it, so killing or restarting the tested server cannot lose a count."""
    needs_server()
    server = RedisServer()
    yield server
    server.close()


#: ACL rules of restricted users: as managed Redis services restrict users (no CLIENT
#: UNBLOCK, CONFIG, INFO, KEYS), and the least docs/transport.md says celery-sheppy needs.
RESTRICTED_ACL_USERS = {
    "worker": ["~*", "&*", "+@all", "-@dangerous"],
    "minimal": ["resetkeys", "~sheppy:*", "resetchannels", "&sheppy:celery::fanout:*", "-@all",
                "+@read", "+@write", "+@stream", "+@scripting", "+@transaction", "+@connection",
                "+@pubsub", "+time"],
}


@pytest.fixture(scope="session")
def restricted_acl_server():
    """A server whose users (RESTRICTED_ACL_USERS, password ``<name>-pw``) are restricted;
    the default user is off."""
    needs_server()
    users = [arg for name, rules in RESTRICTED_ACL_USERS.items()
             for arg in ("--user", name, "on", f">{name}-pw", *rules)]
    server = RedisServer("--user", "default", "off", *users, username="worker",
                         password="worker-pw")
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster():
    """A local Redis Cluster: 3 masters + 3 replicas (t/redis_server.py)."""
    from t.redis_server import RedisCluster

    if CLUSTER_REFUSED:
        pytest.skip(CLUSTER_REFUSED)
    needs_server()
    cluster = RedisCluster()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def sentinel_set():
    """A primary, its replica and 3 Sentinels watching it as ``mymaster``."""
    from t.redis_server import SentinelSet

    needs_server()
    sentinels = SentinelSet()
    yield sentinels
    sentinels.close()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


class Worker:
    """``celery worker`` in a subprocess, on the app in t/integration/tasks.py."""

    def __init__(self, broker, backend, pool="prefork", concurrency=2, queues="celery",
                 extra_env=None, args=()):
        self.pool = pool
        self.log = tempfile.NamedTemporaryFile(prefix="celery-sheppy-worker-", suffix=".log",
                                               delete=False)
        env = dict(os.environ, CELERY_SHEPPY_BROKER=broker, CELERY_SHEPPY_BACKEND=backend,
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **(extra_env or {}))
        self.name = f"w{free_port()}@{socket.gethostname()}"  # tasks see it as request.hostname
        self.pool, self.concurrency = pool, concurrency
        cmd = [sys.executable, "-m", "celery", "-A", "t.integration.tasks", "worker",
               "-P", pool, "-c", str(concurrency), "-Q", queues, "-l", "INFO",
               "-n", self.name, *args]  # Celery's defaults: mingle, gossip, heartbeat
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(ROOT), start_new_session=True)
        atexit.register(self.kill)
        try:
            self.wait_for_log("ready.")
        except Exception:
            self.kill()
            raise

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


@pytest.fixture
def counter(side_redis, monkeypatch):
    """A client of the side Redis, emptied for the test: workers started during the test
    count their runs there (``CELERY_SHEPPY_COUNTER_URL``), never in the server under test,
    which tests kill and restart."""
    client = side_redis.client()
    client.flushdb()
    monkeypatch.setenv("CELERY_SHEPPY_COUNTER_URL", side_redis.url)
    yield client
    client.close()


@pytest.fixture
def workers():
    """The workers a test starts (append them); stopped when it ends."""
    started = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def start_worker():
    workers = []

    def start(*args, **kwargs):
        worker = Worker(*args, **kwargs)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def client_app(broker, backend, **conf):
    """A Celery app for the test process; it calls the tasks of t/integration/tasks.py by name."""
    from celery import Celery

    app = Celery("celery-sheppy-tests", set_as_current=False)
    settings = dict(broker_url=broker, result_backend=backend, result_extended=True,
                    broker_connection_retry_on_startup=True)
    settings.update(conf)
    app.conf.update(settings)
    return app

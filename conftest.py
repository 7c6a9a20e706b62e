"""Fixtures shared by tests/ and t/integration/: private redis-servers and real Celery workers.

Every server is a ``redis-server`` process of our own on a free loopback port,
stopped by its PID; no test touches a server it did not start.
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server process on 127.0.0.1, started and stopped by this test run."""

    def __init__(self, *extra_args, tls=False, password=None, username=None):
        if not shutil.which("redis-server"):
            pytest.exit("redis-server is not installed: apt-get update && apt-get install -y redis-server",
                        returncode=3)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="celery-sheppy-redis-")
        self.extra_args = list(extra_args)
        self.tls = tls
        self.password = password
        self.username = username  # an ACL user the extra args define; password is then its own
        if tls:
            make_certificates(self.dir)
        self.process = None
        atexit.register(self.close)  # a test that fails half-way still stops its server
        self.start()

    @property
    def ca_file(self):
        return os.path.join(self.dir, "ca.pem")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def sheppy_url(self, db=0):
        return f"sheppy://127.0.0.1:{self.port}/{db}"

    def client(self, **kwargs):
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=self.ca_file, ssl_cert_reqs="required")
        if self.password:
            kwargs.setdefault("password", self.password)
        if self.username:
            kwargs.setdefault("username", self.username)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self):
        listen = ["--port", "0", "--tls-port", str(self.port),
                  "--tls-cert-file", os.path.join(self.dir, "server.pem"),
                  "--tls-key-file", os.path.join(self.dir, "server.key"),
                  "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no",
                  ] if self.tls else ["--port", str(self.port)]
        auth = ["--requirepass", self.password] if self.password and not self.username else []
        args = ["redis-server", *listen, *auth, "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--appendonly", "no", *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client(socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                pass
            except redis.ResponseError as exc:  # loading the append-only file
                if "LOADING" not in str(exc):
                    raise
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self):
        """SIGKILL, as a crash would."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self):
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, downtime=0.0):
        self.kill()
        time.sleep(downtime)
        self.start()

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def make_certificates(directory):
    """A throw-away CA and a server certificate for 127.0.0.1, made with openssl."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")
    Path(directory, "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def make_redis_server():
    """Starts servers with extra arguments; all of them stop when the test ends."""
    servers = []

    def make(*args, **kwargs):
        servers.append(RedisServer(*args, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


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
        self.log = tempfile.NamedTemporaryFile(prefix="celery-sheppy-worker-", suffix=".log",
                                               delete=False)
        env = dict(os.environ, CELERY_SHEPPY_BROKER=broker, CELERY_SHEPPY_BACKEND=backend,
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **(extra_env or {}))
        cmd = [sys.executable, "-m", "celery", "-A", "t.integration.tasks", "worker",
               "-P", pool, "-c", str(concurrency), "-Q", queues, "-l", "INFO",
               "--without-gossip", "--without-mingle", "--without-heartbeat",
               "-n", f"w{free_port()}@%h", *args]
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

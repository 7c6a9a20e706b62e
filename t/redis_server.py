"""A private redis-server for the tests, the demo and the bench.

Each server is a ``redis-server`` process of our own on a free loopback port (never
6379), without persistence unless asked, stopped by its PID (also at interpreter exit).
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MissingRedisServer(RuntimeError):
    """No ``redis-server`` on the PATH."""


class RedisServer:
    """A redis-server process on 127.0.0.1 of our own: started on a free port, stopped by PID.

    ``extra_args`` go to redis-server; ``tls`` makes a throw-away CA and serves TLS only;
    ``password`` (with ``username``: an ACL user the extra args define) is what
    :meth:`client` and the readiness check authenticate with.
    """

    def __init__(self, *extra_args, tls=False, password=None, username=None):
        if not shutil.which("redis-server"):
            raise MissingRedisServer(
                "redis-server is not installed: apt-get update && apt-get install -y redis-server")
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


class SentinelServer:
    """A ``redis-server --sentinel`` process on a free loopback port, stopped by its PID.

    ``monitor``: ``(name, host, port, quorum)`` of a primary to watch, or None.
    """

    def __init__(self, monitor=None, down_after_ms=1000, failover_timeout_ms=2000):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="celery-sheppy-sentinel-")
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}"]
        if monitor:
            name, host, port, quorum = monitor
            lines += [f"sentinel monitor {name} {host} {port} {quorum}",
                      f"sentinel down-after-milliseconds {name} {down_after_ms}",
                      f"sentinel failover-timeout {name} {failover_timeout_ms}",
                      f"sentinel parallel-syncs {name} 1"]
        self.config = os.path.join(self.dir, "sentinel.conf")
        Path(self.config).write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(["redis-server", self.config, "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(self.close)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"redis-server --sentinel on port {self.port} did not start")
            time.sleep(0.05)

    def client(self, **kwargs):
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def close(self):
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

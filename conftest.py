"""Fixtures shared by tests/ and t/integration/: private redis-servers and real Celery workers.

Every server is a ``redis-server`` process of our own on a free loopback port,
stopped by its PID; no test touches a server it did not start. A test that starts none
runs without a server installed. What tests share besides fixtures is in t/helpers.py.
"""

import subprocess

import pytest

from t.helpers import (CLUSTER_REFUSED, RESTRICTED_ACL_USERS, SHEPPY_TOOLS, OnCluster, OnServer,
                       Workers, needs_cluster)
from t.redis_server import MissingRedisServer, NoTLS, RedisServer, server_binary, server_name


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
    """The workers a test starts (``workers.start(url, settings, ...)``, or append one);
    stopped when it ends."""
    started = Workers()
    yield started
    started.stop_all()


@pytest.fixture(params=["server", pytest.param("cluster", marks=needs_cluster)])
def topology(request, make_redis_server):
    """Where a feature scenario runs, once on each: a redis-server of the test's own, then
    the session's Redis Cluster, emptied before and after the test (ask for ``topology``
    before ``workers``: the workers stop before it is emptied)."""
    if request.param == "server":
        yield OnServer(make_redis_server())
        return
    cluster = OnCluster(request.getfixturevalue("redis_cluster"))
    cluster.flush()
    yield cluster
    cluster.flush()  # nothing left for a later module's workers (countdown tasks, dead letters)

"""kombu's own shared integration suites (``t/integration/common.py``) against sheppy://.

The suites ship in kombu's sdist, not its wheel: the sdist of the installed kombu
version is fetched once with pip into pytest's cache directory (git-ignored) and
``common.py`` is loaded from there. Without network access the module is skipped.
"""

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import kombu
import pytest

import celery_sheppy.transport  # noqa: F401  a plain kombu process registers the scheme so
from t.helpers import ROOT
from t.redis_server import free_port

CACHE = Path(os.environ.get("CELERY_SHEPPY_KOMBU_SUITES", ROOT / ".pytest_cache" / "kombu-sdist"))


def _load_common():
    target = CACHE / f"kombu-{kombu.__version__}-common.py"
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", f"kombu=={kombu.__version__}",
                 "--no-binary", ":all:", "--no-deps", "--quiet", "-d", tmp],
                capture_output=True, text=True, timeout=300)
            archives = list(Path(tmp).glob("kombu-*.tar.gz"))
            if done.returncode or not archives:
                return None
            with tarfile.open(archives[0]) as tar:
                member = tar.getmember(f"kombu-{kombu.__version__}/t/integration/common.py")
                data = tar.extractfile(member).read()
        CACHE.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    spec = importlib.util.spec_from_file_location("kombu_integration_common", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load_common()
if common is None:
    pytest.skip("kombu's sdist (t/integration/common.py) could not be fetched",
                allow_module_level=True)


@pytest.fixture
def connection(redis_server, redis_client):
    return kombu.Connection(redis_server.sheppy_url(0))


@pytest.fixture
def invalid_connection():
    return kombu.Connection(f"sheppy://127.0.0.1:{free_port()}/0")


@pytest.fixture
def failover_connection(redis_server, redis_client):
    return kombu.Connection(
        f"sheppy://127.0.0.1:{free_port()}/0;sheppy://127.0.0.1:{redis_server.port}/0")


class TestSheppyBasicFunctionality(common.BasicFunctionality):
    pass


class TestSheppyBaseExchangeTypes(common.BaseExchangeTypes):
    def test_fanout(self, connection):
        # The shared version publishes before anyone consumes. A fanout exchange delivers
        # by pub/sub here, as kombu's Redis transport does: only to queues consumed when
        # the message is published.
        ex = kombu.Exchange("test_fanout", type="fanout")
        queues = [kombu.Queue("fanout1", exchange=ex), kombu.Queue("fanout2", exchange=ex)]
        with connection as conn:
            with conn.channel() as channel:
                received = []
                consumer = kombu.Consumer(conn, queues, accept=["pickle"],
                                          callbacks=[lambda body, message: received.append(
                                              (body, message.delivery_info["routing_key"]))])
                with consumer:
                    self._publish(channel, ex)
                    for _ in queues:
                        conn.drain_events(timeout=1)
        assert [body for body, _ in received] == [{"hello": "world"}] * 2


class TestSheppyPriority(common.BasePriority):
    # As with the stock Redis transport: the lower number is delivered first.
    PRIORITY_ORDER = "desc"

    def test_publish_consume(self, connection):
        # The shared version expects AMQP's single drain_events() for three
        # messages; a virtual transport delivers one per call (as kombu's own
        # Redis suite does).
        test_queue = kombu.Queue("priority_test", routing_key="priority_test", max_priority=10)
        received = []

        def callback(body, message):
            received.append(body)
            message.ack()

        with connection as conn:
            with conn.channel() as channel:
                producer = kombu.Producer(channel)
                for msg, prio in [[{"msg": "first"}, 6], [{"msg": "second"}, 3],
                                  [{"msg": "third"}, 6]]:
                    producer.publish(msg, retry=True, exchange=test_queue.exchange,
                                     routing_key=test_queue.routing_key, declare=[test_queue],
                                     serializer="pickle", priority=prio)
                consumer = kombu.Consumer(conn, [test_queue], accept=["pickle"])
                consumer.register_callback(callback)
                with consumer:
                    for _ in range(3):
                        conn.drain_events(timeout=1)
        assert received == [{"msg": "second"}, {"msg": "first"}, {"msg": "third"}]

    def test_publish_requeue_consume(self, connection):
        test_queue = kombu.Queue("priority_requeue_test", routing_key="priority_requeue_test",
                                 max_priority=10)
        messages, bodies = [], []

        def callback(body, message):
            messages.append(message)
            bodies.append(body)

        with connection as conn:
            with conn.channel() as channel:
                producer = kombu.Producer(channel)

                def publish(msg, prio):
                    producer.publish(msg, retry=True, exchange=test_queue.exchange,
                                     routing_key=test_queue.routing_key, declare=[test_queue],
                                     serializer="pickle", priority=prio)

                for msg, prio in [[{"msg": "first"}, 6], [{"msg": "second"}, 3],
                                  [{"msg": "third"}, 6]]:
                    publish(msg, prio)
                consumer = kombu.Consumer(conn, [test_queue], accept=["pickle"])
                consumer.register_callback(callback)
                with consumer:
                    for _ in range(3):
                        conn.drain_events(timeout=1)
                for message in messages:
                    message.requeue()
                messages.clear()
                bodies.clear()
                publish({"msg": "fourth"}, 0)
                with consumer:
                    for _ in range(4):
                        conn.drain_events(timeout=1)
        # Requeued messages go to the end of their priority's stream (streams cannot
        # be prepended to), so order within a priority is kept.
        assert bodies == [{"msg": "fourth"}, {"msg": "second"}, {"msg": "first"},
                          {"msg": "third"}]


class TestSheppyMessage(common.BaseMessage):
    pass


def _suite(name):
    """kombu's shared suite ``name``; older kombu releases ship fewer suites (BaseEventLoop
    came with 5.7), so without it a class whose one test says so, as a skip."""
    suite = getattr(common, name, None)
    if suite is not None:
        return suite

    class Missing:
        def test_suite_exists_in_this_kombu(self):
            pytest.skip(f"kombu {kombu.__version__}'s t/integration/common.py has no {name}")

    return Missing


class TestSheppyEventLoop(_suite("BaseEventLoop")):
    pass


class TestSheppyFailover(common.BaseFailover):
    pass

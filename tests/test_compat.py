"""celery_sheppy.compat on the Celery, kombu and redis-py this run has (every tox cell runs
these, the oldest too): each seam gives the same answer whichever branch it takes."""

import gc
import importlib
import sys
import threading
import uuid
import warnings

import pytest
import redis
from celery import Celery, group, states
from celery.exceptions import ChordError

from celery_sheppy import compat
from celery_sheppy.connect import urls
from t.helpers import client_app


@pytest.fixture
def app():
    app = Celery("compat", set_as_current=False, broker="memory://",
                 backend="cache+memory://")
    yield app
    app.close()


def test_a_chord_error_keeps_its_cause():
    cause = KeyError("part")
    error = compat.chord_error("Dependency x raised KeyError", cause=cause)
    assert isinstance(error, ChordError) and str(error) == "Dependency x raised KeyError"
    assert error.__cause__ is cause


def test_a_chord_body_is_published_once_whichever_way_celery_retries(app):
    sent = []
    assert compat.publish_callback(app, lambda *args: sent.append(args) or "sent", 1, 2) == "sent"
    assert sent == [(1, 2)]


@pytest.mark.parametrize("result_expires, ttl", [(100, 100), (0, 0)])
def test_chord_keys_live_as_long_as_results(redis_server, result_expires, ttl):
    app = client_app(redis_server.sheppy_url(), redis_server.sheppy_url(),
                     result_expires=result_expires)
    try:
        assert compat.chord_ttl(app.backend) == ttl
    finally:
        app.close()


def test_results_are_compressed_only_where_celery_compresses_them(redis_server):
    app = client_app(redis_server.sheppy_url(), redis_server.sheppy_url(),
                     result_compression="zlib")
    try:
        # Celery 5.7 compresses (and sets .compression); older Celery ignores the setting.
        expected = getattr(app.backend, "compression", None)
        assert compat.result_compression(app.backend) == expected in ("zlib", None)
    finally:
        app.close()


def test_a_group_from_a_generator_is_told_apart(app):
    @app.task
    def add(x):
        return x

    assert isinstance(group(add.s(n) for n in range(2)).tasks, compat.LazyTasks)
    assert not isinstance(group([add.s(1)]).tasks, compat.LazyTasks)


def test_a_test_process_may_join_results():
    assert compat.task_join_will_block() is False


def test_a_pooled_connection_is_taken_without_a_deprecation_warning(redis_server):
    pool = redis.BlockingConnectionPool(host="127.0.0.1", port=redis_server.port, timeout=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        connection = compat.pool_connection(pool)
    try:
        connection.send_command("PING")
        assert connection.read_response() in (b"PONG", "PONG")
    finally:
        pool.release(connection)
        pool.disconnect()


def test_a_sentinel_pool_drops_its_idle_connections_on_a_new_primary(redis_server):
    # What redis-py's Sentinel connection calls when the primary changed
    pool = redis.BlockingConnectionPool(host="127.0.0.1", port=redis_server.port, timeout=5)
    client = redis.Redis(connection_pool=pool)
    assert client.ping()
    compat.disconnect_blocking_pool(pool, inuse_connections=False)
    assert client.ping()  # reconnects
    pool.disconnect()


def test_a_cluster_url_works_only_with_a_redis_py_that_has_cluster_transactions():
    if hasattr(redis.cluster, "TransactionStrategy"):
        assert urls.connection_kwargs("sheppy+cluster://h1:7000/")["cluster"]
    else:
        with pytest.raises(ValueError, match=r"needs redis-py 6\.1 or newer.*this is redis-py"):
            urls.connection_kwargs("sheppy+cluster://h1:7000/")


def test_the_flower_hook_refuses_a_flower_without_get_broker(monkeypatch):
    views = pytest.importorskip("flower.views")
    monkeypatch.delattr(views.BaseHandler, "get_broker", raising=False)  # as Flower < 2.2
    monkeypatch.delitem(sys.modules, "celery_sheppy.flower", raising=False)
    with pytest.raises(ImportError, match="needs Flower 2.2 or newer"):
        importlib.import_module("celery_sheppy.flower")  # the one line of flowerconfig.py


def test_a_spare_async_result_collected_ends_no_other_wait_on_its_id(redis_server):
    # Given a result waited on (as a group's member is) and a spare object of the same id
    # (as Celery's apply_async returns and drops)
    app = client_app(redis_server.sheppy_url(), redis_server.sheppy_url())
    try:
        waited = app.AsyncResult("member-1")
        app.backend.add_pending_result(waited, weak=True)
        spare = app.AsyncResult("member-1")
        # When the garbage collector deletes the spare (AsyncResult.__del__)
        del spare
        gc.collect()
        # Then the id's result is still read from the finished stream (celery#4925)
        assert "member-1" in app.backend.result_consumer._watched.values()
        assert waited.id == "member-1"  # alive until here
    finally:
        app.close()


def test_a_second_async_result_of_an_id_is_told_its_result(redis_server):
    # Given a result Celery already keeps a waiter for (a GroupResult made and dropped, as
    # a worker applying a chord makes one), then stored
    app = client_app(redis_server.sheppy_url(), redis_server.sheppy_url())
    try:
        task_id, group_id = str(uuid.uuid4()), str(uuid.uuid4())
        first = app.GroupResult(group_id, [app.AsyncResult(task_id)])
        app.backend.store_result(task_id, 5, states.SUCCESS)

        # When another object of the same id is joined (the chord's header restored by
        # its last part, in that process)
        second = app.GroupResult(group_id, [app.AsyncResult(task_id)])

        # Then it gets the result (before Celery 5.7: one object per id was told, the
        # join timed out)
        assert second.join_native(timeout=30) == [5]
        assert first.results[0].id == task_id  # alive until here
    finally:
        app.close()


def test_a_second_async_result_waiting_before_the_result_comes_gets_it(redis_server):
    # Given a waiter Celery keeps for an id, and a second object of that id waiting
    app = client_app(redis_server.sheppy_url(), redis_server.sheppy_url())
    try:
        task_id = str(uuid.uuid4())
        first = app.AsyncResult(task_id)
        first.then(lambda result: None)
        second = app.AsyncResult(task_id)
        got = []
        waiter = threading.Thread(target=lambda: got.append(second.get(timeout=30)))
        waiter.start()

        # When the result is stored
        app.backend.store_result(task_id, 7, states.SUCCESS)

        # Then both objects have it
        waiter.join(60)
        assert got == [7]
        assert first.get(timeout=30) == 7
    finally:
        app.close()

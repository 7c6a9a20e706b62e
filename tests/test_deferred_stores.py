"""DeferredStores (a prefork child's result stores, replies read by a thread) on a real Redis."""

import logging

import pytest

from celery_sheppy import scripts
from celery_sheppy.backend.deferred_stores import DeferredStores

KEY = "sheppy:tasks:celery:{}"


def record(task_id, status="completed"):
    return f'{{"id":"{task_id}","status":"{status}","created_at":"2026-01-01T00:00:00"}}'


def store_call(task_id, status="completed"):
    """(keys, args) of store_result.lua for a terminal record, as the backend builds them."""
    return ([KEY.format(task_id), "sheppy:finished:celery", "sheppy:celery:celery:states",
             "sheppy:completed:celery", "sheppy:celery:celery:failed"],
            [record(task_id, status), 0, 1, task_id, "0-0", 120, 0])


@pytest.fixture
def client(make_redis_server):
    client = make_redis_server().client()
    yield client
    client.close()


@pytest.fixture
def stores(client):
    script = scripts.registry()["store_result"]
    waited = []

    def store_now(keys, args):
        waited.append(args[3])
        script(client, keys=keys, args=args)

    stores = DeferredStores(client, script, store_now)
    stores.waited = waited
    return stores


def test_stores_land_in_order_and_settle_waits_for_the_last_reply(client, stores):
    scripts.registry()["store_result"](client, *store_call("warm-up"))  # the script is cached
    for i in range(50):
        stores.send(*store_call(f"t{i}"), f"t{i}")
    stores.settle()
    assert all(client.exists(KEY.format(f"t{i}")) for i in range(50))
    assert client.xlen("sheppy:finished:celery") == 51
    assert stores.waited == []  # none needed the waiting path


def test_a_store_whose_connection_was_killed_is_sent_again_waiting(client, stores):
    scripts.registry()["store_result"](client, *store_call("warm-up"))
    stores.send(*store_call("first"), "first")
    stores.settle()
    # When Redis closes the store connection between two stores
    client.client_kill_filter(_type="normal", skipme=True)
    stores.send(*store_call("second"), "second")
    stores.settle()
    # Then the second store, lost with its connection, was sent again and landed
    assert client.exists(KEY.format("second"))
    assert stores.waited == ["second"]


def test_noscript_sends_the_store_again(client, stores):
    client.script_flush()
    stores.send(*store_call("after-flush"), "after-flush")
    stores.settle()
    assert client.exists(KEY.format("after-flush"))
    assert stores.waited == ["after-flush"]


def test_an_error_reply_is_logged_with_the_task_id(client, stores, caplog):
    scripts.registry()["store_result"](client, *store_call("warm-up"))
    client.set(KEY.format("busy"), "x")
    client.config_set("maxmemory", 1)
    try:
        with caplog.at_level(logging.ERROR):
            stores.send(*store_call("refused"), "refused")
            stores.settle()
    finally:
        client.config_set("maxmemory", 0)
    assert "the result of task refused was not stored" in caplog.text
    stores.send(*store_call("later"), "later")
    stores.settle()
    assert client.exists(KEY.format("later"))

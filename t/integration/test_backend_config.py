"""Settings of the sheppy:// result backend: expiry, connection options, queue, ACL, TLS, secrets."""

import json
import ssl
import time
import uuid

import pytest
import redis
from celery import states
from celery.exceptions import ImproperlyConfigured
from celery.result import GroupResult

from celery_sheppy import keys, records
from celery_sheppy.backend import SheppyBackend
from t.helpers import TASKS, celery_cli, client_app, sig, start_worker


def ttl_of(client, key):
    return client.ttl(key)


def test_result_expires_is_the_ttl_of_records_group_records_and_chord_sets(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(), result_expires=600)
    client = redis_server.client()
    backend = app.backend
    task_id, group_id = str(uuid.uuid4()), str(uuid.uuid4())
    backend.store_result(task_id, 1, states.SUCCESS)
    assert 590 < ttl_of(client, keys.task_record("celery", task_id)) <= 600

    parts = [app.AsyncResult(str(uuid.uuid4())) for _ in range(3)]
    backend.apply_chord((group_id, parts), body=None)
    assert 590 < ttl_of(client, keys.chord_pending_set("celery", group_id)) <= 600
    assert 590 < ttl_of(client, keys.group_record("celery", group_id)) <= 600

    saved = GroupResult(str(uuid.uuid4()), parts, app=app)
    saved.save(backend=backend)
    assert 590 < ttl_of(client, keys.group_record("celery", saved.id)) <= 600
    app.close()


def test_a_success_is_never_replaced_and_a_rewrite_keeps_the_first_created_at(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(), result_expires=600)
    client, backend = redis_server.client(), app.backend
    key = lambda task_id: keys.task_record("celery", task_id)  # noqa: E731
    done, started = str(uuid.uuid4()), str(uuid.uuid4())
    backend.store_result(done, 1, states.SUCCESS)
    backend.store_result(done, ValueError("redelivered run"), states.FAILURE)
    assert backend.get_task_meta(done)["status"] == states.SUCCESS
    assert json.loads(client.get(key(done)))["status"] == "completed"
    assert 590 < client.ttl(key(done)) <= 600

    backend.store_result(started, None, states.STARTED)
    first = json.loads(client.get(key(started)))["created_at"]
    time.sleep(0.01)
    backend.store_result(started, 2, states.SUCCESS)
    record = json.loads(client.get(key(started)))
    assert (record["status"], record["created_at"]) == ("completed", first)
    assert record["finished_at"] > first
    app.close()


def test_failures_are_counted_apart_from_sheppys_completed_counter(redis_server):
    queue = f"q{uuid.uuid4().hex[:8]}"
    app = client_app(redis_server.url, redis_server.sheppy_url(),
                     result_backend_transport_options={"queue": queue})
    client, backend = redis_server.client(), app.backend
    ok, bad, revoked, started = (str(uuid.uuid4()) for _ in range(4))
    backend.store_result(ok, 1, states.SUCCESS)
    backend.store_result(bad, ValueError("boom"), states.FAILURE)
    backend.store_result(revoked, None, states.REVOKED)
    backend.store_result(started, None, states.STARTED)
    backend.store_result(ok, ValueError("redelivered run"), states.FAILURE)  # refused: no count
    assert int(client.get(keys.completed_counter(queue))) == 3
    assert int(client.get(keys.failed_counter(queue))) == 1
    app.close()


def test_result_expires_none_means_records_never_expire(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(), result_expires=None)
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, 1, states.SUCCESS)
    assert redis_server.client().ttl(keys.task_record("celery", task_id)) == -1
    app.close()


def test_result_failure_expires_sets_the_ttl_of_failures(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(), result_expires=600,
                     result_failure_expires=60)
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, ValueError("x"), states.FAILURE)
    assert 50 < redis_server.client().ttl(keys.task_record("celery", task_id)) <= 60
    app.close()


def test_task_expires_option_sets_the_ttl_of_its_result(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url())
    backend = SheppyBackend(app=app, url=redis_server.sheppy_url(), expires=30)
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, 1, states.SUCCESS)
    assert 20 < redis_server.client().ttl(keys.task_record("celery", task_id)) <= 30
    app.close()


def test_no_key_written_for_a_chord_is_left_without_a_ttl(redis_server):
    client = redis_server.client(db=3)
    client.flushdb()
    broker, backend = redis_server.url.replace("/0", "/4"), redis_server.sheppy_url(3)
    worker = start_worker(broker, {"result_expires": 900}, backend=backend, pool="threads",
                          concurrency=4)
    app = client_app(broker, backend, result_expires=900)
    try:
        from celery import chord, group

        assert chord([sig(app, "add", i, i) for i in range(10)], sig(app, "tsum"))().get(
            timeout=30) == 90
        result = group(sig(app, "add", 1, 1), sig(app, "add", 2, 2)).delay()
        result.get(timeout=30)
        result.save()
        # queue-level structures of sheppy's layout (streams, counter, registry) are
        # bounded and shared, and sheppy keeps them without a TTL too
        shared = {keys.finished_stream("celery"), keys.completed_counter("celery"),
                  keys.failed_counter("celery"), keys.queue_registry()}
        leftover = [k.decode() for k in client.scan_iter(count=1000)
                    if k.decode() not in shared and client.ttl(k) == -1]
        assert leftover == []
    finally:
        worker.stop()
        app.close()


def test_queue_option_puts_results_under_that_queue(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(),
                     result_backend_transport_options={"queue": "results"})
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, 5, states.SUCCESS)
    assert redis_server.client().exists(keys.task_record("results", task_id))
    assert redis_server.client().hget(keys.queue_registry(), "results") == b"{}"
    assert app.AsyncResult(task_id).get(timeout=5) == 5
    app.close()


def test_queue_defaults_to_task_default_queue(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(), task_default_queue="jobs")
    assert app.backend.queue == "jobs"
    app.close()


def test_bad_queue_names_and_unknown_options_are_refused_clearly(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(),
                     result_backend_transport_options={"queue": "a:b"})
    with pytest.raises(ValueError, match="cannot be used in Sheppy's layout"):
        app.backend
    app = client_app(redis_server.url, redis_server.sheppy_url(),
                     result_backend_transport_options={"visiblity_timeout": 1})
    with pytest.raises(ImproperlyConfigured, match="visiblity_timeout"):
        app.backend
    app = client_app(redis_server.url, redis_server.sheppy_url() + "?sockettimeout=1")
    with pytest.raises(ImproperlyConfigured, match="sockettimeout"):
        app.backend


def test_backend_pointed_at_a_sentinel_says_so(redis_server):
    from t.redis_server import SentinelServer

    sentinel = SentinelServer()
    app = client_app(redis_server.url, f"sheppy://127.0.0.1:{sentinel.port}/0")
    try:
        with pytest.raises(ImproperlyConfigured, match="is a Redis Sentinel"):
            app.backend.store_result(str(uuid.uuid4()), 1, states.SUCCESS)
    finally:
        app.close()
        sentinel.close()


def test_stock_connection_settings_reach_the_connection_pool(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(), redis_socket_timeout=7,
                     redis_socket_connect_timeout=3, redis_backend_health_check_interval=11,
                     redis_max_connections=17, redis_socket_keepalive=True,
                     result_backend_transport_options={"retry_on_timeout": True})
    pool = app.backend.client.connection_pool
    assert pool.connection_kwargs["socket_timeout"] == 7.0
    assert pool.connection_kwargs["socket_connect_timeout"] == 3.0
    assert pool.connection_kwargs["health_check_interval"] == 11
    assert pool.connection_kwargs["socket_keepalive"] is True
    assert pool.connection_kwargs["retry_on_timeout"] is True
    assert pool.max_connections == 17
    # blocking reads get their own, longer timeout
    blocking = app.backend.blocking_client.connection_pool.connection_kwargs
    assert blocking["socket_timeout"] >= 7.0
    app.close()


def test_retry_policy_comes_from_transport_options(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url(),
                     result_backend_transport_options={"retry_policy": {"max_retries": 2}})
    assert app.backend.retry_policy["max_retries"] == 2
    app.close()


def test_public_surface_of_the_stock_redis_backend_exists(redis_server):
    app = client_app(redis_server.url, redis_server.sheppy_url())
    backend = app.backend
    for name in ("get", "mget", "set", "delete", "incr", "expire", "forget", "add_to_chord",
                 "set_chord_size", "apply_chord", "on_chord_part_return", "on_task_call",
                 "client", "ConnectionPool", "max_connections", "connection_class_ssl"):
        assert hasattr(backend, name), name
    assert backend.supports_autoexpire and backend.supports_native_join
    backend.set("sheppy:celery:celery:probe", "v")
    assert backend.get("sheppy:celery:celery:probe") == b"v"
    assert backend.mget(["sheppy:celery:celery:probe"]) == [b"v"]
    assert backend.incr("sheppy:celery:celery:n") == 1
    backend.expire("sheppy:celery:celery:n", 30)
    assert 0 < redis_server.client().ttl("sheppy:celery:celery:n") <= 30
    backend.delete("sheppy:celery:celery:probe")
    assert backend.get("sheppy:celery:celery:probe") is None
    app.close()


# -- credentials and TLS ---------------------------------------------------------------


def test_acl_username_and_password_in_the_url_work_with_a_worker(acl_server):
    port = acl_server.port
    broker = f"redis://alice:s3cret-pw@127.0.0.1:{port}/1"
    backend = f"sheppy://alice:s3cret-pw@127.0.0.1:{port}/0"
    worker = start_worker(broker, backend=backend, pool="threads", concurrency=2)
    app = client_app(broker, backend)
    try:
        assert app.signature(f"{TASKS}.add", args=(2, 2)).delay().get(timeout=30) == 4
        assert "s3cret-pw" not in worker.output()
    finally:
        worker.stop()
        app.close()


def test_wrong_password_gets_a_clear_error_without_the_secret(acl_server):
    app = client_app("memory://", f"sheppy://alice:wrong-pw@127.0.0.1:{acl_server.port}/0")
    with pytest.raises(redis.AuthenticationError) as info:
        app.AsyncResult(str(uuid.uuid4())).get(timeout=1)
    assert "wrong-pw" not in str(info.value)
    app.close()


def test_password_is_masked_in_celery_report_and_as_uri(acl_server):
    backend = f"sheppy://alice:s3cret-pw@127.0.0.1:{acl_server.port}/0"
    app = client_app("memory://", backend)
    assert "s3cret-pw" not in app.backend.as_uri()
    report = celery_cli("memory://", "report", backend=backend)
    assert report.returncode == 0, report.stderr
    assert "sheppy://" in report.stdout and "s3cret-pw" not in report.stdout
    app.close()


def test_sheppys_url_talks_tls_to_a_worker_and_back(tls_server):
    port, ca = tls_server.port, tls_server.ca_file
    broker = f"rediss://127.0.0.1:{port}/1?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    backend = f"sheppys://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    worker = start_worker(broker, backend=backend, pool="threads", concurrency=2)
    app = client_app(broker, backend)
    try:
        assert app.signature(f"{TASKS}.add", args=(3, 4)).delay().get(timeout=30) == 7
    finally:
        worker.stop()
        app.close()


def test_redis_backend_use_ssl_setting_works_like_the_stock_backend(tls_server):
    app = client_app("memory://", f"sheppys://127.0.0.1:{tls_server.port}/0",
                     redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                            "ssl_ca_certs": tls_server.ca_file})
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, "tls", states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=5) == "tls"
    app.close()


def test_tls_with_an_unknown_certificate_authority_fails_clearly(tls_server):
    app = client_app("memory://", f"sheppys://127.0.0.1:{tls_server.port}/0?ssl_cert_reqs=required")
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        app.backend.client.ping()
    app.close()


def test_plain_url_against_a_tls_port_fails_instead_of_hanging(tls_server):
    app = client_app("memory://", f"sheppy://127.0.0.1:{tls_server.port}/0?socket_timeout=2")
    with pytest.raises(redis.ConnectionError):
        app.backend.client.ping()
    app.close()


def test_backend_survives_pickling_for_prefork(redis_server):
    import pickle

    app = client_app(redis_server.url, redis_server.sheppy_url(), result_expires=123)
    clone = pickle.loads(pickle.dumps(app.backend))
    assert clone.expires == 123 and clone.url == redis_server.sheppy_url()
    assert records.sheppy_id("x") == records.sheppy_id("x")
    app.close()

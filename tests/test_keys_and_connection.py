"""keys.py and connect/params.py: names and options, without Redis."""

import ssl

import pytest
import redis

from celery_sheppy import keys
from celery_sheppy.connect import params as connection


def test_key_names_follow_sheppys_layout():
    assert keys.task_record("celery", "abc") == "sheppy:tasks:celery:abc"
    assert keys.pending_stream("celery") == "sheppy:pending:celery"
    assert keys.finished_stream("celery") == "sheppy:finished:celery"
    assert keys.scheduled_set("celery") == "sheppy:scheduled:celery"
    assert keys.completed_counter("celery") == "sheppy:completed:celery"
    assert keys.failed_counter("celery") == "sheppy:celery:celery:failed"
    assert keys.queue_registry() == "sheppy:_queues"
    assert keys.chord_pending_set("celery", "g") == "sheppy:workflows:celery:g:pending"


def test_keys_of_a_hash_tagged_queue_share_its_tag():
    queue = "{celery}"
    for key in (keys.task_record(queue, "x"), keys.pending_stream(queue), keys.finished_stream(queue),
                keys.chord_pending_set(queue, "g"), keys.group_record(queue, "g"),
                keys.state_stream(queue), keys.completed_counter(queue),
                keys.failed_counter(queue)):
        assert key[key.index("{"):key.index("}") + 1] == "{celery}"


@pytest.mark.parametrize("queue", ["celery", "{celery}", "a{b}c", "q.1"])
def test_a_registry_name_gives_back_the_celery_queue_the_broker_keeps_under_it(queue):
    for cluster in (False, True):
        sheppy_name = keys.broker_queue(queue, cluster)
        assert keys.broker_queue(keys.celery_queue(sheppy_name, cluster), cluster) == sheppy_name
    assert keys.celery_queue("{celery}", cluster=True) == "celery"
    assert keys.celery_queue("{celery}") == "{celery}"  # one server: names are kept
    assert keys.celery_queue("{}", cluster=True) == "{}"
    assert keys.celery_queue("{a}{b}", cluster=True) == "{a}{b}"


@pytest.mark.parametrize("name", ["a:b", "a*", "a?", "a[1]", "a\\b", "", "a b"])
def test_queue_names_that_leak_into_sheppys_scan_patterns_are_refused(name):
    with pytest.raises(keys.InvalidQueueName):
        keys.check_queue(name)


@pytest.mark.parametrize("name", ["celery", "{celery}", "high-priority", "q.1"])
def test_ordinary_queue_names_are_accepted(name):
    assert keys.check_queue(name) == name


def test_url_gives_host_port_db_and_credentials():
    kwargs = connection.connection_kwargs("sheppy://user:p%40ss@redis.example:6380/3")
    assert kwargs["host"] == "redis.example" and kwargs["port"] == 6380 and kwargs["db"] == 3
    assert kwargs["username"] == "user" and kwargs["password"] == "p@ss"
    assert kwargs["socket_timeout"] == connection.DEFAULTS["socket_timeout"]


def test_url_query_wins_over_options_and_options_over_defaults():
    kwargs = connection.connection_kwargs(
        "sheppy://h/0?socket_timeout=7", {"socket_timeout": 3, "socket_connect_timeout": 2})
    assert kwargs["socket_timeout"] == 7.0 and kwargs["socket_connect_timeout"] == 2.0


def test_sheppys_url_uses_tls_and_requires_certificates_by_default():
    kwargs = connection.connection_kwargs("sheppys://h:6380/0?ssl_ca_certs=/ca.pem")
    assert kwargs["connection_class"] is redis.SSLConnection
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED and kwargs["ssl_ca_certs"] == "/ca.pem"
    none = connection.connection_kwargs("sheppys://h/0?ssl_cert_reqs=CERT_NONE")
    assert none["ssl_cert_reqs"] == ssl.CERT_NONE


def test_tls_options_on_a_plain_url_are_refused():
    with pytest.raises(ValueError, match="sheppys://"):
        connection.connection_kwargs("sheppy://h/0?ssl_cert_reqs=required")


@pytest.mark.parametrize("url, message", [
    ("redis://h/0", "not a sheppy URL"),
    ("sheppy://h/zero", "must be a number"),
    ("sheppy://h:99999/0", "bad port"),
    ("sheppy://h/0?no_such_option=1", "no_such_option"),
    ("sheppy://h/0?socket_timeout=soon", "socket_timeout"),
    ("sheppys://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
])
def test_bad_urls_get_an_error_naming_the_problem(url, message):
    with pytest.raises(ValueError, match=message):
        connection.connection_kwargs(url)


def test_bad_url_error_does_not_show_the_password():
    with pytest.raises(ValueError) as info:
        connection.connection_kwargs("redis://u:secret@h/0")
    assert "secret" not in str(info.value)


def test_blocking_connections_outlast_their_block():
    kwargs = connection.blocking_kwargs({"socket_timeout": 5.0}, 10)
    assert kwargs["socket_timeout"] == 10 + connection.BLOCKING_READ_MARGIN


def test_redact_hides_only_the_password():
    assert connection.redact("sheppy://u:secret@h:6379/0") == "sheppy://u:**@h:6379/0"
    assert connection.redact("sheppy://h:6379/0") == "sheppy://h:6379/0"

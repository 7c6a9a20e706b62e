"""Celery result backend storing results as sheppy task records: ``result_backend = "sheppy://..."``.

Results of queue ``q`` (``result_backend_transport_options["queue"]``, default
``task_default_queue``) are records ``sheppy:tasks:<q>:<id>``.

:class:`SheppyBackend` owns the connections, the options and the retry policy, and
Celery's key/value surface; its parts:

- ``stores``: writing a result (record, finished or states stream entry, counters, the
  ``acks_late`` ack) in one script; ``deferred_stores``: in prefork pool children, those
  scripts sent without waiting for their reply;
- ``consumer``: :class:`ResultConsumer`, waiting for results on the two streams;
- ``chords``: chords joined natively with a set of the header's task ids.
"""

from functools import partial

import redis
from celery import states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import BackendStoreError, ImproperlyConfigured
from celery.utils.log import get_logger
from celery.utils.time import humanize_seconds
from kombu.utils.functional import retry_over_time
from kombu.utils.objects import cached_property

from .. import compat, keys, patches, records
from ..connect import params, topology_of, urls
from .chords import NativeChords
from .consumer import MAX_BLOCK_SECONDS, ResultConsumer
from .stores import ResultStores

__all__ = ["SheppyBackend", "ResultConsumer"]

logger = get_logger(__name__)

E_LOST = "Connection to Redis lost: Retry (%s/%s) %s."

#: Connection errors that no retry can mend (redis-py counts them as ConnectionError).
NOT_RETRIED = (redis.AuthenticationError, redis.exceptions.AuthorizationError)

# Settings with the stock Redis backend's names -> our connection option names.
_CONF_OPTIONS = {
    "redis_socket_timeout": "socket_timeout",
    "redis_socket_connect_timeout": "socket_connect_timeout",
    "redis_retry_on_timeout": "retry_on_timeout",
    "redis_socket_keepalive": "socket_keepalive",
    "redis_backend_health_check_interval": "health_check_interval",
    "redis_max_connections": "max_connections",
    "redis_username": "username",
    "redis_password": "password",
    "redis_client_name": "client_name",
}

# Options of the stock backend that make no sense for a fixed layout: accepted, ignored.
_IGNORED_TRANSPORT_OPTIONS = {"global_keyprefix", "result_chord_ordered"}
_OWN_TRANSPORT_OPTIONS = {"queue", "retry_policy", "additional_connection_errors"}


class SheppyBackend(ResultStores, NativeChords, AsyncBackendMixin, KeyValueStoreBackend):
    """Celery result backend on Redis, storing sheppy task records."""

    ResultConsumer = ResultConsumer

    #: :pypi:`redis` client module.
    redis = redis
    connection_class_ssl = redis.SSLConnection

    #: Maximum number of connections in the pool (``redis_max_connections``).
    max_connections = None

    supports_autoexpire = True
    supports_native_join = True
    supports_result_compression = True
    supports_failure_expires = True

    #: Redis's largest string value (bytes); bigger results get BackendStoreError.
    _MAX_STR_VALUE_SIZE = 512 * 1024 * 1024

    key_t = str

    def __init__(self, host=None, port=None, db=None, password=None,
                 max_connections=None, url=None, connection_pool=None, **kwargs):
        if host and "://" in host:
            url, host = host, None
        super().__init__(expires_type=int, url=url, **kwargs)
        patches.install()  # often before the broker's first use (patches/group_publish.py)
        conf = self.app.conf
        failure_expires = conf.get("result_failure_expires")
        self.failure_expires = (
            self.expires if failure_expires is None
            else self.prepare_expires(failure_expires, type=int))
        options = self._transport_options
        unknown = set(options) - _OWN_TRANSPORT_OPTIONS - _IGNORED_TRANSPORT_OPTIONS - set(
            params.OPTION_PARSERS) - set(urls.SENTINEL_OPTIONS) - set(
            urls.SENTINEL_NOOP_OPTIONS)
        if unknown:
            raise ImproperlyConfigured(
                f"unknown result_backend_transport_options for sheppy://: {sorted(unknown)}")
        self.queue = keys.check_queue(options.get("queue") or conf.task_default_queue)

        settings = {ours: conf.get(stock) for stock, ours in _CONF_OPTIONS.items()}
        settings.update((k, v) for k, v in options.items() if k in params.OPTION_PARSERS)
        settings.update(conf.get("redis_backend_use_ssl") or {})
        for name, value in (("host", host), ("port", port), ("db", db), ("password", password)):
            if value is not None:
                settings[name] = value
        if max_connections:
            settings["max_connections"] = max_connections
        url = url or "sheppy://"
        tls = _backend_tls(conf.get("result_backend"), url)
        #: The URL as configured (Celery's loader cut "sheppy+" off a Sentinel or Cluster URL).
        self._configured_url = conf.get("result_backend") if tls is not None else url
        topology_options = urls.split_options(options)[1]
        try:
            self.connparams = urls.connection_kwargs(url, settings, topology_options, tls=tls)
        except (ValueError, KeyError) as exc:
            raise ImproperlyConfigured(f"sheppy result backend: {exc}") from None
        #: Server, Sentinel or Cluster (connect/topology.py).
        self.topology = topology_of(self.connparams)
        #: The queues whose namespaces hold this backend's results: its queue, or on a
        #: Redis Cluster its result shards (keys.result_shards).
        self.result_queues = self.topology.result_queues(self.queue)
        self.max_connections = self.connparams.get("max_connections")
        self._ConnectionPool = connection_pool
        self._native_json = self.serializer == "json" and not compat.result_compression(self)

        self.connection_errors = params.CONNECTION_ERRORS
        self.channel_errors = params.CHANNEL_ERRORS
        extra_errors = options.get("additional_connection_errors") or ()
        self.connection_errors += tuple(extra_errors)
        self.result_consumer = self.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages)

    # -- connections -------------------------------------------------------------

    def as_uri(self, include_password=False):
        if urls.kind_of(self._configured_url) == "server":
            return super().as_uri(include_password)
        return self._configured_url if include_password else urls.redact(self._configured_url)

    @cached_property
    def _transport_options(self):
        return self.app.conf.get("result_backend_transport_options") or {}

    @property
    def ConnectionPool(self):
        if self._ConnectionPool is None:
            # Threads beyond max_connections wait for a free connection instead of
            # failing at once (redis-py's plain pool raises MaxConnectionsError).
            self._ConnectionPool = partial(
                self.redis.BlockingConnectionPool, timeout=params.POOL_WAIT_SECONDS)
        return self._ConnectionPool

    def _make_client(self, connparams):
        connparams = dict(connparams, max_connections=self.max_connections
                          or params.DEFAULT_MAX_CONNECTIONS)
        return type(self.topology)(connparams).client(
            blocking_timeout=params.POOL_WAIT_SECONDS, pool_class=self.ConnectionPool)

    @cached_property
    def client(self):
        client = self._make_client(self.connparams)
        where = f"the sheppy:// result backend at {self.topology.describe()}"
        try:
            self.topology.check_server(
                client, where, self.connparams.get("connection_class") is self.connection_class_ssl)
        except self.connection_errors:
            return client  # not reachable now: its first command says so
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        return client

    @cached_property
    def blocking_client(self):
        """A client for XREAD BLOCK, whose socket timeout outlasts the block."""
        return self._make_client(params.blocking_kwargs(self.connparams, MAX_BLOCK_SECONDS))

    def queue_for(self, sheppy_id):
        """The queue whose namespace holds the result, group or chord of ``sheppy_id``."""
        return self.topology.result_queue(self.result_queues, sheppy_id)

    def reset_connections(self):
        self._same_server = None
        for name in ("client", "blocking_client"):
            client = self.__dict__.get(name)
            if client is not None:
                client.connection_pool.reset()

    # -- retry policy -------------------------------------------------------------

    def exception_safe_to_retry(self, exc):
        return isinstance(exc, self.connection_errors) and not isinstance(exc, NOT_RETRIED)

    @cached_property
    def retry_policy(self):
        policy = dict(super().retry_policy)
        policy.update(self._transport_options.get("retry_policy") or {})
        return policy

    def ensure(self, fun, args, **policy):
        retry_policy = dict(self.retry_policy, **policy)
        max_retries = retry_policy.get("max_retries")
        return retry_over_time(
            fun, self.connection_errors, args, {},
            partial(self.on_connection_error, max_retries), **retry_policy)

    def on_connection_error(self, max_retries, exc, intervals, retries):
        if isinstance(exc, NOT_RETRIED):
            raise exc
        tts = next(intervals)
        logger.error(E_LOST.strip(), retries, max_retries or "Inf", humanize_seconds(tts, "in "))
        return tts

    # -- keys ----------------------------------------------------------------------

    def get_key_for_task(self, task_id, key=""):
        if not task_id:
            raise ValueError(f"task_id must not be empty. Got {task_id} instead.")
        sid = records.sheppy_id(task_id)
        return keys.task_record(self.queue_for(sid), sid)

    def get_key_for_group(self, group_id, key=""):
        if not group_id:
            raise ValueError(f"group_id must not be empty. Got {group_id} instead.")
        sid = records.sheppy_id(group_id)
        return keys.group_record(self.queue_for(sid), sid)

    def get_key_for_chord(self, group_id, key=""):
        if not group_id:
            raise ValueError(f"group_id must not be empty. Got {group_id} instead.")
        sid = records.sheppy_id(group_id)
        return keys.chord_pending_set(self.queue_for(sid), sid)

    # -- key/value primitives (the stock backend's public surface) ------------------

    def get(self, key):
        self._settle_stores()  # a task reading its own state reads what it stored
        return self.client.get(key)

    def mget(self, keys):
        self._settle_stores()
        if not self.topology.single_node:
            return self.client.mget_nonatomic(keys)  # one MGET per slot
        return self.client.mget(keys)

    def set(self, key, value, expires=None, **retry_policy):
        self._check_size(value)
        return self.ensure(self._set, (key, value, expires), **retry_policy)

    def _set(self, key, value, expires=None):
        expires = self.expires if expires is None else expires
        return self.client.set(key, value, ex=expires or None)

    def _set_with_state(self, key, value, state):
        if state == states.FAILURE:
            return self.set(key, value, expires=self.failure_expires)
        return self.set(key, value)

    def delete(self, key):
        self.client.delete(key)

    def incr(self, key):
        return self.client.incr(key)

    def expire(self, key, value):
        if not value:
            return self.client.persist(key)
        return self.client.expire(key, value)

    def remove_pending_result(self, result):
        if compat.waited_on_by_another(self, result):
            return result  # Celery before 5.7 would end the other object's wait
        return super().remove_pending_result(result)

    def forget(self, task_id):
        super().forget(task_id)
        self.result_consumer.cancel_for(task_id)

    def on_task_call(self, producer, task_id):
        if not compat.task_join_will_block():
            self.result_consumer.consume_from(task_id)

    def decode_result(self, payload):
        record = records.loads(payload)
        return self.meta_from_decoded(records.meta_from_record(record, self.decode))

    @cached_property
    def _max_value_size(self):
        """The largest value this server takes (bytes): ``proto-max-bulk-len``, capped at 512 MiB.

        A larger value makes Redis drop the connection instead of answering with an error.
        """
        try:
            reply = self.client.config_get("proto-max-bulk-len")
            return min(int(reply["proto-max-bulk-len"]), self._MAX_STR_VALUE_SIZE)
        except (redis.ResponseError, KeyError, ValueError):  # CONFIG denied by ACL, or a proxy
            return self._MAX_STR_VALUE_SIZE

    def _check_size(self, value):
        if value is None:
            return
        size = len(value)
        if isinstance(value, str) and size * 4 > self._max_value_size:
            size = len(value.encode("utf-8"))  # only worth counting bytes near the limit
        if size > self._max_value_size:
            raise BackendStoreError(
                f"result of {size} bytes is over this Redis server's value limit of "
                f"{self._max_value_size} bytes (proto-max-bulk-len)")

    def __reduce__(self, args=(), kwargs=None):
        kwargs = {} if not kwargs else kwargs
        return super().__reduce__(args, dict(kwargs, expires=self.expires, url=self.url))


def _backend_tls(configured, url):
    """TLS for a ``sentinel://``/``cluster://`` URL Celery's loader cut from the configured
    ``sheppys+sentinel://...`` (the ``sheppys`` was taken as the backend's name); else None."""
    if isinstance(configured, str) and configured.partition("+")[2] == url:
        return urls.is_tls(configured)
    return None

"""Celery result backend storing results as sheppy task records: ``result_backend = "sheppy://..."``.

Results of queue ``q`` (``result_backend_transport_options["queue"]``, default
``task_default_queue``) are records ``sheppy:tasks:<q>:<id>``.

:class:`SheppyBackend` is the object Celery calls. It owns the options, the connections
and the retry policy, and Celery's key/value surface; everything else it hands to a part
that owns its state and names what it needs in its constructor:

- ``writer`` (stores.py, :class:`ResultWriter`): a task's state as its record, one script
  per result (record, stream entry, counters, the ``acks_late`` ack); in prefork pool
  children those scripts go out without waiting for their reply (deferred_stores.py);
- ``chords`` (chords.py, :class:`NativeChords`): chords joined natively with a set of the
  header's task ids;
- ``result_consumer`` (consumer.py, :class:`ResultConsumer`, composed as Celery composes
  its own): waiting for results on the two streams;
- ``topology`` (the connect package's :class:`~celery_sheppy.connect.Topology`: Server,
  Sentinel or Cluster, built by ``topology_of``): the one place asked what Redis this is
  (its clients, which queue holds a result, whether one node holds every key);
- ``value_limit`` (value_limit.py, :class:`ValueLimit`): the largest value the server takes.

The writer, the chords and the value limit are made on first use, as the client is.
"""

from functools import partial

import redis
from celery import states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import ImproperlyConfigured
from celery.utils.log import get_logger
from celery.utils.time import humanize_seconds
from kombu.utils.encoding import bytes_to_str, ensure_bytes
from kombu.utils.functional import retry_over_time
from kombu.utils.objects import cached_property

from .. import compat, keys, patches, records
from ..connect import params, topology_of, urls
from .chords import NativeChords
from .consumer import MAX_BLOCK_SECONDS, ResultConsumer
from .stores import ResultWriter
from .value_limit import ValueLimit

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


class SheppyBackend(AsyncBackendMixin, KeyValueStoreBackend):
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
        writer = self.__dict__.get("writer")  # made on first use: nothing to reset before
        if writer is not None:
            writer.reset()
        for name in ("client", "blocking_client"):
            client = self.__dict__.get(name)
            if client is not None:
                client.connection_pool.reset()

    # -- parts made on first use (their client connects on first use) -------------------

    @cached_property
    def writer(self):
        return ResultWriter(self.app, self.client, self.ensure, self.topology, self.result_queues,
                            self.value_limit, self.expires, self.failure_expires)

    @cached_property
    def chords(self):
        return NativeChords(self, self.client, self.ensure, self.topology, self.result_queues,
                            self.value_limit)

    @cached_property
    def value_limit(self):
        return ValueLimit(self.client, self._MAX_STR_VALUE_SIZE)

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
        self.writer.settle()  # a task reading its own state reads what it stored
        return self.client.get(key)

    def mget(self, keys):
        self.writer.settle()
        if self.topology.single_node:
            return self.client.mget(keys)
        return self.client.mget_nonatomic(keys)  # one MGET per slot

    def set(self, key, value, expires=None, **retry_policy):
        self.value_limit.check(value)
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

    def _add_pending_result(self, task_id, result, weak=False):
        super()._add_pending_result(task_id, result, weak=weak)
        if not compat.told_by_celery(self, result):
            self.result_consumer.also_tell(result, weak=weak)

    def mark_as_revoked(self, task_id, reason="", request=None, store_result=True,
                        state=states.REVOKED):
        # A revoke never overwrites a result, as Celery 5.7's worker checks before it stores
        # one. Celery 5.6's stores REVOKED for every id of a revoke broadcast, and its chord
        # error handler revokes a group body, then fails each task of it: the revoke arriving
        # after the failure replaced the chord's error with "revoked".
        if store_result and self.get_state(task_id) in states.READY_STATES:
            store_result = False
        return super().mark_as_revoked(task_id, reason, request=request,
                                       store_result=store_result, state=state)

    def remove_pending_result(self, result):
        waited_on = self.result_consumer.stop_telling(result)
        if waited_on or compat.waited_on_by_another(self, result):
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

    # -- storing results (stores.py) ---------------------------------------------------

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        payload = None if self._native_json else ensure_bytes(self.encode(meta))
        self.writer.store(meta, payload, result, request)
        return result

    # -- chords (chords.py) ------------------------------------------------------------

    def apply_chord(self, header_result_args, body, **kwargs):
        self.ensure_chords_allowed()
        self.chords.apply(header_result_args)

    def set_chord_size(self, group_id, chord_size):
        self.chords.set_size(group_id, chord_size)

    def add_to_chord(self, group_id, result):
        self.chords.add(group_id, result)

    def on_chord_part_return(self, request, state, result, **kwargs):
        self.chords.on_part_return(request)

    def __reduce__(self, args=(), kwargs=None):
        kwargs = {} if not kwargs else kwargs
        return super().__reduce__(args, dict(kwargs, expires=self.expires, url=self.url))


def _backend_tls(configured, url):
    """TLS for a ``sentinel://``/``cluster://`` URL Celery's loader cut from the configured
    ``sheppys+sentinel://...`` (the ``sheppys`` was taken as the backend's name); else None."""
    if isinstance(configured, str) and configured.partition("+")[2] == url:
        return urls.is_tls(configured)
    return None

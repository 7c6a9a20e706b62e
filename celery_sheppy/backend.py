"""Celery result backend storing results as sheppy task records: ``result_backend = "sheppy://..."``.

Results of queue ``q`` (``result_backend_transport_options["queue"]``, default
``task_default_queue``) are records ``sheppy:tasks:<q>:<id>``. Storing one is
one script: record, then an entry in ``sheppy:finished:<q>`` (terminal states)
or ``sheppy:celery:<q>:states`` (others), and sheppy's completed counter.

``AsyncResult.get()`` waits on those two streams with ``XREAD BLOCK`` from the
last id read (:class:`ResultConsumer`): nothing is lost while a connection is
down, and one reader serves every waiter of the process.

Chords are joined natively: :meth:`SheppyBackend.apply_chord` puts the header's
task ids in a set, each finished part removes its own id, and the part that
empties the set fires the body; a part that reports twice removes nothing.
"""

import threading
import time
import uuid
from contextlib import contextmanager
from functools import partial

import redis
from redis.exceptions import RedisClusterException
from celery import states
from celery._state import task_join_will_block
from celery.backends.asynchronous import AsyncBackendMixin, BaseResultConsumer
from celery.backends.base import KeyValueStoreBackend, _create_chord_error_with_cause
from celery.canvas import maybe_signature
from celery.exceptions import BackendStoreError, ChordError, ImproperlyConfigured, Reject
from celery.result import GroupResult, ResultBase, allow_join_result
from celery.utils.functional import _regen
from celery.utils.log import get_logger
from celery.utils.time import humanize_seconds
from kombu.utils.encoding import bytes_to_str, ensure_bytes
from kombu.utils.functional import retry_over_time
from kombu.utils.objects import cached_property

from . import connection, deferred_stores, endpoints, group_publish, keys, records, scripts

logger = get_logger(__name__)

E_LOST = "Connection to Redis lost: Retry (%s/%s) %s."

#: Connection errors that no retry can mend (redis-py counts them as ConnectionError).
NOT_RETRIED = (redis.AuthenticationError, redis.exceptions.AuthorizationError)

#: sheppy keeps finished-stream entries for about this long (seconds).
STREAM_KEEP_SECONDS = 60

#: Longest single XREAD BLOCK of a result waiter, in seconds.
MAX_BLOCK_SECONDS = 1.0

#: On a Redis Cluster, longest wait (s) for a result whose shard is not the one blocked on
#: while several shards are waited for (ResultConsumer._read_shards).
CLUSTER_POLL_SECONDS = 0.05

#: A read position unused for this long (seconds) is renewed before the next wait,
#: so a waiter does not first read a backlog it has no interest in.
POSITION_STALE_SECONDS = 20.0

#: How long a chord's body state is kept when chords do not expire (result_chord_ttl
#: unset): a redelivery of its last part later than this would send the body again.
CHORD_BODY_STATE_SECONDS = 24 * 3600

#: Ids a producer may hold for results nobody waits on before unwaited ones are dropped.
MAX_WATCHED_IDS = 10000

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


class ResultConsumer(BaseResultConsumer):
    """Delivers stored results to waiting ``AsyncResult`` objects.

    One thread at a time reads the finished and states streams with
    ``XREAD BLOCK`` from the last ids it has seen; other waiting threads sleep
    until it is done, then look at their results. Entries for ids this process
    waits on are fetched with one ``MGET``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        backend = self.backend
        self._connection_errors = backend.connection_errors
        self._streams = tuple(stream for queue in backend.result_queues
                              for stream in (keys.finished_stream(queue), keys.state_stream(queue)))
        self._reset_state()

    def _reset_state(self):
        self._lock = threading.Lock()
        self._read_done = threading.Condition(self._lock)
        self._reading = False
        self._watched = {}  # sheppy id -> Celery task id
        self._positions = None  # stream key -> last id read
        self._last_read = 0.0

    def on_after_fork(self):
        self._reset_state()
        self.backend.reset_connections()
        super().on_after_fork()

    def start(self, initial_task_id, **kwargs):
        self.consume_from(initial_task_id)

    def consume_from(self, task_id):
        task_id = bytes_to_str(task_id)
        with self._lock:
            if len(self._watched) >= MAX_WATCHED_IDS:
                self._drop_unwaited()
            self._watched[records.sheppy_id(task_id)] = task_id
            stale = time.monotonic() - self._last_read > POSITION_STALE_SECONDS
        if stale:
            # Before the caller reads the record: a result stored after that read is
            # then announced after this position.
            self._mark_position()

    def cancel_for(self, task_id):
        with self._lock:
            self._watched.pop(records.sheppy_id(bytes_to_str(task_id)), None)

    def _drop_unwaited(self):
        concrete, weak = self._pending_results
        for sid, task_id in list(self._watched.items()):
            if task_id not in concrete and task_id not in weak:
                del self._watched[sid]

    def _mark_position(self):
        client = self.backend.client
        with client.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                pipe.xrevrange(stream, count=1)
            newest = self.backend.ensure(pipe.execute, ())
        positions = {s: (e[0][0] if e else b"0-0") for s, e in zip(self._streams, newest)}
        with self._lock:
            if self._positions is None or time.monotonic() - self._last_read > POSITION_STALE_SECONDS:
                self._positions = positions
                self._last_read = time.monotonic()

    def on_wait_for_pending(self, result, **kwargs):
        for meta in result._iter_meta(**kwargs):
            if meta is not None:
                self.on_state_change(meta, None)

    def on_state_change(self, meta, message):
        super().on_state_change(meta, message)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def drain_events_until(self, p, timeout=None, on_interval=None):
        # Never block for longer than the caller's timeout in one read.
        interval = MAX_BLOCK_SECONDS if timeout is None else max(min(timeout, MAX_BLOCK_SECONDS), 0.01)
        return self.drainer.drain_events_until(
            p, timeout=timeout, interval=interval, on_interval=on_interval)

    def drain_events(self, timeout=None):
        with self._lock:
            if self._reading:
                self._read_done.wait(MAX_BLOCK_SECONDS if timeout is None else timeout)
                return
            self._reading = True
        try:
            with self.reconnect_on_error():
                self._read_once(timeout)
        finally:
            with self._lock:
                self._reading = False
                self._read_done.notify_all()

    def _read_once(self, timeout):
        if self._positions is None:
            self._mark_position()
        block = MAX_BLOCK_SECONDS if timeout is None else min(timeout, MAX_BLOCK_SECONDS)
        with self._lock:
            positions = dict(self._positions)
        if self.backend._shards is None:
            reply = self.backend.blocking_client.xread(
                positions, count=1000, block=max(int(block * 1000), 1) if block > 0 else None)
        else:
            reply = self._read_shards(positions, block)
        wanted = []
        for stream, entries in reply or ():
            stream = bytes_to_str(stream)
            for entry_id, fields in entries:
                positions[stream] = entry_id
                sid = bytes_to_str(fields.get(b"task_id", b""))
                if sid in self._watched:
                    wanted.append(sid)
        with self._lock:
            self._positions = positions
            self._last_read = time.monotonic()
        if wanted:
            self._deliver(list(dict.fromkeys(wanted)))

    def _read_shards(self, positions, block):
        """On a Redis Cluster: read the streams of the result shards holding watched ids.

        One XREAD may name keys of one slot only, so one shard blocks (its two streams);
        several are read without blocking, one pipelined round trip per node, and when
        nothing came the read blocks on the shard with the most waiters for at most
        :data:`CLUSTER_POLL_SECONDS` (the others' results wait that long at most)."""
        backend = self.backend
        with self._lock:
            counts = {}
            for sid in self._watched:
                queue = backend.queue_for(sid)
                counts[queue] = counts.get(queue, 0) + 1
        if not counts:
            if block > 0:
                time.sleep(min(block, CLUSTER_POLL_SECONDS))
            return []
        client = backend.blocking_client

        def streams_of(queue):
            return {stream: positions[stream]
                    for stream in (keys.finished_stream(queue), keys.state_stream(queue))}

        busiest = max(counts, key=counts.get)
        if len(counts) > 1:
            reply = _xread_shards(client, [streams_of(queue) for queue in counts])
            if reply or block <= 0:
                return reply
            block = min(block, CLUSTER_POLL_SECONDS)
        return _xread_shard(client, streams_of(busiest),
                            block=max(int(block * 1000), 1) if block > 0 else None) or []

    def _deliver(self, sids):
        backend = self.backend
        values = backend.mget([keys.task_record(backend.queue_for(sid), sid) for sid in sids])
        for sid, value in zip(sids, values):
            if not value:
                continue
            try:
                meta = backend.decode_result(value)
            except records.RecordError as exc:
                # Other waiters must not suffer; this task's own get() raises when it
                # reads the record.
                logger.error("Unreadable result record %s: %s", sid, exc)
                continue
            self.on_state_change(meta, None)

    @contextmanager
    def reconnect_on_error(self):
        try:
            yield
        except self._connection_errors as lost:
            try:
                self._reconnect()
            except self._connection_errors as exc:
                # The next wait tries again: nothing here needs a restart of the application.
                raise redis.ConnectionError(
                    f"lost the connection to the result backend {self.backend.as_uri()} and "
                    f"could not reconnect within its retry policy: {exc}") from lost

    def _reconnect(self):
        self.backend.ensure(self._resync, ())

    def _resync(self):
        """After a lost connection: fresh connections, then the records of every watched id."""
        self.backend.reset_connections()
        with self._lock:
            sids = list(self._watched)
        for start in range(0, len(sids), 1000):
            self._deliver(sids[start:start + 1000])


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
        group_publish.install()  # often before the broker's first use (see group_publish)
        conf = self.app.conf
        failure_expires = conf.get("result_failure_expires")
        self.failure_expires = (
            self.expires if failure_expires is None
            else self.prepare_expires(failure_expires, type=int))
        options = self._transport_options
        unknown = set(options) - _OWN_TRANSPORT_OPTIONS - _IGNORED_TRANSPORT_OPTIONS - set(
            connection.OPTION_PARSERS) - set(endpoints.SENTINEL_OPTIONS) - set(
            endpoints.SENTINEL_NOOP_OPTIONS)
        if unknown:
            raise ImproperlyConfigured(
                f"unknown result_backend_transport_options for sheppy://: {sorted(unknown)}")
        self.queue = keys.check_queue(options.get("queue") or conf.task_default_queue)

        settings = {ours: conf.get(stock) for stock, ours in _CONF_OPTIONS.items()}
        settings.update((k, v) for k, v in options.items() if k in connection.OPTION_PARSERS)
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
        topology = endpoints.split_options(options)[1]
        try:
            self.connparams = endpoints.connection_kwargs(
                url, settings, topology, tls=tls)
        except (ValueError, KeyError) as exc:
            raise ImproperlyConfigured(f"sheppy result backend: {exc}") from None
        #: Result shards (hash-tagged queue names) on a Redis Cluster, else None (keys.py).
        self._shards = (keys.result_shards(self.queue) if endpoints.is_cluster(self.connparams)
                        else None)
        self.max_connections = self.connparams.get("max_connections")
        self._ConnectionPool = connection_pool
        self._native_json = self.serializer == "json" and not self.compression

        self.connection_errors = connection.CONNECTION_ERRORS
        self.channel_errors = connection.CHANNEL_ERRORS
        extra_errors = options.get("additional_connection_errors") or ()
        self.connection_errors += tuple(extra_errors)
        self._registered_at = {}  # queue -> when it was last put in sheppy's queue registry
        self._same_server = None  # broker on this server and db? (_broker_is_here)
        self.result_consumer = self.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages)

    # -- connections -------------------------------------------------------------

    def as_uri(self, include_password=False):
        if endpoints.kind_of(self._configured_url) == "server":
            return super().as_uri(include_password)
        return self._configured_url if include_password else endpoints.redact(self._configured_url)

    @cached_property
    def _transport_options(self):
        return self.app.conf.get("result_backend_transport_options") or {}

    @property
    def ConnectionPool(self):
        if self._ConnectionPool is None:
            # Threads beyond max_connections wait for a free connection instead of
            # failing at once (redis-py's plain pool raises MaxConnectionsError).
            self._ConnectionPool = partial(
                self.redis.BlockingConnectionPool, timeout=connection.POOL_WAIT_SECONDS)
        return self._ConnectionPool

    def _make_client(self, params):
        params = dict(params, max_connections=self.max_connections
                      or connection.DEFAULT_MAX_CONNECTIONS)
        if "sentinel" not in params and not endpoints.is_cluster(params):
            return self.redis.Redis(connection_pool=self.ConnectionPool(**params))
        return endpoints.make_client(params, blocking_timeout=connection.POOL_WAIT_SECONDS)

    @cached_property
    def client(self):
        client = self._make_client(self.connparams)
        if self._shards is not None:
            return client  # RedisCluster found the cluster's nodes already
        try:
            hello = connection.server_hello(client)
        except self.connection_errors:
            return client  # not reachable now: its first command says so
        try:
            connection.check_standalone(
                hello, f"the sheppy:// result backend at {endpoints.describe(self.connparams)}",
                (self.connparams.get("host"), self.connparams.get("port")),
                self.connparams.get("connection_class") is self.connection_class_ssl)
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        return client

    @cached_property
    def blocking_client(self):
        """A client for XREAD BLOCK, whose socket timeout outlasts the block."""
        return self._make_client(connection.blocking_kwargs(self.connparams, MAX_BLOCK_SECONDS))

    @property
    def result_queues(self):
        """The queues whose namespaces hold this backend's results: its queue, or on a
        Redis Cluster its result shards (keys.result_shards)."""
        return self._shards or (self.queue,)

    def queue_for(self, sheppy_id):
        """The queue whose namespace holds the result, group or chord of ``sheppy_id``."""
        if self._shards is None:
            return self.queue
        return keys.result_shard(self._shards, sheppy_id)

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
        if self._shards is not None:
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

    def forget(self, task_id):
        super().forget(task_id)
        self.result_consumer.cancel_for(task_id)

    def on_task_call(self, producer, task_id):
        if not task_join_will_block():
            self.result_consumer.consume_from(task_id)

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

    # -- results ---------------------------------------------------------------------

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        payload = None if self._native_json else ensure_bytes(self.encode(meta))
        text = records.dumps(records.build_record(meta["task_id"], meta, request, payload))
        try:
            self._check_size(text)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        expires = self.failure_expires if state == states.FAILURE else self.expires
        terminal = state in records.TERMINAL_STATES
        ack = self._delivery_to_ack(request, state, result) if terminal else None
        sid = records.sheppy_id(task_id)
        store = self._store_call(sid, text, terminal, expires, ack, state == states.FAILURE)
        if self._defers_stores(request):
            self._deferred_stores.send(*store, meta["task_id"])
        else:
            self._settle_stores()  # a deferred STARTED must not land after this SUCCESS
            self._write_record(*store)
        self._register_queue(self.queue_for(sid))
        return result

    def _defers_stores(self, request):
        """Whether this store is sent without waiting for its reply (deferred_stores.py):
        in a prefork pool child's main thread, on one server or behind Sentinel, and not
        a chord part's result (the chord's count and join follow on another connection)."""
        return (deferred_stores.in_pool_child() and self._shards is None
                and threading.current_thread() is threading.main_thread()
                and not getattr(request, "chord", None))

    @cached_property
    def _deferred_stores(self):
        return deferred_stores.DeferredStores(self.client, scripts.registry()["store_result"],
                                              self._write_record)

    def _settle_stores(self):
        stores = self.__dict__.get("_deferred_stores")
        if stores is not None:
            stores.settle()

    def _delivery_to_ack(self, request, state, result):
        """``(stream, entry id)`` of the message a terminal result may ack in the same
        script: an ``acks_late`` task's ``sheppy://`` delivery on this Redis, in this
        backend's queue, unless the worker rejects it after this failure; else None."""
        task = self.app.tasks.get(getattr(request, "task", None) or "")
        if not getattr(task, "acks_late", False):
            return None  # acked when the worker accepted it: a second XACK + XDEL would be wasted
        if getattr(request, "chord", None):
            # A chord part: acked by the worker once the chord counted it and, if it was the
            # last, its body was sent; a worker killed before then has it redelivered.
            return None
        if state == states.FAILURE and (_is_reject(result) or not _acks_on_failure(task)):
            return None  # the worker rejects it next: to the dead letters, not acked here
        properties = getattr(request, "properties", None)
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        entry = keys.entry_of_tag(tag)
        if entry is None or not self._broker_is_here:
            return None
        if keys.queue_of_stream(entry[0]) != self.queue_for(records.sheppy_id(request.id)):
            return None  # another queue may live in another cluster slot
        return entry

    @property
    def _broker_is_here(self):
        """True when the broker is ``sheppy://`` on this backend's server and database,
        as the servers say (not the URLs: ``localhost`` and ``127.0.0.1`` are one server,
        two ports behind a proxy may be two). Decided once per connection."""
        if self._same_server is None:
            self._same_server = self._probe_broker()  # None again when it could not tell
        return bool(self._same_server)

    def _probe_broker(self):
        """Write a token with this backend's client, read it with the broker's."""
        url = self.app.conf.broker_write_url or self.app.conf.broker_url
        if isinstance(url, (list, tuple)):
            url = url[0] if url else None
        if not (url or "").split(";")[0].strip().startswith(tuple(connection.SCHEMES)):
            return False
        token = uuid.uuid4().hex
        key = keys.server_probe(token)
        try:
            self.client.set(key, token, ex=10)
            with self.app.connection_for_write() as conn:
                seen = conn.default_channel.client.get(key)
            self.client.delete(key)
        except Exception as exc:  # pylint: disable=broad-except
            logger.warning("sheppy: could not tell whether broker and result backend share "
                           "a Redis database (%r); will ask again with the next result", exc)
            return None
        return bytes_to_str(seen or b"") == token

    def _store_call(self, sid, text, terminal, expires, ack=None, failed=False):
        """``(keys, args)`` of the store_result script storing record ``text``."""
        queue = self.queue_for(sid)
        min_id = f"{int((time.time() - STREAM_KEEP_SECONDS) * 1000)}-0"
        # ack: (stream, entry id) of the task's message, acked in the same script, so a
        # stored result's message is never redelivered (the worker's own ack is a no-op)
        ack_keys, ack_args = ([ack[0]], [keys.CONSUMER_GROUP, ack[1]]) if ack else ([], [])
        return ([keys.task_record(queue, sid), keys.finished_stream(queue),
                 keys.state_stream(queue), keys.completed_counter(queue),
                 keys.failed_counter(queue), *ack_keys],
                [text, int(expires or 0), (2 if failed else 1) if terminal else 0, sid, min_id,
                 2 * STREAM_KEEP_SECONDS, *ack_args])

    def _write_record(self, store_keys, store_args):
        # Retried on a lost connection like the stock backend's set() (retry_policy:
        # 20 tries a second apart by default), so a Redis restart loses no result. A
        # retry after a lost reply rewrites the same record; a stored SUCCESS stays.
        # Called directly, not in a pipeline: redis-py sends SCRIPT EXISTS before every
        # pipeline holding a script, a round trip per result.
        self.ensure(lambda: scripts.registry()["store_result"](
            self.client, keys=store_keys, args=store_args), ())

    def _register_queue(self, queue):
        # sheppy's tools list queues from the registry; it lives in another cluster
        # slot, so it is kept apart from the script, and renewed once a minute.
        now = time.monotonic()
        if now - self._registered_at.get(queue, 0.0) > 60:
            self.ensure(lambda: self.client.hsetnx(keys.queue_registry(), queue, "{}"), ())
            self._registered_at[queue] = now

    def decode_result(self, payload):
        record = records.loads(payload)
        return self.meta_from_decoded(records.meta_from_record(record, self.decode))

    # -- groups and chords --------------------------------------------------------------

    @property
    def _chord_ttl(self):
        return self._chord_result_expires or self.chord_expires or 0

    def apply_chord(self, header_result_args, body, **kwargs):
        self.ensure_chords_allowed()
        group_id, results = header_result_args[0], header_result_args[1]
        if isinstance(results, _regen):
            return self._apply_lazy_chord(group_id)
        header_result = self.app.GroupResult(*header_result_args)
        group_key = self.get_key_for_group(header_result.id)
        chord_key = self.get_key_for_chord(header_result.id)
        added_key = self._chord_added_key(header_result.id)
        group_value = self.encode({"result": header_result.as_tuple()})
        self._check_size(group_value)
        ids = _leaf_ids(header_result)
        ttl = self._chord_ttl

        def record_chord():
            # A re-applied frozen chord reuses its group id: start from an empty set.
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(chord_key, added_key)
                pipe.sadd(chord_key, *ids)
                if ttl:
                    pipe.expire(chord_key, ttl)
                pipe.set(group_key, group_value, ex=ttl or None)
                pipe.execute()

        self.ensure(record_chord, ())

    def _apply_lazy_chord(self, group_id):
        """A chord whose header is a generator: Celery freezes and sends it one task at a
        time (celery#3021), so its ids are unknown now; parts are counted as they finish
        against the size :meth:`set_chord_size` stores before the last task is sent."""
        sid, ttl = records.sheppy_id(group_id), self._chord_ttl
        queue = self.queue_for(sid)

        def record_chord():
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self.get_key_for_chord(group_id), self._chord_added_key(group_id),
                            self.get_key_for_group(group_id), keys.lazy_chord_done(queue, sid))
                pipe.set(keys.lazy_chord_size(queue, sid), -1, ex=ttl or None)
                pipe.execute()

        self.ensure(record_chord, ())

    def set_chord_size(self, group_id, chord_size):
        """Store the size of a generator-header chord; other chords count their pending set."""
        sid = records.sheppy_id(group_id)
        key = keys.lazy_chord_size(self.queue_for(sid), sid)
        # xx: only a chord _apply_lazy_chord started, keepttl: its expiry stays.
        self.ensure(lambda: self.client.set(key, chord_size, xx=True, keepttl=True), ())

    def _chord_added_key(self, group_id):
        sid = records.sheppy_id(group_id)
        return keys.chord_added_list(self.queue_for(sid), sid)

    def add_to_chord(self, group_id, result):
        chord_key = self.get_key_for_chord(group_id)
        added_key = self._chord_added_key(group_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.sadd(chord_key, result.id)
            # The body gets the added tasks' results too, after the header's (as with redis://).
            pipe.rpush(added_key, result.id)
            if self._chord_ttl:
                pipe.expire(chord_key, self._chord_ttl)
                pipe.expire(added_key, self._chord_ttl)
            pipe.execute()

    def on_chord_part_return(self, request, state, result, **kwargs):
        group_id, task_id = request.group, request.id
        if not group_id or not task_id:
            return
        sid = records.sheppy_id(group_id)
        index = "+inf" if request.group_index is None else request.group_index
        queue = self.queue_for(sid)
        body_key = keys.chord_body_state(queue, sid)
        chord_keys = [self.get_key_for_chord(group_id), keys.lazy_chord_done(queue, sid),
                      keys.lazy_chord_size(queue, sid), self._chord_added_key(group_id), body_key]
        body_ttl = self._chord_ttl or CHORD_BODY_STATE_SECONDS
        last = self.ensure(lambda: scripts.registry()["chord_part_return"](
            self.client, keys=chord_keys, args=[task_id, index, self._chord_ttl, body_ttl]), ())
        if last == 1:
            self._fire_chord_body(request, group_id)
            # From here a redelivery of this part (its message is acked next) fires nothing.
            self.ensure(lambda: self.client.set(body_key, "sent", ex=body_ttl), ())

    def _fire_chord_body(self, request, group_id):
        app = self.app
        callback = maybe_signature(request.chord, app=app)
        header = GroupResult.restore(group_id, backend=self)
        if header is not None:
            added = self.client.lrange(self._chord_added_key(group_id), 0, -1)
            header = app.GroupResult(group_id, header.results + [
                app.AsyncResult(bytes_to_str(task_id), backend=self) for task_id in added])
        else:
            # A generator header saved no GroupResult: its parts, in header order.
            sid = records.sheppy_id(group_id)
            done_key = keys.lazy_chord_done(self.queue_for(sid), sid)
            done = self.client.zrange(done_key, 0, -1)
            if done:
                header = app.GroupResult(group_id, [
                    app.AsyncResult(bytes_to_str(task_id), backend=self) for task_id in done])
        if header is None:
            return self.chord_error_from_stack(
                callback, ChordError(f"GroupResult {group_id} no longer exists"))
        try:
            with allow_join_result():
                values = header.join_native(timeout=app.conf.result_chord_join_timeout, propagate=True)
        except Exception as exc:  # pylint: disable=broad-except
            try:
                culprit = next(header._failed_join_report())
                reason = f"Dependency {culprit.id} raised {exc!r}"
            except StopIteration:
                reason = repr(exc)
            logger.exception("Chord %r raised: %r", group_id, reason)
            return self.chord_error_from_stack(
                callback, _create_chord_error_with_cause(message=reason, original_exc=exc))
        try:
            app.amqp._retry_publish(callback.delay, values)
        except Exception as exc:  # pylint: disable=broad-except
            logger.exception("Chord callback for %r raised: %r", group_id, exc)
            return self.chord_error_from_stack(
                callback, _create_chord_error_with_cause(
                    message=f"Callback error: {exc!r}", original_exc=exc))

    def __reduce__(self, args=(), kwargs=None):
        kwargs = {} if not kwargs else kwargs
        return super().__reduce__(args, dict(kwargs, expires=self.expires, url=self.url))


def _is_reject(result):
    """Whether a FAILURE's ``result`` is Celery's Reject: the exception itself, or the dict
    ``encode_result`` makes of it with a non-pickle serializer (json by default)."""
    if isinstance(result, Reject):
        return True
    return (isinstance(result, dict) and result.get("exc_type") == Reject.__name__
            and result.get("exc_module") == Reject.__module__)


def _backend_tls(configured, url):
    """TLS for a ``sentinel://``/``cluster://`` URL Celery's loader cut from the configured
    ``sheppys+sentinel://...`` (the ``sheppys`` was taken as the backend's name); else None."""
    if isinstance(configured, str) and configured.partition("+")[2] == url:
        return endpoints.is_tls(configured)
    return None


def _acks_on_failure(task):
    """Whether the worker acks ``task``'s message when it fails (else it rejects it)."""
    for flag in (getattr(task, "acks_on_failure", None),
                 getattr(task, "acks_on_failure_or_timeout", None)):
        if flag is not None:
            return bool(flag)
    return True


def _leaf_ids(result):
    """Ids of the tasks that report to a chord with header ``result``, in header order."""
    ids = []
    for node in result.results:
        if isinstance(node, GroupResult):
            ids.extend(_leaf_ids(node))
        elif isinstance(node, ResultBase):
            ids.append(node.id)
    return ids


# XREAD names its keys after STREAMS, which redis-py's cluster client cannot find without
# asking a node (COMMAND GETKEYS: one more round trip per XREAD, 4 per task in the bench).
# A shard's streams share a slot, so the node is known here; on a redirection (a slot
# moved) the client's own routing, which follows it and refreshes the slot map, is used.

def _xread_shard(client, streams, block=None):
    """XREAD of one shard's ``streams`` ({stream: last id}) on a RedisCluster."""
    try:
        node = client.get_node_from_key(next(iter(streams)))
        return client.execute_command(
            "XREAD", "COUNT", 1000, *(("BLOCK", block) if block is not None else ()),
            "STREAMS", *streams, *streams.values(), target_nodes=node)
    except (redis.ResponseError, redis.ConnectionError, RedisClusterException):
        return client.xread(streams, count=1000, block=block)


def _xread_shards(client, shards):
    """XREAD of several shards' streams without blocking: one pipeline per node."""
    try:
        by_node = {}
        for streams in shards:
            node = client.get_node_from_key(next(iter(streams)))
            by_node.setdefault(node.name, (node, []))[1].append(streams)
        return [item for node, parts in by_node.values()
                for item in _pipelined_xreads(client.get_redis_connection(node), parts)]
    except (redis.ResponseError, redis.ConnectionError, RedisClusterException):
        return _pipelined_xreads(client, shards)


def _pipelined_xreads(client, shards):
    """Non-blocking XREADs of ``shards`` in one pipeline of ``client``; their entries."""
    with client.pipeline(transaction=False) as pipe:
        for streams in shards:
            pipe.xread(streams, count=1000)
        return [item for part in pipe.execute() for item in part or ()]

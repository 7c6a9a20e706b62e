"""Kombu transport on Redis Streams in Sheppy's layout: ``broker_url = "sheppy://host:port/db"``.

Features
========
* Type: virtual (``kombu.transport.virtual``), asynchronous (Celery's event loop).
* Exchanges: direct, topic, fanout. Bindings live in Redis, so any process routes.
* Priorities: yes (``priority_steps``; the lower number is delivered first, as with
  the stock ``redis://`` transport).
* Queue expiry (``Queue(expires=...)``) and message TTL (``expiration``,
  ``Queue(message_ttl=...)``): yes.

URL
===
::

    sheppy://[[username]:password@]host[:port][/db][?option=value&...]
    sheppys://...    (TLS, options as for ``rediss://``)

The scheme resolves without an import in user code: see ``docs/transport.md``.

Layout
======
Queue ``q`` is the stream ``sheppy:pending:<q>`` (priority step ``n > 0``:
``sheppy:celery:<q>:priority:<n>``), read by consumer group ``workers``; every
channel is one consumer with a unique name. Each entry is ``{"data": <record>}``,
a sheppy task record carrying the kombu message (``records.message_to_record``).

* publish: one ``XADD`` (``XADD`` + ``PEXPIRE`` for an expiring queue); a named
  exchange costs one ``ZSCORE`` more in the same round trip, which proves the
  cached binding table current.
* consume: a blocking ``XREADGROUP`` over all consumed streams, sent on the
  channel's own connection and read when its socket is readable (Celery's hub, or
  ``drain_events``); ``COUNT`` follows the QoS prefetch budget.
* ack: ``XACK`` + ``XDEL``, one round trip. Requeue and restore of unacked
  messages: ``scripts/requeue.lua`` (``XACK`` + ``XDEL`` + ``XADD``, atomic).
* reliability (``docs/delivery.md``): leases renewed by the upkeep (``renew.lua``)
  and expired ones taken over (``reclaim.lua``); dead letters in ``sheppy:dead:<q>``
  (``dead_letter.lua``; :func:`dead_letters`, :func:`replay_dead_letters`,
  :func:`purge_dead_letters`); delayed tasks in ``sheppy:scheduled:<q>``
  (``schedule.lua``, ``promote.lua``); revokes kept in ``sheppy:celery::revoked``.

Transport options
=================
``visibility_timeout`` (s, the lease; default 30), ``max_deliveries`` (default 5),
``delay_threshold`` (s; later tasks wait in ``sheppy:scheduled:<q>``; default 60),
``dead_letter_maxlen``, ``revoke_expires`` (s),
``polling_interval`` (s, longest single block of a read; a new message ends it at
once; default 10),
``priority_steps``, ``queue_order_strategy`` (``round_robin``, ``sorted``,
``priority``), ``max_batch`` (most messages per read without a prefetch limit),
``consumer_reap_after`` (s), ``socket_timeout``, ``socket_connect_timeout``,
``socket_keepalive``, ``health_check_interval``, ``max_connections``,
``retry_on_timeout``, ``client_name``, ``username``, ``password``,
``body_encoding``, ``deadletter_queue``; ``max_retries``, ``interval_start``,
``interval_step``, ``interval_max`` (s): kombu's connection retry, and here also a
publish's retry on a lost connection (off while ``max_retries`` is unset; a batch's
MULTI/EXEC flush then retries with Celery's default publish policy).
``global_keyprefix`` and ``sep`` are refused: sheppy's key layout is fixed.
"""

import base64
import json
import os
import socket
import sys
from collections import deque
from contextlib import nullcontext
from datetime import datetime

from queue import Empty
import threading
from threading import get_ident
from time import monotonic, sleep, time
from uuid import uuid4

import redis
from kombu import serialization
from kombu.exceptions import ChannelError
from kombu.log import get_logger
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.encoding import bytes_to_str
from kombu.utils.functional import retry_over_time
from kombu.utils.eventio import ERR, READ, poll
from kombu.utils.objects import cached_property
from kombu.utils.scheduling import cycle_by_name

from .. import connection as options_mod
from .. import endpoints
from .. import __version__ as celery_sheppy_version
from .. import group_publish, keys, kombu_aliases, records, scripts
from . import orphans
from .streams import PRIORITY_STEPS, QueueStreams

kombu_aliases.register()  # importing the transport is enough for a plain kombu process

logger = get_logger(__name__)

GROUP = keys.CONSUMER_GROUP

#: Separator inside binding members (the stock Redis transport's).
SEP = "\x06\x16"

#: Member of an exchange's binding zset whose score versions the table.
VERSION_MEMBER = "\x00version"

#: A binding of an expiring queue lives this many times the queue's expiry,
#: and never less than MIN_BINDING_MS, and is renewed by its consumer.
BINDING_EXPIRES_FACTOR = 2
MIN_BINDING_MS = 60 * 60 * 1000

#: Most entry ids one lease renewal call carries (Lua's unpack has a limit).
RENEW_CHUNK = 1000

#: Seconds between looks for priority streams a publisher made (the first message of a
#: priority creates its stream): the first such message of a queue waits up to this long.
PRIORITY_LOOK_INTERVAL = 5.0

#: Seconds between looks for due messages in the scheduled set, and most moved per look.
PROMOTE_INTERVAL = 1.0
PROMOTE_BATCH = 500

#: With nothing due, the next look is at the earliest due time, or after this many
#: seconds, or delay_threshold if shorter (a producer may schedule a message due
#: sooner than anything seen, but never sooner than delay_threshold).
PROMOTE_IDLE_LOOK = 30.0

#: Celery's default task_publish_retry_policy: a batch flush's retries while the
#: transport's own ``max_retries`` is unset (Celery's retry covers only the buffering).
CELERY_PUBLISH_RETRY = dict(max_retries=3, interval_start=0, interval_step=0.2, interval_max=0.2)

#: Seconds between reads of the revoked set. A worker that is online gets revokes as
#: broadcasts; the set is for those that were not, and is read in full at start.
REVOKE_READ_INTERVAL = 30.0

#: A scheduled message's record and payload outlive its due time by this many seconds.
SCHEDULED_KEEP_SECONDS = 30 * 24 * 3600

#: Revokes are read again this far back (ms): their times come from publishers' clocks.
REVOKE_CLOCK_SLACK_MS = 60000

#: Longest single block of a read, in seconds, when CLIENT UNBLOCK is denied (the ACL
#: category @dangerous holds it): queue changes wait for the read to end.
UNBLOCK_DENIED_BLOCK = 1.0

#: Content types kombu passes through without a serializer.
RAW_CONTENT_TYPES = ("application/data", "application/text")

#: Options sheppy's fixed layout cannot honour.
REFUSED_OPTIONS = ("global_keyprefix", "sep")

#: Options of the stock redis:// transport that mean nothing here (streams have no
#: unacked hash and fanout is not pub/sub): accepted, so a project can switch URLs only.
STOCK_NOOP_OPTIONS = frozenset({
    "ack_emulation", "unacked_key", "unacked_index_key", "unacked_mutex_key",
    "unacked_mutex_expire", "unacked_restore_limit", "unacked_restore_interval",
    "unacked_restore_throttle", "fanout_prefix", "fanout_patterns", "socket_keepalive_options",
    *endpoints.SENTINEL_NOOP_OPTIONS,
})


#: Options passed to redis-py (names as in ``connection.OPTION_PARSERS``).
CONNECTION_OPTIONS = (
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "health_check_interval",
    "max_connections", "retry_on_timeout", "client_name", "username", "password",
)


class Message(virtual.Message):
    """kombu's virtual message, weakly referable: the orphan ledger watches whether
    Celery still holds it after a lost connection (orphans.py)."""


class QoS(virtual.QoS):
    """Prefetch accounting of kombu's virtual QoS; acks and put-backs go to Redis."""

    def ack(self, delivery_tag):
        self.channel._ack_soon(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        self.channel._reject(delivery_tag, requeue)
        super().ack(delivery_tag)

    def restore_unacked(self):
        """Put every unacked message back in its stream (one round trip)."""
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        if tags:
            try:
                self.channel._put_back(tags)
            except self.channel.connection_errors as exc:
                # Still pending in the group: nothing is lost, and a lease
                # recovery redelivers them. Not worth an emergency dump.
                logger.warning("Could not return %d unacked message(s) to Redis (%r); "
                               "they stay pending in their consumer group", len(tags), exc)
        return []


class Channel(virtual.Channel):
    """A kombu channel: one consumer of the ``workers`` group."""

    QoS = QoS
    Message = Message

    supports_fanout = True
    body_encoding = None  # text bodies are kept as text, bytes as base64 (records.py)

    #: The lease, in seconds: an entry whose consumer has not renewed it for this long
    #: is taken over by another consumer and redelivered. Live consumers renew theirs
    #: every quarter of it, so a task may run for hours without being stolen.
    visibility_timeout = 30
    #: An entry delivered more often than this goes to the dead-letter stream.
    max_deliveries = 5
    #: A message due later than this many seconds waits in sheppy's scheduled set
    #: instead of in a worker's memory.
    delay_threshold = 60
    #: Approximate most entries kept in a queue's dead-letter stream.
    dead_letter_maxlen = 100000
    #: Seconds a revoked task id is remembered (Celery's default for its workers).
    revoke_expires = 10800
    #: Longest single block of a read, in seconds (a new message ends it at once; an
    #: idle consumer sends one XREADGROUP per interval).
    polling_interval = 10.0
    priority_steps = list(PRIORITY_STEPS)
    queue_order_strategy = "round_robin"
    #: Most messages one read asks for when the prefetch count is unlimited.
    max_batch = 100
    #: Seconds a read may wait for room to grow (Celery's event loop only). Under
    #: prefork, room frees one message at a time as the pool accepts tasks: without
    #: the wait, every message would cost one XREADGROUP of COUNT 1.
    read_coalesce = 0.002
    #: Seconds after which an idle consumer with no pending messages is removed.
    consumer_reap_after = 300
    global_keyprefix = ""
    sep = SEP

    socket_timeout = None
    socket_connect_timeout = None
    socket_keepalive = None
    health_check_interval = None
    max_connections = None
    retry_on_timeout = None
    client_name = None
    username = None
    password = None
    #: Sentinel (sheppy+sentinel:// URLs, endpoints.py): the monitored primary's name,
    #: connection options for the Sentinels, and how many peers a Sentinel must see.
    master_name = None
    sentinel_kwargs = None
    min_other_sentinels = None

    from_transport_options = virtual.Channel.from_transport_options + (
        *endpoints.SENTINEL_OPTIONS,
        "visibility_timeout", "polling_interval", "priority_steps", "queue_order_strategy",
        "max_batch", "consumer_reap_after", "global_keyprefix", "sep", *CONNECTION_OPTIONS,
        "max_deliveries", "delay_threshold", "dead_letter_maxlen", "revoke_expires",
        "max_retries", "interval_start", "interval_step", "interval_max",
    )

    #: Publish retry on a lost connection (stock option names; seconds). Off unless
    #: ``max_retries`` is set: Celery's task_publish_retry_policy retries as well.
    max_retries = None
    interval_start = 0
    interval_step = 0.2
    interval_max = 1

    _reading = None  # the blocking connection while a read is outstanding
    _short_since = None  # when a read was first put off for lack of room
    _wake_at = None  # when the hub timer that ends that wait fires
    _hot_streams = frozenset()  # the streams the last read with messages got them from
    _blocking_id = None  # CLIENT ID of the blocking connection, to interrupt its read
    _can_unblock = True  # CLIENT UNBLOCK is allowed (the ACL may deny it)
    _closing = False
    _orphans = None  # the orphan ledger, once the connection was lost (orphans.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in REFUSED_OPTIONS:
            if getattr(self, name) != getattr(Channel, name):
                raise ChannelError(f"transport option {name!r} is not supported by sheppy://: "
                                   "sheppy's key layout is fixed")
        try:
            self.queue_streams = QueueStreams(self.priority_steps)
        except ValueError as exc:
            raise ChannelError(f"sheppy:// broker: {exc}") from None
        self.priority_steps = list(self.queue_streams.steps)
        self.connection_errors = self.connection.connection_errors
        self._pid = os.getpid()
        self._inflight_lock = threading.RLock()
        self.consumer_name = f"{socket.gethostname()}:{self._pid}:{uuid4().hex[:12]}"
        self._queue_cycle = cycle_by_name(self.queue_order_strategy)()
        self._buffer = deque()  # (queue, stream, entry id, data): read, not yet delivered
        self._inflight = {}  # delivery tag -> (stream, entry id, record)
        self._acks_due = []  # tags acked during this turn of the hub's loop, not yet sent
        self._acks_unconfirmed = deque()  # (replies due, {stream: ids}) sent, unanswered
        self._ack_fd = None  # the ack connection's socket, as registered with the hub
        self._deliveries = {}  # delivery tag -> deliveries counted, this one included
        self._claimed = {}  # (stream, entry id) -> group's delivery counter, for reclaimed entries
        self._renewed_at = self._reclaimed_at = self._promoted_at = monotonic()
        self._revoked = {}  # Celery task id -> revoke time (epoch ms)
        self._revoked_read_ms = None  # newest revoke time read
        self._revokes_read_at = 0.0
        self._next_promote_look = 0.0  # epoch seconds
        self._no_ack = set()
        self._expires = {}  # queue -> x-expires (ms)
        self._message_ttl = {}  # queue -> x-message-ttl (ms)
        self._auto_delete = set()
        self._grouped = {}  # queue -> its streams that exist with the group (as last seen)
        self._publish_grouped = set()  # priority streams this channel made sure have the group
        self._discovered_at = monotonic()
        self._read_from = set()  # queues this channel's consumer may appear in
        self._tables = {}  # exchange -> (version, [(routing_key, pattern, queue, expires_ms)])
        self._maintained_at = monotonic()
        self._bindings_renewed = {}  # queue -> when its bindings' lifetime was renewed
        self._reaped_at = 0.0
        self._fd = None
        self._read_sent_at = None
        try:
            hello = options_mod.server_hello(self.client) or {"ping": self.client.ping()}
            options_mod.check_standalone(
                hello, f"the sheppy:// broker at {self._where}",
                (self.connparams.get("host"), self.connparams.get("port")),
                self.connection.client.transport_cls.startswith("sheppys"))
        except ValueError as exc:
            self._disconnect()
            raise ChannelError(str(exc)) from None
        except Exception:
            self._disconnect()
            raise
        self.connection.cycle.add(self)

    @property
    def _where(self):
        return endpoints.describe(self.connparams)

    # -- connections -------------------------------------------------------------------

    @cached_property
    def connparams(self):
        conninfo = self.connection.client
        settings = {name: getattr(self, name) for name in CONNECTION_OPTIONS
                    if getattr(self, name) is not None}
        if conninfo.userid:
            settings["username"] = conninfo.userid
        if conninfo.password:
            password = conninfo.password
            settings["password"] = password() if callable(password) else password
        if isinstance(conninfo.ssl, dict):
            settings.update(conninfo.ssl)
        # kombu parsed the URL (as for redis://): rebuild it for our parser.
        host = conninfo.hostname or "localhost"
        topology_url = endpoints.kombu_url(conninfo)  # sheppy+sentinel://...
        if topology_url or self.master_name:
            return self._topology_params(topology_url or "sheppy://", settings)
        host = f"[{host}]" if ":" in host else host
        scheme = conninfo.transport_cls if conninfo.transport_cls in options_mod.SCHEMES else "sheppy"
        db = str(conninfo.virtual_host or "").strip("/")
        if db and not db.isdigit():
            raise ChannelError(f"sheppy:// broker: the database must be a number, got {db!r}")
        url = f"{scheme}://{host}:{conninfo.port or self.connection.default_port}/{db}"
        try:
            return options_mod.connection_kwargs(url, settings)
        except ValueError as exc:
            raise ChannelError(f"sheppy:// broker: {exc}") from None

    def _topology_params(self, url, settings):
        options = {name: getattr(self, name) for name in endpoints.SENTINEL_OPTIONS
                   if getattr(self, name) is not None}
        try:
            params = endpoints.connection_kwargs(url, settings, options)
        except (ValueError, KeyError) as exc:
            raise ChannelError(f"sheppy:// broker: {exc}") from None
        if endpoints.is_cluster(params):
            raise ChannelError(
                "sheppy:// broker: Redis Cluster (sheppy+cluster://) is supported by the "
                "result backend only, not yet by the broker; see docs/deployment.md")
        return params

    @cached_property
    def pool(self):
        return endpoints.make_pool(self.connparams)

    @cached_property
    def client(self):
        """Client for every command but the blocking read."""
        return redis.Redis(connection_pool=self.pool)

    @cached_property
    def _blocking_pool(self):
        params = options_mod.blocking_kwargs(self.connparams, self.polling_interval)
        params.pop("max_connections", None)
        return endpoints.make_pool(params)

    @cached_property
    def _blocking_conn(self):
        """The connection the blocking XREADGROUP is sent on (never in the pool's rotation)."""
        return self._blocking_pool.get_connection()

    def conn_or_acquire(self, client=None):  # kombu's PublishBatch enters this
        return nullcontext(client or self.client)

    def _disconnect(self):
        for name in ("pool", "_blocking_pool"):
            pool = self.__dict__.pop(name, None)
            if pool is not None:
                pool.disconnect()
        for name in ("client", "_blocking_conn", "_ack_conn"):
            self.__dict__.pop(name, None)
        self._reading = None
        self._blocking_id = None

    def _connect_blocking(self):
        """The blocking connection, connected, with its client id known."""
        conn = self._blocking_conn
        if conn._sock is None or self._blocking_id is None:
            conn.connect()
            self._blocking_id, self._can_unblock = _probe_unblock(conn)
            if not self._can_unblock:
                logger.warning(
                    "sheppy: CLIENT ID or CLIENT UNBLOCK is not allowed for this Redis user "
                    "(ACL @dangerous): reads block for at most %.0f s instead of %.0f s, so a "
                    "change of consumed queues waits for the current read to end",
                    min(self.polling_interval, UNBLOCK_DENIED_BLOCK), self.polling_interval)
        return conn

    def _block_seconds(self):
        """How long one blocking read waits: shorter when it cannot be interrupted."""
        if self._can_unblock:
            return self.polling_interval
        return min(self.polling_interval, UNBLOCK_DENIED_BLOCK)

    def _interrupt_read(self):
        """Make the outstanding blocking read return now (its queues changed); without
        CLIENT UNBLOCK it returns by itself within :meth:`_block_seconds`."""
        if self._reading is not None and self._blocking_id is not None and self._can_unblock:
            try:
                self.client.client_unblock(self._blocking_id)
            except self.connection_errors:
                pass
            except redis.ResponseError as exc:  # NOPERM: an ACL that denies it
                logger.warning("sheppy: CLIENT UNBLOCK refused (%s); reads now block for at "
                               "most %.0f s", exc, UNBLOCK_DENIED_BLOCK)
                self._can_unblock = False

    @cached_property
    def _scripts(self):
        register = self.client.register_script
        return {
            "requeue": register(scripts.REQUEUE),
            "read": register(scripts.READ),
            "purge": register(scripts.PURGE),
            "bind": register(scripts.BIND),
            "reap": register(scripts.REAP_CONSUMERS),
            "renew": register(scripts.RENEW),
            "reclaim": register(scripts.RECLAIM),
            "dead_letter": register(scripts.DEAD_LETTER),
            "replay": register(scripts.REPLAY),
            "schedule": register(scripts.SCHEDULE),
            "promote": register(scripts.PROMOTE),
        }

    # -- streams of a queue ----------------------------------------------------------------

    def priority(self, n):
        return self.queue_streams.step_of(n)

    def _streams(self, queue):
        """The queue's streams, highest priority (lowest step) first."""
        return self.queue_streams.of(queue, expiring=queue in self._expires)

    def _stream_for(self, queue, message, expires=None):
        expiring = bool(expires) if expires is not None else queue in self._expires
        return self.queue_streams.for_message(queue, self._get_message_priority(message),
                                              expiring=expiring)

    def _ensure_groups(self, queue, force=False):
        """Create the queue's pending stream and the group on it, and learn which of its
        priority streams exist: those are made by the first publish of their priority
        (:meth:`_add_put`), so an unused step leaves no key behind."""
        if queue in self._grouped and not force:
            return self._grouped[queue]
        streams = self._streams(queue)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.xgroup_create(streams[0], GROUP, id="0", mkstream=True)
            for stream in streams[1:]:
                pipe.xgroup_create(stream, GROUP, id="0")
            if queue in self._expires:
                pipe.pexpire(streams[0], self._expires[queue])
            replies = pipe.execute(raise_on_error=False)
        present = []
        for stream, reply in zip(streams, replies):
            if not isinstance(reply, Exception) or "BUSYGROUP" in str(reply):
                present.append(stream)
            elif "requires the key to exist" not in str(reply):
                raise reply
        self._grouped[queue] = present
        return present

    def _discover_streams(self, force=False):
        """Look for priority streams that publishers created since the queue was declared;
        a new one joins the read (every PRIORITY_LOOK_INTERVAL seconds)."""
        now = monotonic()
        if not force and now - self._discovered_at < PRIORITY_LOOK_INTERVAL:
            return
        self._discovered_at = now
        absent = {queue: [stream for stream in self._streams(queue)
                          if stream not in self._grouped.get(queue, ())]
                  for queue in self._lease_queues()}
        absent = {queue: streams for queue, streams in absent.items() if streams}
        if not absent:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for streams in absent.values():
                pipe.exists(*streams)
            counts = pipe.execute()
        grown = [queue for queue, count in zip(absent, counts) if count]
        for queue in grown:
            self._ensure_groups(queue, force=True)
        if grown:
            self._interrupt_read()

    # -- declaring ---------------------------------------------------------------------------

    def prepare_queue_arguments(self, arguments, **kwargs):
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue, auto_delete=False, arguments=None, **kwargs):
        arguments = arguments or {}
        for name, table in (("x-expires", self._expires), ("x-message-ttl", self._message_ttl)):
            value = arguments.get(name)
            if value is None:
                table.pop(queue, None)
            else:
                table[queue] = int(value)
        if auto_delete:
            self._auto_delete.add(queue)
        self._ensure_groups(queue, force=True)
        if not auto_delete and queue not in self._expires:
            # sheppy's tools list queues from this hash; transient queues stay out of it.
            self.client.hsetnx(keys.queue_registry(), queue, "{}")

    def _has_queue(self, queue, **kwargs):
        return bool(self.client.exists(*self._streams(queue)))

    def _size(self, queue):
        """Messages waiting in ``queue`` (delivered, unacked ones not counted)."""
        streams = self._streams(queue)
        with self.client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
                pipe.xpending(stream, GROUP)
            replies = pipe.execute(raise_on_error=False)
        size = 0
        for length, pending in zip(replies[::2], replies[1::2]):
            if isinstance(length, int):
                size += length - (pending["pending"] if isinstance(pending, dict) else 0)
        return max(size, 0)

    def _purge(self, queue):
        """Delete the waiting messages of ``queue``, the scheduled (delayed) ones included;
        delivered ones stay. Returns the count."""
        purged = 0
        script = self._scripts["purge"]
        for stream in self._streams(queue):
            while True:
                deleted = script(keys=[stream], args=[GROUP, 10000])
                purged += deleted
                if deleted < 10000:
                    break
        return purged + self._purge_scheduled(queue)

    def _purge_scheduled(self, queue):
        scheduled = keys.scheduled_set(queue)
        script = scripts.registry()["purge_scheduled"]
        purged = 0
        while True:
            ids = [bytes_to_str(member) for member in self.client.zrange(scheduled, 0, 499)]
            if not ids:
                return purged
            pairs = [key for sid in ids for key in (keys.delayed_message(queue, sid),
                                                     keys.task_record(queue, sid))]
            purged += script(self.client, keys=[scheduled, *pairs], args=ids)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        self._drop_queue(queue)

    def _delete(self, queue, exchange, routing_key, pattern, *args, **kwargs):
        self._unbind(exchange, routing_key, pattern, queue)

    def _drop_queue(self, queue):
        self.client.delete(*self.queue_streams.all_known(queue))
        self.client.hdel(keys.queue_registry(), queue)
        self._grouped.pop(queue, None)
        self._auto_delete.discard(queue)

    # -- bindings ------------------------------------------------------------------------------

    def _binding_prefix(self, routing_key, pattern, queue):
        return SEP.join([routing_key or "", pattern or "", queue, ""])

    def _binding_ms(self, queue):
        expires = self._expires.get(queue)
        return max(expires * BINDING_EXPIRES_FACTOR, MIN_BINDING_MS) if expires else 0

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        self._scripts["bind"](
            keys=[keys.exchange_bindings(exchange)],
            args=[self._binding_prefix(routing_key, pattern, queue), self._expires.get(queue, 0),
                  self._binding_ms(queue), "add", VERSION_MEMBER])
        self._tables.pop(exchange, None)
        self._bindings_renewed[queue] = monotonic()  # just given its full lifetime

    def _unbind(self, exchange, routing_key, pattern, queue):
        self._scripts["bind"](
            keys=[keys.exchange_bindings(exchange)],
            args=[self._binding_prefix(routing_key, pattern, queue), 0, 0, "remove",
                  VERSION_MEMBER])
        self._tables.pop(exchange, None)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        _, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._unbind(exchange, routing_key, pattern, queue)

    def _load_table(self, exchange):
        rows = self.client.zrange(keys.exchange_bindings(exchange), 0, -1, withscores=True)
        self._tables[exchange] = table = _parse_table(rows)
        return table

    def get_table(self, exchange):
        version, bindings = self._tables.get(exchange) or self._load_table(exchange)
        return [(rk, pattern, queue) for rk, pattern, queue, _ in bindings]

    def _route(self, exchange, routing_key, bindings):
        """``{queue: expires_ms}`` that a message with ``routing_key`` goes to."""
        exchange_type = self.typeof(exchange)
        table = [(rk, pattern, queue) for rk, pattern, queue, _ in bindings]
        if exchange_type.type == "fanout":
            # Fanout ignores the routing key, except for bindings with a pattern
            # (Celery's event receivers bind "task.#"), as the stock fanout_patterns.
            topic = self.exchange_types["topic"]
            queues = {queue for rk, _, queue in table
                      if not rk or rk == "#" or topic._match(topic.key_to_pattern(rk), routing_key)}
        else:
            queues = exchange_type.lookup(table, exchange, routing_key, None)
        if not queues and self.deadletter_queue:
            queues = {self.deadletter_queue}
        expires = {queue: ms for _, _, queue, ms in bindings}
        return {queue: expires.get(queue, 0) for queue in queues if queue}

    # -- publishing ------------------------------------------------------------------------------

    def create_publish_batch(self, max_size):
        return PublishBatch(self, max_size)

    def _execute_batch(self, commands):
        """Run buffered publish ``commands`` as one MULTI/EXEC: on a lost connection
        none of them ran, so the whole batch is retried (publish retry policy, or
        Celery's default task_publish_retry_policy while ``max_retries`` is unset)."""
        def execute():
            with self.client.pipeline(transaction=True) as pipe:
                for name, args, kwargs in commands:
                    getattr(pipe, name)(*args, **kwargs)
                _execute(pipe)

        return self._retrying_publish(execute, (), {}, CELERY_PUBLISH_RETRY)

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        if self.max_retries is None or kwargs.get("_publish_batch") is not None:
            return self._publish(message, exchange, routing_key, **kwargs)
        # broker_transport_options' retry policy (stock names): retry the whole publish
        # on a lost connection, then let the last error out.
        return self._retrying_publish(self._publish, (message, exchange, routing_key), kwargs)

    def _retrying_publish(self, fun, args, kwargs, default=None):
        """``fun(*args, **kwargs)`` retried on a lost connection by the transport's
        publish retry policy, or ``default`` while ``max_retries`` is unset."""
        policy = default if self.max_retries is None else dict(
            max_retries=self.max_retries, interval_start=self.interval_start,
            interval_step=self.interval_step, interval_max=self.interval_max)
        return retry_over_time(fun, self.connection_errors, args, kwargs,
                               self._on_publish_error, **policy)

    def _on_publish_error(self, exc, intervals, retries):
        wait = next(intervals)
        logger.warning("sheppy: publish failed (%s); retry %d in %.1f s", exc, retries + 1, wait)
        return wait

    def _publish(self, message, exchange, routing_key, **kwargs):
        self._inplace_augment_message(message, exchange, routing_key)
        batch = kwargs.pop("_publish_batch", None)
        if exchange and exchange.endswith(".pidbox"):
            self._remember_revokes(message)
        due = self._due_later(message)
        if due is not None:
            return self._publish_delayed(exchange, routing_key, message, due)
        if not exchange:
            return self._put(routing_key, message, _publish_batch=batch)
        return self._publish_to_exchange(exchange, routing_key, message, batch)

    def _publish_to_exchange(self, exchange, routing_key, message, batch=None):
        """Route ``message`` by ``exchange``'s bindings: into ``batch`` when batching."""
        if batch is not None:
            version, bindings = self._tables.get(exchange) or self._load_table(exchange)
            for queue, expires in self._route(exchange, routing_key, bindings).items():
                self._add_put(batch.add, queue, message, expires)
            return None
        return self._publish_routed(exchange, routing_key, message)

    def _publish_routed(self, exchange, routing_key, message):
        """XADD to the queues bound to ``exchange``; the binding table's version is
        read in the same round trip, and when it changed the delivery is corrected
        (added to newly bound queues, deleted from unbound ones)."""
        version, bindings = self._tables.get(exchange) or self._load_table(exchange)
        routed = self._route(exchange, routing_key, bindings)
        record = records.message_to_record(message)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zscore(keys.exchange_bindings(exchange), VERSION_MEMBER)
            order = []
            for queue, expires in routed.items():
                self._add_put(_adder(pipe), queue, message, expires, record)
                order.append((queue, self._stream_for(queue, message, expires),
                              len(pipe.command_stack) - 1))
            replies = _execute(pipe)
        if replies[0] == version:
            return
        current = self._load_table(exchange)[1]
        now = self._route(exchange, routing_key, current)
        with self.client.pipeline(transaction=False) as pipe:
            for queue, stream, index in order:
                if queue not in now:
                    pipe.xdel(stream, replies[index])
            for queue, expires in now.items():
                if queue not in routed:
                    self._add_put(_adder(pipe), queue, message, expires, record)
            _execute(pipe)

    def _put(self, queue, message, **kwargs):
        due = self._due_later(message)
        if due is not None and queue not in self._expires:
            return self._schedule(queue, message, due)
        batch = kwargs.get("_publish_batch")
        expires = self._expires.get(queue, 0)
        if batch is not None:
            return self._add_put(batch.add, queue, message, expires)
        with self.client.pipeline(transaction=False) as pipe:
            self._add_put(_adder(pipe), queue, message, expires)
            _execute(pipe)

    def _add_put(self, add, queue, message, expires, record=None):
        # An expiring queue (reply, event receiver, pidbox) lives while its consumer
        # renews it: a publish never creates or extends it (NOMKSTREAM), so the queue of
        # a receiver that stopped expires on time and stops collecting messages.
        stream = self._stream_for(queue, message, expires)
        if not expires and stream != keys.pending_stream(queue) and (
                stream not in self._publish_grouped):
            # The first message of a priority makes its stream: with the group, from id 0
            # (BUSYGROUP when it exists is ignored, see _execute).
            add("xgroup_create", stream, GROUP, id="0", mkstream=True)
            self._publish_grouped.add(stream)
            present = self._grouped.get(queue)
            if present is not None and stream not in present:  # this channel reads it too
                self._grouped[queue] = [name for name in self._streams(queue)
                                        if name in present or name == stream]
        add("xadd", stream, {"data": record or records.message_to_record(message)},
            nomkstream=bool(expires))

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        self._publish_to_exchange(exchange, routing_key, message, kwargs.get("_publish_batch"))

    # -- consuming -------------------------------------------------------------------------------

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        self._ensure_groups(queue)
        if queue not in self._expires:
            self._read_revokes(force=True)  # revoked while no worker listened
        self._read_from.add(queue)
        if no_ack:
            self._no_ack.add(queue)
        else:
            self._no_ack.discard(queue)
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        self._queue_cycle.update(self.active_queues)
        self._interrupt_read()
        self._maybe_reap(force=True)
        return result

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        self._queue_cycle.update(self.active_queues)
        self._interrupt_read()
        if queue is not None and queue not in self._active_queues:
            self._no_ack.discard(queue)
            kept = [item for item in self._buffer if item[0] != queue]
            returned = [item for item in self._buffer if item[0] == queue]
            self._buffer = deque(kept)
            if returned:
                self._return_buffered(returned)
            if queue in self._auto_delete:
                self.queue_delete(queue)  # its last consumer is gone, as with AMQP
        return result

    @property
    def active_queues(self):
        return list(dict.fromkeys(self._active_queues))

    def _budget(self):
        budget = self.qos.can_consume_max_estimate()
        if budget is None:
            budget = self.max_batch
        return budget - len(self._buffer)

    def _get(self, queue, timeout=None):
        """One message of ``queue``, highest priority first (``basic_get``)."""
        while True:
            item = next((item for item in self._buffer if item[0] == queue), None)
            if item is None:
                break
            self._buffer.remove(item)  # not while iterating: _receive may drop it
            message = self._receive(*item)
            if message is not None:
                return message
        self._ensure_groups(queue)
        self._read_from.add(queue)
        reply = self._scripts["read"](keys=self._streams(queue),
                                      args=[GROUP, self.consumer_name, 1])
        for stream, entry_id, data in zip(reply[::3], reply[1::3], reply[2::3]):
            message = self._receive(queue, bytes_to_str(stream), bytes_to_str(entry_id), data)
            if message is not None:
                return message
        raise Empty()

    def _start_read(self):
        """Send the blocking XREADGROUP for every consumed queue, if there is room."""
        if self._reading is not None or self._closing or self._buffer:
            return False
        queues = self.active_queues
        if not queues or not self.qos.can_consume():
            return False
        budget = self._budget()
        if budget <= 0 or self._put_off(budget):
            return False
        ordered = self._queue_cycle.consume(len(queues))
        by_queue = [self._ensure_groups(queue) for queue in ordered]
        streams = [stream for present in by_queue for stream in present]
        if not streams:
            return False
        # COUNT is per stream: split the budget among the streams the last read found
        # messages in (usually one: the priority-0 stream), not among all four steps of
        # every queue, which would make most reads COUNT 1.
        hot = len(self._hot_streams.intersection(streams)) or len(streams)
        per_stream = max(1, budget // hot)
        conn = self._connect_blocking()
        conn.send_command("XREADGROUP", "GROUP", GROUP, self.consumer_name, "COUNT", per_stream,
                          "BLOCK", max(int(self._block_seconds() * 1000), 1),
                          "STREAMS", *streams, *([">"] * len(streams)))
        self._reading = conn
        self._read_sent_at = monotonic()
        # Delivery order within a read: by priority step first, then by queue order.
        self._read_order = {stream: (step, index) for index, queue in enumerate(ordered)
                            for step, stream in enumerate(self._streams(queue))}
        self._read_queues = {stream: queue for queue, present in zip(ordered, by_queue)
                             for stream in present}
        return True

    def _put_off(self, budget):
        """True while a small read (under half the prefetch window, the rest still in
        hand) waits up to ``read_coalesce`` for more acks; the hub wakes us then."""
        hub = self.connection.cycle._hub
        prefetch = self.qos.prefetch_count
        if hub is None or not prefetch or budget * 2 >= prefetch:
            self._short_since = None
            return False
        now = monotonic()
        if self._short_since is None:
            self._short_since = now
        remaining = self._short_since + self.read_coalesce - now
        if remaining <= 0:
            self._short_since = None
            return False
        if self._wake_at is None or self._wake_at < now:  # none set, or one that was lost
            # kombu's hub times its poll before on_tick (where we are), so a timer set
            # now would not shorten this poll: wake the hub too, and its next poll
            # waits for the timer; on_tick then starts the read.
            waker = getattr(hub, "_waker", None)
            if waker is None:
                return False
            self._wake_at = now + remaining
            hub.call_later(remaining, self._woken)
            waker.wake()
        return True

    def _woken(self):
        self._wake_at = None

    @property
    def fileno(self):
        conn = self._reading
        sock = getattr(conn, "_sock", None)
        return sock.fileno() if sock is not None else None

    def _finish_read(self):
        """Read the reply of the outstanding XREADGROUP into the buffer."""
        conn = self._reading
        if conn is None:
            return 0
        self._reading = None
        try:
            reply = self.client.parse_response(conn, "XREADGROUP")
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):
                self._grouped.clear()  # a stream expired or was deleted: declare again
                self._publish_grouped.clear()
                if "UNBLOCKED" in str(exc):  # also: the primary became a replica
                    conn.disconnect()  # the next read connects anew (Sentinel: to the new one)
                return 0
            raise
        except self.connection_errors:
            conn.disconnect()
            raise
        entries = []
        for stream, items in reply or ():
            stream = bytes_to_str(stream)
            queue = self._read_queues[stream]
            for entry_id, fields in items:
                entries.append((self._read_order[stream], queue, stream,
                                bytes_to_str(entry_id), (fields or {}).get(b"data")))
        entries.sort(key=lambda entry: entry[0])  # priority first, then queue order; stable
        if entries:
            self._hot_streams = {entry[2] for entry in entries}
            self._queue_cycle.rotate(entries[0][1])
        self._buffer.extend(entry[1:] for entry in entries)
        return len(entries)

    def _deliver_buffered(self, limit=None):
        """Hand buffered messages to their consumers while the QoS allows; returns how many."""
        delivered = 0
        no_ack = []
        try:
            while self._buffer and (limit is None or delivered < limit) and self.qos.can_consume():
                queue, stream, entry_id, data = item = self._buffer.popleft()
                message = self._receive(*item)
                if message is None:
                    continue
                if queue in self._no_ack:
                    no_ack.append(message["properties"]["delivery_tag"])
                delivered += 1
                self.connection._deliver(message, queue)
        finally:
            if no_ack:
                self._ack(no_ack)
        return delivered

    def _receive(self, queue, stream, entry_id, data):
        """The kombu message of an entry, registered as in flight; None if it is dropped
        (undecodable or delivered too often: dead-lettered; expired or revoked: acked)."""
        counter = self._claimed.pop((stream, entry_id), 1)
        try:
            record, message = records.record_to_message(data)
            _check_content_type(message)
        except records.RecordError as exc:
            logger.error("Cannot decode message %s of %s, moved to the dead letters: %s",
                         entry_id, stream, exc)
            self._dead_letter(queue, stream, entry_id, f"undecodable: {exc}", counter, data)
            return None
        deliveries = records.prior_deliveries(record) + counter
        if deliveries > self.max_deliveries:
            logger.error("Message %s of %s was delivered %d times (max_deliveries %d), "
                         "moved to the dead letters", entry_id, stream, deliveries - 1,
                         self.max_deliveries)
            self._dead_letter(queue, stream, entry_id, "max_deliveries exceeded",
                              deliveries - 1, data)
            return None
        tag = f"{entry_id} {stream}"
        self._inflight[tag] = (stream, entry_id, record)
        self._deliveries[tag] = deliveries
        task_id = (message.get("headers") or {}).get("id")
        if task_id is not None and str(task_id) in self._revoked and not self._hand_revoked(task_id):
            logger.info("Task %s was revoked: dropping its message %s", task_id, entry_id)
            self._ack([tag])
            return None
        properties = message["properties"]
        ttl = properties.get("expiration") or self._message_ttl.get(queue)
        if ttl is not None:
            published_ms = int(entry_id.split("-", 1)[0])
            try:
                expired = time() * 1000 - published_ms > float(ttl)
            except (TypeError, ValueError):
                expired = False
            if expired:
                self._ack([tag])
                return None
        properties["delivery_tag"] = tag
        return message

    # -- acknowledging ---------------------------------------------------------------------------

    def _ack_soon(self, tag):
        """Ack ``tag``: from the thread of Celery's hub, at the start of the loop's next
        turn (:meth:`_flush_acks`), together with the other acks of this turn (a prefork
        worker acks each task as its pool accepts it: one round trip each otherwise);
        from any other thread, or without a hub, now."""
        with self._inflight_lock:  # a pool thread's ack must not race lose()
            ledger = self._orphans
            if ledger is None:
                cycle = getattr(self.connection, "cycle", None)  # None once closed
                if cycle is not None and cycle.loop_thread == get_ident():
                    self._acks_due.append(tag)
                    return
                by_stream = self._take_acked([tag])  # no hub, or a pool thread: now
        if ledger is None:
            return self._ack_entries(by_stream)
        if not ledger.ack(tag):  # the connection was lost: a new one sends it
            logger.warning("sheppy: ack of a message this worker no longer holds (%s) "
                           "dropped: it was returned to its stream and may run again", tag)

    def _reject(self, tag, requeue):
        """``reject(requeue=True)``: back to its stream, the delivery counted; otherwise to
        its queue's dead letters, as with a dead-letter exchange on AMQP."""
        with self._inflight_lock:
            ledger = self._orphans
        if ledger is not None:
            if not ledger.reject(tag, requeue):
                logger.warning("sheppy: reject of a message this worker no longer holds "
                               "(%s) dropped", tag)
        elif requeue:
            self._put_back([tag], count=True)
        else:
            self._dead_letter_tag(tag, "rejected")

    def _flush_acks(self):
        """Send the acks of this loop turn on the ack connection without waiting for the
        replies: the hub reads them when they come (:meth:`_confirm_acks`)."""
        if not self._acks_due:
            return
        tags, self._acks_due = self._acks_due, []
        by_stream = self._take_acked(tags)
        if not by_stream:
            return
        hub = self.connection.cycle._hub
        if hub is None:
            return self._ack_entries(by_stream)
        commands = _ack_commands(by_stream)
        conn = self._ack_conn
        try:
            if conn._sock is None:
                conn.connect()
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except self.connection_errors:
            # the usual way, with the acks sent before that were not confirmed
            return self._ack_entries(_merged([*self._lost_ack_conn(), by_stream]))
        self._acks_unconfirmed.append((len(commands), by_stream))
        fd = conn._sock.fileno()
        if self._ack_fd != fd:
            self._ack_fd = fd
            hub.add_reader(fd, self._confirm_acks)

    def _confirm_acks(self, *_, block=False):
        """Read the replies of sent acks (those that arrived; all of them if ``block``).
        If the connection was lost, the unconfirmed acks are sent again the usual way:
        XACK and XDEL are idempotent."""
        if not self._acks_unconfirmed:
            if not block and "_ack_conn" in self.__dict__:
                # Readable with nothing asked: the server closed it. Reconnected on next use.
                self._lost_ack_conn()
            return
        conn = self._ack_conn
        try:
            while self._acks_unconfirmed and (block or conn.can_read(timeout=0)):
                replies, by_stream = self._acks_unconfirmed[0]
                for _ in range(replies):
                    try:
                        conn.read_response()
                    except redis.ResponseError as exc:
                        logger.warning("sheppy: an ack failed: %r", exc)
                self._acks_unconfirmed.popleft()
        except self.connection_errors:
            self._ack_entries(_merged(self._lost_ack_conn()))

    def _lost_ack_conn(self):
        """Drop the ack connection; returns the acks sent on it and not confirmed
        (``[{stream: [entry id]}]``), which the caller sends again."""
        hub = getattr(self.connection, "cycle", None) and self.connection.cycle._hub
        if self._ack_fd is not None and hub is not None:
            hub.remove_reader(self._ack_fd)
        self._ack_fd = None
        unconfirmed = [by_stream for _, by_stream in self._acks_unconfirmed]
        self._acks_unconfirmed.clear()
        self._ack_conn.disconnect()
        return unconfirmed

    @cached_property
    def _ack_conn(self):
        """The connection acks are sent on without waiting (see :meth:`_flush_acks`)."""
        return self._blocking_pool.get_connection()

    def _ack(self, tags):
        self._ack_entries(self._take_acked(tags))

    def _take_acked(self, tags):
        """``{stream: [entry id, ...]}`` of ``tags``, which stop being in flight."""
        by_stream = {}
        unknown = 0
        for tag in tags:
            entry, _ = self._pop_inflight(tag)
            if entry is None:
                unknown += 1
            else:
                by_stream.setdefault(entry[0], []).append(entry[1])
        if unknown:
            logger.warning("sheppy: %d ack(s) of messages this channel no longer holds dropped "
                           "(returned to their stream when it closed): they may run again",
                           unknown)
        return by_stream

    def _ack_entries(self, by_stream):
        """XACK + XDEL now. If Redis cannot be reached the acks are kept by the process's
        orphan ledger and sent by the upkeep once it can: an ack is never dropped."""
        if not by_stream:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for command in _ack_commands(by_stream):
                    pipe.execute_command(*command)
                pipe.execute()
        except self.connection_errors as exc:
            count = sum(len(ids) for ids in by_stream.values())
            logger.warning("sheppy: %d ack(s) could not reach Redis (%r): kept, and sent once "
                           "it answers again", count, exc)
            orphans.ledger_for(self.connparams, self.visibility_timeout).retry_acks(by_stream)

    def _put_back(self, tags, count=False):
        """Requeue delivered messages. ``count``: the delivery counts (a rejected
        message was tried); otherwise (a restore of unstarted messages) it is not."""
        entries = []
        for tag in tags:
            entry, deliveries = self._pop_inflight(tag)
            if entry is not None:
                if not count:
                    deliveries = records.prior_deliveries(entry[2])
                entries.append((*entry, deliveries))
        self._requeue(entries)

    def _pop_inflight(self, tag):
        """``(entry or None, deliveries or None)`` of ``tag``, which stops being in flight."""
        with self._inflight_lock:
            return self._inflight.pop(tag, None), self._deliveries.pop(tag, None)

    def _dead_letter_tag(self, tag, reason):
        entry, deliveries = self._pop_inflight(tag)
        if entry is None:
            return
        deliveries = deliveries or 1
        stream, entry_id, record = entry
        self._dead_letter(keys.queue_of_stream(stream), stream, entry_id, reason, deliveries,
                          records.dumps(record))

    def _dead_letter(self, queue, stream, entry_id, reason, deliveries, data):
        """Move one delivered entry to its queue's dead-letter stream (acked in the same step)."""
        queue = queue or keys.queue_of_stream(stream)
        if queue is None:  # not a queue stream we know: just ack it
            self._ack_entry(stream, entry_id)
            return
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        self._scripts["dead_letter"](
            keys=[stream, keys.dead_letter_stream(queue)],
            args=[GROUP, entry_id, reason, int(deliveries), data or "", self.dead_letter_maxlen])

    def _ack_entry(self, stream, entry_id):
        with self.client.pipeline(transaction=False) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            pipe.execute()

    def _return_buffered(self, items):
        """Put read-but-undelivered entries back (they are pending for this consumer).

        They are marked redelivered too: the flag means "may have been seen before",
        and Celery only uses it to check for a stored result first.
        """
        entries = []
        for queue, stream, entry_id, data in items:
            try:
                record, _ = records.record_to_message(data)
            except records.RecordError:
                continue
            entries.append((stream, entry_id, record, None))
        self._requeue(entries)

    def _requeue(self, entries):
        if not entries:
            return
        script = self._scripts["requeue"]
        with self.client.pipeline(transaction=False) as pipe:
            for stream, entry_id, record, deliveries in entries:
                script(keys=[stream],
                       args=[GROUP, entry_id, records.mark_redelivered(record, deliveries)],
                       client=pipe)
            pipe.execute()

    # -- upkeep -------------------------------------------------------------------------------

    def maintain(self):
        """Renew expiring queues and their bindings; remove dead consumers. Cheap when idle."""
        now = monotonic()
        consumed = [queue for queue in self.active_queues if queue in self._expires]
        if consumed:
            every = min(self._expires[queue] for queue in consumed) / 1000 / 3
            if now - self._maintained_at >= every:
                self._maintained_at = now
                self._renew(consumed)
        orphans.upkeep()  # before reclaiming: leases of what this worker still runs first
        self._maybe_reap()
        self._discover_streams()
        self._renew_leases()
        self._reclaim_expired()
        self._promote_due()
        self._read_revokes()

    def _renew(self, queues):
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for stream in self._streams(queue):
                    pipe.pexpire(stream, self._expires[queue])
                for exchange, routing_key, arguments in self.state.queue_bindings(queue):
                    _, pattern, _ = self.typeof(exchange).prepare_bind(
                        queue, exchange, routing_key, arguments)
                    if self._binding_ms(queue) and self._binding_due(queue):
                        self._scripts["bind"](
                            keys=[keys.exchange_bindings(exchange)],
                            args=[self._binding_prefix(routing_key, pattern, queue),
                                  self._expires[queue], self._binding_ms(queue), "add",
                                  VERSION_MEMBER],
                            client=pipe)
            pipe.execute()

    def _binding_due(self, queue):
        # Bindings live >= MIN_BINDING_MS: renewing them every third of that is enough.
        if monotonic() - self._bindings_renewed.get(queue, 0.0) < self._binding_ms(queue) / 3000:
            return False
        self._bindings_renewed[queue] = monotonic()
        return True

    def _maybe_reap(self, force=False, own=False):
        now = monotonic()
        if not force and not own and now - self._reaped_at < self.consumer_reap_after / 2:
            return
        self._reaped_at = now
        queues = sorted(self._read_from) if own else self.active_queues
        if not queues:
            return
        script = self._scripts["reap"]
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for stream in self._streams(queue):
                    script(keys=[stream], args=[GROUP, int(self.consumer_reap_after * 1000),
                                                self.consumer_name if own else ""], client=pipe)
            pipe.execute(raise_on_error=False)

    def read_overdue(self):
        """True when the outstanding read's reply is late enough to suspect a dead socket."""
        sent = self._read_sent_at
        if self._reading is None or sent is None:
            return False
        grace = self._block_seconds() + (self.connparams.get("health_check_interval") or 25)
        return monotonic() - sent > grace


    # -- reliability: leases -------------------------------------------------------------------

    def _lease_queues(self):
        """Consumed queues whose messages are leased (expiring queues are not: their
        messages are broadcasts for one consumer)."""
        return [queue for queue in self.active_queues if queue not in self._expires]

    def _held_entries(self):
        """``{stream: [entry id, ...]}`` of every entry this channel holds (buffered or delivered)."""
        held = {}
        for stream, entry_id, _ in self._inflight.values():
            held.setdefault(stream, []).append(entry_id)
        for _, stream, entry_id, _ in self._buffer:
            held.setdefault(stream, []).append(entry_id)
        return held

    def _renew_leases(self, force=False):
        """Reset the idle time of the entries this channel holds, every quarter of the lease."""
        now = monotonic()
        if not force and now - self._renewed_at < self.visibility_timeout / 4:
            return
        self._renewed_at = now
        held = self._held_entries()
        if not held:
            return
        script = self._scripts["renew"]
        with self.client.pipeline(transaction=False) as pipe:
            for stream, ids in held.items():
                for start in range(0, len(ids), RENEW_CHUNK):
                    script(keys=[stream], args=[GROUP, self.consumer_name,
                                                *ids[start:start + RENEW_CHUNK]], client=pipe)
            replies = pipe.execute(raise_on_error=False)
        lost = sum(len(reply) for reply in replies if isinstance(reply, list))
        if lost:
            logger.debug("sheppy: %d held message(s) were acked or taken over meanwhile", lost)

    def _reclaim_expired(self):
        """Take over entries of consumers that stopped renewing them (XAUTOCLAIM)."""
        now = monotonic()
        # every half lease: a dead consumer's messages come back within 1.5 leases
        if now - self._reclaimed_at < max(self.visibility_timeout / 2, 1.0):
            return
        self._reclaimed_at = now
        queues = self._lease_queues()
        budget = self._budget()
        if not queues or budget <= 0 or not self.qos.can_consume():
            return
        script = self._scripts["reclaim"]
        lease_ms = max(int(self.visibility_timeout * 1000), 1)
        taken = 0
        for queue in queues:  # no pipeline: redis-py sends SCRIPT EXISTS before those
            if budget <= 0:
                break
            streams = self._streams(queue)
            try:
                reply = script(keys=streams, args=[GROUP, self.consumer_name, lease_ms, budget])
            except redis.ResponseError as exc:  # e.g. NOGROUP: a stream was deleted
                logger.debug("sheppy: reclaim on %s failed: %r", queue, exc)
                continue
            for index, entry_id, data, counter in zip(*[iter(reply)] * 4):
                stream, entry_id = streams[int(index) - 1], bytes_to_str(entry_id)
                if orphans.still_held(f"{entry_id} {stream}", self.consumer_name):
                    continue  # this worker still runs it since a lost connection: not stolen
                self._claimed[(stream, entry_id)] = int(counter)
                self._buffer.append((queue, stream, entry_id, _flag_redelivered(data)))
                taken += 1
                budget -= 1
        if taken:
            logger.warning("sheppy: took over %d message(s) whose lease of %ss expired",
                           taken, self.visibility_timeout)

    # -- reliability: delayed delivery ------------------------------------------------------------

    def _due_later(self, message):
        """Due time (epoch seconds) of a task message due later than ``delay_threshold``."""
        headers = message.get("headers") or {}
        eta = headers.get("eta")
        if not eta or not headers.get("task") or not headers.get("id"):
            return None
        try:
            due = datetime.fromisoformat(records.aware_iso(eta)).timestamp()
        except (TypeError, ValueError):
            return None
        return due if due - time() > self.delay_threshold else None

    def _publish_delayed(self, exchange, routing_key, message, due):
        if not exchange:
            return self._put(routing_key, message)
        routed = self._route(exchange, routing_key, self._load_table(exchange)[1])
        for queue, expires in routed.items():
            if expires:
                with self.client.pipeline(transaction=False) as pipe:
                    self._add_put(_adder(pipe), queue, message, expires)
                    _execute(pipe)
            else:
                self._schedule(queue, message, due)
        return None

    def _schedule(self, queue, message, due):
        """Keep ``message`` in sheppy's scheduled set until ``due`` (epoch seconds)."""
        data = records.message_to_record(message)
        sid = records.loads(data)["id"]
        self._scripts["schedule"](
            keys=[keys.scheduled_set(queue), keys.task_record(queue, sid),
                  keys.delayed_message(queue, sid)],
            args=[sid, repr(float(due)), records.scheduled_record(data),
                  data, self._stream_for(queue, message),
                  int(max(due - time(), 0)) + SCHEDULED_KEEP_SECONDS])

    def _promote_due(self):
        """Move due messages of the consumed queues from the scheduled set to their streams."""
        now = monotonic()
        if now - self._promoted_at < PROMOTE_INTERVAL or time() < self._next_promote_look:
            return
        self._promoted_at = now
        queues = self._lease_queues()
        if not queues:
            return
        # One ZRANGE per queue while nothing is due (the idle case), then the due batch.
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zrange(keys.scheduled_set(queue), 0, 0, withscores=True)
            firsts = pipe.execute(raise_on_error=False)
        earliest = {queue: rows[0][1] for queue, rows in zip(queues, firsts)
                    if isinstance(rows, list) and rows}
        due_queues = [queue for queue, at in earliest.items() if at <= time()]
        if not due_queues:
            # Anything scheduled later is due more than delay_threshold after it is sent.
            look = time() + min(PROMOTE_IDLE_LOOK, self.delay_threshold)
            self._next_promote_look = min([*earliest.values(), look])
            return
        self._next_promote_look = 0.0  # more may be due: look again after PROMOTE_INTERVAL
        with self.client.pipeline(transaction=False) as pipe:
            for queue in due_queues:
                pipe.zrangebyscore(keys.scheduled_set(queue), "-inf", time(), start=0,
                                   num=PROMOTE_BATCH)
            due = pipe.execute(raise_on_error=False)
        script = self._scripts["promote"]
        with self.client.pipeline(transaction=False) as pipe:
            for queue, members in zip(due_queues, due):
                if not isinstance(members, list):
                    continue
                for member in members:
                    sid = bytes_to_str(member)
                    script(keys=[keys.scheduled_set(queue), keys.delayed_message(queue, sid),
                                 keys.task_record(queue, sid), *self._streams(queue)],
                           args=[sid, GROUP], client=pipe)
            pipe.execute(raise_on_error=False)

    # -- reliability: durable revokes -------------------------------------------------------------

    def _remember_revokes(self, message):
        """Keep the ids of a ``revoke`` broadcast in Redis, for workers that are not listening."""
        ids = _revoked_ids(message)
        if not ids:
            return
        now_ms = int(time() * 1000)
        expires_ms = int(self.revoke_expires * 1000)
        key = keys.revoked_set()
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {task_id: now_ms for task_id in ids})
            pipe.zremrangebyscore(key, "-inf", now_ms - expires_ms)
            pipe.pexpire(key, expires_ms)
            pipe.execute()
        for task_id in ids:
            self._revoked[task_id] = now_ms

    def _read_revokes(self, force=False):
        """Read revokes newer than the last read (all of them the first time)."""
        if not force and (self._revoked_read_ms is None and not self._lease_queues()):
            return
        if not force and monotonic() - self._revokes_read_at < REVOKE_READ_INTERVAL:
            return
        self._revokes_read_at = monotonic()
        now_ms = time() * 1000
        expires_ms = self.revoke_expires * 1000
        since = self._revoked_read_ms
        # revoke times come from publishers' clocks: read a minute back every time
        start = now_ms - expires_ms if since is None else since - REVOKE_CLOCK_SLACK_MS
        rows = self.client.zrangebyscore(keys.revoked_set(), start, "+inf", withscores=True)
        newest = since or now_ms
        for member, score in rows:
            self._revoked[bytes_to_str(member)] = score
            newest = max(newest, score)
        self._revoked_read_ms = min(newest, now_ms)
        if len(self._revoked) > 1000 and rows:
            self._revoked = {task_id: at for task_id, at in self._revoked.items()
                             if at > now_ms - expires_ms}

    def _hand_revoked(self, task_id):
        """In a Celery worker, let Celery itself handle a revoked task (it stores REVOKED
        and acks); returns False elsewhere."""
        state = sys.modules.get("celery.worker.state")
        if state is None:
            return False
        state.revoked.add(str(task_id))
        return True

    # -- dead letters -----------------------------------------------------------------------------

    def dead_letters(self, queue, count=100, start="-"):
        """Dead letters of ``queue``, oldest first: dicts with ``id``, ``reason``,
        ``deliveries`` (int), ``stream``, ``entry`` and ``data`` (the original entry)."""
        rows = self.client.xrange(keys.dead_letter_stream(keys.check_queue(queue)),
                                  min=start, count=count)
        return [_dead_letter_dict(entry_id, fields) for entry_id, fields in rows]

    def replay_dead_letters(self, queue, ids=None):
        """Put dead letters of ``queue`` (all, or those ``ids``) back in their streams, with
        their delivery count cleared. Returns how many went back."""
        dead = keys.dead_letter_stream(keys.check_queue(queue))
        self._ensure_groups(queue)
        replayed = 0
        for letter in self._letters(queue, ids):
            stream = letter["stream"]
            if keys.queue_of_stream(stream) != queue:
                stream = keys.pending_stream(queue)
            if self._scripts["replay"](keys=[dead, stream],
                                       args=[letter["id"], records.reset_deliveries(letter["data"]),
                                             GROUP]):
                replayed += 1
        return replayed

    def purge_dead_letters(self, queue, ids=None):
        """Delete dead letters of ``queue`` (all, or those ``ids``). Returns how many."""
        dead = keys.dead_letter_stream(keys.check_queue(queue))
        if ids is None:
            count = self.client.xlen(dead)
            self.client.delete(dead)
            return count
        return self.client.xdel(dead, *ids) if ids else 0

    def _letters(self, queue, ids):
        if ids is not None:
            dead = keys.dead_letter_stream(queue)
            with self.client.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xrange(dead, min=entry_id, max=entry_id)
                rows = [row for reply in pipe.execute() for row in reply]
            yield from (_dead_letter_dict(entry_id, fields) for entry_id, fields in rows)
            return
        start = "-"
        while True:
            letters = self.dead_letters(queue, count=1000, start=start)
            yield from letters
            if len(letters) < 1000:
                return
            start = "(" + letters[-1]["id"]

    # -- closing --------------------------------------------------------------------------------

    def lose(self):
        """The connection is gone (kombu's ``Connection.collect`` after a connection error):
        close without talking to Redis. What Celery holds goes to the orphan ledger, which
        acks it on a new connection when Celery does (orphans.py); nothing is requeued
        that the worker may still run."""
        if self.closed:
            return
        self.closed = self._closing = True
        cycle = getattr(self.connection, "cycle", None)
        if cycle is not None:
            cycle.discard(self)
        qos = self._qos
        messages = dict(qos._delivered) if qos is not None else {}
        if qos is not None:
            qos._delivered.clear()
            qos._dirty.clear()
        with self._inflight_lock:  # no pool thread acks meanwhile: each ack goes one way
            if os.getpid() == self._pid:  # not in a forked child: those are the parent's
                unsent = self._take_acked(self._acks_due)
                for _, by_stream in self._acks_unconfirmed:
                    for stream, ids in by_stream.items():
                        unsent.setdefault(stream, []).extend(ids)
                ledger = orphans.ledger_for(self.connparams, self.visibility_timeout)
                ledger.adopt(self.consumer_name, dict(self._inflight), dict(self._deliveries),
                             messages, list(self._buffer), unsent)
                self._orphans = ledger
            self._acks_due, self._acks_unconfirmed = [], deque()
            self._inflight.clear()
            self._deliveries.clear()
            self._buffer.clear()
        hub = getattr(cycle, "_hub", None)
        if self._ack_fd is not None and hub is not None:
            hub.remove_reader(self._ack_fd)
        self._ack_fd = None
        self._disconnect()

    def close(self):
        if self.closed:
            return
        self._closing = True
        self.connection.cycle.discard(self)
        due = len(self._acks_due)
        try:
            self._flush_acks()
            self._confirm_acks(block=True)
            if "_ack_conn" in self.__dict__:
                self._lost_ack_conn()  # done with it: unregistered and closed
        except self.connection_errors as exc:
            # Still pending for this consumer: a lease recovery redelivers them.
            logger.warning("sheppy: %d ack(s) lost on close: %r", due, exc)
        try:
            if self._reading is not None:
                self._interrupt_read()
                self._finish_read()
        except Exception:  # pylint: disable=broad-except
            logger.debug("sheppy: outstanding read lost on close", exc_info=True)
        try:
            super().close()  # cancels consumers (auto_delete queues go), returns unacked
            self._return_buffered(list(self._buffer))
            self._buffer.clear()
            self._maybe_reap(own=True)
        except self.connection_errors as exc:
            logger.warning("sheppy: could not tidy up channel on close: %r", exc)
        finally:
            self._disconnect()


def _check_transport_options(options):
    """Refuse ``broker_transport_options`` this transport does not know, by name."""
    known = set(Channel.from_transport_options) | STOCK_NOOP_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        raise ChannelError(
            f"unknown broker_transport_options for sheppy://: {unknown}; accepted: "
            f"{', '.join(sorted(known - STOCK_NOOP_OPTIONS))}")


def _probe_unblock(conn):
    """``(client id or None, CLIENT UNBLOCK allowed)`` of a fresh connection, in one round
    trip (CLIENT UNBLOCK of id 0, which is no client, only tests the permission)."""
    conn.send_packed_command(conn.pack_commands([("CLIENT", "ID"), ("CLIENT", "UNBLOCK", "0")]))
    replies = []
    for _ in range(2):
        try:
            replies.append(conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    client_id = replies[0] if isinstance(replies[0], int) else None
    return client_id, client_id is not None and not isinstance(replies[1], Exception)


def _check_content_type(message):
    """Raise RecordError for a Celery task message whose content type no serializer of
    this process decodes (Celery would drop it). Other messages pass: kombu hands their
    bodies over raw."""
    if not (message.get("headers") or {}).get("task"):
        return
    content_type = message.get("content-type")
    if content_type and content_type not in RAW_CONTENT_TYPES and content_type not in getattr(
            serialization.registry, "_decoders", {content_type: None}):
        raise records.RecordError(f"unknown content type {content_type!r}")


def _flag_redelivered(data):
    """A reclaimed entry's data, its message marked redelivered (bad data unchanged)."""
    try:
        return records.mark_redelivered(records.loads(data))
    except (records.RecordError, KeyError, TypeError, AttributeError, ValueError):
        return data


def _revoked_ids(message):
    """Task ids of a ``revoke`` remote-control message, else []."""
    body = message.get("body")
    try:
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)
    except (TypeError, ValueError):
        return []
    if not isinstance(payload, dict) or payload.get("method") != "revoke":
        return []
    ids = (payload.get("arguments") or {}).get("task_id")
    if isinstance(ids, (str, bytes)):
        ids = [ids]
    return [bytes_to_str(task_id) for task_id in ids or () if task_id]


def _dead_letter_dict(entry_id, fields):
    fields = {bytes_to_str(key): bytes_to_str(value) for key, value in (fields or {}).items()}
    try:
        deliveries = int(fields.get("deliveries") or 0)
    except ValueError:
        deliveries = 0
    return {"id": bytes_to_str(entry_id), "reason": fields.get("reason", ""),
            "deliveries": deliveries, "stream": fields.get("stream", ""),
            "entry": fields.get("entry", ""), "data": fields.get("data", "")}


def dead_letters(connection, queue, count=100):
    """Dead letters of ``queue`` on a ``sheppy://`` kombu connection (see Channel.dead_letters).

    With Celery: ``with app.connection_for_write() as conn: dead_letters(conn, "celery")``.
    """
    return connection.default_channel.dead_letters(queue, count=count)


def replay_dead_letters(connection, queue, ids=None):
    """Put dead letters of ``queue`` back in their streams; returns how many."""
    return connection.default_channel.replay_dead_letters(queue, ids=ids)


def purge_dead_letters(connection, queue, ids=None):
    """Delete dead letters of ``queue`` (all, or ``ids``); returns how many."""
    return connection.default_channel.purge_dead_letters(queue, ids=ids)


class PublishBatch:
    """Publishes buffered by ``Producer.batch()`` (and a group's tasks, see group_publish).

    The channel routes each message as usual, but its XADD/PEXPIRE commands are kept;
    :meth:`flush` (at ``max_size`` commands, and when the batch ends) sends them in one
    round trip with :meth:`Channel._execute_batch`.
    """

    def __init__(self, channel, max_size):
        self.channel = channel
        self.max_size = max_size
        self._commands = []
        self._collecting = None

    def publish(self, message, **kwargs):
        collected = self._collecting = []
        try:
            result = self.channel.basic_publish(message, _publish_batch=self, **kwargs)
        finally:
            self._collecting = None
        if self._commands and len(self._commands) + len(collected) > self.max_size:
            self.flush()  # a message's commands never straddle two flushes
        self._commands.extend(collected)
        if len(self._commands) >= self.max_size:
            self.flush()
        return result

    def add(self, name, *args, **kwargs):
        if self._collecting is None:
            raise RuntimeError("publish command added outside a batched publish")
        self._collecting.append((name, args, kwargs))

    def flush(self):
        commands, self._commands = self._commands, []
        if commands:
            self.channel._execute_batch(commands)

    def discard(self):
        self._commands = []

    close = discard


def _merged(batches):
    """One ``{stream: [entry id]}`` of several."""
    merged = {}
    for by_stream in batches:
        for stream, ids in by_stream.items():
            merged.setdefault(stream, []).extend(ids)
    return merged


def _ack_commands(by_stream):
    """XACK + XDEL of ``{stream: [entry id, ...]}``: the ack, sent waiting or not."""
    return [command for stream, ids in by_stream.items()
            for command in (("XACK", stream, GROUP, *ids), ("XDEL", stream, *ids))]


def _execute(pipe):
    """``pipe.execute()``, where a BUSYGROUP reply (the group existed) is no error."""
    replies = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise reply
    return replies


def _adder(pipe):
    """``add(name, *args, **kwargs)`` into a pipeline (or a client), as PublishBatch.add."""
    return lambda name, *args, **kwargs: getattr(pipe, name)(*args, **kwargs)


def _parse_table(rows):
    """``(version, [(routing_key, pattern, queue, expires_ms)])`` from a binding zset."""
    version = None
    bindings = []
    now_ms = time() * 1000
    for member, score in rows:
        member = bytes_to_str(member)
        if member == VERSION_MEMBER:
            version = score
            continue
        if score <= now_ms:
            continue
        parts = member.split(SEP)
        if len(parts) != 4:
            continue
        routing_key, pattern, queue, expires = parts
        bindings.append((routing_key, pattern or None, queue, int(expires or 0)))
    return version, bindings


class Poller:
    """Waits on the blocking reads of every channel of a transport.

    With Celery's hub, each channel's read connection is registered as a reader;
    without one, :meth:`get` polls them (``Connection.drain_events``).
    """

    def __init__(self):
        self._channels = []
        self._hub = None
        self._registered = {}  # fd -> channel, in the hub
        self.loop_thread = None  # the thread running the hub's loop (seen in on_tick)

    def add(self, channel):
        self._channels.append(channel)

    def discard(self, channel):
        if channel in self._channels:
            self._channels.remove(channel)
        for fd, chan in list(self._registered.items()):
            if chan is channel:
                self._unregister(fd)

    def close(self):
        for fd in list(self._registered):
            self._unregister(fd)
        self._channels = []

    def _unregister(self, fd):
        self._registered.pop(fd, None)
        if self._hub is not None:
            try:
                self._hub.remove_reader(fd)
            except (KeyError, ValueError, OSError):
                pass

    # -- with a hub --------------------------------------------------------------------

    def on_tick(self):
        self.loop_thread = get_ident()
        for channel in list(self._channels):
            channel._flush_acks()
            channel._deliver_buffered()
            channel._start_read()
            # A read may be outstanding from before the hub existed (mingle's broadcast
            # is read with drain_events): register it too, or nobody reads its reply.
            if channel._reading is not None:
                fd = channel.fileno
                if fd is not None and self._registered.get(fd) is not channel:
                    for old, chan in list(self._registered.items()):
                        if chan is channel:
                            self._unregister(old)
                    self._registered[fd] = channel
                    self._hub.add_reader(fd, self.on_readable, fd)

    def on_readable(self, fd):
        channel = self._registered.get(fd)
        if channel is None:
            return
        if channel._reading is None or channel.fileno != fd:
            # Nothing asked: the server closed the idle connection.
            self._unregister(fd)
            channel._blocking_conn.disconnect()
            return
        try:
            channel._finish_read()
        except channel.connection_errors:
            self._unregister(fd)
            raise
        channel._deliver_buffered()

    def maintain(self):
        for channel in list(self._channels):
            try:
                channel.maintain()
                if channel.read_overdue():
                    logger.warning("sheppy: read got no reply in time; dropping the connection")
                    fd = channel.fileno
                    if fd is not None:
                        self._unregister(fd)
                    channel._reading.disconnect()
                    channel._reading = None
            except channel.connection_errors:
                logger.debug("sheppy: upkeep failed, will retry", exc_info=True)

    # -- without a hub (drain_events) ------------------------------------------------------------

    def get(self, callback, timeout=None):
        for channel in list(self._channels):
            if channel._deliver_buffered(limit=1):
                return
        self._maintain_if_due()
        waiting = {}
        for channel in list(self._channels):
            channel._start_read()
            if channel._reading is not None:
                waiting[channel.fileno] = channel
        if not waiting:
            sleep(min(timeout, 0.1) if timeout is not None else 0.1)
            raise Empty()
        poller = poll()
        try:
            for fd in waiting:
                poller.register(fd, READ | ERR)
            events = poller.poll(timeout)
        finally:
            poller.close()
        for fd, _ in events or ():
            channel = waiting.get(fd)
            if channel is not None:
                channel._finish_read()
        for channel in list(self._channels):
            if channel._deliver_buffered(limit=1):
                return
        raise Empty()

    _maintained_at = 0.0

    def _maintain_if_due(self):
        if monotonic() - self._maintained_at >= 1.0:
            self._maintained_at = monotonic()
            self.maintain()


class Transport(virtual.Transport):
    """``sheppy://`` transport."""

    Channel = Channel

    polling_interval = None  # no sleeping between reads: they block in Redis
    default_port = 6379
    #: Celery treats us as Redis: events use a fanout exchange, mingle and gossip work.
    driver_type = "redis"
    driver_name = "celery-sheppy"  # `celery report`: celery-sheppy:<version> (redis-py <version>)

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        batch_publish=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
    )

    connection_errors = options_mod.CONNECTION_ERRORS
    channel_errors = options_mod.CHANNEL_ERRORS

    #: Seconds between upkeep runs (expiring queues, dead consumers, stuck reads).
    upkeep_interval = 1.0

    def __init__(self, client, **kwargs):
        _check_transport_options(client.transport_options or {})
        super().__init__(client, **kwargs)
        group_publish.install()
        self.cycle = Poller()
        self._upkeep_tref = None

    def driver_version(self):
        return f"{celery_sheppy_version} (redis-py {redis.__version__})"

    def register_with_event_loop(self, connection, loop):
        cycle = self.cycle
        cycle._hub = loop
        cycle._registered.clear()
        loop.on_tick.add(cycle.on_tick)
        if self._upkeep_tref is not None:
            self._upkeep_tref.cancel()
        self._upkeep_tref = loop.call_repeatedly(self.upkeep_interval, cycle.maintain)

    def on_readable(self, fileno):
        self.cycle.on_readable(fileno)

    def _collect(self, connection):
        """kombu's ``Connection.collect``: Celery's consumer after a connection error, and
        connection pools after a fork. Channels are dropped without talking to Redis
        (:meth:`Channel.lose`), never closed the usual way, which would requeue messages
        the worker is still running."""
        for channel in [*self.channels, *self._avail_channels]:
            channel.lose()
        self.channels = []
        self._avail_channels = []
        self.cycle.close()

    def close_connection(self, connection):
        super().close_connection(connection)
        self.cycle.close()

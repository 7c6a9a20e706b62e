"""The kombu channel: kombu's hooks, each delegating to the part that owns the state.

A channel is one consumer of the ``workers`` group. It holds its parts and nothing else:

* ``settings``: the parsed transport options (options.py);
* ``conns``: its Redis connections (connections.py);
* ``queues``: declared queues (expiry, TTL, auto-delete) and their streams (streams.py);
* ``groups``: which streams exist with the group (groups.py);
* ``router``: exchange bindings and their cache (routing.py);
* ``publisher``: single, batched and delayed publishes (publish.py);
* ``reader``: the blocking read, the read-ahead buffer, delivery (reading.py);
* ``ledger`` and ``acker``: messages in flight; acks, rejects, put-backs (acks.py);
* ``letters``: dead letters (dead_letters.py); ``revokes``: durable revokes (revokes.py);
* ``fanout`` and ``subscriber``: bindings to fanout exchanges and the pub/sub connection
  their messages come on (fanout.py);
* ``upkeep``: the named periodic jobs, ``reaper`` and ``registration`` (presence.py)
  among them (upkeep.py).

The methods under "poller interface" are what the transport's Poller calls (poller.py).
"""

import os
import socket
from collections import deque
from contextlib import nullcontext
from queue import Empty
from uuid import uuid4

import redis
from kombu.exceptions import ChannelError
from kombu.log import get_logger
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.encoding import bytes_to_str

from .. import keys, scripts
from ..connect import params as connection_params
from . import options, presence, upkeep
from .acks import Acker, InflightLedger
from .connections import Connections, connparams
from .dead_letters import DeadLetters
from .fanout import FanoutBindings, Subscriber, is_fanout_tag
from .fanout import decode as decode_fanout
from .groups import StreamGroups
from .publish import PublishBatch, Publisher
from .port import KombuPort
from .reading import Reader
from .revokes import Revokes
from .routing import Router
from .streams import QueueStreams, Queues

logger = get_logger(__name__)

GROUP = keys.CONSUMER_GROUP

#: Entries one purge call deletes (the call repeats until fewer are left).
PURGE_CHUNK = 10000

#: Scheduled messages one purge call deletes.
PURGE_SCHEDULED_CHUNK = 500


class Message(virtual.Message):
    """kombu's virtual message, weakly referable: the orphan ledger watches whether
    Celery still holds it after a lost connection (orphans.py)."""


class QoS(virtual.QoS):
    """Prefetch accounting of kombu's virtual QoS; acks and put-backs go to Redis."""

    def ack(self, delivery_tag):
        if not is_fanout_tag(delivery_tag):  # a broadcast is in no stream: nothing to ack
            self.channel.acker.ack_soon(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if not is_fanout_tag(delivery_tag):
            self.channel.acker.reject(delivery_tag, requeue)
        super().ack(delivery_tag)

    def restore_unacked(self):
        """Put every unacked message back in its stream (one round trip)."""
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        if tags:
            try:
                self.channel.acker.put_back(tags)
            except self.channel.connection_errors as exc:
                # Still pending in the group: nothing is lost, and a lease
                # recovery redelivers them. Not worth an emergency dump.
                logger.warning("Could not return %d unacked message(s) to Redis (%r); "
                               "they stay pending in their consumer group", len(tags), exc)
        return []


class Channel(virtual.Channel):
    QoS = QoS
    Message = Message

    supports_fanout = True
    body_encoding = None  # text bodies are kept as text, bytes as base64 (records/messages.py)
    from_transport_options = ()  # every option is read by options.parse

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings = options.parse(self.connection.client.transport_options)
        self.body_encoding = settings.body_encoding
        self.deadletter_queue = settings.deadletter_queue
        self.connection_errors = self.connection.connection_errors
        self._pid = os.getpid()
        self.consumer_name = f"{socket.gethostname()}:{self._pid}:{uuid4().hex[:12]}"
        self.conns = conns = Connections(connparams(self.connection.client, settings),
                                         settings.polling_interval)
        self.port = port = KombuPort(self)
        self.queues = queues = Queues(QueueStreams(settings.priority_steps), conns.topology)
        self.groups = StreamGroups(conns, queues)
        self.router = Router(conns, queues, port)
        self.revokes = Revokes(conns, settings.revoke_expires)
        self.letters = DeadLetters(conns, self.groups, settings.dead_letter_maxlen)
        self.ledger = InflightLedger()
        self.acker = Acker(conns, self.ledger, self.letters, port,
                           settings.visibility_timeout, self.connection_errors)
        self.reader = Reader(port, conns, queues, self.groups, self.ledger, self.acker,
                             self.letters, self.revokes)
        self.publisher = Publisher(port, conns, queues, self.groups, self.router, self.revokes)
        self.fanout = FanoutBindings()
        self.subscriber = Subscriber(conns.subscriber_connection)
        self._broadcasts = deque()  # (queue, message) received from fanout exchanges
        self.reaper = upkeep.ConsumerReaper(conns, queues, self.consumer_name,
                                            settings.consumer_reap_after)
        self.registration = presence.Registration(conns, queues, self.consumer_name,
                                                  self.reaper.read_from,
                                                  settings.visibility_timeout)
        self.upkeep = self._upkeep_jobs()
        try:
            conns.topology.check_server(
                self.client, f"the sheppy:// broker at {conns.where}",
                self.connection.client.transport_cls.startswith("sheppys"))
        except ValueError as exc:
            self._disconnect()
            raise ChannelError(str(exc)) from None
        except Exception:
            self._disconnect()
            raise
        self.connection.cycle.add(self)

    def _upkeep_jobs(self):
        settings, conns, queues = self.settings, self.conns, self.queues

        def leased():
            return queues.leased(self.read_queues)

        return upkeep.Upkeep([
            upkeep.ExpiringQueues(conns, queues, self.router, lambda: self.read_queues,
                                  lambda queue: self.state.queue_bindings(queue)),
            upkeep.OrphanUpkeep(),
            self.registration,
            upkeep.LeaseRenewal(conns, lambda: [self.ledger.held(), self.reader.buffer.held()],
                                self.consumer_name, settings.visibility_timeout),
            upkeep.Recovery(conns, queues, self.acker, self.letters, self.reaper, leased,
                            self.consumer_name, settings.visibility_timeout),
            upkeep.Promotion(conns, queues, leased, settings.delay_threshold),
            upkeep.RevokeReading(self.revokes, leased),
        ])

    @property
    def client(self):
        """The redis-py client for every command but the blocking read."""
        return self.conns.client

    @property
    def connparams(self):
        return self.conns.params

    def conn_or_acquire(self, client=None):  # kombu's PublishBatch enters this
        return nullcontext(client or self.client)

    def _disconnect(self):
        self.subscriber.close()
        self.conns.disconnect()
        self.reader.reset()

    @property
    def active_queues(self):
        return list(dict.fromkeys(self._active_queues))

    @property
    def read_queues(self):
        """The consumed queues read from their streams: all but those bound to a fanout
        exchange, whose messages come by pub/sub (as kombu's Redis transport does)."""
        return [queue for queue in self.active_queues if queue not in self.fanout]

    def _subscribe(self):
        self.subscriber.sync(self.fanout.subscriptions(self.active_queues))

    # -- declaring ---------------------------------------------------------------------------

    def prepare_queue_arguments(self, arguments, **kwargs):
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue, auto_delete=False, arguments=None, **kwargs):
        self.queues.declare(queue, arguments, auto_delete)
        self.groups.ensure(queue, force=True)
        if not auto_delete and not self.queues.expiring(queue):
            # sheppy's tools list queues from this hash; transient queues stay out of it.
            # (On a Cluster a command of its own: the hash has a slot of its own.)
            self.client.hsetnx(keys.queue_registry(), self.queues.named(queue), "{}")

    def _has_queue(self, queue, **kwargs):
        return bool(self.client.exists(*self.queues.streams(queue)))

    def _size(self, queue):
        """Messages waiting in ``queue`` (delivered, unacked ones not counted)."""
        with self.client.pipeline(transaction=False) as pipe:
            for stream in self.queues.streams(queue):
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
        script = scripts.registry()["purge"]
        try:
            for stream in self.queues.streams(queue):
                while True:
                    deleted = script(self.client, keys=[stream], args=[GROUP, PURGE_CHUNK])
                    purged += deleted
                    if deleted < PURGE_CHUNK:
                        break
            return purged + self._purge_scheduled(queue)
        except redis.ResponseError as exc:
            # `celery purge` takes a channel error for "no such queue" and says nothing
            # was purged: say what went wrong.
            logger.error("sheppy: purge of queue %r stopped after %d message(s): Redis "
                         "refused a command: %s", queue, purged, exc)
            raise

    def _purge_scheduled(self, queue):
        name = self.queues.named(queue)
        scheduled = keys.scheduled_set(name)
        script = scripts.registry()["purge_scheduled"]
        purged = 0
        while True:
            ids = [bytes_to_str(member) for member in
                   self.client.zrange(scheduled, 0, PURGE_SCHEDULED_CHUNK - 1)]
            if not ids:
                return purged
            pairs = [key for sid in ids for key in (keys.delayed_message(name, sid),
                                                     keys.task_record(name, sid))]
            purged += script(self.client, keys=[scheduled, *pairs], args=ids)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        self.client.delete(*self.queues.all_known(queue))
        self.client.hdel(keys.queue_registry(), self.queues.named(queue))
        self.groups.forget(queue)
        self.queues.forget(queue)
        self.fanout.forget(queue)

    def _delete(self, queue, exchange, routing_key, pattern, *args, **kwargs):
        self._unbind(queue, exchange, routing_key, pattern)

    # -- bindings ------------------------------------------------------------------------------

    def _is_fanout(self, exchange):
        return bool(exchange) and self.typeof(exchange).type == "fanout"

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        if self._is_fanout(exchange):
            self.fanout.bind(queue, exchange, routing_key)
            self._subscribe()
        else:
            self.router.bind(exchange, routing_key, pattern, queue)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        _, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._unbind(queue, exchange, routing_key, pattern)

    def _unbind(self, queue, exchange, routing_key, pattern):
        if self._is_fanout(exchange):
            self.fanout.unbind(queue, exchange, routing_key)
            self._subscribe()
        else:
            self.router.unbind(exchange, routing_key, pattern, queue)

    def get_table(self, exchange):
        _, bindings = self.router.table(exchange)
        return [(rk, pattern, queue) for rk, pattern, queue, _ in bindings]

    # -- publishing ------------------------------------------------------------------------------

    def create_publish_batch(self, max_size):
        return PublishBatch(self, max_size)

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        return self.publisher.publish(message, exchange, routing_key, **kwargs)

    def _inplace_augment_message(self, message, exchange, routing_key):
        # kombu's, less the delivery tag (a uuid4 per publish): the record leaves it out,
        # and a delivery's tag comes from its stream entry (reading.py).
        message["body"], body_encoding = self.encode_body(message["body"], self.body_encoding)
        properties = message["properties"]
        properties["body_encoding"] = body_encoding
        properties["delivery_info"].update(exchange=exchange, routing_key=routing_key)

    def _put(self, queue, message, **kwargs):
        self.publisher.put(queue, self.publisher.outgoing(message), kwargs.get("_publish_batch"))

    # -- consuming -------------------------------------------------------------------------------

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        present = self.groups.ensure(queue)
        if not self.queues.expiring(queue):
            self.revokes.read(force=True)  # revoked while no worker listened
            self.registration.join(present)
        self.reaper.read_from.add(queue)
        if no_ack:
            self.reader.no_ack.add(queue)
        else:
            self.reader.no_ack.discard(queue)
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        self.reader.queues_changed(self.read_queues)
        self._subscribe()
        self.registration.run(force=True)
        return result

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        self.reader.queues_changed(self.read_queues)
        self._subscribe()
        if queue is not None and queue not in self._active_queues:
            self.reader.no_ack.discard(queue)
            returned = self.reader.buffer.remove_queue(queue)
            if returned:
                self.acker.return_buffered(returned)
            if queue in self.queues.auto_delete:
                self.queue_delete(queue)  # its last consumer is gone, as with AMQP
        return result

    def _get(self, queue, timeout=None):
        """One message of ``queue``, highest priority first (``basic_get``)."""
        self.reaper.read_from.add(queue)
        message = self.reader.get(queue)
        if message is None:
            raise Empty()
        return message

    # -- poller interface (poller.py) ---------------------------------------------------------

    def on_tick(self):
        self.acker.flush()
        self.reader.deliver()
        return self.start_read()

    def read_ready(self, fd):
        if fd is not None and fd == self.subscriber.fileno():
            self._receive_broadcasts()
            return True
        return self.reader.readable(fd)

    def deliver(self, limit=None):
        delivered = 0
        broadcasts = self._broadcasts
        while broadcasts and (limit is None or delivered < limit):
            queue, message = broadcasts.popleft()
            if queue in self._active_queues:
                self.connection._deliver(message, queue)
                delivered += 1
        left = None if limit is None else limit - delivered
        if left is None or left > 0:
            delivered += self.reader.deliver(left)
        return delivered

    def start_read(self):
        self.reader.start()
        fd = self.subscriber.fileno()
        return self.reader.filenos() + ([fd] if fd is not None else [])

    def _receive_broadcasts(self):
        """Queue for delivery the fanout messages that arrived, one copy per consumed
        queue whose binding they match."""
        for data in self.subscriber.read():
            message = decode_fanout(data)
            if message is None:
                continue
            info = message["properties"].get("delivery_info") or {}
            for queue in self.fanout.receivers(self.active_queues, info.get("exchange"),
                                               info.get("routing_key")):
                copy = dict(message, properties=dict(message["properties"],
                                                     delivery_tag=self.subscriber.next_tag()))
                self._broadcasts.append((queue, copy))

    def maintain(self):
        self.upkeep.run()

    def drop_overdue_read(self):
        interval = self.connparams.get("health_check_interval") or connection_params.HEALTH_CHECK_INTERVAL
        return self.reader.drop_if_overdue(interval)

    # -- dead letters (see dead_letters.py for the module-level API) ------------------------------

    def dead_letters(self, queue, count=100, start="-"):
        return self.letters.list(queue, count=count, start=start)

    def replay_dead_letters(self, queue, ids=None):
        return self.letters.replay(queue, ids=ids)

    def purge_dead_letters(self, queue, ids=None):
        return self.letters.purge(queue, ids=ids)

    # -- closing --------------------------------------------------------------------------------

    def lose(self):
        """The connection is gone (kombu's ``Connection.collect`` after a connection error):
        close without talking to Redis. What Celery holds goes to the orphan ledger, which
        acks it on a new connection when Celery does (orphans.py); nothing is requeued
        that the worker may still run."""
        if self.closed:
            return
        self.closed = self.reader.closing = True
        cycle = getattr(self.connection, "cycle", None)
        if cycle is not None:
            cycle.discard(self)
        qos = self._qos
        messages = dict(qos._delivered) if qos is not None else {}
        if qos is not None:
            qos._delivered.clear()
            qos._dirty.clear()
        # not in a forked child: those deliveries are the parent's
        self.acker.lose(self.consumer_name, messages, self.reader.buffer.drain(),
                        adopt=os.getpid() == self._pid)
        self._disconnect()

    def close(self):
        if self.closed:
            return
        self.reader.closing = True
        self.connection.cycle.discard(self)
        self.acker.close()
        try:
            if self.reader.reading:
                self.reader.interrupt()
                self.reader.finish()
        except Exception:  # pylint: disable=broad-except
            logger.debug("sheppy: outstanding read lost on close", exc_info=True)
        try:
            super().close()  # cancels consumers (auto_delete queues go), returns unacked
            self.acker.return_buffered(self.reader.buffer.drain())
            self.registration.remove()
            self.reaper.run(own=True)
        except self.connection_errors as exc:
            logger.warning("sheppy: could not tidy up channel on close: %r", exc)
        finally:
            self._disconnect()

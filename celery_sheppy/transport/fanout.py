"""Fan-out exchanges over Redis pub/sub: one PUBLISH per message, whatever the receivers.

Celery fans out its events (heartbeats, task events: exchange ``celeryev``, which Celery
types fanout on a Redis broker) and its remote control (``celery.pidbox``), and every
receiver (each worker's gossip and control, ``celery events``, Flower) has a queue bound
there. A stream per bound queue made every event one XADD per receiver, then a read, an
ack and a delete there: a deployment's heartbeats alone cost the square of its workers.
Here a message to a fanout exchange is one ``PUBLISH`` on the channel of its exchange
and the first word of its routing key (:func:`keys.fanout_channel`), and a channel
consuming queues bound to fanout exchanges subscribes on a connection of its own:

* a binding with key ``""`` gets the messages published with routing key ``""`` (Celery's
  remote control), as with the stock transport: ``SUBSCRIBE <x>/``;
* a binding whose key starts with a word (Celery's gossip binds ``worker.#``) gets the
  messages whose routing key matches it as a topic: ``SUBSCRIBE <x>/<word>``, then the
  match is checked here;
* a binding ``#`` (or starting with a wildcard: ``celery events``, Flower) gets every
  message of the exchange: ``PSUBSCRIBE <x>/*`` (an ACL user needs that pattern itself:
  Redis matches subscription patterns literally against ``&`` rules, docs/transport.md).

As with the stock ``redis://`` transport these messages are best effort: a receiver not
connected when one is published never gets it, which is what Celery expects of events
and broadcasts. What must not be lost is not left to them: a ``revoke`` broadcast is
also kept in Redis (``revokes.py``) and read by every worker when it starts consuming;
replies to remote control go to the reply queue's stream (a direct exchange).

Bindings to fanout exchanges are this channel's own, as in kombu's Redis transport: a
publisher needs no table, and a binding ends with its channel.
"""

import redis
from kombu.log import get_logger
from kombu.transport.virtual.exchange import TopicExchange
from kombu.utils.encoding import bytes_to_str

from .. import keys, records

logger = get_logger(__name__)

#: Delivery tags of fanout messages start with this (no space: not a stream entry's tag,
#: ``keys.entry_of_tag``); acking one is a no-op.
TAG_PREFIX = "fanout-"

_topic = TopicExchange(None)


def is_fanout_tag(tag):
    return isinstance(tag, str) and tag.startswith(TAG_PREFIX)


def first_word(routing_key):
    """The part of a routing key before its first ``.``: what its channel is named by."""
    return (routing_key or "").split(".", 1)[0]


def matches(binding_key, routing_key):
    """True when a message with ``routing_key`` reaches a fanout binding of ``binding_key``
    (see the module docstring)."""
    if binding_key == "#":
        return True
    if not binding_key:
        return not routing_key
    return bool(_topic._match(_topic.key_to_pattern(binding_key), routing_key or ""))


def subscription(exchange, binding_key):
    """``(command, channel or pattern)`` a binding of ``exchange`` with ``binding_key`` needs."""
    word = first_word(binding_key)
    if binding_key and word in ("#", "*"):
        return "PSUBSCRIBE", keys.fanout_pattern(exchange)
    return "SUBSCRIBE", keys.fanout_channel(exchange, word)


class FanoutBindings:
    """The bindings of this channel's queues to fanout exchanges."""

    def __init__(self):
        self._by_queue = {}  # queue -> {(exchange, binding key)}

    def bind(self, queue, exchange, routing_key):
        self._by_queue.setdefault(queue, set()).add((exchange, routing_key or ""))

    def unbind(self, queue, exchange, routing_key):
        bound = self._by_queue.get(queue)
        if bound is not None:
            bound.discard((exchange, routing_key or ""))
            if not bound:
                del self._by_queue[queue]

    def forget(self, queue):
        self._by_queue.pop(queue, None)

    def __contains__(self, queue):
        return queue in self._by_queue

    def subscriptions(self, queues):
        """``{(command, name)}`` that ``queues``' fanout bindings need; an exchange with a
        pattern subscription needs no channel of its own besides (a message would come
        twice)."""
        wanted = {subscription(exchange, binding_key)
                  for queue in queues for exchange, binding_key in self._by_queue.get(queue, ())}
        patterns = {name for command, name in wanted if command == "PSUBSCRIBE"}
        return {(command, name) for command, name in wanted
                if command == "PSUBSCRIBE" or _pattern_of(name) not in patterns}

    def receivers(self, queues, exchange, routing_key):
        """Those of ``queues`` a message to ``exchange`` with ``routing_key`` goes to."""
        return [queue for queue in queues
                if any(bound_exchange == exchange and matches(binding_key, routing_key)
                       for bound_exchange, binding_key in self._by_queue.get(queue, ()))]


def _pattern_of(channel):
    """The exchange pattern covering a channel ``keys.fanout_channel`` named."""
    exchange = channel[len(keys.fanout_channel("", "")) - 1:].rsplit("/", 1)[0]
    return keys.fanout_pattern(exchange)


class Subscriber:
    """The channel's pub/sub connection: its subscriptions and the messages they bring.

    Subscribing sends (P)SUBSCRIBE / (P)UNSUBSCRIBE without waiting; their confirmations
    come with the messages and are skipped by :meth:`read` when the connection is
    readable (the poller watches :meth:`fileno`).
    """

    _UNDO = {"SUBSCRIBE": "UNSUBSCRIBE", "PSUBSCRIBE": "PUNSUBSCRIBE"}

    def __init__(self, connect):
        self._connect = connect  # () -> a new redis-py connection, not connected yet
        self._conn = None
        self._subscribed = set()  # {(command, name)}
        self._serial = 0

    def fileno(self):
        sock = getattr(self._conn, "_sock", None)
        return sock.fileno() if sock is not None else None

    def sync(self, subscriptions):
        """Be subscribed to exactly ``subscriptions`` (``{(command, name)}``)."""
        subscriptions = set(subscriptions)
        if subscriptions == self._subscribed:
            return
        if not subscriptions:
            self.close()
            return
        if self._conn is None or self._conn._sock is None:
            self._conn = self._connect()
            self._conn.connect()
            self._subscribed = set()
        for command, name in sorted(self._subscribed - subscriptions):
            self._conn.send_command(self._UNDO[command], name, check_health=False)
        for command, name in sorted(subscriptions - self._subscribed):
            # (a health check's PING would be answered among the messages)
            self._conn.send_command(command, name, check_health=False)
        self._subscribed = subscriptions

    def read(self):
        """``[data]`` of the messages that arrived (confirmations skipped)."""
        conn, messages = self._conn, []
        if conn is None:
            return messages
        while conn.can_read(timeout=0):
            reply = _read_push(conn)
            if not isinstance(reply, list) or not reply:
                continue
            kind = bytes_to_str(reply[0])
            if kind == "message":
                messages.append(reply[2])
            elif kind == "pmessage":
                messages.append(reply[3])
        return messages

    def next_tag(self):
        self._serial += 1
        return f"{TAG_PREFIX}{self._serial}"

    def close(self):
        conn, self._conn = self._conn, None
        self._subscribed = set()
        if conn is not None:
            try:
                conn.disconnect()
            except (redis.RedisError, OSError):
                pass


def _read_push(conn):
    """The next pub/sub reply: on RESP3 (redis-py 8's default) messages are push frames,
    which ``read_response`` skips unless asked for them (redis-py 5.0+ can be)."""
    try:
        return conn.read_response(push_request=True)
    except TypeError:  # a redis-py without RESP3
        return conn.read_response()


def decode(data):
    """The kombu message dict a fanout message carries, or None (logged) if it cannot be
    read: a receiver never stops for one bad broadcast."""
    try:
        _, message = records.record_to_message(data)
        records.check_content_type(message)
    except records.RecordError as exc:
        logger.error("sheppy: undecodable fanout message dropped: %s", exc)
        return None
    return message

"""Publishing: single messages, batches (``Producer.batch()``, Celery groups) and delayed ones.

A published message is taken apart once, into an :class:`Outgoing`: its priority, its
due time and its record (built once, whatever the number of queues it goes to). Then:

* to a queue: one ``XADD`` (``NOMKSTREAM`` for an expiring queue, which only its
  consumer keeps alive); the first message of a priority makes its stream, with the group;
* to an exchange: routed by the cached binding table (``routing.py``), whose version is
  read in the same round trip as the XADDs; a changed version corrects the delivery;
* to a fanout exchange: one PUBLISH on its pub/sub channel (``fanout.py``);
* due later than ``delay_threshold``: kept in sheppy's scheduled set (``schedule.lua``)
  until the upkeep promotes it (``upkeep.Promotion``);
* in a batch: the commands are kept and sent as one MULTI/EXEC (:class:`PublishBatch`).

On a lost connection a publish is retried by the transport's retry options
(``max_retries`` ...); a batch's flush, while those are unset, by Celery's default policy.
"""

from time import time

from kombu.log import get_logger
from kombu.utils.functional import retry_over_time

from .. import keys, records, scripts
from . import claims, fanout
from .routing import VERSION_MEMBER
from .upkeep import due_hint

logger = get_logger(__name__)

GROUP = keys.CONSUMER_GROUP

#: Celery's default task_publish_retry_policy: a batch flush's retries while the
#: transport's own ``max_retries`` is unset (Celery's retry covers only the buffering).
CELERY_PUBLISH_RETRY = dict(max_retries=3, interval_start=0, interval_step=0.2, interval_max=0.2)

#: A scheduled message's record and payload outlive its due time by this many seconds.
SCHEDULED_KEEP_SECONDS = 30 * 24 * 3600


class Outgoing:
    """A message being published: its priority, due time (epoch s, or None) and record."""

    __slots__ = ("message", "priority", "due", "_record", "_text")

    def __init__(self, message, priority, delay_threshold):
        self.message = message
        self.priority = priority
        self.due = due_later(message, delay_threshold)
        self._record = self._text = None

    @property
    def record(self):
        if self._record is None:
            self._record = records.pending_record(self.message)
        return self._record

    @property
    def text(self):
        if self._text is None:
            self._text = records.dumps(self.record)
        return self._text


def due_later(message, threshold):
    """Due time (epoch seconds) of a task message due more than ``threshold`` s from now."""
    due = records.due_time(message)
    return due if due is not None and due - time() > threshold else None


class Publisher:
    def __init__(self, port, conns, queues, groups, router, revokes):
        self.port = port  # kombu's side: a message's envelope, priorities (port.py)
        self.conns = conns
        self.queues = queues
        self.groups = groups
        self.router = router
        self.revokes = revokes
        self.settings = port.settings
        self.connection_errors = port.connection_errors

    def outgoing(self, message):
        return Outgoing(message, self.port.priority_of(message),
                        self.settings.delay_threshold)

    def publish(self, message, exchange, routing_key, **kwargs):
        if self.settings.max_retries is None or kwargs.get("_publish_batch") is not None:
            return self._publish(message, exchange, routing_key, **kwargs)
        # broker_transport_options' retry policy (stock names): retry the whole publish
        # on a lost connection, then let the last error out.
        return self._retrying(self._publish, (message, exchange, routing_key), kwargs)

    def execute_batch(self, commands):
        """Run buffered publish ``commands`` as one MULTI/EXEC: on a lost connection
        none of them ran, so the whole batch is retried (publish retry policy, or
        Celery's default task_publish_retry_policy while ``max_retries`` is unset)."""
        # One MULTI per slot group (on a Redis Cluster each queue is one slot): a batch to
        # one queue stays one transaction, to several queues of a cluster it is not atomic.
        parts = self.conns.topology.by_slot(commands, key=_command_key)

        def execute(part):
            with self.conns.client.pipeline(transaction=True) as pipe:
                for name, args, kwargs in part:
                    getattr(pipe, name)(*args, **kwargs)
                _execute(pipe)

        for part in parts:  # each retried alone: a part sent is never sent again
            self._retrying(execute, (part,), {}, CELERY_PUBLISH_RETRY)

    def _retrying(self, fun, args, kwargs, default=None):
        """``fun(*args, **kwargs)`` retried on a lost connection by the transport's
        publish retry policy, or ``default`` while ``max_retries`` is unset."""
        settings = self.settings
        policy = default if settings.max_retries is None else dict(
            max_retries=settings.max_retries, interval_start=settings.interval_start,
            interval_step=settings.interval_step, interval_max=settings.interval_max)
        return retry_over_time(fun, self.connection_errors, args, kwargs,
                               _on_publish_error, **policy)

    def _publish(self, message, exchange, routing_key, _publish_batch=None, **kwargs):
        self.port.address(message, exchange, routing_key)
        if exchange and exchange.endswith(".pidbox"):
            self.revokes.remember(message)
        out = self.outgoing(message)
        if exchange and self.port.exchange_type(exchange).type == "fanout":
            return self._broadcast(exchange, routing_key, out, _publish_batch)
        claim = claims.of(message)
        if claim is not None:  # unique tasks, beat occurrences
            return claims.publish(self, exchange, routing_key, out, claim)
        if out.due is not None:
            return self._publish_delayed(exchange, routing_key, out)
        if not exchange:
            return self.put(routing_key, out, _publish_batch)
        if _publish_batch is not None:
            _, bindings = self.router.table(exchange)
            for queue, expires in self.router.route(exchange, routing_key, bindings).items():
                self._add_put(_publish_batch.add, queue, out, expires)
            return None
        return self._publish_routed(exchange, routing_key, out)

    def _broadcast(self, exchange, routing_key, out, batch=None):
        """One PUBLISH, whatever the number of receivers (fanout.py)."""
        command = ("PUBLISH", keys.fanout_channel(exchange, fanout.first_word(routing_key)),
                   out.text)
        if batch is not None:
            return batch.add("execute_command", *command)
        commands = _Commands()
        commands.add("execute_command", *command)
        self.conns.send(commands)
        return None

    def put(self, queue, out, batch=None):
        """Publish ``out`` to ``queue``: into ``batch`` when batching."""
        if out.due is not None and not self.queues.expiring(queue):
            return self._schedule(queue, out)
        expires = self.queues.expires.get(queue, 0)
        if batch is not None:
            return self._add_put(batch.add, queue, out, expires)
        commands = _Commands()
        self._add_put(commands.add, queue, out, expires)
        self.conns.send(commands)
        return None

    def _publish_routed(self, exchange, routing_key, out):
        """XADD to the queues bound to ``exchange``; the binding table's version is
        read in the same round trip, and when it changed the delivery is corrected
        (added to newly bound queues, deleted from unbound ones)."""
        router = self.router
        version, bindings = router.table(exchange)
        routed = router.route(exchange, routing_key, bindings)
        with self.conns.client.pipeline(transaction=False) as pipe:
            pipe.zscore(keys.exchange_bindings(exchange), VERSION_MEMBER)
            order = []
            for queue, expires in routed.items():
                stream = self._add_put(_adder(pipe), queue, out, expires)
                order.append((queue, stream, len(pipe.command_stack) - 1))
            replies = _execute(pipe)
        if replies[0] == version:
            return
        now = router.route(exchange, routing_key, router.load(exchange)[1])
        with self.conns.client.pipeline(transaction=False) as pipe:
            for queue, stream, index in order:
                if queue not in now:
                    pipe.xdel(stream, replies[index])
            for queue, expires in now.items():
                if queue not in routed:
                    self._add_put(_adder(pipe), queue, out, expires)
            _execute(pipe)

    def _add_put(self, add, queue, out, expires):
        """Add the commands publishing ``out`` to ``queue``; returns the stream."""
        # An expiring queue (reply, event receiver, pidbox) lives while its consumer
        # renews it: a publish never creates or extends it (NOMKSTREAM), so the queue of
        # a receiver that stopped expires on time and stops collecting messages.
        stream = self.queues.stream_for(queue, out.priority, expires)
        if not expires and self.groups.needs_group(queue, stream):
            # The first message of a priority makes its stream: with the group, from id 0
            # (BUSYGROUP when it exists is ignored, see _execute).
            add("xgroup_create", stream, GROUP, id="0", mkstream=True)
        # Raw XADD: redis-py's xadd() builds the same arguments, a few µs later.
        add("execute_command", "XADD", stream, *(("NOMKSTREAM",) if expires else ()), "*",
            "data", out.text)
        return stream

    def _publish_delayed(self, exchange, routing_key, out):
        if not exchange:
            return self.put(routing_key, out)
        routed = self.router.route(exchange, routing_key, self.router.load(exchange)[1])
        for queue, expires in routed.items():
            if expires:
                commands = _Commands()
                self._add_put(commands.add, queue, out, expires)
                self.conns.send(commands)
            else:
                self._schedule(queue, out)
        return None

    def _schedule(self, queue, out):
        """Keep ``out`` in sheppy's scheduled set until it is due."""
        record = out.record
        sid = record["id"]
        name = self.queues.named(queue)
        scripts.registry()["schedule"].with_commands(
            self.conns.client,
            keys=[keys.scheduled_set(name), keys.task_record(name, sid),
                  keys.delayed_message(name, sid)],
            args=[sid, repr(float(out.due)), records.scheduled_record(record), out.text,
                  self.queues.stream_for(queue, out.priority),
                  int(max(out.due - time(), 0)) + SCHEDULED_KEEP_SECONDS],
            commands=[due_hint(name, out.due)])


class PublishBatch:
    """Publishes buffered by ``Producer.batch()`` (and a group's tasks, see patches/group_publish.py).

    The channel routes each message as usual, but its XADD/PEXPIRE commands are kept;
    :meth:`flush` (at ``max_size`` commands, and when the batch ends) sends them in one
    round trip with :meth:`Publisher.execute_batch`.
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
            self.channel.publisher.execute_batch(commands)

    def discard(self):
        self._commands = []

    close = discard


def _command_key(command):
    """The key of a publish command (``(name, args, kwargs)``, as PublishBatch.add takes it)."""
    name, args, _ = command
    return args[1] if name == "execute_command" else args[0]


def _on_publish_error(exc, intervals, retries):
    wait = next(intervals)
    logger.warning("sheppy: publish failed (%s); retry %d in %.1f s", exc, retries + 1, wait)
    return wait


def _execute(pipe):
    """``pipe.execute()``, where a BUSYGROUP reply (the group existed) is no error."""
    replies = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise reply
    return replies


class _Commands(list):
    """Publish commands, collected as ``add(name, *args, **kwargs)`` (as PublishBatch.add),
    for ``Connections.send``."""

    def add(self, name, *args, **kwargs):
        self.append((name, args, kwargs))


def _adder(pipe):
    """``add(name, *args, **kwargs)`` into a pipeline, as PublishBatch.add."""
    return lambda name, *args, **kwargs: getattr(pipe, name)(*args, **kwargs)

"""Reading: the blocking XREADGROUPs of a channel, its read-ahead buffer, and delivery.

:class:`Reader` owns the channel's read state: its outstanding blocking reads, one per
slot group of the consumed streams (``topology.slot_group``: one read over every stream
on one server, one per consumed slot on a Redis Cluster, where a command names keys of
one slot), each on a connection of its own to the node serving the group; the
:class:`ReadBuffer` of entries read but not yet delivered; and delivery, where the steps
of steps.py decide what becomes of each entry. :class:`~.poller.Poller` decides when
reads start and finish.

A read that fails is raised to the consumer (Celery's reconnects), except where the
topology reroutes reads (a Cluster: MOVED, ASK, a failover, a lost node): the slot map
is learnt again and the read sent to the new owner after :data:`REROUTE_PAUSE`, the
worker keeping its connection.
"""

from time import monotonic

import redis
from kombu.log import get_logger
from kombu.utils.encoding import bytes_to_str
from kombu.utils.scheduling import cycle_by_name

from .. import keys, records, scripts
from . import steps
from .buffer import ReadBuffer
from .connections import probe_unblock
from .limits import Limiter
from .revokes import hand_to_celery

logger = get_logger(__name__)

GROUP = keys.CONSUMER_GROUP

#: Longest single block of a read, in seconds, when CLIENT UNBLOCK is denied (the ACL
#: category @dangerous holds it): queue changes wait for the read to end.
UNBLOCK_DENIED_BLOCK = 1.0

#: Seconds a read may wait for room to grow (Celery's event loop only). Under prefork,
#: room frees one message at a time as the pool accepts tasks: without the wait, every
#: message would cost one XREADGROUP of COUNT 1.
READ_COALESCE = 0.002

#: Seconds between checks that the node of outstanding reads still serves their slots
#: (one EXISTS per node, where the topology reroutes reads: a read that reached a master
#: while a CLUSTER FAILOVER paused it may stay blocked on the new replica).
OWNER_CHECK_INTERVAL = 2.0

#: Seconds past its block after which a rerouting topology's read without a reply is
#: dropped (a healthy node answers when the block ends; one server waits the health check).
OVERDUE_MARGIN = 3.0

#: Seconds before a slot group whose read failed is read again (its node may be failing
#: over: the slot map changes once the cluster has promoted a replica).
REROUTE_PAUSE = 0.5


class _Read:
    """One outstanding blocking read: its connection, node and streams."""

    __slots__ = ("conn", "fd", "node", "sent_at", "queue_of", "order")

    def __init__(self, conn, node, queue_of, order):
        self.conn = conn
        self.fd = conn._sock.fileno()  # kept: redis-py drops the socket on an error
        self.node = node
        self.sent_at = monotonic()
        self.queue_of = queue_of  # stream -> queue
        self.order = order  # stream -> (priority step, queue index)


class _Link:
    """A slot group's read connection: the node it talks to and its client id."""

    __slots__ = ("node_name", "conn", "client_id")

    def __init__(self, node_name, conn):
        self.node_name = node_name
        self.conn = conn
        self.client_id = None  # CLIENT ID, to interrupt its read


class Reader:
    def __init__(self, port, conns, queues, groups, ledger, acker, letters, revokes):
        self.port = port  # kombu's side (port.py)
        self.conns = conns
        self.topology = conns.topology
        self.queues = queues
        self.groups = groups
        self.ledger = ledger
        self.acker = acker
        self.letters = letters
        self.revokes = revokes
        settings = port.settings
        self.polling_interval = settings.polling_interval
        self.max_batch = settings.max_batch
        self.max_deliveries = settings.max_deliveries
        self.limits = Limiter(port, conns, queues, settings.rate_limits)
        self.consumer_name = port.consumer_name
        self.buffer = ReadBuffer()
        self.no_ack = set()  # queues consumed without acks
        self.closing = False
        self._cycle = cycle_by_name(settings.queue_order_strategy)()
        self._reads = {}  # slot group -> _Read outstanding
        self._links = {}  # slot group -> _Link
        self._paused = {}  # slot group -> monotonic time before which it is not read (rerouted)
        self._groups = frozenset()  # the slot groups the last start() found to read
        self._checked_at = {}  # node name -> when its ownership was last checked
        self._short_since = None  # when a read was first put off for lack of room
        self._wake_at = None  # when the hub timer that ends that wait fires
        self._hot_streams = frozenset()  # the streams the last reads with messages got them from
        self._can_unblock = True  # CLIENT UNBLOCK is allowed (the ACL may deny it)

    # -- room ----------------------------------------------------------------------------

    def budget(self):
        """Messages the QoS lets this channel read ahead now (may be <= 0)."""
        budget = self.port.prefetch_estimate()
        if budget is None:
            budget = self.max_batch
        return budget - len(self.buffer)

    def room(self):
        """:meth:`budget`, or 0 while the QoS allows no delivery."""
        budget = self.budget()
        return budget if budget > 0 and self.port.can_consume() else 0

    def queues_changed(self, queues):
        self._cycle.update(queues)
        self.interrupt()

    # -- the blocking reads --------------------------------------------------------------

    @property
    def reading(self):
        return bool(self._reads)

    def filenos(self):
        """The file descriptors of the outstanding reads."""
        return [read.fd for read in self._reads.values()
                if getattr(read.conn, "_sock", None) is not None]

    def _may_read(self):
        """``(consumed queues in read order, messages the reads may take)``, or None while
        no read may start (closing, messages still buffered, no room in the window)."""
        if self.closing or self.buffer:
            return None
        queues = self.port.read_queues()
        if not queues or not self.port.can_consume():
            return None
        budget = self.budget()
        if budget <= 0 or self._put_off(budget):
            return None
        return self._cycle.consume(len(queues)), budget

    def start(self):
        """Send a blocking XREADGROUP for every slot group of the consumed streams that
        has none outstanding, if there is room; True if one was sent."""
        if self._reads and self._groups <= set(self._reads):
            return False  # every group's read is outstanding
        may = self._may_read()
        if may is None:
            return False
        ordered, budget = may
        by_group = {}  # slot group -> [(queue index, queue, streams)]
        for index, queue in enumerate(ordered):
            streams = self.groups.ensure(queue)
            if streams:
                by_group.setdefault(self.topology.slot_group(streams[0]), []).append(
                    (index, queue, streams))
        self._groups = frozenset(by_group)
        streams = [stream for members in by_group.values() for _, _, present in members
                   for stream in present]
        # COUNT is per stream: split the budget among the streams the last read found
        # messages in (usually one: the priority-0 stream), not among all four steps of
        # every queue, which would make most reads COUNT 1.
        hot = len(self._hot_streams.intersection(streams)) or len(streams)
        per_stream = max(1, budget // hot) if streams else 0
        started = False
        now = monotonic()
        for group, members in by_group.items():
            if group in self._reads or self._paused.get(group, 0.0) > now:
                continue
            try:
                self._send(group, members, per_stream)
            except self.port.connection_errors as exc:
                if not self.topology.read_error_reroutes(exc):
                    raise
                self._reroute(group, exc)  # its master is gone: the slot map says who took over
                continue
            started = True
        return started

    def _send(self, group, members, per_stream):
        streams = [stream for _, _, present in members for stream in present]
        node, conn = self._connect(group)
        conn.send_command("XREADGROUP", "GROUP", GROUP, self.consumer_name, "COUNT", per_stream,
                          "BLOCK", max(int(self.block_seconds() * 1000), 1),
                          "STREAMS", *streams, *([">"] * len(streams)))
        # Delivery order within a read: by priority step first, then by queue order.
        order = {stream: (step, index) for index, queue, _ in members
                 for step, stream in enumerate(self.queues.streams(queue))}
        queue_of = {stream: queue for _, queue, present in members for stream in present}
        self._reads[group] = _Read(conn, node, queue_of, order)

    def _connect(self, group):
        """``(node, connection)`` for reads of ``group``, connected, its client id known; a
        connection to a node that no longer serves the group is dropped for a new one."""
        node = self.topology.read_node(self.conns.client, group)
        name = node.name if node is not None else None
        link = self._links.get(group)
        if link is not None and link.node_name != name:
            self._close(link.conn)
            link = None
        if link is None:
            link = self._links[group] = _Link(name, self.conns.read_connection(node))
        conn = link.conn
        if conn._sock is None or link.client_id is None:
            conn.connect()
            link.client_id, can_unblock = probe_unblock(conn)
            if not can_unblock and self._can_unblock:
                logger.warning(
                    "sheppy: CLIENT ID or CLIENT UNBLOCK is not allowed for this Redis user "
                    "(ACL @dangerous): reads block for at most %.0f s instead of %.0f s, so a "
                    "change of consumed queues waits for the current read to end",
                    min(self.polling_interval, UNBLOCK_DENIED_BLOCK), self.polling_interval)
            self._can_unblock = can_unblock
        return node, conn

    def _put_off(self, budget):
        """True while a small read (under half the prefetch window, the rest still in
        hand) waits up to READ_COALESCE for more acks; the hub wakes us then."""
        hub = self.port.hub
        prefetch = self.port.prefetch_count
        if hub is None or not prefetch or budget * 2 >= prefetch:
            self._short_since = None
            return False
        now = monotonic()
        if self._short_since is None:
            self._short_since = now
        remaining = self._short_since + READ_COALESCE - now
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

    def finish(self):
        """Read the replies of every outstanding read into the buffer (``drain_events``, a
        closing channel: they are ready); returns how many entries."""
        return sum(self._finish(group) for group in list(self._reads))

    def _finish(self, group):
        read = self._reads.pop(group, None)
        if read is None:
            return 0
        try:
            reply = self.topology.node_client(self.conns.client, read.node).parse_response(
                read.conn, "XREADGROUP")
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self.groups.reset()  # a stream expired or was deleted: declare again
                return 0
            if self.topology.read_error_reroutes(exc):
                self._forget(read.fd)
                self._reroute(group, exc)
                return 0
            if "UNBLOCKED" in str(exc):  # the primary became a replica (Sentinel)
                self.groups.reset()
                self._drop_link(group)  # the next read connects anew: to the new primary
                return 0
            raise
        except self.port.connection_errors as exc:
            self._forget(read.fd)
            if self.topology.read_error_reroutes(exc):
                self._reroute(group, exc)
                return 0
            self._drop_link(group)
            raise
        return self._buffer_reply(reply, read.order, read.queue_of)

    def _buffer_reply(self, reply, order, queue_of):
        """Put the entries of an XREADGROUP ``reply`` in the buffer, by priority step, then
        queue order (``order``: stream -> rank, ``queue_of``: stream -> queue); how many."""
        entries = []
        for stream, items in reply or ():
            stream = bytes_to_str(stream)
            queue = queue_of[stream]
            for entry_id, fields in items:
                data = (fields or {}).get(b"data")
                if data is None and fields:  # not ours: keep what it holds for its dead letter
                    data = records.FieldsWithoutData.of(fields)
                entries.append((order[stream], queue, stream, bytes_to_str(entry_id), data))
        entries.sort(key=lambda entry: entry[0])  # priority first, then queue order; stable
        if entries:
            got = {entry[2] for entry in entries}
            # streams of other groups' outstanding reads stay hot (they were not asked here)
            self._hot_streams = got | {stream for stream in self._hot_streams if any(
                stream in read.queue_of for read in self._reads.values())}
            self._cycle.rotate(entries[0][1])
        self.buffer.extend(entry[1:] for entry in entries)
        return len(entries)

    def _reroute(self, group, exc):
        """The read of ``group`` failed or was dropped where the topology reroutes reads:
        drop its connection, learn the slot map again, read again after REROUTE_PAUSE."""
        logger.warning("sheppy: read of slot %s failed (%r): asking the cluster for its slot "
                       "map and reading again", group, exc)
        self._drop_link(group)
        self._paused[group] = monotonic() + REROUTE_PAUSE
        try:
            self.topology.refresh(self.conns.client)
        except redis.RedisError as error:  # the next read tries again
            logger.debug("sheppy: slot map refresh failed: %r", error)

    def _drop_link(self, group):
        link = self._links.pop(group, None)
        if link is not None:
            self._close(link.conn)

    def _close(self, conn):
        """Disconnect ``conn``, and make the poller forget its fd first: a new connection
        may get the same fd number, which the hub would then never watch."""
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            self._forget(sock.fileno())
        conn.disconnect()

    def _forget(self, fd):
        self.port.forget(fd)

    def readable(self, fd):
        """The hub saw ``fd`` readable: read that read's reply into the buffer. False when
        nothing is to be read there any more: the read was rerouted (its connection closed),
        or nothing was asked (the server closed an idle connection)."""
        for group, read in list(self._reads.items()):
            if read.fd == fd:
                self._finish(group)
                return group in self._links
        for group, link in list(self._links.items()):
            sock = getattr(link.conn, "_sock", None)
            if sock is not None and sock.fileno() == fd:
                self._drop_link(group)
        return False

    def block_seconds(self):
        """How long one blocking read waits: shorter when it cannot be interrupted."""
        if self._can_unblock:
            return self.polling_interval
        return min(self.polling_interval, UNBLOCK_DENIED_BLOCK)

    def interrupt(self):
        """Make the outstanding blocking reads return now (their queues changed); without
        CLIENT UNBLOCK they return by themselves within :meth:`block_seconds`."""
        if not self._can_unblock:
            return
        for group, read in list(self._reads.items()):
            link = self._links.get(group)
            if link is None or link.client_id is None:
                continue
            try:
                self.topology.node_client(self.conns.client, read.node).client_unblock(
                    link.client_id)
            except self.port.connection_errors:
                pass
            except redis.ResponseError as exc:
                if "NOPERM" not in str(exc):  # MOVED: its read returns anyway
                    logger.debug("sheppy: CLIENT UNBLOCK: %r", exc)
                    continue
                logger.warning("sheppy: CLIENT UNBLOCK refused (%s); reads now block for at "
                               "most %.0f s", exc, UNBLOCK_DENIED_BLOCK)
                self._can_unblock = False
                return

    def drop_if_overdue(self, health_check_interval):
        """Drop reads whose reply is late enough to suspect a dead socket, and, where the
        topology reroutes reads, reads sent to a node that no longer serves their slot
        (checked every OWNER_CHECK_INTERVAL per node); ``(True, an fd dropped)`` or
        ``(False, None)``. A reply that did come is read instead: nobody drained the
        connection meanwhile (a pooled connection, as a remote-control client's, reused
        after its read ended)."""
        reroutes = self.topology.reroutes_reads
        margin = min(health_check_interval, OVERDUE_MARGIN) if reroutes else health_check_interval
        limit = self.block_seconds() + margin
        now = monotonic()
        dropped, checked = [], {}  # node name -> its check's error (a failover demotes a node)
        for group, read in list(self._reads.items()):
            if now - read.sent_at > limit:
                reason = TimeoutError("no reply in time")
            elif reroutes:
                name = read.node.name
                if name not in checked:
                    checked[name] = self._check_owner(group, read, now)
                reason = checked[name]
            else:
                continue
            if reason is None:
                continue
            if _has_reply(read.conn):  # answered meanwhile: its entries must not be lost
                self._finish(group)
                continue
            dropped.append(read.fd)
            del self._reads[group]
            if reroutes:
                self._forget(read.fd)
                self._reroute(group, reason)
            else:
                self._drop_link(group)
        return (True, dropped[0]) if dropped else (False, None)

    def _check_owner(self, group, read, now):
        if now - self._checked_at.get(read.node.name, read.sent_at) < OWNER_CHECK_INTERVAL:
            return None
        self._checked_at[read.node.name] = now
        return self.topology.read_owner_error(self.conns.client, group, read.node,
                                              next(iter(read.queue_of)))

    def reset(self):
        """The channel's connections are dropped: no read is outstanding."""
        self._reads.clear()
        for group in list(self._links):
            self._drop_link(group)

    # -- delivering ------------------------------------------------------------------------

    def deliver(self, limit=None):
        """Hand buffered messages to their consumers while the QoS allows; returns how many."""
        delivered = 0
        no_ack = []
        port = self.port
        try:
            while self.buffer and (limit is None or delivered < limit) and port.can_consume():
                item = self.buffer.popleft()
                message = self.receive(*item)
                if message is None:
                    continue
                if item.queue in self.no_ack:
                    no_ack.append(message["properties"]["delivery_tag"])
                delivered += 1
                port.deliver(message, item.queue)
        finally:
            if no_ack:
                self.acker.ack(no_ack)
        return delivered

    def get(self, queue):
        """One message of ``queue`` (buffered, else read now without blocking), or None."""
        while True:
            item = self.buffer.take(queue)
            if item is None:
                break
            message = self.receive(*item)
            if message is not None:
                return message
        self.groups.ensure(queue)
        reply = scripts.registry()["read"](self.conns.client, keys=self.queues.streams(queue),
                                           args=[GROUP, self.consumer_name, 1])
        for stream, entry_id, data in zip(reply[::3], reply[1::3], reply[2::3]):
            message = self.receive(queue, bytes_to_str(stream), bytes_to_str(entry_id), data)
            if message is not None:
                return message
        return None

    def _give_back_ttl(self, stream, sheppy_id):
        """sheppy's retry rewrote a Celery record without a TTL (``SET`` alone): give it
        the one sheppy gives its own records, unless it has one (``EXPIRE NX``)."""
        queue = keys.queue_of_stream(stream)
        if queue and sheppy_id:
            self.conns.client.execute_command(
                "EXPIRE", keys.task_record(queue, sheppy_id), records.SHEPPY_RECORD_TTL, "NX")

    def receive(self, queue, stream, entry_id, data):
        """The kombu message of an entry, registered as in flight; None if it is dropped
        (the steps of steps.py: undecodable or delivered too often: dead-lettered; over
        its rate limit: deferred; expired or revoked: acked)."""
        decoded = steps.decode(data)
        if isinstance(decoded, steps.DeadLetter):
            logger.error("Cannot decode message %s of %s, moved to the dead letters: %s",
                         entry_id, stream, decoded.error)
            self.letters.move(queue, stream, entry_id, decoded.reason, decoded.deliveries, data)
            if isinstance(decoded.error, records.RequeuedBySheppy):
                self._give_back_ttl(stream, decoded.error.sheppy_id)
            return None
        record, message = decoded
        deliveries = steps.count_delivery(record, self.max_deliveries)
        if isinstance(deliveries, steps.DeadLetter):
            logger.error("Message %s of %s was delivered %d times (max_deliveries %d), "
                         "moved to the dead letters", entry_id, stream, deliveries.deliveries,
                         self.max_deliveries)
            self.letters.move(queue, stream, entry_id, deliveries.reason, deliveries.deliveries,
                              data)
            return None
        if self.limits.defer(queue, stream, entry_id, record, message):
            return None  # over its global rate limit: in the scheduled set until its slot
        tag = self.ledger.add(stream, entry_id, record, deliveries)
        task_id = steps.revoked(message, self.revokes.is_revoked)
        if task_id is not None and not hand_to_celery(task_id):
            logger.info("Task %s was revoked: dropping its message %s", task_id, entry_id)
            self.acker.ack([tag])
            return None
        properties = message["properties"]
        if steps.expired(entry_id, properties.get("expiration")
                         or self.queues.message_ttl.get(queue)):
            self.acker.ack([tag])
            return None
        properties["delivery_tag"] = tag
        return message


def _has_reply(conn):
    try:
        return conn.can_read(timeout=0)
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False

"""Reading: the blocking XREADGROUP of a channel, its read-ahead buffer, and delivery.

:class:`Reader` owns the channel's read state: the outstanding blocking read (one
XREADGROUP over every consumed stream, on the channel's blocking connection), the
:class:`ReadBuffer` of entries read but not yet delivered. Delivering an entry
(:meth:`Reader.receive`) decodes it and registers it in flight, or drops it: undecodable
or delivered too often (dead-lettered), expired or revoked (acked).
:class:`~.poller.Poller` decides when reads start and finish.
"""

from time import monotonic, time

import redis
from kombu.log import get_logger
from kombu.utils.encoding import bytes_to_str
from kombu.utils.scheduling import cycle_by_name

from .. import keys, records, scripts
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

class Reader:
    def __init__(self, channel, conns, queues, groups, ledger, acker, letters, revokes):
        self.channel = channel  # kombu's side: qos, read_queues, connection._deliver
        self.conns = conns
        self.queues = queues
        self.groups = groups
        self.ledger = ledger
        self.acker = acker
        self.letters = letters
        self.revokes = revokes
        settings = channel.settings
        self.polling_interval = settings.polling_interval
        self.max_batch = settings.max_batch
        self.max_deliveries = settings.max_deliveries
        self.limits = Limiter(channel, conns, queues, settings.rate_limits)
        self.consumer_name = channel.consumer_name
        self.buffer = ReadBuffer()
        self.no_ack = set()  # queues consumed without acks
        self.closing = False
        self._cycle = cycle_by_name(settings.queue_order_strategy)()
        self._reading = None  # the blocking connection while a read is outstanding
        self._sent_at = None
        self._short_since = None  # when a read was first put off for lack of room
        self._wake_at = None  # when the hub timer that ends that wait fires
        self._hot_streams = frozenset()  # the streams the last read with messages got them from
        self._order = {}  # stream -> (priority step, queue index) of the outstanding read
        self._queue_of = {}  # stream -> queue of the outstanding read
        self._blocking_id = None  # CLIENT ID of the blocking connection, to interrupt its read
        self._can_unblock = True  # CLIENT UNBLOCK is allowed (the ACL may deny it)

    # -- room ----------------------------------------------------------------------------

    def budget(self):
        """Messages the QoS lets this channel read ahead now (may be <= 0)."""
        budget = self.channel.qos.can_consume_max_estimate()
        if budget is None:
            budget = self.max_batch
        return budget - len(self.buffer)

    def room(self):
        """:meth:`budget`, or 0 while the QoS allows no delivery."""
        budget = self.budget()
        return budget if budget > 0 and self.channel.qos.can_consume() else 0

    def queues_changed(self, queues):
        self._cycle.update(queues)
        self.interrupt()

    # -- the blocking read ---------------------------------------------------------------

    @property
    def reading(self):
        return self._reading is not None

    @property
    def fileno(self):
        sock = getattr(self._reading, "_sock", None)
        return sock.fileno() if sock is not None else None

    def filenos(self):
        """The file descriptors of the outstanding reads (one here; one per slot on a
        Redis Cluster, cluster.py)."""
        fd = self.fileno if self._reading is not None else None
        return [] if fd is None else [fd]

    def _may_read(self):
        """``(consumed queues in read order, messages the read may take)``, or None while
        no read may start (closing, messages still buffered, no room in the window)."""
        if self.closing or self.buffer:
            return None
        channel = self.channel
        queues = channel.read_queues
        if not queues or not channel.qos.can_consume():
            return None
        budget = self.budget()
        if budget <= 0 or self._put_off(budget):
            return None
        return self._cycle.consume(len(queues)), budget

    def start(self):
        """Send the blocking XREADGROUP for every consumed queue, if there is room."""
        if self._reading is not None:
            return False
        may = self._may_read()
        if may is None:
            return False
        ordered, budget = may
        by_queue = [self.groups.ensure(queue) for queue in ordered]
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
                          "BLOCK", max(int(self.block_seconds() * 1000), 1),
                          "STREAMS", *streams, *([">"] * len(streams)))
        self._reading = conn
        self._sent_at = monotonic()
        # Delivery order within a read: by priority step first, then by queue order.
        self._order = {stream: (step, index) for index, queue in enumerate(ordered)
                       for step, stream in enumerate(self.queues.streams(queue))}
        self._queue_of = {stream: queue for queue, present in zip(ordered, by_queue)
                          for stream in present}
        return True

    def _put_off(self, budget):
        """True while a small read (under half the prefetch window, the rest still in
        hand) waits up to READ_COALESCE for more acks; the hub wakes us then."""
        cycle = self.channel.connection.cycle
        hub = cycle.hub
        prefetch = self.channel.qos.prefetch_count
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
        """Read the reply of the outstanding XREADGROUP into the buffer; returns how many."""
        conn = self._reading
        if conn is None:
            return 0
        self._reading = None
        try:
            reply = self.conns.client.parse_response(conn, "XREADGROUP")
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):
                self.groups.reset()  # a stream expired or was deleted: declare again
                if "UNBLOCKED" in str(exc):  # also: the primary became a replica
                    self._close(conn)  # the next read connects anew (Sentinel: to the new one)
                return 0
            raise
        except self.channel.connection_errors:
            self._close(conn)
            raise
        return self._buffer_reply(reply, self._order, self._queue_of)

    def _buffer_reply(self, reply, order, queue_of, hot=frozenset()):
        """Put the entries of an XREADGROUP ``reply`` in the buffer, by priority step, then
        queue order (``order``: stream -> rank, ``queue_of``: stream -> queue); how many.
        ``hot``: streams still hot from other outstanding reads (one per slot, cluster.py)."""
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
            self._hot_streams = set(hot) | {entry[2] for entry in entries}
            self._cycle.rotate(entries[0][1])
        self.buffer.extend(entry[1:] for entry in entries)
        return len(entries)

    def _close(self, conn):
        """Disconnect ``conn``, and make the poller forget its fd first: a new connection
        may get the same fd number, which the hub would then never watch."""
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            self._forget(sock.fileno())
        conn.disconnect()

    def _forget(self, fd):
        poller = getattr(self.channel.connection, "cycle", None)
        if poller is not None:
            poller.forget(fd)

    def readable(self, fd):
        """The hub saw ``fd`` readable: read the reply into the buffer. False when ``fd``
        is not this read's (nothing asked: the server closed the idle connection)."""
        if self._reading is None or self.fileno != fd:
            self.conns.blocking_conn.disconnect()
            return False
        self.finish()
        return True

    def _connect_blocking(self):
        """The blocking connection, connected, with its client id known."""
        conn = self.conns.blocking_conn
        if conn._sock is None or self._blocking_id is None:
            conn.connect()
            self._blocking_id, self._can_unblock = probe_unblock(conn)
            if not self._can_unblock:
                logger.warning(
                    "sheppy: CLIENT ID or CLIENT UNBLOCK is not allowed for this Redis user "
                    "(ACL @dangerous): reads block for at most %.0f s instead of %.0f s, so a "
                    "change of consumed queues waits for the current read to end",
                    min(self.polling_interval, UNBLOCK_DENIED_BLOCK), self.polling_interval)
        return conn

    def block_seconds(self):
        """How long one blocking read waits: shorter when it cannot be interrupted."""
        if self._can_unblock:
            return self.polling_interval
        return min(self.polling_interval, UNBLOCK_DENIED_BLOCK)

    def interrupt(self):
        """Make the outstanding blocking read return now (its queues changed); without
        CLIENT UNBLOCK it returns by itself within :meth:`block_seconds`."""
        if self._reading is not None and self._blocking_id is not None and self._can_unblock:
            try:
                self.conns.client.client_unblock(self._blocking_id)
            except self.channel.connection_errors:
                pass
            except redis.ResponseError as exc:  # NOPERM: an ACL that denies it
                logger.warning("sheppy: CLIENT UNBLOCK refused (%s); reads now block for at "
                               "most %.0f s", exc, UNBLOCK_DENIED_BLOCK)
                self._can_unblock = False

    def drop_if_overdue(self, health_check_interval):
        """Drop the outstanding read when its reply is late enough to suspect a dead
        socket: ``(True, its file descriptor or None)``, else ``(False, None)``. A reply
        that did come is read instead: nobody drained the connection meanwhile (a pooled
        connection, as a remote-control client's, reused after its read ended)."""
        sent = self._sent_at
        if self._reading is None or sent is None:
            return False, None
        if monotonic() - sent <= self.block_seconds() + health_check_interval:
            return False, None
        if _has_reply(self._reading):
            self.finish()  # its entries (if any) go to the buffer, delivered as usual
            return False, None
        fd = self.fileno
        self._reading.disconnect()
        self._reading = None
        return True, fd

    def reset(self):
        """The connections were dropped: no read is outstanding."""
        self._reading = None
        self._blocking_id = None

    # -- delivering ------------------------------------------------------------------------

    def deliver(self, limit=None):
        """Hand buffered messages to their consumers while the QoS allows; returns how many."""
        delivered = 0
        no_ack = []
        channel = self.channel
        try:
            while self.buffer and (limit is None or delivered < limit) and channel.qos.can_consume():
                item = self.buffer.popleft()
                message = self.receive(*item)
                if message is None:
                    continue
                if item.queue in self.no_ack:
                    no_ack.append(message["properties"]["delivery_tag"])
                delivered += 1
                channel.connection._deliver(message, item.queue)
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
        (undecodable or delivered too often: dead-lettered; expired or revoked: acked)."""
        counter = 1  # this delivery; earlier ones are counted in the record (requeue.lua)
        try:
            record, message = records.record_to_message(data)
            records.check_content_type(message)
        except records.RecordError as exc:
            logger.error("Cannot decode message %s of %s, moved to the dead letters: %s",
                         entry_id, stream, exc)
            self.letters.move(queue, stream, entry_id, f"undecodable: {exc}", counter, data)
            if isinstance(exc, records.RequeuedBySheppy):
                self._give_back_ttl(stream, exc.sheppy_id)
            return None
        deliveries = records.prior_deliveries(record) + counter
        if deliveries > self.max_deliveries:
            logger.error("Message %s of %s was delivered %d times (max_deliveries %d), "
                         "moved to the dead letters", entry_id, stream, deliveries - 1,
                         self.max_deliveries)
            self.letters.move(queue, stream, entry_id, "max_deliveries exceeded",
                              deliveries - 1, data)
            return None
        if self.limits.defer(queue, stream, entry_id, record, message):
            return None  # over its global rate limit: in the scheduled set until its slot
        tag = self.ledger.add(stream, entry_id, record, deliveries)
        task_id = (message.get("headers") or {}).get("id")
        if task_id is not None and self.revokes.is_revoked(task_id) and not hand_to_celery(task_id):
            logger.info("Task %s was revoked: dropping its message %s", task_id, entry_id)
            self.acker.ack([tag])
            return None
        properties = message["properties"]
        ttl = properties.get("expiration") or self.queues.message_ttl.get(queue)
        if ttl is not None and _expired(entry_id, ttl):
            self.acker.ack([tag])
            return None
        properties["delivery_tag"] = tag
        return message


def _has_reply(conn):
    try:
        return conn.can_read(timeout=0)
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _expired(entry_id, ttl):
    """True when the entry (its id is its publish time, ms) is older than ``ttl`` ms."""
    published_ms = int(entry_id.split("-", 1)[0])
    try:
        return time() * 1000 - published_ms > float(ttl)
    except (TypeError, ValueError):
        return False

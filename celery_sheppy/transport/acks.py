"""What a channel delivered and how its acks, rejects and put-backs reach Redis.

:class:`InflightLedger` holds every delivered, unsettled message (by delivery tag); it is
the only holder of that state, and thread-safe (a pool thread's ack must not race a
lost connection's hand-over). :class:`Acker` settles messages:

* an ack from the thread of Celery's hub waits for the end of the loop's turn and goes
  with the turn's other acks, on the ack connection, without waiting for the replies
  (read when they come: :meth:`Acker.confirm`); from any other thread it is sent now;
* an ack that cannot reach Redis is kept by the process's orphan ledger and sent later;
* a reject requeues (the delivery counted) or dead-letters; a put-back (a restore of
  unstarted messages) requeues without counting, marked redelivered (``requeue.lua``).

After a lost connection (:meth:`Acker.lose`) acks and rejects go to the orphan ledger.
"""

import threading
from collections import deque
from threading import get_ident

import redis
from kombu.log import get_logger

from .. import keys, records, scripts
from . import orphans

logger = get_logger(__name__)

GROUP = keys.CONSUMER_GROUP


class InflightLedger:
    """Delivered, unsettled messages: tag -> (stream, entry id, record) and deliveries."""

    def __init__(self):
        self.lock = threading.RLock()
        self._inflight = {}  # delivery tag -> (stream, entry id, record)
        self._deliveries = {}  # delivery tag -> deliveries counted, this one included

    def add(self, stream, entry_id, record, deliveries):
        """Register a delivery; returns its delivery tag."""
        tag = keys.delivery_tag(stream, entry_id)
        with self.lock:
            self._inflight[tag] = (stream, entry_id, record)
            self._deliveries[tag] = deliveries
        return tag

    def pop(self, tag):
        """``(entry or None, deliveries or None)`` of ``tag``, which stops being in flight."""
        with self.lock:
            return self._inflight.pop(tag, None), self._deliveries.pop(tag, None)

    def take(self, tags):
        """``({stream: [entry id]}, unknown count)`` of ``tags``, which stop being in flight."""
        by_stream = {}
        unknown = 0
        for tag in tags:
            entry, _ = self.pop(tag)
            if entry is None:
                unknown += 1
            else:
                by_stream.setdefault(entry[0], []).append(entry[1])
        return by_stream, unknown

    def held(self):
        """``{stream: [entry id]}`` of every message in flight."""
        held = {}
        with self.lock:
            for stream, entry_id, _ in self._inflight.values():
                held.setdefault(stream, []).append(entry_id)
        return held

    def clear(self):
        """``(inflight, deliveries)`` as they were; the ledger is then empty."""
        with self.lock:
            inflight, deliveries = dict(self._inflight), dict(self._deliveries)
            self._inflight.clear()
            self._deliveries.clear()
        return inflight, deliveries


def merged(batches):
    """One ``{stream: [entry id]}`` of several."""
    result = {}
    for by_stream in batches:
        for stream, ids in by_stream.items():
            result.setdefault(stream, []).extend(ids)
    return result


def ack_commands(by_stream):
    """XACK + XDEL of ``{stream: [entry id, ...]}``: the ack, sent waiting or not."""
    return [command for stream, ids in by_stream.items()
            for command in (("XACK", stream, GROUP, *ids), ("XDEL", stream, *ids))]


class Acker:
    def __init__(self, conns, ledger, dead_letters, port, lease_seconds, connection_errors):
        self.conns = conns
        self.ledger = ledger
        self.dead_letters = dead_letters
        self.port = port  # kombu's side: the Poller (hub, loop thread) while open (port.py)
        self.lease_seconds = lease_seconds
        self.connection_errors = connection_errors
        self._due = []  # tags acked during this turn of the hub's loop, not yet sent
        self._unconfirmed = deque()  # (replies due, {stream: ids}) sent, unanswered
        self._fd = None  # the ack connection's socket, as registered with the hub
        self._orphans = None  # the orphan ledger, once the connection was lost

    # -- what Celery does ------------------------------------------------------------------

    def ack_soon(self, tag):
        """Ack ``tag``: from the thread of Celery's hub at the start of the loop's next turn
        (:meth:`flush`), with the other acks of this turn (a prefork worker acks each task
        as its pool accepts it: one round trip each otherwise); from any other thread, or
        without a hub, now."""
        with self.ledger.lock:  # a pool thread's ack must not race lose()
            ledger = self._orphans
            if ledger is None:
                poller = self.port.poller
                if poller is not None and poller.loop_thread == get_ident():
                    self._due.append(tag)
                    return
                by_stream = self._take([tag])  # no hub, or a pool thread: now
        if ledger is None:
            return self.ack_entries(by_stream)
        if not ledger.ack(tag):  # the connection was lost: a new one sends it
            logger.warning("sheppy: ack of a message this worker no longer holds (%s) "
                           "dropped: it was returned to its stream and may run again", tag)

    def reject(self, tag, requeue):
        """``reject(requeue=True)``: back to its stream, the delivery counted; otherwise to
        its queue's dead letters, as with a dead-letter exchange on AMQP."""
        with self.ledger.lock:
            ledger = self._orphans
        if ledger is not None:
            if not ledger.reject(tag, requeue):
                logger.warning("sheppy: reject of a message this worker no longer holds "
                               "(%s) dropped", tag)
        elif requeue:
            self.put_back([tag], count=True)
        else:
            self._dead_letter(tag, "rejected")

    def ack(self, tags):
        """Ack ``tags`` now (messages the transport drops itself)."""
        self.ack_entries(self._take(tags))

    def _take(self, tags):
        by_stream, unknown = self.ledger.take(tags)
        if unknown:
            logger.warning("sheppy: %d ack(s) of messages this channel no longer holds dropped "
                           "(returned to their stream when it closed): they may run again",
                           unknown)
        return by_stream

    def _dead_letter(self, tag, reason):
        entry, deliveries = self.ledger.pop(tag)
        if entry is None:
            return
        stream, entry_id, record = entry
        self.dead_letters.move(keys.queue_of_stream(stream), stream, entry_id, reason,
                               deliveries or 1, records.dumps(record))

    # -- sending ------------------------------------------------------------------------------

    def flush(self):
        """Send the acks of this loop turn on the ack connection without waiting for the
        replies: the hub reads them when they come (:meth:`confirm`)."""
        if not self._due:
            return
        tags, self._due = self._due, []
        by_stream = self._take(tags)
        if not by_stream:
            return
        hub = self._hub()
        if hub is None or not self.conns.topology.single_node:  # streams on several nodes
            return self.ack_entries(by_stream)
        commands = ack_commands(by_stream)
        conn = self.conns.ack_conn
        try:
            if conn._sock is None:
                conn.connect()
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except self.connection_errors:
            # the usual way, with the acks sent before that were not confirmed
            return self.ack_entries(merged([*self._lost_ack_conn(), by_stream]))
        self._unconfirmed.append((len(commands), by_stream))
        fd = conn._sock.fileno()
        if self._fd != fd:
            self._fd = fd
            hub.add_reader(fd, self.confirm)

    def confirm(self, *_, block=False):
        """Read the replies of sent acks (those that arrived; all of them if ``block``).
        If the connection was lost, the unconfirmed acks are sent again the usual way:
        XACK and XDEL are idempotent."""
        if not self._unconfirmed:
            if not block and self.conns.has_ack_conn:
                # Readable with nothing asked: the server closed it. Reconnected on next use.
                self._lost_ack_conn()
            return
        conn = self.conns.ack_conn
        try:
            while self._unconfirmed and (block or conn.can_read(timeout=0)):
                replies, _ = self._unconfirmed[0]
                for _ in range(replies):
                    try:
                        conn.read_response()
                    except redis.ResponseError as exc:
                        logger.warning("sheppy: an ack failed: %r", exc)
                self._unconfirmed.popleft()
        except self.connection_errors:
            self.ack_entries(merged(self._lost_ack_conn()))

    def _lost_ack_conn(self):
        """Drop the ack connection; returns the acks sent on it and not confirmed
        (``[{stream: [entry id]}]``), which the caller sends again."""
        self._unregister()
        unconfirmed = [by_stream for _, by_stream in self._unconfirmed]
        self._unconfirmed.clear()
        self.conns.ack_conn.disconnect()
        return unconfirmed

    def _hub(self):
        return self.port.hub

    def _unregister(self):
        hub = self._hub()
        if self._fd is not None and hub is not None:
            hub.remove_reader(self._fd)
        self._fd = None

    def ack_entries(self, by_stream):
        """XACK + XDEL now. If Redis cannot be reached the acks are kept by the process's
        orphan ledger and sent by the upkeep once it can: an ack is never dropped."""
        if not by_stream:
            return
        try:
            with self.conns.client.pipeline(transaction=False) as pipe:
                for command in ack_commands(by_stream):
                    pipe.execute_command(*command)
                pipe.execute()
        except self.connection_errors as exc:
            count = sum(len(ids) for ids in by_stream.values())
            logger.warning("sheppy: %d ack(s) could not reach Redis (%r): kept, and sent once "
                           "it answers again", count, exc)
            orphans.ledger_for(self.conns.params, self.lease_seconds).retry_acks(by_stream)

    def put_back(self, tags, count=False):
        """Requeue delivered messages. ``count``: the delivery counts (a rejected
        message was tried); otherwise (a restore of unstarted messages) it is not."""
        entries = []
        for tag in tags:
            entry, deliveries = self.ledger.pop(tag)
            if entry is not None:
                if not count:
                    deliveries = records.prior_deliveries(entry[2])
                entries.append((*entry, deliveries))
        self.requeue(entries)

    def return_buffered(self, items):
        """Put read-but-undelivered entries back (they are pending for this consumer).

        They are marked redelivered too: the flag means "may have been seen before",
        and Celery only uses it to check for a stored result first.
        """
        entries = []
        for _, stream, entry_id, data in items:
            try:
                record, _ = records.record_to_message(data)
            except records.RecordError:
                continue
            entries.append((stream, entry_id, record, None))
        self.requeue(entries)

    def requeue(self, entries):
        """``[(stream, entry id, record, deliveries)]`` back in their streams, one round trip."""
        if entries:
            scripts.registry()["requeue"].many(self.conns.client, [
                ([stream], [GROUP, entry_id, records.mark_redelivered(record, deliveries)])
                for stream, entry_id, record, deliveries in entries])

    # -- closing ----------------------------------------------------------------------------------

    def close(self):
        """Send this turn's acks and wait for every reply; then close the ack connection."""
        due = len(self._due)
        try:
            self.flush()
            self.confirm(block=True)
            if self.conns.has_ack_conn:
                self._lost_ack_conn()  # done with it: unregistered and closed
        except self.connection_errors as exc:
            # Still pending for this consumer: a lease recovery redelivers them.
            logger.warning("sheppy: %d ack(s) lost on close: %r", due, exc)

    def lose(self, consumer, messages, buffered, adopt=True):
        """The connection is gone: the orphan ledger of the process takes what Celery
        holds (``messages``: {tag: kombu message}), the ``buffered`` entries and the acks
        not confirmed; later acks and rejects go to it. ``adopt=False`` (a forked child:
        those deliveries are the parent's) only forgets them."""
        with self.ledger.lock:  # no pool thread acks meanwhile: each ack goes one way
            if adopt:
                unsent = self._take(self._due)
                unsent = merged([unsent, *(by_stream for _, by_stream in self._unconfirmed)])
                inflight, deliveries = self.ledger.clear()
                ledger = orphans.ledger_for(self.conns.params, self.lease_seconds)
                ledger.adopt(consumer, inflight, deliveries, messages, buffered, unsent)
                self._orphans = ledger
            else:
                self.ledger.clear()
            self._due, self._unconfirmed = [], deque()
        self._unregister()

"""Messages still in Celery's hands when their channel's connection was lost.

When Celery's consumer loses its broker connection it calls ``Connection.collect()``
and reconnects with a new connection. Tasks it had already handed to its pool go on
running, and their acks arrive later on the old, dead channel. Returning those messages
to their streams (kombu's ``restore_unacked``) would run them twice, and dropping their
acks would run them again after the lease. Instead, a lost channel gives every message
it had delivered to this process's :class:`OrphanLedger`, which

* sends their acks (and rejects) on a live connection of its own when they come
  (``XACK`` does not check the consumer: the entry is named by stream and id);
* keeps renewing their leases, and the registration of the lost channel's consumer name
  (presence.py), while Celery still holds the message object (a worker's request keeps it
  alive until it acks);
* puts back in their streams (``requeue.lua``, marked redelivered) the messages Celery
  let go of without acking (the prefork pool's unsent jobs: the message object was freed),
  the countdown (ETA) tasks Celery did not start when they came due, and the entries read
  but never delivered;
* acks the jobs the prefork pool discarded after it had written them to a child process
  (Celery's ``pool.flush()`` drops every job no child has accepted yet; a written one
  runs in its child all the same, and is not reported back to be acked).

Countdown tasks are judged by their due time, not by whether Celery still references
them: on a lost connection Celery 5.3–5.5 clears its timer, 5.6 keeps the entries and
runs them when due, 5.7 cancels them but keeps the cancelled entries (with the request and
its message) until the next reconnect. A held countdown task whose id Celery's worker
state does not know (``celery.worker.state.requests``: scheduled, reserved or running)
:data:`ETA_GRACE` seconds after it came due, and again ETA_GRACE later, will not be run
by Celery and goes back to its stream.

Acks that cannot be sent (Redis down) are kept and retried by the upkeep of any live
channel of the process; after ``GIVE_UP_AFTER`` leases they are logged and left to the
recovery of expired leases (upkeep.Recovery), which redelivers them. The lost consumer
itself is removed from the groups by that recovery once its registration has ended and
its pending list is empty.
"""

import os
import sys
import threading
import weakref
from time import monotonic, time

import redis
from kombu.log import get_logger

from .. import compat, keys, records, scripts
from ..connect import topology_of
from . import presence

logger = get_logger(__name__)

#: Leases after which an ack that could not be sent is given up (and logged).
GIVE_UP_AFTER = 4

#: Seconds between two tries to reach Redis while it is unreachable.
RETRY_INTERVAL = 1.0

#: Seconds after its due time by which Celery has handed a countdown task it still
#: holds to its pool (its timer fires on the event loop the upkeep also runs on).
ETA_GRACE = 1.0


class Orphan:
    """One delivery of a lost channel."""

    __slots__ = ("stream", "entry_id", "record", "deliveries", "message", "since", "task_id",
                 "due", "unknown_since", "in_pool_process")

    def __init__(self, stream, entry_id, record, deliveries, message):
        self.stream = stream
        self.entry_id = entry_id
        self.record = record
        self.deliveries = deliveries
        # weakref to the kombu message Celery holds; None: read, never delivered
        self.message = weakref.ref(message) if message is not None else None
        self.since = monotonic()
        carried = (record.get("celery") or {}).get("message") or {}
        self.task_id = (carried.get("headers") or {}).get("id")
        self.due = records.due_time(carried)  # a countdown task's due time (epoch s)
        self.unknown_since = None  # first upkeep that found it due and unknown to Celery
        # Asked when the connection is lost, before Celery's pool.flush() discards the jobs
        # no child has accepted: one already written to a child runs there all the same
        self.in_pool_process = message is not None and compat.written_to_pool_process(
            self.task_id)

    def released_by_celery(self, now):
        """True when Celery will not run it: it freed the message, or it is a countdown
        task Celery did not take up when due (seen at two upkeeps in a row, since a
        task that just finished leaves Celery's state a moment before its ack comes, and
        every channel's upkeep runs the ledger's: ETA_GRACE apart)."""
        if self.message is None or self.message() is None:
            return True
        if self.due is None or now < self.due + ETA_GRACE or celery_knows(self.task_id):
            self.unknown_since = None
            return False
        if self.unknown_since is None:
            self.unknown_since = now
            return False
        return now - self.unknown_since >= ETA_GRACE


class OrphanLedger:
    """The orphaned deliveries of one Redis server and database, for this process."""

    def __init__(self, connparams, lease_seconds):
        self.connparams = connparams
        self.lease = lease_seconds
        self._lock = threading.RLock()
        self._orphans = {}  # delivery tag -> Orphan
        self._owners = {}  # delivery tag -> consumer name
        self._acks = {}  # delivery tag -> (stream, entry id, first try): acked, not sent
        self._requeues = {}  # delivery tag -> (Orphan, count the delivery)
        self._renewed_at = 0.0
        self._failed_at = None
        self._client = None

    # -- taking deliveries over ------------------------------------------------------------

    def adopt(self, consumer, inflight, deliveries, messages, buffered, unsent):
        """Take over a lost channel's deliveries.

        ``inflight``: {tag: (stream, entry id, record)} handed to Celery; ``messages``:
        {tag: kombu message}; ``buffered``: [(queue, stream, entry id, data)] read but
        never delivered; ``unsent``: {stream: [entry id]} acked but not confirmed.
        """
        with self._lock:
            for tag, (stream, entry_id, record) in inflight.items():
                self._orphans[tag] = Orphan(stream, entry_id, record, deliveries.get(tag),
                                            messages.get(tag))
                self._owners[tag] = consumer
            for _, stream, entry_id, data in buffered:
                try:
                    record, _ = records.record_to_message(data)
                except records.RecordError:
                    continue  # stays pending: its recovery after the lease dead-letters it
                tag = f"{entry_id} {stream}"
                self._requeues[tag] = (Orphan(stream, entry_id, record, None, None), False)
                self._owners[tag] = consumer
            for stream, ids in unsent.items():
                for entry_id in ids:
                    self._acks[f"{entry_id} {stream}"] = (stream, entry_id, monotonic())
        if inflight or buffered:
            logger.warning(
                "sheppy: broker connection lost with %d message(s) in the worker's hands and "
                "%d read ahead; their acks go to Redis on a new connection, nothing is "
                "requeued while the worker may still run it", len(inflight), len(buffered))
        # Not sent from here (Celery's reconnect path): the next upkeep of a live channel does.

    def retry_acks(self, by_stream):
        """Acks ``{stream: [entry id]}`` that a live channel could not send: sent later."""
        now = monotonic()
        with self._lock:
            for stream, ids in by_stream.items():
                for entry_id in ids:
                    self._acks[f"{entry_id} {stream}"] = (stream, entry_id, now)
            self._failed_at = now

    def __len__(self):
        with self._lock:
            return len(self._orphans) + len(self._acks) + len(self._requeues)

    # -- what Celery does with them ------------------------------------------------------------

    def ack(self, tag):
        with self._lock:
            orphan = self._orphans.pop(tag, None)
            if orphan is None:
                return False
            self._acks[tag] = (orphan.stream, orphan.entry_id, monotonic())
        self.flush()
        return True

    def reject(self, tag, requeue):
        with self._lock:
            orphan = self._orphans.pop(tag, None)
            if orphan is None:
                return False
            if requeue:
                self._requeues[tag] = (orphan, True)
            else:
                # No dead-letter move from here: ack it, as kombu's virtual QoS would.
                logger.warning("sheppy: message %s rejected after a lost connection: acked",
                               orphan.entry_id)
                self._acks[tag] = (orphan.stream, orphan.entry_id, monotonic())
        self.flush()
        return True

    # -- talking to Redis ------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            self._client = topology_of(self.connparams).client()
        return self._client

    def flush(self, upkeep=False):
        """Send due acks and requeues; on ``upkeep``, also renew and release. Never raises."""
        now = monotonic()
        if self._failed_at is not None and now - self._failed_at < RETRY_INTERVAL:
            return
        try:
            if upkeep:
                self._release_dropped()
            self._send_acks()
            if upkeep:
                self._renew(now)
            self._send_requeues()
            self._failed_at = None
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError) as exc:
            self._failed_at = now
            self._give_up_stale(now, exc)
        except redis.ResponseError as exc:
            logger.warning("sheppy: orphaned deliveries: Redis refused a command: %r", exc)

    def _send_acks(self):
        with self._lock:
            due = dict(self._acks)
        if not due:
            return
        by_stream = {}
        for stream, entry_id, _ in due.values():
            by_stream.setdefault(stream, []).append(entry_id)
        with self.client.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, keys.CONSUMER_GROUP, *ids)
                pipe.xdel(stream, *ids)
            pipe.execute()
        with self._lock:
            for tag in due:
                self._acks.pop(tag, None)
                self._owners.pop(tag, None)

    def _release_dropped(self):
        """Messages Celery let go of without acking go back to their streams, but for the
        jobs its prefork pool had written to a child before discarding them: that child
        runs them, nobody acks them, so the ledger does."""
        now = time()
        handed = 0
        with self._lock:
            for tag, orphan in list(self._orphans.items()):
                if orphan.released_by_celery(now):
                    del self._orphans[tag]
                    if orphan.in_pool_process and orphan.message() is None:
                        self._acks[tag] = (orphan.stream, orphan.entry_id, monotonic())
                        handed += 1
                    else:
                        self._requeues[tag] = (orphan, False)
        if handed:
            logger.info("sheppy: %d message(s) of a lost connection that Celery's pool had "
                        "written to a child process before discarding them: acked, the child "
                        "runs them", handed)

    def _send_requeues(self):
        with self._lock:
            due = dict(self._requeues)
        if not due:
            return
        script = scripts.registry()["requeue"]
        for tag, (orphan, counted) in due.items():
            deliveries = orphan.deliveries if counted else records.prior_deliveries(orphan.record)
            script(self.client, keys=[orphan.stream],
                   args=[keys.CONSUMER_GROUP, orphan.entry_id,
                         records.mark_redelivered(orphan.record, deliveries)])
            with self._lock:
                self._requeues.pop(tag, None)
                self._owners.pop(tag, None)
        logger.info("sheppy: %d message(s) of a lost connection that the worker let go of "
                    "went back to their streams", len(due))

    def _renew(self, now):
        if now - self._renewed_at < self.lease / 4:
            return
        self._renewed_at = now
        with self._lock:
            held = {}
            for tag, orphan in self._orphans.items():
                held.setdefault((self._owners[tag], orphan.stream), []).append(orphan.entry_id)
        if not held:
            return
        # the lost consumers stay registered while they hold something, so no recovery
        # looks for their messages (presence.py); those Celery let go of are put back above
        presence.register(self.client, sorted({consumer for consumer, _ in held}),
                          int(self.lease * 1000))
        script = scripts.registry()["renew"]
        for (consumer, stream), ids in held.items():
            script(self.client, keys=[stream], args=[keys.CONSUMER_GROUP, consumer, *ids])

    def _give_up_stale(self, now, exc):
        limit = GIVE_UP_AFTER * self.lease
        with self._lock:
            stale = [tag for tag, (_, _, since) in self._acks.items() if now - since > limit]
            for tag in stale:
                self._acks.pop(tag, None)
                self._owners.pop(tag, None)
        if stale:
            logger.error("sheppy: gave up sending %d ack(s) after a lost connection (%r): "
                         "those messages will be redelivered after their lease", len(stale), exc)
        else:
            logger.debug("sheppy: orphaned deliveries: Redis unreachable (%r); will retry", exc)


_ledgers = {}
_ledgers_lock = threading.Lock()
_pid = os.getpid()


def ledger_for(connparams, lease_seconds):
    """This process's ledger for the server and database of ``connparams``."""
    global _pid
    key = tuple(sorted((name, repr(value)) for name, value in connparams.items()))
    with _ledgers_lock:
        if os.getpid() != _pid:  # forked: the parent's deliveries are not ours
            _ledgers.clear()
            _pid = os.getpid()
        ledger = _ledgers.get(key)
        if ledger is None:
            ledger = _ledgers[key] = OrphanLedger(connparams, lease_seconds)
        ledger.lease = min(ledger.lease, lease_seconds)
        return ledger


def celery_knows(task_id):
    """True when this process's Celery worker has task ``task_id`` scheduled, reserved or
    running (``celery.worker.state.requests``), or when no Celery worker runs here."""
    state = sys.modules.get("celery.worker.state")
    if state is None or task_id is None:
        return True
    return str(task_id) in state.requests


def upkeep():
    """Renew, release and retry the orphaned deliveries of this process (hub timer)."""
    if os.getpid() != _pid:
        return
    with _ledgers_lock:
        ledgers = list(_ledgers.values())
    for ledger in ledgers:
        if len(ledger):
            ledger.flush(upkeep=True)

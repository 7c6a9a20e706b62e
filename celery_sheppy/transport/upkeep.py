"""A channel's upkeep: named periodic jobs, run in order by :meth:`Upkeep.run`.

The transport's poller runs the upkeep of every channel once a second (Celery's hub
timer, or ``drain_events``); each job keeps its own interval, so a run is cheap when
idle. In order:

``expiring_queues``  renew expiring queues (their streams' TTL) and their bindings
``orphans``          acks, leases and put-backs of a lost connection (``orphans.py``),
                     before the reclaim: leases of what this worker still runs first
``register_consumer`` renew this consumer's registration as alive (``presence.py``)
``reap_consumers``   remove consumers idle past ``consumer_reap_after`` holding nothing,
                     unless registered
``renew_leases``     reset the idle time of every entry this channel holds
``reclaim``          take over entries whose lease expired (XAUTOCLAIM, ``reclaim.lua``)
``promote``          move due messages from sheppy's scheduled set to their streams
``read_revokes``     read revokes published while this worker did not listen
"""

from time import monotonic, time

import redis
from kombu.log import get_logger
from kombu.utils.encoding import bytes_to_str

from .. import keys, scripts
from . import orphans, presence

logger = get_logger(__name__)

GROUP = keys.CONSUMER_GROUP

#: Most entry ids one lease renewal call carries (Lua's unpack has a limit).
RENEW_CHUNK = 1000

#: Seconds between looks for due messages in the scheduled set, and most moved per look.
PROMOTE_INTERVAL = 1.0
PROMOTE_BATCH = 500

#: With nothing due, the next look is at the earliest due time, or after this many
#: seconds, or delay_threshold if shorter (a producer may schedule a message due
#: sooner than anything seen, but never sooner than delay_threshold).
PROMOTE_IDLE_LOOK = 30.0

#: Seconds between looks at every consumed queue's scheduled set itself (the first look
#: too), for messages scheduled without a hint in ``sheppy:celery::due``.
PROMOTE_FULL_LOOK = 600.0


class Upkeep:
    def __init__(self, jobs):
        self.jobs = list(jobs)

    def run(self):
        """Run every job that is due, in order (a connection error stops the run)."""
        for job in self.jobs:
            job.run()


class ExpiringQueues:
    """Keep consumed expiring queues (and their bindings) alive: every third of the
    shortest expiry among them."""

    name = "expiring_queues"

    def __init__(self, conns, queues, router, consumed, bindings_of):
        self.conns = conns
        self.queues = queues
        self.router = router
        self.consumed = consumed  # () -> the queues the channel consumes
        self.bindings_of = bindings_of  # queue -> kombu's [(exchange, routing_key, arguments)]
        self._renewed_at = monotonic()

    def run(self):
        expires = self.queues.expires
        consumed = [queue for queue in self.consumed() if queue in expires]
        if not consumed:
            return
        now = monotonic()
        if now - self._renewed_at < min(expires[queue] for queue in consumed) / 1000 / 3:
            return
        self._renewed_at = now
        calls = []
        with self.conns.client.pipeline(transaction=False) as pipe:
            for queue in consumed:
                for stream in self.queues.streams(queue):
                    pipe.pexpire(stream, expires[queue])
                calls.extend(self.router.renewals(queue, self.bindings_of(queue)))
            pipe.execute()
        scripts.registry()["bind"].many(self.conns.client, calls)


class OrphanUpkeep:
    name = "orphans"

    def run(self):
        orphans.upkeep()


class ConsumerReaper:
    """Remove consumers of the group idle past ``consumer_reap_after`` with nothing pending
    and no registration (every half of it); on close, this channel's own consumer."""

    name = "reap_consumers"

    def __init__(self, conns, queues, consumed, consumer_name, reap_after):
        self.conns = conns
        self.queues = queues
        self.consumed = consumed
        self.consumer_name = consumer_name
        self.reap_after = reap_after  # seconds
        self.read_from = set()  # queues this channel's consumer may appear in
        self._reaped_at = 0.0

    def run(self, force=False, own=False):
        now = monotonic()
        if not force and not own and now - self._reaped_at < self.reap_after / 2:
            return
        self._reaped_at = now
        queues = sorted(self.read_from) if own else self.consumed()
        streams = [stream for queue in queues for stream in self.queues.streams(queue)]
        if not streams:
            return
        alive = presence.registered(self.conns.client, self._idle(streams))
        alive.discard(self.consumer_name if own else None)
        calls = [([stream], [GROUP, int(self.reap_after * 1000),
                             self.consumer_name if own else "", *sorted(alive)])
                 for stream in streams]
        scripts.registry()["reap_consumers"].many(self.conns.client, calls, raise_on_error=False)

    def _idle(self, streams):
        """Names of the consumers of ``streams`` the script would remove for being idle
        (nothing pending, idle past ``reap_after``): their registrations are asked for."""
        with self.conns.client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_consumers(stream, GROUP)
            replies = pipe.execute(raise_on_error=False)
        limit_ms = self.reap_after * 1000
        return {bytes_to_str(c["name"]) for reply in replies if isinstance(reply, list)
                for c in reply if c["pending"] == 0 and c["idle"] > limit_ms}


class LeaseRenewal:
    """Reset the idle time of the entries this channel holds, every quarter of the lease."""

    name = "renew_leases"

    def __init__(self, conns, held, consumer_name, lease_seconds):
        self.conns = conns
        self.held = held  # () -> [{stream: [entry id]}] of what the channel holds
        self.consumer_name = consumer_name
        self.lease_seconds = lease_seconds
        self._renewed_at = monotonic()

    def run(self, force=False):
        now = monotonic()
        if not force and now - self._renewed_at < self.lease_seconds / 4:
            return
        self._renewed_at = now
        calls = []
        for by_stream in self.held():
            for stream, ids in by_stream.items():
                for start in range(0, len(ids), RENEW_CHUNK):
                    calls.append(([stream], [GROUP, self.consumer_name,
                                             *ids[start:start + RENEW_CHUNK]]))
        if not calls:
            return
        replies = scripts.registry()["renew"].many(self.conns.client, calls,
                                                   raise_on_error=False)
        lost = sum(len(reply) for reply in replies if isinstance(reply, list))
        if lost:
            logger.debug("sheppy: %d held message(s) were acked or taken over meanwhile", lost)


class Reclaim:
    """Take over entries of consumers that stopped renewing them (XAUTOCLAIM), every half
    lease: a dead consumer's messages come back within 1.5 leases."""

    name = "reclaim"

    def __init__(self, conns, queues, reader, leased, lease_seconds):
        self.conns = conns
        self.queues = queues
        self.reader = reader
        self.leased = leased
        self.lease_seconds = lease_seconds
        self._reclaimed_at = monotonic()

    def run(self):
        now = monotonic()
        if now - self._reclaimed_at < max(self.lease_seconds / 2, 1.0):
            return
        self._reclaimed_at = now
        queues = self.leased()
        budget = self.reader.room()
        if not queues or budget <= 0:
            return
        script = scripts.registry()["reclaim"]
        consumer = self.reader.consumer_name
        lease_ms = max(int(self.lease_seconds * 1000), 1)
        taken = 0
        for queue in queues:  # one call at a time: each call's budget is what is left
            if budget <= 0:
                break
            streams = self.queues.streams(queue)
            try:
                reply = script(self.conns.client, keys=streams,
                               args=[GROUP, consumer, lease_ms, budget])
            except redis.ResponseError as exc:  # e.g. NOGROUP: a stream was deleted
                logger.debug("sheppy: reclaim on %s failed: %r", queue, exc)
                continue
            for index, entry_id, data, counter in zip(*[iter(reply)] * 4):
                stream, entry_id = streams[int(index) - 1], bytes_to_str(entry_id)
                if orphans.still_held(keys.delivery_tag(stream, entry_id), consumer):
                    continue  # this worker still runs it since a lost connection: not stolen
                self.reader.claim(queue, stream, entry_id, data, counter)
                taken += 1
                budget -= 1
        if taken:
            logger.warning("sheppy: took over %d message(s) whose lease of %ss expired",
                           taken, self.lease_seconds)


def due_hint(queue_name, due):
    """The command that tells promoters sheppy queue ``queue_name`` has a message due at
    ``due`` (epoch s): ZADD LT keeps the earliest. Sent after the scheduling itself, so a
    promoter that reset the hint and then read the set sees the message (Promotion)."""
    return ("ZADD", keys.due_index(), "LT", repr(float(due)), queue_name)


class Promotion:
    """Move due messages of the consumed queues from the scheduled set to their streams.

    Which queues have something due comes from one read of ``sheppy:celery::due``
    (:func:`due_hint`), not from a look at every queue's set; every
    PROMOTE_FULL_LOOK seconds (and first) each consumed queue's set is read once, for
    messages a writer that gives no hint scheduled (an older celery-sheppy)."""

    name = "promote"

    def __init__(self, conns, queues, leased, delay_threshold):
        self.conns = conns
        self.queues = queues
        self.leased = leased
        self.delay_threshold = delay_threshold
        self._promoted_at = monotonic()
        self._next_look = 0.0  # epoch seconds
        self._full_look_at = None  # monotonic time of the last look at every set

    def run(self):
        now = monotonic()
        if now - self._promoted_at < PROMOTE_INTERVAL or time() < self._next_look:
            return
        self._promoted_at = now
        queues = self.leased()
        if not queues:
            return
        named = {self.queues.named(queue): queue for queue in queues}
        earliest = self._earliest(named, now)
        due_queues = [named[name] for name, at in earliest.items() if at <= time()]
        if not due_queues:
            # Anything scheduled later is due more than delay_threshold after it is sent.
            look = time() + min(PROMOTE_IDLE_LOOK, self.delay_threshold)
            self._next_look = min([*earliest.values(), look])
            return
        self._next_look = 0.0  # more may be due: look again after PROMOTE_INTERVAL
        self._promote(due_queues)
        self._rehint([self.queues.named(queue) for queue in due_queues])

    def _earliest(self, named, now):
        """{sheppy queue name: earliest due time} of the consumed queues with a hint (or,
        at a full look, with anything scheduled)."""
        client = self.conns.client
        if self._full_look_at is None or now - self._full_look_at >= PROMOTE_FULL_LOOK:
            self._full_look_at = now
            with client.pipeline(transaction=False) as pipe:
                for name in named:
                    pipe.zrange(keys.scheduled_set(name), 0, 0, withscores=True)
                firsts = pipe.execute(raise_on_error=False)
            return {name: rows[0][1] for name, rows in zip(named, firsts)
                    if isinstance(rows, list) and rows}
        hints = client.zrange(keys.due_index(), 0, -1, withscores=True)
        return {name: at for name, at in ((bytes_to_str(member), at) for member, at in hints)
                if name in named}

    def _promote(self, due_queues):
        client = self.conns.client
        with client.pipeline(transaction=False) as pipe:
            for queue in due_queues:
                pipe.zrangebyscore(keys.scheduled_set(self.queues.named(queue)), "-inf", time(),
                                   start=0, num=PROMOTE_BATCH)
            due = pipe.execute(raise_on_error=False)
        calls = []
        for queue, members in zip(due_queues, due):
            if not isinstance(members, list):
                continue
            name = self.queues.named(queue)
            for member in members:
                sid = bytes_to_str(member)
                calls.append(([keys.scheduled_set(name), keys.delayed_message(name, sid),
                               keys.task_record(name, sid), *self.queues.streams(queue)],
                              [sid, GROUP]))
        scripts.registry()["promote"].many(client, calls, raise_on_error=False)

    def _rehint(self, names):
        """Set the hints of ``names`` to their sets' earliest due times: the hint is
        removed first, then the set read, so a message scheduled meanwhile, whose writer
        lowers the hint after adding it, is never hidden by an older reading."""
        client = self.conns.client
        client.zrem(keys.due_index(), *names)
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zrange(keys.scheduled_set(name), 0, 0, withscores=True)
            firsts = pipe.execute(raise_on_error=False)
        hints = [due_hint(name, rows[0][1]) for name, rows in zip(names, firsts)
                 if isinstance(rows, list) and rows]
        if hints:
            with client.pipeline(transaction=False) as pipe:
                for hint in hints:
                    pipe.execute_command(*hint)
                pipe.execute(raise_on_error=False)


class RevokeReading:
    name = "read_revokes"

    def __init__(self, revokes, leased):
        self.revokes = revokes
        self.leased = leased

    def run(self):
        self.revokes.read(leased=bool(self.leased()))

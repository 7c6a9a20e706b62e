"""A channel's upkeep: named periodic jobs, run in order by :meth:`Upkeep.run`.

The transport's poller runs the upkeep of every channel once a second (Celery's hub
timer, or ``drain_events``); each job keeps its own interval, so a run is cheap when
idle. In order:

``expiring_queues``  renew expiring queues (their streams' TTL) and their bindings
``orphans``          acks, leases and put-backs of a lost connection (``orphans.py``),
                     before the recovery: leases of what this worker still runs first
``register_consumer`` renew this consumer's registration as alive (``presence.py``)
``renew_leases``     reset the idle time of every entry this channel holds
``recover``          put back the expired entries of dead consumers (``recover.lua``)
``promote``          move due messages from sheppy's scheduled set to their streams
``read_revokes``     read revokes published while this worker did not listen

Idle, a channel's upkeep costs a fixed number of commands whatever the number of queues it
consumes: the registration (every quarter lease), a look for dead consumers (every half
lease), a look for due messages (at most every 30 s), a read of revokes (every 30 s).
"""

from time import monotonic, time

from kombu.log import get_logger
from kombu.utils.encoding import bytes_to_str

from .. import keys, records, scripts
from . import orphans, presence

logger = get_logger(__name__)

GROUP = keys.CONSUMER_GROUP

#: Most entry ids one lease renewal call carries (Lua's unpack has a limit).
RENEW_CHUNK = 1000

#: Entries of a dead consumer one recovery call takes per stream (Lua's unpack has a
#: limit), and seconds one upkeep run may spend recovering (the rest at the next run).
RECOVER_BATCH = 1000
RECOVER_TIME = 0.5

#: A dead consumer's name is kept in the registry this many leases after it died, for
#: every worker to recover its messages in the queues it consumes.
FORGET_AFTER_LEASES = 20

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
    """Remove consumers of the group that hold nothing and are gone: at a channel's first
    recovery (:meth:`sweep`, for consumers that never registered) and, on close, this
    channel's own. Dead registered consumers are removed by their recovery."""

    def __init__(self, conns, queues, consumer_name, reap_after):
        self.conns = conns
        self.queues = queues
        self.consumer_name = consumer_name
        self.reap_after = reap_after  # seconds
        self.read_from = set()  # queues this channel's consumer may appear in

    def run(self, own=False):
        """Remove this channel's own consumer from every group it may appear in (if it
        holds nothing)."""
        streams = [stream for queue in sorted(self.read_from)
                   for stream in self.queues.streams(queue)]
        self._reap(streams, self.consumer_name, ())

    def sweep(self, streams):
        """Remove the unregistered consumers of ``streams`` idle past ``consumer_reap_after``
        holding nothing; returns the unregistered ones that hold entries (to recover)."""
        with self.conns.client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_consumers(stream, GROUP)
            replies = pipe.execute(raise_on_error=False)
        by_stream = {stream: reply for stream, reply in zip(streams, replies)
                     if isinstance(reply, list)}
        names = {bytes_to_str(c["name"]) for reply in by_stream.values() for c in reply}
        alive = presence.registered(self.conns.client, names)
        limit_ms = self.reap_after * 1000
        idle = [stream for stream, reply in by_stream.items()
                if any(not c["pending"] and c["idle"] > limit_ms
                       and bytes_to_str(c["name"]) not in alive for c in reply)]
        self._reap(idle, "", alive)
        return sorted({bytes_to_str(c["name"]) for reply in by_stream.values() for c in reply
                       if c["pending"]} - alive)

    def _reap(self, streams, own, alive):
        if streams:
            calls = [([stream], [GROUP, int(self.reap_after * 1000), own, *sorted(alive)])
                     for stream in streams]
            scripts.registry()["reap_consumers"].many(self.conns.client, calls,
                                                      raise_on_error=False)


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


class Recovery:
    """Put the messages of dead consumers back in their streams, for any worker with room.

    Dead consumers are found in the consumer registry (presence.py: one read every half
    lease, whatever the number of queues), not by looking at every stream: a consumer
    whose registration ended. For each, every stream of this channel's leased queues
    hands over its entries idle past the lease (``recover.lua``, in rounds of
    RECOVER_BATCH), which go back to the end of their stream marked redelivered, their
    deliveries counted (``requeue.lua``); a consumer left holding nothing is removed from
    the group. A dead consumer's messages are thus readable by every worker within 1.5
    leases of its last renewal, whatever their number; a consumer whose entries are still
    renewed (its process lives on) keeps them.

    The first run also looks at the consumers of every stream once (``XINFO CONSUMERS``):
    a consumer that holds entries and is not registered (an older celery-sheppy, a sheppy
    worker that stopped on a Celery task) is recovered as a dead one, at every run until
    it holds nothing, and idle unregistered consumers holding nothing are removed.
    """

    name = "recover"

    def __init__(self, conns, queues, acker, letters, reaper, leased, consumer_name,
                 lease_seconds):
        self.conns = conns
        self.queues = queues
        self.acker = acker
        self.letters = letters
        self.reaper = reaper
        self.leased = leased
        self.consumer_name = consumer_name
        self.lease_ms = max(int(lease_seconds * 1000), 1)
        self._ran_at = 0.0  # the first run (with its sweep) at the first upkeep
        self._swept = False
        self._unregistered = set()  # names found holding entries by the sweep, not yet done
        self._recovered = set()  # dead names that hold nothing more in this channel's streams

    def run(self):
        now = monotonic()
        if now - self._ran_at < max(self.lease_ms / 2000, 1.0):
            return
        queues = self.leased()
        if not queues:
            return
        self._ran_at = now
        streams = [(queue, stream) for queue in queues for stream in self.queues.streams(queue)]
        if not self._swept:
            self._unregistered.update(self.reaper.sweep([stream for _, stream in streams]))
            self._swept = True
        ended = presence.ended(self.conns.client, FORGET_AFTER_LEASES * self.lease_ms)
        self._recovered &= set(ended)
        deadline = monotonic() + RECOVER_TIME
        for name in [*sorted(self._unregistered), *ended]:
            if name == self.consumer_name or name in self._recovered:
                continue
            done = self._recover(name, streams, deadline)
            if done is None:  # out of time: go on at the next upkeep, not half a lease later
                self._ran_at = 0.0
                return
            if done:
                self._unregistered.discard(name)
                if name in ended:
                    self._recovered.add(name)

    def _recover(self, name, streams, deadline):
        """Take over and put back ``name``'s expired entries in ``streams``: True when it
        holds nothing more there, False when it still holds live entries, None when the
        time ran out first."""
        script = scripts.registry()["recover"]
        left = list(streams)
        while left:
            if monotonic() > deadline:
                return None
            replies = script.many(self.conns.client, [
                ([stream], [GROUP, name, self.lease_ms, self.consumer_name, RECOVER_BATCH])
                for _, stream in left], raise_on_error=False)
            more, holding = [], False
            for (queue, stream), reply in zip(left, replies):
                if isinstance(reply, Exception):
                    logger.debug("sheppy: recovery on %s failed: %r", stream, reply)
                    holding = True
                    continue
                taken = list(zip(*[iter(reply[1:])] * 3))
                self._put_back(queue, stream, taken)
                if len(taken) == RECOVER_BATCH:
                    more.append((queue, stream))
                elif reply[0]:
                    holding = True
            if not more:
                return not holding
            left = more
        return True

    def _put_back(self, queue, stream, taken):
        if not taken:
            return
        entries = []
        for entry_id, data, deliveries in taken:
            entry_id = bytes_to_str(entry_id)
            try:
                record, _ = records.record_to_message(data or None)
            except records.RecordError as exc:
                self.letters.move(queue, stream, entry_id, f"undecodable: {exc}",
                                  int(deliveries), data)
                continue
            entries.append((stream, entry_id, record,
                            records.prior_deliveries(record) + int(deliveries)))
        self.acker.requeue(entries)
        logger.warning("sheppy: %d message(s) of a consumer whose lease expired went back to "
                       "%s", len(taken), stream)


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

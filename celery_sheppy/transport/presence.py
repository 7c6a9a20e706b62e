"""The consumer registry: which consumers of the ``workers`` groups are alive, in one key.

A consumer that holds messages shows it lives by renewing their lease; one that holds
nothing leaves no such trace, and its reads do not either on Redis 7.0 (``XINFO
CONSUMERS`` counts empty reads in its idle time only from 7.2 on; 7.0 does not even add a
consumer to a group before it is given an entry). So a channel that consumes a leased
queue joins its groups when it starts consuming it (``XGROUP CREATECONSUMER``) and keeps
its name in ``sheppy:celery::consumers`` (:func:`keys.consumer_registry`, a zset: name ->
the end of its registration, epoch ms), one ``ZADD`` every quarter lease for one lease,
removed when it closes: the same on every server, one command whatever the number of
queues. A process's orphan ledger keeps the names of its lost channels registered while
it holds their messages (orphans.py).

Readers: ``celery sheppy status`` (:func:`registered`), and the recovery of a dead
consumer's messages (upkeep.Recovery), which asks for the names whose registration ended
(:func:`ended`) instead of looking at every stream. The ends are the registering
process's clock: a worker whose clock runs a quarter lease behind the others' would be
judged dead early, which only makes the recovery look, and take nothing (it takes only
entries idle longer than the lease, as Redis counts it).
"""

from time import monotonic, time

from .. import keys


def now_ms():
    return int(time() * 1000)


class Registration:
    name = "register_consumer"

    def __init__(self, conns, queues, consumer_name, read_from, lease_seconds):
        self.conns = conns
        self.queues = queues
        self.consumer_name = consumer_name
        self.read_from = read_from  # the queues whose groups this consumer may appear in
        self.lease_ms = max(int(lease_seconds * 1000), 1)
        self._registered_at = None

    def run(self, force=False):
        """Register (again) every quarter lease while the channel reads a leased queue."""
        now = monotonic()
        if not force and self._registered_at is not None \
                and now - self._registered_at < self.lease_ms / 4000:
            return
        if not self.queues.leased(self.read_from):
            return  # remote-control and event queues only: nobody counts those consumers
        register(self.conns.client, [self.consumer_name], self.lease_ms)
        self._registered_at = now

    def join(self, streams):
        """Appear in the group of ``streams`` now (XGROUP CREATECONSUMER): Redis 7.0 adds a
        consumer to a group only when it is given an entry, so an idle worker that was
        never given one would not be listed at all."""
        if not streams:
            return
        with self.conns.client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xgroup_createconsumer(stream, keys.CONSUMER_GROUP, self.consumer_name)
            pipe.execute(raise_on_error=False)  # NOGROUP: a stream deleted meanwhile

    def remove(self):
        """Unregister (the channel closes); the reaper may then remove its consumer."""
        if self._registered_at is not None:
            self.conns.client.zrem(keys.consumer_registry(), self.consumer_name)
            self._registered_at = None


def register(client, names, lease_ms):
    """Register consumer ``names`` as alive for ``lease_ms`` from now (one ZADD)."""
    end = now_ms() + lease_ms
    client.zadd(keys.consumer_registry(), {name: end for name in names})


def registered(client, names):
    """Those of consumer ``names`` whose registration lasts (one ZMSCORE; none if no
    names)."""
    names = sorted(set(names))
    if not names:
        return set()
    ends = client.zmscore(keys.consumer_registry(), names)
    now = now_ms()
    return {name for name, end in zip(names, ends) if end is not None and end >= now}


def ended(client, forget_after_ms):
    """Names whose registration ended (oldest first); those that ended more than
    ``forget_after_ms`` ago are forgotten in the same round trip."""
    now = now_ms()
    with client.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(keys.consumer_registry(), "-inf", now - forget_after_ms)
        pipe.zrangebyscore(keys.consumer_registry(), "-inf", now)
        _, names = pipe.execute()
    return [name.decode() if isinstance(name, bytes) else name for name in names]

"""A consuming channel's registration: how an idle worker is told from a gone one.

A consumer that holds messages shows it lives by renewing their lease (``upkeep``'s
``renew_leases``). One that holds nothing leaves no such trace, and its reads do not
either on Redis 7.0 (``XINFO CONSUMERS`` counts empty reads in its idle time only from
7.2 on; 7.0 does not even add a consumer to a group before it is given an entry). So a
channel that consumes a leased queue joins its groups when it starts consuming it
(``XGROUP CREATECONSUMER``) and keeps ``sheppy:celery::consumer:<name>`` set for one
lease (``SET … PX``, Redis's clock), renewed every quarter lease, deleted when it closes:
the same on every server. One command per quarter lease per consuming channel (every
7.5 s with the default lease), whatever the number of queues. ``celery sheppy status``
and the consumer reaper ask for the registrations of the consumers they see.
"""

from time import monotonic

from .. import keys


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
        self.conns.client.set(keys.consumer_registration(self.consumer_name), self.lease_ms,
                              px=self.lease_ms)
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
            self.conns.client.delete(keys.consumer_registration(self.consumer_name))
            self._registered_at = None


def registered(client, names):
    """Those of consumer ``names`` whose registration lasts (one round trip; none if no
    names)."""
    names = sorted(set(names))
    if not names:
        return set()
    with client.pipeline(transaction=False) as pipe:
        for name in names:  # one key each: one slot each on a Redis Cluster
            pipe.exists(keys.consumer_registration(name))
        return {name for name, found in zip(names, pipe.execute()) if found}

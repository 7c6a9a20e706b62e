"""Which of a queue's streams exist with the ``workers`` group, as this channel last saw.

A queue's pending stream is made when it is declared; a priority stream is made by the
first message of its priority (so an unused step leaves no key behind), with the group,
by whoever publishes it. A reader reads only the streams known to exist: a look for new
ones runs every :data:`PRIORITY_LOOK_INTERVAL` seconds, and a NOGROUP reply (a stream
expired or was deleted) makes every queue declare again.
"""

from time import monotonic

from .. import keys

GROUP = keys.CONSUMER_GROUP

#: Seconds between looks for priority streams a publisher made (the first message of a
#: priority creates its stream): the first such message of a queue waits up to this long.
PRIORITY_LOOK_INTERVAL = 5.0


class StreamGroups:
    def __init__(self, conns, queues):
        self.conns = conns
        self.queues = queues
        self._grouped = {}  # queue -> its streams that exist with the group (as last seen)
        self._publish_grouped = set()  # priority streams this channel made sure have the group
        self._discovered_at = monotonic()

    def ensure(self, queue, force=False):
        """Create the queue's pending stream and the group on it, and learn which of its
        priority streams exist. Returns those that do, highest priority first."""
        if queue in self._grouped and not force:
            return self._grouped[queue]
        streams = self.queues.streams(queue)
        expires = self.queues.expires.get(queue)
        with self.conns.client.pipeline(transaction=False) as pipe:
            pipe.xgroup_create(streams[0], GROUP, id="0", mkstream=True)
            for stream in streams[1:]:
                pipe.xgroup_create(stream, GROUP, id="0")
            if expires is not None:
                pipe.pexpire(streams[0], expires)
            replies = pipe.execute(raise_on_error=False)
        present = []
        for stream, reply in zip(streams, replies):
            if not isinstance(reply, Exception) or "BUSYGROUP" in str(reply):
                present.append(stream)
            elif "requires the key to exist" not in str(reply):
                raise reply
        self._grouped[queue] = present
        return present

    def needs_group(self, queue, stream):
        """True when a publish to priority ``stream`` must create it with the group first
        (once per channel; BUSYGROUP when it exists is no error)."""
        if stream == keys.pending_stream(self.queues.named(queue)) or stream in self._publish_grouped:
            return False
        self._publish_grouped.add(stream)
        present = self._grouped.get(queue)
        if present is not None and stream not in present:  # this channel reads it too
            self._grouped[queue] = [name for name in self.queues.streams(queue)
                                    if name in present or name == stream]
        return True

    def discover(self, queues, force=False):
        """Look for priority streams of ``queues`` that publishers made since they were
        declared (every PRIORITY_LOOK_INTERVAL seconds); True when one joins the read."""
        now = monotonic()
        if not force and now - self._discovered_at < PRIORITY_LOOK_INTERVAL:
            return False
        self._discovered_at = now
        absent = {queue: [stream for stream in self.queues.streams(queue)
                          if stream not in self._grouped.get(queue, ())]
                  for queue in queues}
        absent = {queue: streams for queue, streams in absent.items() if streams}
        if not absent:
            return False
        with self.conns.client.pipeline(transaction=False) as pipe:
            for streams in absent.values():
                pipe.exists(*streams)
            counts = pipe.execute()
        grown = [queue for queue, count in zip(absent, counts) if count]
        for queue in grown:
            self.ensure(queue, force=True)
        return bool(grown)

    def forget(self, queue):
        self._grouped.pop(queue, None)

    def reset(self):
        """Forget every stream: one expired or was deleted, so queues declare again."""
        self._grouped.clear()
        self._publish_grouped.clear()

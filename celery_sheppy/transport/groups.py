"""Which of a queue's streams exist with the ``workers`` group, as this channel last saw.

Declaring a queue makes all of its streams with the group: its pending stream and one
stream per priority step (an empty stream with the group is about 700 bytes), so a
reader reads them all from the start and never looks for new ones; a publisher to a
queue nobody declared makes the stream of its message's priority, with the group. A
NOGROUP reply (a stream expired or was deleted) makes every queue declare again.
"""

from .. import keys

GROUP = keys.CONSUMER_GROUP


class StreamGroups:
    def __init__(self, conns, queues):
        self.conns = conns
        self.queues = queues
        self._grouped = {}  # queue -> its streams that exist with the group (as last seen)
        self._publish_grouped = set()  # priority streams this channel made sure have the group

    def ensure(self, queue, force=False):
        """Create the queue's streams with the group (those that exist keep theirs).
        Returns the streams, highest priority first."""
        if queue in self._grouped and not force:
            return self._grouped[queue]
        streams = self.queues.streams(queue)
        expires = self.queues.expires.get(queue)
        with self.conns.client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
            if expires is not None:
                pipe.pexpire(streams[0], expires)
            replies = pipe.execute(raise_on_error=False)
        for reply in replies[:len(streams)]:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply
        self._grouped[queue] = streams
        return streams

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

    def forget(self, queue):
        self._grouped.pop(queue, None)

    def reset(self):
        """Forget every stream: one expired or was deleted, so queues declare again."""
        self._grouped.clear()
        self._publish_grouped.clear()

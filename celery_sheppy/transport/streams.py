"""The streams of a queue: the only place that derives them from the priority steps.

A queue ``q`` has one stream per priority step. The first (lowest) step is always
sheppy's ``sheppy:pending:<q>``, whatever its number, so a message without a priority
lands where sheppy's tools look; every other step ``n`` is
``sheppy:celery:<q>:priority:<n>``. An expiring queue (remote-control replies, event
receivers) has the pending stream only: its publishers learn that it expires from its
binding and never use another.

On a Redis Cluster the queue's keys are those of sheppy queue ``{q}``
(``keys.broker_queue``): :meth:`Queues.named` is the one translation, and every key of a
queue the transport builds goes through it.
"""

from bisect import bisect

from .. import keys
from ..connect import Server

#: Stock default: four priority steps per queue (the lower number is delivered first).
PRIORITY_STEPS = (0, 3, 6, 9)


def parse_steps(steps):
    """Sorted distinct integer steps; an empty list means one step."""
    try:
        parsed = sorted({int(step) for step in steps})
    except (TypeError, ValueError):
        raise ValueError(f"priority_steps must be a list of integers, got {steps!r}") from None
    return tuple(parsed) or (0,)


class QueueStreams:
    """Which streams a queue has and which one a message of a priority goes to."""

    def __init__(self, priority_steps=PRIORITY_STEPS):
        self.steps = parse_steps(priority_steps)

    def step_of(self, priority):
        """The step a message of ``priority`` belongs to (the highest step not above it)."""
        steps = self.steps
        return steps[max(bisect(steps, priority) - 1, 0)]

    def _stream(self, queue, step):
        if step == self.steps[0]:
            return keys.pending_stream(queue)
        return keys.priority_stream(queue, step)

    def of(self, queue, expiring=False):
        """The streams of ``queue``, highest priority (lowest step) first."""
        keys.check_queue(queue)
        if expiring:
            return [keys.pending_stream(queue)]
        return [self._stream(queue, step) for step in self.steps]

    def for_message(self, queue, priority, expiring=False):
        """The stream a message of ``priority`` (None: 0) published to ``queue`` goes to."""
        keys.check_queue(queue)
        if expiring:
            return keys.pending_stream(queue)
        return self._stream(queue, self.step_of(priority or 0))

    def all_known(self, queue):
        """Every stream ``queue`` may have, whatever the steps (for deleting a queue)."""
        return list(dict.fromkeys([keys.pending_stream(queue),
                                   *(keys.priority_stream(queue, step) for step in self.steps
                                     if step)]))


class Queues:
    """The queues a channel declared (which expire, their message TTL, which go with their
    last consumer) and, from those, their streams."""

    def __init__(self, streams, topology=None):
        self.streams_of = streams  # the QueueStreams of the channel's priority steps
        self.topology = topology or Server({})  # names queue q {q} on a Redis Cluster
        self.expires = {}  # queue -> x-expires (ms)
        self.message_ttl = {}  # queue -> x-message-ttl (ms)
        self.auto_delete = set()

    def declare(self, queue, arguments=None, auto_delete=False):
        arguments = arguments or {}
        for name, table in (("x-expires", self.expires), ("x-message-ttl", self.message_ttl)):
            value = arguments.get(name)
            if value is None:
                table.pop(queue, None)
            else:
                table[queue] = int(value)
        if auto_delete:
            self.auto_delete.add(queue)

    def forget(self, queue):
        self.auto_delete.discard(queue)

    def expiring(self, queue):
        return queue in self.expires

    def named(self, queue):
        """The sheppy queue name ``queue``'s keys are built with (``topology.broker_queue``)."""
        return self.topology.broker_queue(queue)

    def streams(self, queue):
        """The queue's streams, highest priority (lowest step) first."""
        return self.streams_of.of(self.named(queue), expiring=queue in self.expires)

    def stream_for(self, queue, priority, expires=None):
        """The stream a message of ``priority`` goes to; ``expires``: the queue's expiry as
        its binding says (None: as declared here)."""
        expiring = bool(expires) if expires is not None else queue in self.expires
        return self.streams_of.for_message(self.named(queue), priority, expiring=expiring)

    def all_known(self, queue):
        return self.streams_of.all_known(self.named(queue))

    def leased(self, queues):
        """Those of ``queues`` whose messages are leased (expiring queues' are not: their
        messages are broadcasts for one consumer)."""
        return [queue for queue in queues if queue not in self.expires]

"""The streams of a queue: the only place that derives them from the priority steps.

A queue ``q`` has one stream per priority step. The first (lowest) step is always
sheppy's ``sheppy:pending:<q>``, whatever its number, so a message without a priority
lands where sheppy's tools look; every other step ``n`` is
``sheppy:celery:<q>:priority:<n>``. An expiring queue (remote-control replies, event
receivers) has the pending stream only: its publishers learn that it expires from its
binding and never use another.
"""

from bisect import bisect

from .. import keys

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

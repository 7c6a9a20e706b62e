"""Global rate limits: one limit per queue and task, shared by every worker.

A task opts in with ``@app.task(sheppy_rate_limit="20/s")`` (Celery's rate strings:
``"N/s"``, ``"N/m"``, ``"N/h"``, or a number per second), or a worker names limits in
the transport option ``rate_limits = {"proj.tasks.fetch": "20/s"}`` (which wins).

Every delivered message of a limited task is checked by ``scripts/rate_limit.lua``
before the worker sees it. The limit is a sequence of slots ``1/rate`` apart in
``sheppy:celery:<q>:ratelimit:<task>``: a message is admitted when the next free slot
has come; otherwise it books the next free slot and goes to ``sheppy:scheduled:<q>``,
due then, and leaves the stream, so it takes no prefetch room and no delivery is
counted. The channel that booked it promotes it when its slot comes (a hub timer);
any consumer's upkeep does it later if that channel is gone. A booked message that
comes back on time is admitted for its slot; one that comes back late (its booker died,
or it was requeued) books again.
"""

import sys
from time import time
from uuid import uuid4

from kombu.log import get_logger

from .. import keys, records, scripts
from .upkeep import due_hint

logger = get_logger(__name__)

#: The task attribute (``@app.task(sheppy_rate_limit=...)``) naming a task's limit.
TASK_OPTION = "sheppy_rate_limit"

#: Admissions are checked in Redis, but a task starts a moment later (the hub, the
#: pool's hand-off), and that moment varies: each period is stretched by this many
#: milliseconds so that N + 1 starts never fit in one period (20/s: 19.3/s at most).
JITTER_GUARD_MS = 35

#: Milliseconds a booked message may come back after its slot and still take it. A
#: later one (its timer fired late, its booker died, it was requeued) books a new slot:
#: admitting it late could put it next to the following slot's message.
BOOKED_LATE_MS = 15

#: The same for a message booked by a channel without an event loop (``drain_events``,
#: Celery's gevent/eventlet pools): the upkeep promotes it, about once a second, so it
#: may come that late (and its task may start next to another slot's).
UPKEEP_LATE_MS = 2500

#: Seconds a booked message's copy is kept beyond its slot.
BOOKED_KEEP_SECONDS = 7 * 24 * 3600

#: A promotion timer that finds its message not due yet (clock granularity) looks again
#: after this many seconds, at most ``PROMOTE_TRIES`` times.
PROMOTE_RETRY = 0.005
PROMOTE_TRIES = 20


def slot_ms(limit):
    """Milliseconds between two admissions for a Celery rate string (``"N/s"``,
    ``"N/m"``, ``"N/h"``, a number per second), the period stretched by
    ``JITTER_GUARD_MS``; None: no limit."""
    if limit in (None, "", 0, "0"):
        return None
    count, period = limit, 1
    if isinstance(limit, str):
        count, _, unit = limit.partition("/")
        period = _PERIODS.get(unit.strip() or "s")
        if period is None:
            raise ValueError(f"invalid rate limit {limit!r}: the unit must be s, m or h")
    try:
        count = float(count)
    except (TypeError, ValueError):
        raise ValueError(f"invalid rate limit {limit!r}: not 'N/s', 'N/m' or 'N/h'") from None
    if count <= 0:
        return None
    return (period * 1000.0 + JITTER_GUARD_MS) / count


_PERIODS = {"s": 1, "m": 60, "h": 3600}


def _task_limit(name):
    """The ``sheppy_rate_limit`` of task ``name`` in the process's current Celery app."""
    state = sys.modules.get("celery._state")
    if state is None:
        return None
    app = state.get_current_app()
    if not app.finalized:
        return None
    task = app.tasks.get(name)
    return getattr(task, TASK_OPTION, None) if task is not None else None


class Limiter:
    """The rate limits one channel applies to what it receives."""

    def __init__(self, port, conns, queues, limits=None):
        self.port = port  # kombu's side: the event loop, closing (port.py)
        self.conns = conns
        self.queues = queues
        self._configured = dict(limits or {})
        for limit in self._configured.values():
            slot_ms(limit)  # a bad rate string fails at start, naming itself
        self._slots = {}  # task name -> slot length (ms) or None

    def slot_for(self, task_name):
        try:
            return self._slots[task_name]
        except KeyError:
            pass
        limit = self._configured.get(task_name)
        if limit is None:
            limit = _task_limit(task_name)
        try:
            slot = slot_ms(limit)
        except ValueError as exc:
            logger.error("sheppy: task %s: %s; not rate limited", task_name, exc)
            slot = None
        self._slots[task_name] = slot
        return slot

    def defer(self, queue, stream, entry_id, record, message):
        """True if the message is over its task's limit: it then left ``stream`` for the
        scheduled set (atomically) and must not be delivered."""
        name = (message.get("headers") or {}).get("task")
        if not name or self.queues.expiring(queue):
            return False
        slot = self.slot_for(str(name))
        if slot is None:
            return False
        extras = record.get("celery") if isinstance(record.get("celery"), dict) else {}
        token = f"@sheppy-rate-slot-{uuid4().hex}@"
        timer = self._hub() is not None  # else the upkeep promotes it, up to a second late
        data = records.dumps(dict(record, celery=dict(
            extras, rate_slot=token, rate_late=BOOKED_LATE_MS if timer else UPKEEP_LATE_MS)))
        booked = extras.get("rate_slot")
        if isinstance(booked, bool) or not isinstance(booked, (int, float)):
            booked = ""
        late = extras.get("rate_late", BOOKED_LATE_MS)
        sid = record["id"]
        named = self.queues.named(queue)
        admitted, wait_ms = scripts.registry()["rate_limit"](
            self.conns.client,
            keys=[keys.rate_limit(named, name), stream, keys.scheduled_set(named),
                  keys.delayed_message(named, sid)],
            args=[keys.CONSUMER_GROUP, entry_id, sid, repr(slot), data, f'"{token}"',
                  booked, late if isinstance(late, int) else BOOKED_LATE_MS, BOOKED_KEEP_SECONDS])
        if admitted:
            return False
        # this channel promotes it (below); the hint lets any other do it if it dies
        self.conns.client.execute_command(*due_hint(named, time() + int(wait_ms) / 1000.0))
        self._promote_later(queue, sid, int(wait_ms) / 1000.0)
        return True

    def _hub(self):
        return self.port.hub

    def _promote_later(self, queue, sid, delay, tries=PROMOTE_TRIES):
        hub = self._hub()
        if hub is None:  # no event loop: the upkeep's promotion delivers it
            return
        hub.call_later(max(delay, 0.0), self._promote, queue, sid, tries)

    def _promote(self, queue, sid, tries):
        client = self.conns.client
        if self.port.closed or self.port.poller is None:
            return
        named = self.queues.named(queue)
        try:
            added = scripts.registry()["promote"](
                client,
                keys=[keys.scheduled_set(named), keys.delayed_message(named, sid),
                      keys.task_record(named, sid), *self.queues.streams(queue)],
                args=[sid, keys.CONSUMER_GROUP])
            if not added and tries > 1 and client.zscore(
                    keys.scheduled_set(named), sid) is not None:
                self._promote_later(queue, sid, PROMOTE_RETRY, tries - 1)
        except Exception as exc:  # the upkeep's promotion delivers it later
            logger.debug("sheppy: promotion of rate limited %s failed: %r", sid, exc)


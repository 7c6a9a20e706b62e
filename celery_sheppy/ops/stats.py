"""The operator's view of ``sheppy://`` queues: what each queue holds, from a few commands.

:func:`queue_stats` is the one API behind ``celery sheppy status``, ``celery sheppy
metrics`` and Flower's Broker page. Per queue it costs a fixed number of commands per
stream (``XLEN``, ``XINFO GROUPS``, ``XINFO CONSUMERS``, at most one ``XRANGE … COUNT 1``)
plus ``ZCARD``, ``XLEN`` and two ``GET`` of the result counters (on the ``sheppy://``
result backend's own Redis, where they are written), and one ``EXISTS`` of the
registration of each consumer that holds nothing: never a scan over task records. At
most five pipelined round trips, whatever the number of queues.

Definitions (``docs/operations.md`` explains them for operators):

* **ready**: entries after the group's last-delivered id: ``XLEN - pending`` (acked
  entries are deleted, so the stream holds exactly the ready and the in-flight ones),
  or ``XINFO GROUPS`` ``lag`` when that is smaller. ``lag`` alone can overcount: Redis
  7.0 keeps a stale one after ``XDEL`` emptied the stream (a purge).
* **oldest ready age**: now (Redis ``TIME``) minus the id of the first entry after the
  last-delivered id, which is when it was added (published, requeued, replayed or
  moved from the scheduled set).
* **in flight**: the group's pending entries (read, not acked: running, prefetched, or
  waiting for their ETA in a worker), per consumer from ``XINFO CONSUMERS``.
* **consumer state**: a consumer holding messages renews their lease every quarter
  lease, which resets its idle time: it is *alive* while idle <= lease, else *dead*
  (its messages are past the lease: *stuck* until a live worker takes them over).
  A consumer holding nothing is *alive* while its registration in
  ``sheppy:celery::consumers`` lasts (its worker renews it every quarter lease:
  ``transport/presence.py``), else *dead* (gone; the recovery removes it). Neither uses
  the idle time of empty reads, which Redis counts only from 7.2 on: the same on every
  server.
"""

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import redis
from kombu.utils.encoding import bytes_to_str

from .. import keys
from ..backend import SheppyBackend
from ..connect import CONNECTION_ERRORS, redact
from ..transport import Transport
from ..transport import presence
from ..transport.options import BY_NAME as TRANSPORT_OPTIONS
from ..transport.streams import QueueStreams

#: Stock values of the transport options read here (docs/transport.md).
DEFAULT_LEASE = float(TRANSPORT_OPTIONS["visibility_timeout"].default)

ALIVE, DEAD = "alive", "dead"

# Replies that mean "no such stream or group yet": counted as empty, not as errors.
_ABSENT = ("no such key", "nogroup")


class NotSheppyBroker(RuntimeError):
    """The app's broker is not ``sheppy://``."""


class UnknownQueue(ValueError):
    """A queue named by the caller that this broker has no trace of."""


class ResultsUnreachable(RuntimeError):
    """The ``sheppy://`` result backend, where the result counters live, cannot be reached."""


@dataclass
class ConsumerStats:
    name: str
    in_flight: int
    idle: float  #: seconds since the consumer last read, renewed or claimed (min over streams)
    state: str  #: ALIVE or DEAD (see the module docstring)


@dataclass
class QueueStats:
    queue: str
    ready: int
    in_flight: int
    oldest_ready_age: object  #: seconds (float), None when nothing is ready
    scheduled: int
    dead_letters: int
    completed: object  #: sheppy's counter of finished results (int), None if never written
    failed: object  #: FAILURE results among them (int), None when completed is None
    consumers: list = field(default_factory=list)  #: [ConsumerStats], by name

    @property
    def stuck(self):
        """Messages held by dead consumers: past their lease, waiting to be taken over."""
        return sum(c.in_flight for c in self.consumers if c.state == DEAD)

    def count(self, state):
        return sum(1 for c in self.consumers if c.state == state)

    def as_dict(self):
        data = asdict(self)
        data.update(stuck=self.stuck, consumers_alive=self.count(ALIVE),
                    consumers_dead=self.count(DEAD))
        return data


@dataclass(frozen=True)
class Settings:
    """The broker transport options this view depends on, in seconds."""

    lease: float = DEFAULT_LEASE
    streams: QueueStreams = field(default_factory=QueueStreams)

    @classmethod
    def of(cls, app):
        options = app.conf.broker_transport_options or {}
        kwargs = {}
        if options.get("priority_steps") is not None:
            kwargs["streams"] = QueueStreams(options["priority_steps"])
        return cls(lease=float(options.get("visibility_timeout") or DEFAULT_LEASE), **kwargs)


class Inspector:
    """An open ``sheppy://`` broker connection and the settings to read it with."""

    def __init__(self, app, connection):
        self.app = app
        self.connection = connection
        self.settings = Settings.of(app)
        channel = connection.default_channel
        self.client = channel.client  # the transport's redis-py client
        self.topology = channel.conns.topology  # names queue q {q} on a Redis Cluster

    @property
    def url(self):
        return broker_url(self.connection)

    def queues(self, only=None, known=False):
        """Queue names: ``only`` (checked), else the configured ones and sheppy's registry
        (on a Redis Cluster their sheppy names ``{q}``, without the result shards).
        ``known``: UnknownQueue for a name of ``only`` that is none of those and has no
        stream, scheduled set or dead letters (a typo would show a row of zeros)."""
        if only:
            named = list(dict.fromkeys(self.topology.broker_queue(keys.check_queue(name))
                                       for name in only))
            if known:
                self._check_known(named)
            return named
        names = {self.app.conf.task_default_queue, *self.app.amqp.queues.keys()}
        names = {self.topology.broker_queue(name) for name in names}
        for name in self.client.hkeys(keys.queue_registry()):
            names.add(bytes_to_str(name))
        backend = self.app.backend
        shards = (set(backend.result_queues) - {backend.queue}
                  if isinstance(backend, SheppyBackend) else set())
        return sorted(name for name in names if _usable(name) and name not in shards)

    def _check_known(self, names):
        listed = set(self.queues())
        others = [name for name in names if name not in listed]
        if not others:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for name in others:  # one slot per queue on a Redis Cluster: one command each
                pipe.exists(*self.settings.streams.of(name), keys.scheduled_set(name),
                            keys.dead_letter_stream(name))
            found = pipe.execute()
        unknown = [name for name, count in zip(others, found) if not count]
        if unknown:
            raise UnknownQueue(
                f"no queue {', '.join(map(repr, unknown))} on {self.url}: not among the app's "
                "queues nor in sheppy's registry, and no stream, scheduled or dead letters "
                f"under that name (queues: {', '.join(sorted(listed)) or 'none'})")

    def now(self):
        """Redis's clock in epoch seconds: the clock stream ids are made of."""
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    @property
    def results_client(self):
        """The ``sheppy://`` result backend's client (its counters live where it writes),
        or None when results go elsewhere: the counters are then read from the broker."""
        backend = self.app.backend
        return backend.client if isinstance(backend, SheppyBackend) else None

    @property
    def results_queue(self):
        """The queue whose row holds the result counters of every task queue (the
        ``sheppy://`` result backend's queue), or None when results go elsewhere."""
        backend = self.app.backend
        if isinstance(backend, SheppyBackend):
            return self.topology.broker_queue(backend.queue)
        return None

    @property
    def result_namespaces(self):
        """{queue: the queues its result counters are kept in}: on a Redis Cluster the
        backend's queue counts in each of its result shards (keys.result_shards)."""
        backend = self.app.backend
        if isinstance(backend, SheppyBackend) and backend.result_queues != (backend.queue,):
            return {self.topology.broker_queue(backend.queue): backend.result_queues}
        return {}

    def stats(self, queues=None):
        """[QueueStats] of ``queues`` (default: :meth:`queues`), in that order."""
        try:
            return collect(self.client, self.queues(queues), self.settings, self.results_client,
                           self.result_namespaces)
        except ResultsUnreachable as exc:
            raise ResultsUnreachable(
                f"cannot reach the sheppy:// result backend {self.app.backend.as_uri()} "
                f"(it holds the result counters): {exc}") from None


@contextmanager
def inspector(app):
    """An :class:`Inspector` on the app's own broker settings (TLS, ACL, options).

    Raises NotSheppyBroker if the broker is not ``sheppy://``, and kombu's
    OperationalError after one failed attempt to reach it.
    """
    with app.connection_for_read() as conn:
        if not isinstance(conn.transport, Transport):
            raise NotSheppyBroker(
                f"the broker is {broker_url(conn)!r}, not sheppy:// (set broker_url = "
                "'sheppy://host:port/db'; this works on sheppy:// brokers only)")
        conn.ensure_connection(max_retries=0)  # one attempt: fail now, not after retries
        yield Inspector(app, conn)


def queue_stats(app, queues=None):
    """[QueueStats] of the app's queues (or ``queues``), read on the app's own broker."""
    with inspector(app) as view:
        return view.stats(queues)


def broker_url(conn):
    """The connection's URL, its password (if any) masked."""
    return redact(conn.as_uri(include_password=True))  # kombu masks even a missing one


def is_sheppy(app):
    """True if the app's broker is ``sheppy://`` (no connection is made)."""
    conn = app.connection_for_read()
    try:
        return isinstance(conn.transport, Transport)
    finally:
        conn.release()


def collect(client, queues, settings, results_client=None, result_namespaces=None):
    """[QueueStats] of ``queues`` in up to four round trips: the streams, the result
    counters (from ``results_client`` when given, else from ``client``; summed over
    ``result_namespaces[queue]`` when given), the first ready entries, the registrations
    of the consumers that hold nothing."""
    streams = {queue: settings.streams.of(queue) for queue in queues}
    with client.pipeline(transaction=False) as pipe:
        pipe.execute_command("TIME")  # (pipe.time() is refused by a Cluster's pipeline)
        for queue in queues:
            for stream in streams[queue]:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
                pipe.xinfo_consumers(stream, keys.CONSUMER_GROUP)
            pipe.zcard(keys.scheduled_set(queue))
            pipe.xlen(keys.dead_letter_stream(queue))
        replies = iter(pipe.execute(raise_on_error=False))
    seconds, micros = _value(next(replies))
    now_ms = seconds * 1000 + micros // 1000
    results = iter(_counters(results_client or client, queues, result_namespaces or {}))
    parts = []
    for queue in queues:
        per_stream = [_stream_part(stream, _value(next(replies)), _value(next(replies), []),
                                   _value(next(replies), []))
                      for stream in streams[queue]]
        counters = [_value(next(replies)), _value(next(replies)), next(results), next(results)]
        parts.append((queue, per_stream, counters))
    firsts = _first_ready(client, [p for _, per_stream, _ in parts for p in per_stream])
    registered = presence.registered(client, _holding_nothing(parts))
    return [_queue_stats(queue, per_stream, counters, firsts, now_ms, settings, registered)
            for queue, per_stream, counters in parts]


def _counters(client, queues, namespaces):
    """completed, failed of each queue (None: never written), in one round trip (GETs:
    no multi-key command mixes queues, which may live in different cluster slots; on a
    Redis Cluster one per node). A queue with ``namespaces`` sums theirs."""
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for name in namespaces.get(queue, (queue,)):
                    pipe.get(keys.completed_counter(name))
                    pipe.get(keys.failed_counter(name))
            replies = iter(pipe.execute(raise_on_error=False))
    except CONNECTION_ERRORS as exc:
        raise ResultsUnreachable(str(exc)) from exc
    counts = []
    for queue in queues:
        parts = [(_value(next(replies)), _value(next(replies)))
                 for _ in namespaces.get(queue, (queue,))]
        for column in (0, 1):
            written = [int(part[column]) for part in parts if part[column] is not None]
            counts.append(sum(written) if written else None)
    return counts


def _stream_part(stream, length, groups, consumers):
    """One stream's counts: {stream, ready, last_id, consumers: [(name, pending, idle ms)]}."""
    group = next((g for g in groups if bytes_to_str(g["name"]) == keys.CONSUMER_GROUP), None)
    length = length or 0
    if group is None:
        ready, last_id = length, None
    else:
        # Acked entries are deleted, so the stream holds the ready and the in-flight ones:
        # XLEN - pending bounds the ready count. ``lag`` is exact when set, but Redis 7.0
        # keeps a stale one once XDEL emptied the stream (a purge): it is clamped.
        waiting = max(length - group["pending"], 0)
        lag = group.get("lag")
        ready = waiting if lag is None else min(lag, waiting)
        last_id = bytes_to_str(group["last-delivered-id"])
    return {"stream": stream, "ready": ready, "last_id": last_id,
            "consumers": [(bytes_to_str(c["name"]), c["pending"], c["idle"]) for c in consumers]}


def _holding_nothing(parts):
    """Names of the consumers that hold nothing in some queue: judged by registration."""
    names = set()
    for _, per_stream, _ in parts:
        held = {}
        for part in per_stream:
            for name, pending, _ in part["consumers"]:
                held[name] = held.get(name, 0) + pending
        names.update(name for name, count in held.items() if not count)
    return names


def _first_ready(client, parts):
    """{stream: id of its first ready entry}, one ``XRANGE … COUNT 1`` per stream with any."""
    wanted = [p for p in parts if p["ready"]]
    if not wanted:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for part in wanted:
            last = part["last_id"]
            pipe.xrange(part["stream"], min=f"({last}" if last and last != "0-0" else "-",
                        count=1)
        replies = pipe.execute(raise_on_error=False)
    return {part["stream"]: bytes_to_str(rows[0][0])
            for part, rows in zip(wanted, replies) if isinstance(rows, list) and rows}


def _queue_stats(queue, per_stream, counters, firsts, now_ms, settings, registered):
    held, idle = {}, {}
    for part in per_stream:
        for name, pending, idle_ms in part["consumers"]:
            held[name] = held.get(name, 0) + pending
            idle[name] = min(idle.get(name, idle_ms), idle_ms)
    consumers = [ConsumerStats(name, held[name], idle[name] / 1000,
                               _state(held[name], idle[name] / 1000, name in registered,
                                      settings))
                 for name in sorted(held)]
    oldest = [int(firsts[p["stream"]].split("-")[0]) for p in per_stream if p["stream"] in firsts]
    scheduled, dead, completed, failed = counters
    completed = _int_or_none(completed)
    failed = _int_or_none(failed)
    if failed is None and completed is not None:
        failed = 0  # the failed counter appears with the first failure
    return QueueStats(
        queue=queue, ready=sum(p["ready"] for p in per_stream),
        in_flight=sum(held.values()),
        oldest_ready_age=max((now_ms - min(oldest)) / 1000, 0.0) if oldest else None,
        scheduled=scheduled or 0, dead_letters=dead or 0, completed=completed, failed=failed,
        consumers=consumers)


def _state(in_flight, idle, registered, settings):
    """A consumer holding messages lives while it renews them; one holding nothing while
    it is registered."""
    if in_flight:
        return ALIVE if idle <= settings.lease else DEAD
    return ALIVE if registered else DEAD


def _value(reply, absent=None):
    """A pipeline reply; a missing stream or group counts as ``absent``, other errors raise."""
    if isinstance(reply, redis.ResponseError):
        if any(text in str(reply).lower() for text in _ABSENT):
            return absent
        raise reply
    if isinstance(reply, Exception):
        raise reply
    return reply


def _int_or_none(value):
    return None if value is None else int(value)


def _usable(name):
    try:
        keys.check_queue(name)
    except keys.InvalidQueueName:
        return False  # e.g. a sheppy queue with ':' in its name: not ours to read
    return True

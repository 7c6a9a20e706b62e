"""A leaderless Celery beat in sheppy's cron layout.

``celery -A proj beat -S celery_sheppy.beat:Scheduler`` (or ``beat_scheduler =
"celery_sheppy.beat:Scheduler"``), on a ``sheppy://`` broker. Any number of beat
processes may run: there is no leader and no lock.

* On start, ``beat_schedule`` is reconciled into ``sheppy:cron:<q>`` (``q``: the
  entry's ``options["queue"]``, else ``task_default_queue``; on a Redis Cluster the
  broker's name for it, ``{q}``, as for every key of the queue): one sheppy ``TaskCron``
  record per entry (``sheppy cron list`` shows them), keyed by a deterministic id of
  the entry's definition; records of entries no longer configured are deleted. Only
  records this scheduler wrote (their ``celery.beat`` field) are touched.
* Every beat runs the entries it finds in the cron tables (read again every
  ``RELOAD_INTERVAL`` seconds), not only its own configuration.
* Occurrences are computed from the schedule, not from a per-process last run:
  ``crontab`` and ``solar`` by Celery's own arithmetic (``timezone``/``enable_utc``
  respected), intervals (``timedelta``, seconds, ``schedule``) at multiples of the
  interval since the Unix epoch. Each occurrence is published with the task id
  ``uuid5(entry id, occurrence time)`` through a claimed publish
  (``transport/claims.py``): whichever beat sends it first adds it, the others' sends
  add nothing. A beat that stops (even kill -9) costs no occurrence while another runs.

Differences from Celery's own beat: an occurrence due while no beat runs is skipped
(Celery's beat runs it once, late); ``relative`` intervals are anchored at the epoch.
"""

import json
import time
from datetime import datetime, timedelta
from math import floor
from uuid import UUID, uuid5

from celery import beat, schedules
from celery.utils.log import get_logger
from kombu.utils.encoding import bytes_to_str

from . import keys, records
from .transport import claims

logger = get_logger(__name__)

#: Namespace of entry ids and occurrence (task) ids.
BEAT_NAMESPACE = UUID("3c5e0b8e-8f0c-4a51-9d51-6a0a2b7f7c21")

#: Seconds between two reads of the cron tables (entries added or removed elsewhere).
RELOAD_INTERVAL = 5.0

#: Seconds an occurrence's claim is kept. An occurrence later than half of this is
#: skipped (its claim may be gone: sending it could run it twice).
OCCURRENCE_KEEP = 600


class UnsupportedSchedule(ValueError):
    """A beat entry whose schedule cannot be kept in the cron table."""


def schedule_to_dict(sched):
    """A JSON-able description of a Celery schedule (crontab, solar, interval)."""
    if isinstance(sched, schedules.crontab):
        return {"type": "crontab", **{field: _cron_field(getattr(sched, f"_orig_{field}"))
                                      for field in _CRON_FIELDS}}
    if isinstance(sched, schedules.solar):
        return {"type": "solar", "event": sched.event, "lat": sched.lat, "lon": sched.lon}
    if isinstance(sched, schedules.schedule):
        return {"type": "interval", "seconds": sched.run_every.total_seconds()}
    raise UnsupportedSchedule(f"schedule {sched!r} is not a crontab, solar or interval")


_CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


def _cron_field(value):
    if isinstance(value, (set, frozenset, list, tuple, range)):
        return ",".join(str(item) for item in sorted(value))
    return str(value)


def schedule_from_dict(data, app):
    kind = data.get("type")
    if kind == "crontab":
        return schedules.crontab(app=app, **{field: data[field] for field in _CRON_FIELDS})
    if kind == "solar":
        return schedules.solar(data["event"], data["lat"], data["lon"], app=app)
    if kind == "interval":
        return schedules.schedule(timedelta(seconds=data["seconds"]), app=app)
    raise UnsupportedSchedule(f"unknown schedule type {kind!r}")


def cron_expression(data):
    """The sheppy cron expression shown for a schedule (exact for crontabs and for
    intervals that divide a minute, an hour or a day; the nearest coarser one else)."""
    if data["type"] == "crontab":
        return " ".join(data[field] for field in _CRON_FIELDS)
    if data["type"] == "interval":
        seconds = data["seconds"]
        if seconds < 60 and seconds == int(seconds) and 60 % int(seconds) == 0:
            return "* * * * * *" if seconds == 1 else f"* * * * * */{int(seconds)}"
        minutes = seconds / 60
        if minutes < 60 and minutes == int(minutes) and 60 % int(minutes) == 0:
            return "* * * * *" if minutes == 1 else f"*/{int(minutes)} * * * *"
        hours = seconds / 3600
        if hours < 24 and hours == int(hours) and 24 % int(hours) == 0:
            return f"0 */{int(hours)} * * *"
        return "0 0 * * *"
    return "* * * * *"  # solar: sheppy's tools have no expression for it


def entry_record(name, task, sched, args=(), kwargs=None, options=None):
    """``(entry id, queue or None, sheppy TaskCron record)`` for one beat entry."""
    data = schedule_to_dict(sched)
    options = {key: value for key, value in (options or {}).items()
               if key not in ("task_id", "headers")}
    queue = options.get("queue")
    if queue is not None and not isinstance(queue, str):
        queue = getattr(queue, "name", str(queue))
        options["queue"] = queue
    definition = json.dumps([name, task, data, list(args or ()), kwargs or {}, options],
                            sort_keys=True, default=str)
    entry_id = str(uuid5(BEAT_NAMESPACE, definition))
    record = {
        "id": entry_id,
        "expression": cron_expression(data),
        "spec": {"func": records.SPEC_FUNC, "args": list(args or ()), "kwargs": kwargs or {}},
        "config": {},
        "celery": {"beat": name, "task": task, "schedule": data, "options": options},
    }
    json.dumps(record)  # args that JSON cannot hold fail here, naming the entry
    return entry_id, queue, record


def occurrence_id(entry_id, at):
    """The task id of the occurrence of ``entry_id`` due at ``at`` (epoch seconds)."""
    return str(uuid5(BEAT_NAMESPACE, f"{entry_id}:{round(at * 1000)}"))


class Entry:
    """One cron record as this beat runs it."""

    def __init__(self, entry_id, queue, record, app, now):
        celery_part = record["celery"]
        self.id = entry_id
        self.queue = queue
        self.name = celery_part["beat"]
        self.task = celery_part["task"]
        self.data = celery_part["schedule"]
        self.schedule = schedule_from_dict(self.data, app)
        self.args = list(record["spec"].get("args") or [])
        self.kwargs = dict(record["spec"].get("kwargs") or {})
        self.options = dict(celery_part.get("options") or {})
        self.next = self.after(now)

    def after(self, at):
        """The first occurrence after ``at`` (epoch seconds)."""
        if self.data["type"] == "interval":
            every = self.data["seconds"]
            return (floor(at / every) + 1) * every
        # In the schedule's (the app's) timezone, as Celery's own beat passes last_run_at:
        # Celery before 5.7 reads a crontab's hours off last_run_at as it is given.
        last = datetime.fromtimestamp(at, tz=self.schedule.tz)
        due = (self.schedule.now() + self.schedule.remaining_estimate(last)).timestamp()
        if self.data["type"] == "crontab":
            due = float(round(due))
        return due if due > at else self.after(at + 1)


class Scheduler(beat.Scheduler):
    """Celery beat scheduler keeping its entries in ``sheppy:cron:<q>``; see the module."""

    def __init__(self, *args, **kwargs):
        self._entries = {}  # entry id -> Entry
        self._loaded_at = 0.0
        super().__init__(*args, **kwargs)

    # -- the cron tables --------------------------------------------------------------

    @property
    def _channel(self):
        channel = self.producer.channel
        if not hasattr(channel, "queues") or not hasattr(channel, "conns"):
            raise RuntimeError("celery_sheppy.beat:Scheduler needs a sheppy:// broker, not "
                               f"{self.app.conf.broker_url!r}")
        return channel

    @property
    def client(self):
        return self._channel.client

    def _named(self, queue):
        """The sheppy queue the broker keeps Celery queue ``queue`` under: on a Redis
        Cluster ``{q}``, so the cron table sits with the queue's keys and sheppy's registry
        lists no queue the broker does not use."""
        return self._channel.queues.named(queue)

    def _table(self, queue):
        return keys.cron_table(self._named(queue))

    def _default_queue(self):
        return self.app.conf.task_default_queue

    def _configured(self):
        """``{queue: {entry id: record}}`` of ``beat_schedule``."""
        tables = {}
        for name, spec in (self.app.conf.beat_schedule or {}).items():
            try:
                sched = schedules.maybe_schedule(spec["schedule"], False, self.app)
                entry_id, queue, record = entry_record(
                    name, spec["task"], sched, spec.get("args") or (), spec.get("kwargs"),
                    spec.get("options"))
            except (UnsupportedSchedule, ImportError, TypeError, ValueError, KeyError) as exc:
                logger.error("beat: entry %r cannot be kept in sheppy's cron table: %s",
                             name, exc)
                continue
            tables.setdefault(queue or self._default_queue(), {})[entry_id] = record
        return tables

    def _queues(self):
        """Celery queue names: the default one and those of sheppy's registry."""
        topology = self._channel.queues.topology
        known = {topology.celery_queue(bytes_to_str(name))
                 for name in self.client.hkeys(keys.queue_registry())}
        return sorted(known | {self._default_queue()})

    def setup_schedule(self):
        """Reconcile ``beat_schedule`` into the cron tables (removed entries deleted)."""
        wanted = self._configured()
        client = self.client
        queues = sorted(set(self._queues()) | set(wanted))
        for queue in queues:
            keys.check_queue(queue)
            table = self._table(queue)
            present = client.hgetall(table)
            mine = wanted.get(queue, {})
            stale = [field for field, raw in present.items()
                     if _ours(raw) and bytes_to_str(field) not in mine]
            with client.pipeline(transaction=False) as pipe:
                if stale:
                    pipe.hdel(table, *stale)
                for entry_id, record in mine.items():
                    pipe.hset(table, entry_id, json.dumps(record))
                if mine:
                    pipe.hsetnx(keys.queue_registry(), self._named(queue), "{}")
                pipe.execute()
            if stale:
                logger.info("beat: removed %d entries no longer configured from %s",
                            len(stale), table)
        logger.info("beat: %d entries in sheppy's cron tables",
                    sum(len(table) for table in wanted.values()))
        self._reload(time.time())

    def _reload(self, now):
        """Read the cron tables; entries keep their next occurrence across reads."""
        found = {}
        for queue in self._queues():
            for field, raw in self.client.hgetall(self._table(queue)).items():
                entry_id = bytes_to_str(field)
                if entry_id in self._entries:
                    found[entry_id] = self._entries[entry_id]
                    continue
                try:
                    record = json.loads(raw)
                    if not _ours_record(record):
                        continue  # sheppy's own crons: not Celery tasks
                    found[entry_id] = Entry(entry_id, queue, record, self.app, now)
                except (UnsupportedSchedule, ImportError, TypeError, ValueError, KeyError) as exc:
                    logger.error("beat: cannot run cron record %s of %s: %s", entry_id,
                                 queue, exc)
        self._entries = found
        self._loaded_at = time.monotonic()

    # -- Celery's beat API ------------------------------------------------------------

    def tick(self, *args, **kwargs):
        """Publish the due occurrences; returns seconds until the next one."""
        now = time.time()
        if time.monotonic() - self._loaded_at >= RELOAD_INTERVAL:
            try:
                self._reload(now)
            except Exception as exc:  # Redis away: keep the entries known, try again
                logger.warning("beat: cannot read the cron tables: %r", exc)
                self._loaded_at = time.monotonic()
        soonest = now + min(self.max_interval, RELOAD_INTERVAL)
        for entry in list(self._entries.values()):
            while entry.next <= now:
                if now - entry.next <= OCCURRENCE_KEEP / 2:
                    self._send(entry, entry.next)
                entry.next = entry.after(entry.next)
            soonest = min(soonest, entry.next)
        return max(soonest - time.time(), 0.0)

    def _send(self, entry, at):
        task_id = occurrence_id(entry.id, at)
        claim = {"kind": "beat", "key": task_id, "ttl": OCCURRENCE_KEEP}
        options = dict(entry.options, task_id=task_id, headers={claims.HEADER: claim})
        options.setdefault("queue", entry.queue)
        try:
            self.app.send_task(entry.task, entry.args, entry.kwargs, producer=self.producer,
                               **options)
        except Exception as exc:  # another beat may still send it
            logger.error("beat: sending %s (%s) failed: %r", entry.name, task_id, exc)
            return
        if claims.take_refusal(task_id) is None:
            logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)

    def sync(self):
        pass

    @property
    def schedule(self):
        return {entry.name: entry for entry in self._entries.values()}

    @property
    def info(self):
        return f"    . cron tables -> {self._table(self._default_queue())} (sheppy)"


def _ours(raw):
    try:
        return _ours_record(json.loads(raw))
    except (TypeError, ValueError):
        return False


def _ours_record(record):
    part = record.get("celery") if isinstance(record, dict) else None
    return isinstance(part, dict) and "beat" in part and "task" in part

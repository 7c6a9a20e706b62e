"""The Celery app the integration tests run in real workers.

Broker and result backend come from CELERY_SHEPPY_BROKER / CELERY_SHEPPY_BACKEND;
extra settings from CELERY_SHEPPY_CONF (JSON).
"""

import json
import os
import time

from celery import Celery
from celery.exceptions import Ignore

app = Celery("t.integration.tasks")
app.conf.update(
    broker_url=os.environ.get("CELERY_SHEPPY_BROKER", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("CELERY_SHEPPY_BACKEND", "sheppy://127.0.0.1:6379/0"),
    result_extended=True,
    task_track_started=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
)
app.conf.update(json.loads(os.environ.get("CELERY_SHEPPY_CONF", "{}")))
if os.environ.get("CELERY_SHEPPY_BEAT_SCHEDULE") == "crontabs":  # beat schedules JSON cannot hold
    from datetime import timedelta

    from celery.schedules import crontab

    app.conf.beat_schedule = {
        "weekday mornings": {"task": "t.integration.tasks.beat_tick", "args": ["w"],
                             "schedule": crontab(minute=30, hour=3, day_of_week="1-5")},
        "quarter hours": {"task": "t.integration.tasks.beat_tick", "args": ["q"],
                          "schedule": timedelta(minutes=15)},
    }


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(values):
    return sum(values)


@app.task
def identity(value):
    return value


@app.task
def fail(message="expected failure"):
    raise ValueError(message)


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task(bind=True)
def progress(self, steps, delay=0.2):
    for step in range(steps):
        self.update_state(state="PROGRESS", meta={"step": step, "of": steps})
        time.sleep(delay)
    return steps


@app.task(bind=True, max_retries=3, default_retry_delay=0.1)
def retry_once(self, value):
    if self.request.retries < 1:
        raise self.retry(countdown=0.1)
    return value


@app.task(bind=True, max_retries=None)
def retry_forever(self):
    raise self.retry(countdown=3600)


@app.task(bind=True)
def store_twice(self, value):
    """Stores its result and reports to its chord twice, as a redelivered run would."""
    for _ in range(2):
        self.backend.mark_as_done(self.request.id, value, request=self.request)
    raise Ignore()


@app.task
def record_run(value, key=None):
    """Counts its runs under ``key`` in Redis (the test's server) so tests can see duplicates.

    As a chord body, ``record_run.s(key)`` is called with the header results first.
    """
    import redis

    key = value if key is None else key
    url = os.environ["CELERY_SHEPPY_COUNTER_URL"]
    redis.Redis.from_url(url).rpush(key, json.dumps(value))
    return value


@app.task(bind=True)
def leave_state(self, state=None, meta=None):
    """Leaves its record as a running task's: STARTED, or custom ``state`` with ``meta``."""
    if state:
        self.update_state(state=state, meta=meta)
    raise Ignore()


@app.task(bind=True, max_retries=None)
def retry_later(self, message="not yet", countdown=3600):
    """Retries with a long countdown, with the exception that made it retry."""
    raise self.retry(exc=LookupError(message), countdown=countdown)


@app.task
def as_set(*values):
    """A result that JSON cannot encode (pickle result serializer only)."""
    return set(values)


@app.task
def big(size):
    """A result of ``size`` characters."""
    return "y" * size


@app.task(acks_late=True)
def add_acks_late(x, y):
    return x + y


@app.task(bind=True)
def delivery(self):
    """How the worker received this task: its ``redelivered`` flag."""
    return bool((self.request.delivery_info or {}).get("redelivered"))


# -- reliability (t/integration/test_reliability.py) -----------------------------------------


_COUNTER = []


def _counter():
    if not _COUNTER:
        import redis

        _COUNTER.append(redis.Redis.from_url(os.environ["CELERY_SHEPPY_COUNTER_URL"]))
    return _COUNTER[0]


def _count(key, item, patience=60):
    """RPUSH ``item`` to ``key``, waiting out a Redis restart: a run must be counted."""
    import redis

    deadline = time.monotonic() + patience
    while True:
        try:
            return _counter().rpush(key, json.dumps(item))
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@app.task(bind=True, acks_late=True)
def tracked(self, key, value, seconds=0.0):
    """Records each run of ``value`` in the list ``key`` as ``[value, worker, time]``, then sleeps."""
    return _track(self, key, value, seconds)


@app.task(bind=True)
def tracked_early_ack(self, key, value, seconds=0.0):
    """``tracked`` with Celery's default ack: acked as the worker starts it."""
    return _track(self, key, value, seconds)


def _track(task, key, value, seconds):
    _count(key, [value, task.request.hostname, time.time()])
    time.sleep(seconds)
    return value


@app.task(bind=True, acks_late=True)
def crash(self, key):
    """Records its run, then kills the whole worker process (pool: threads or solo)."""
    _count(key, [self.request.id, self.request.hostname, time.time()])
    os._exit(1)


@app.task(bind=True, acks_late=True)
def store_then_crash(self, value, key):
    """First delivery: stores its result and reports to its chord as the worker does at the
    end of a task, then kills the worker before the message is acked. The redelivered run
    returns normally."""
    _count(key, [value, self.request.hostname, time.time()])
    if not (self.request.delivery_info or {}).get("redelivered"):
        self.backend.mark_as_done(self.request.id, value, request=self.request)
        os._exit(1)
    return value


@app.task(bind=True, acks_late=True)
def complete_chord_then_crash(self, value, key):
    """First delivery: waits until it is its chord's last unfinished part, then returns, and
    the worker dies when its backend would send the chord's body (after counting the part).
    The redelivered run returns normally."""
    _count(key, [value, self.request.hostname, time.time()])
    if not (self.request.delivery_info or {}).get("redelivered"):
        unfinished = self.backend.get_key_for_chord(self.request.group)
        deadline = time.monotonic() + 30
        while self.backend.client.scard(unfinished) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.backend.chords.fire_body = lambda *args: os._exit(1)
    return value


@app.task(bind=True, acks_late=True)
def pending_after_own_result(self, key):
    """Stores its own result, then records in ``key`` whether its message is still pending."""
    self.backend.mark_as_done(self.request.id, "stored", request=self.request)
    entry_id, stream = self.request.properties["delivery_tag"].split(" ", 1)
    pending = self.backend.client.xpending_range(stream, "workers", min=entry_id, max=entry_id,
                                                 count=1)
    _count(key, [bool(pending), self.request.hostname, time.time()])
    return "ignored: the stored result stays"


@app.task(bind=True)
def extend_chord(self, values):
    """A chord header part that adds one ``identity`` task per value to its own chord."""
    for value in values:
        self.add_to_chord(identity.si(value))
    return 0


# -- the operator's view (t/integration/test_ops_cli.py) --------------------------------------


@app.task(acks_late=True)
def hold(seconds):
    """Holds its message in flight (acked when done) for ``seconds``."""
    time.sleep(seconds)
    return seconds


@app.task(acks_late=True)  # Reject only reaches the broker before the ack
def picky(flag):
    """Rejected to the dead letters until the key ``flag`` exists in the counter Redis."""
    from celery.exceptions import Reject

    if not _counter().exists(flag):
        raise Reject("not yet", requeue=False)
    return flag


# -- features (t/integration/test_features.py) ------------------------------------------------


@app.task(bind=True, sheppy_rate_limit="20/s")
def limited(self, key):
    """Globally limited to 20 runs a second; records ``[start time, worker]`` in ``key``."""
    _count(key, [time.time(), self.request.hostname])
    time.sleep(0.01)


@app.task(bind=True, rate_limit="4/s")
def worker_limited(self, key):
    """Celery's own per-worker rate limit; records its start time in ``key``."""
    _count(key, [time.time(), self.request.hostname])


@app.task(bind=True)
def beat_tick(self, key):
    """Records each run as ``[task id, time]`` in ``key`` (beat occurrences)."""
    _count(key, [self.request.id, time.time()])


from celery_sheppy.unique import UniqueTask  # noqa: E402


@app.task(bind=True, base=UniqueTask, sheppy_unique=True)
def unique_sleep(self, key, seconds):
    """A unique task (key: name + arguments); records ``[task id, time]`` in ``key``."""
    _count(key, [self.request.id, time.time()])
    time.sleep(seconds)
    return seconds


@app.task(bind=True, base=UniqueTask, sheppy_unique=True)
def unique_fail(self, key):
    _count(key, [self.request.id, time.time()])
    raise ValueError("fails for good")


@app.task(bind=True, base=UniqueTask, sheppy_unique=True, acks_late=True)
def unique_reject(self, key):
    """Rejected to the dead letters."""
    from celery.exceptions import Reject

    _count(key, [self.request.id, time.time()])
    raise Reject("to the dead letters", requeue=False)


@app.task(bind=True, base=UniqueTask, sheppy_unique=True, max_retries=1)
def unique_retry(self, key):
    """Retries once, 2 s later; records ``[task id, time]`` in ``key`` on each run."""
    _count(key, [self.request.id, time.time()])
    if not self.request.retries:
        raise self.retry(countdown=2)
    return "retried"

"""Unique tasks on a ``sheppy://`` broker: while a task with the same unique key is
pending, scheduled or running, publishing another one is refused and the caller gets
the existing task's ``AsyncResult``.

::

    from celery_sheppy.unique import UniqueTask

    @app.task(base=UniqueTask, sheppy_unique=True)        # key: task name + arguments
    def refresh(account_id): ...

    refresh.delay(7)                                       # runs
    refresh.delay(7).id == refresh.delay(7).id             # while the first is not done
    refresh.apply_async((7,), sheppy_unique="account-7")   # a key of one's own
    refresh.apply_async((7,), sheppy_unique=False)         # not unique, this call

    app = Celery(..., task_cls="celery_sheppy.unique:UniqueTask")  # per call, any task

The key ``sheppy:celery:<q>:unique:<key>`` holds the holder's task id. It is taken
with the publish, atomically (``transport/claims.py``), and lives as long as the
task's message and run:

* published: kept ``sheppy_unique_ttl`` seconds (default one day) while the message
  waits; a message reclaimed from a dead worker is still the holder;
* running: kept ``RUNNING_LEASES`` leases (the broker's ``visibility_timeout``) and
  renewed every quarter lease by the process that runs it, so a worker killed with
  SIGKILL frees the key within two leases, unless its message is redelivered (an
  ``acks_late`` task), whose new run holds it again;
* released when the task succeeds, fails for good, is ignored, rejected to the dead
  letters or revoked; a retry keeps it (the retry's message is the same task id).
"""

import hashlib
import json
import os
import threading
import weakref

from celery import Task, signals, states
from celery.utils.log import get_logger

from .transport import claims

logger = get_logger(__name__)

#: The task attribute and ``apply_async`` option: True (key from name + arguments),
#: a string (the key), False/None (not unique).
OPTION = "sheppy_unique"

#: Seconds a published task holds its key before it runs (task attribute
#: ``sheppy_unique_ttl``).
PENDING_TTL = 24 * 3600

#: A running task's key lives this many leases without renewal.
RUNNING_LEASES = 2

#: Celery states after which a task's key is released.
RELEASED_STATES = frozenset(states.READY_STATES) | {states.IGNORED, states.REJECTED}


def unique_key(task_name, args, kwargs):
    """The key of ``sheppy_unique=True``: the task name and a digest of its arguments."""
    text = json.dumps([list(args or ()), kwargs or {}], sort_keys=True, default=repr)
    return f"{task_name}:{hashlib.sha1(text.encode('utf-8')).hexdigest()}"


class UniqueTask(Task):
    """A Celery task whose publishes may be unique (see the module)."""

    sheppy_unique = None
    sheppy_unique_ttl = PENDING_TTL

    def apply_async(self, args=None, kwargs=None, task_id=None, **options):
        unique = options.pop(OPTION, None)
        if unique is None:
            unique = self.sheppy_unique
        headers = dict(options.pop("headers", None) or {})
        if unique and claims.HEADER not in headers:
            key = unique if isinstance(unique, str) else unique_key(self.name, args, kwargs)
            headers[claims.HEADER] = {"kind": "unique", "key": key,
                                      "ttl": self.sheppy_unique_ttl}
        if headers:
            options["headers"] = headers
        result = super().apply_async(args, kwargs, task_id=task_id, **options)
        holder = claims.take_refusal(result.id) if claims.HEADER in headers else None
        if holder is not None and holder != result.id:
            logger.info("Task %s[%s] not sent: %s with the same unique key is not done",
                        self.name, result.id, holder)
            return self.AsyncResult(holder)
        return result

    def signature_from_request(self, request=None, *args, **kwargs):
        """A retry keeps its claim (the same task id takes it again)."""
        sig = super().signature_from_request(request, *args, **kwargs)
        claim = getattr(request if request is not None else self.request, claims.HEADER, None)
        if isinstance(claim, dict):
            sig.options["headers"] = dict(sig.options.get("headers") or {},
                                          **{claims.HEADER: claim})
        return sig


# -- the worker side: renew while running, release when done ------------------------------


class _Holds:
    """The unique keys this process's running tasks hold, renewed by one thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = {}  # task id -> (claim, app)
        self.wake = threading.Event()
        self.thread = None
        self.pid = None
        self.clients = weakref.WeakKeyDictionary()  # app -> (pid, kombu connection)
        self.clients_lock = threading.Lock()

    def client(self, app):
        """A Redis client of ``app``'s broker, one per process (forked pools included)."""
        with self.clients_lock:
            pid, conn = self.clients.get(app, (None, None))
            if pid != os.getpid():
                conn = app.connection_for_write()
                self.clients[app] = (os.getpid(), conn)
            return conn.default_channel.client

    def lease(self, app):
        return float((app.conf.broker_transport_options or {}).get("visibility_timeout", 30))

    def start(self, task_id, claim, app):
        with self.lock:
            self.held[task_id] = (claim, app)
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._renew_loop,
                                               name="sheppy-unique-renew", daemon=True)
                self.thread.start()
        self.renew(task_id, claim, app)

    def stop(self, task_id):
        with self.lock:
            return self.held.pop(task_id, None)

    def renew(self, task_id, claim, app):
        try:
            lease = self.lease(app)
            if not claims.renew(self.client(app), claim, task_id, RUNNING_LEASES * lease):
                logger.warning("unique task %s no longer holds its key %s", task_id,
                               claim.get("key"))
                self.stop(task_id)
        except Exception as exc:  # Redis away: the next turn tries again
            logger.warning("unique task %s: key %s not renewed: %r", task_id,
                           claim.get("key"), exc)

    def _renew_loop(self):
        while True:
            with self.lock:
                held = list(self.held.items())
            every = min([self.lease(app) for _, (_, app) in held] or [30.0]) / 4
            self.wake.wait(every)
            self.wake.clear()
            for task_id, (claim, app) in held:
                if task_id in self.held:
                    self.renew(task_id, claim, app)


_holds = _Holds()


def _claim_of(request):
    claim = getattr(request, claims.HEADER, None) if request is not None else None
    if isinstance(claim, dict) and claim.get("kind") == "unique" and claim.get("queue"):
        return claim
    return None


def _release(task_id, claim, app):
    try:
        claims.release(_holds.client(app), claim, task_id)
    except Exception as exc:  # the key expires by itself
        logger.warning("unique task %s: key %s not released: %r", task_id, claim.get("key"),
                       exc)


@signals.task_prerun.connect
def _on_prerun(sender=None, task_id=None, task=None, **_):
    claim = _claim_of(getattr(task, "request", None))
    if claim is not None:
        _holds.start(task_id, claim, task.app)


@signals.task_postrun.connect
def _on_postrun(sender=None, task_id=None, task=None, state=None, **_):
    claim = _claim_of(getattr(task, "request", None))
    if claim is None:
        return
    _holds.stop(task_id)
    if state in RELEASED_STATES:
        _release(task_id, claim, task.app)
    else:  # a retry: its message waits again
        try:
            claims.renew(_holds.client(task.app), claim, task_id,
                         float(claim.get("ttl") or PENDING_TTL))
        except Exception as exc:
            logger.warning("unique task %s: key not renewed: %r", task_id, exc)


@signals.task_revoked.connect
def _on_revoked(sender=None, request=None, **_):
    claim = _claim_of(request)
    if claim is not None and sender is not None:
        _holds.stop(request.id)
        _release(request.id, claim, sender.app)

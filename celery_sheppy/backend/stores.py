"""Writing results: :class:`ResultWriter` stores a task's state as its sheppy record;
:class:`StoredResult` is one result being stored, worked out once.

Storing one is one script (``store_result.lua``): the record, then an entry in
``sheppy:finished:<q>`` (terminal states) or ``sheppy:celery:<q>:states`` (others), and
sheppy's completed or failed counter; an ``acks_late`` task's message on the same Redis
is acked in the same script.

The writer owns the broker probe (does the broker share this database? asked once per
connection), when this process last renewed each queue in sheppy's queue registry and
each finished stream's time to live, and, in prefork pool children, the connection whose
stores are sent without waiting for their reply (deferred_stores.py).
"""

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from celery import states
from celery.exceptions import BackendStoreError, Reject
from celery.utils.log import get_logger
from kombu.utils.encoding import bytes_to_str

from .. import keys, records, scripts
from ..connect import params
from . import deferred_stores

logger = get_logger(__name__)

#: sheppy keeps finished-stream entries for about this long (seconds).
STREAM_KEEP_SECONDS = 60

#: Seconds between two stores of a process that renew the finished stream's time to
#: live (STREAM_KEEP_SECONDS + twice this): once results stop, it goes within 2 minutes.
FINISHED_TTL_EVERY = 30

#: Seconds between two renewals of a queue in sheppy's queue registry by one process.
REGISTRY_EVERY = 60


@dataclass(frozen=True)
class StoredResult:
    """One result being stored: what the store script writes and how it is sent."""

    __slots__ = ("task_id", "sheppy_id", "queue", "record", "expires", "terminal", "failed",
                 "ack", "chord_part")

    task_id: str  # Celery's id, for messages
    sheppy_id: str  # the record's id (records.sheppy_id)
    queue: str  # the queue whose namespace holds the record (Topology.result_queue)
    record: str  # the record's JSON text
    expires: int  # seconds the record lives, 0: for ever
    terminal: bool  # a ready state: announced on the finished stream and counted
    failed: bool  # FAILURE: counted as failed
    ack: Optional[tuple]  # (stream, entry id) of the message acked with it, or None
    chord_part: bool  # a chord's header task: the chord counts it on another connection


class ResultWriter:
    """Stores results in ``queues`` with ``client``.

    ``app``: the Celery app (a task's ``acks_late``, the broker's URL and connection);
    ``ensure(fun, args)``: runs a command under the backend's retry policy;
    ``topology``: the connect package's Topology, which of ``queues`` (its
    ``result_queues`` of the backend's queue) holds a result and whether one node holds
    them all; ``value_limit``: the server's ValueLimit; ``expires``, ``failure_expires``:
    seconds a result lives (0: for ever)."""

    def __init__(self, app, client, ensure, topology, queues, value_limit,
                 expires, failure_expires):
        self.app = app
        self.client = client
        self.ensure = ensure
        self.topology = topology
        self.queues = queues
        self.value_limit = value_limit
        self.expires = int(expires or 0)
        self.failure_expires = int(failure_expires or 0)
        self._script = scripts.registry()["store_result"]
        #: Is the broker on this backend's server and database? None: not asked yet on
        #: this connection (:attr:`broker_is_here`).
        self._same_server = None
        self._registered_at = {}  # queue -> when it was last put in sheppy's queue registry
        self._finished_ttl_at = {}  # queue -> when its finished stream's TTL was last renewed
        self._queue_keys = {}  # queue -> the store script's keys of that queue
        self._deferred = None  # DeferredStores, made by a pool child's first deferred store

    def store(self, meta, payload, result, request):
        """Store Celery result ``meta`` (with ``payload``, its encoding, or None to store
        the meta natively); ``result`` as the task returned it."""
        stored = self.stored_result(meta, payload, result, request)
        store_keys, store_args = self._script_call(stored)
        if self._defers(stored):
            self._deferred_stores().send(store_keys, store_args, stored.task_id)
        else:
            self.settle()  # a deferred STARTED must not land after this SUCCESS
            self.store_now(store_keys, store_args)
        self._register_queue(stored.queue)

    def stored_result(self, meta, payload, result, request):
        """The :class:`StoredResult` of ``meta``; BackendStoreError when it is too big."""
        task_id, state = meta["task_id"], meta["status"]
        text = records.dumps(records.build_record(task_id, meta, request, payload))
        try:
            self.value_limit.check(text)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        sid = records.sheppy_id(task_id)
        queue = self.topology.result_queue(self.queues, sid)
        failed = state == states.FAILURE
        terminal = state in records.TERMINAL_STATES
        return StoredResult(
            task_id=task_id, sheppy_id=sid, queue=queue, record=text,
            expires=self.failure_expires if failed else self.expires,
            terminal=terminal, failed=failed,
            ack=self._message_to_ack(request, state, result, queue) if terminal else None,
            chord_part=bool(getattr(request, "chord", None)))

    def settle(self):
        """Wait until the last deferred store of this process has been answered: what the
        process reads next includes it."""
        if self._deferred is not None:
            self._deferred.settle()

    def reset(self):
        """After a fork or a lost connection: ask about the broker again."""
        self._same_server = None

    # -- the script call ------------------------------------------------------------------

    def _script_call(self, stored):
        """``(keys, args)`` of the store_result script storing ``stored``."""
        queue = stored.queue
        queue_keys = self._queue_keys.get(queue)
        if queue_keys is None:
            queue_keys = self._queue_keys[queue] = (
                keys.finished_stream(queue), keys.state_stream(queue),
                keys.completed_counter(queue), keys.failed_counter(queue))
        min_id = f"{int((time.time() - STREAM_KEEP_SECONDS) * 1000)}-0"
        # ack: (stream, entry id) of the task's message, acked in the same script, so a
        # stored result's message is never redelivered (the worker's own ack is a no-op)
        ack = stored.ack
        ack_keys, ack_args = ([ack[0]], [keys.CONSUMER_GROUP, ack[1]]) if ack else ([], [])
        terminal = stored.terminal
        return ([keys.task_record(queue, stored.sheppy_id), *queue_keys, *ack_keys],
                [stored.record, stored.expires, (2 if stored.failed else 1) if terminal else 0,
                 stored.sheppy_id, min_id, 2 * STREAM_KEEP_SECONDS,
                 self._finished_ttl(queue) if terminal else 0, *ack_args])

    def _finished_ttl(self, queue):
        """The finished stream's time to live to give with this store, or 0 (given by
        this process less than FINISHED_TTL_EVERY ago)."""
        now = time.monotonic()
        if now - self._finished_ttl_at.get(queue, -FINISHED_TTL_EVERY) < FINISHED_TTL_EVERY:
            return 0
        self._finished_ttl_at[queue] = now
        return STREAM_KEEP_SECONDS + 2 * FINISHED_TTL_EVERY

    def store_now(self, store_keys, store_args):
        """Run one store, waiting for its reply."""
        # Retried on a lost connection like the stock backend's set() (retry_policy:
        # 20 tries a second apart by default), so a Redis restart loses no result. A
        # retry after a lost reply rewrites the same record; a stored SUCCESS stays.
        # Called directly, not in a pipeline: redis-py sends SCRIPT EXISTS before every
        # pipeline holding a script, a round trip per result.
        self.ensure(lambda: self._script(self.client, keys=store_keys, args=store_args), ())

    # -- stores sent without waiting ----------------------------------------------------

    def _defers(self, stored):
        """Whether ``stored`` is sent without waiting for its reply (deferred_stores.py):
        in a prefork pool child's main thread, on one node, and not a chord part's result
        (the chord's count and join follow on another connection)."""
        return (not stored.chord_part and self.topology.single_node
                and deferred_stores.in_pool_child()
                and threading.current_thread() is threading.main_thread())

    def _deferred_stores(self):
        if self._deferred is None:  # only a pool child's main thread gets here
            self._deferred = deferred_stores.DeferredStores(
                self.client, self._script, self.store_now)
        return self._deferred

    # -- sheppy's queue registry ----------------------------------------------------------

    def _register_queue(self, queue):
        # sheppy's tools list queues from the registry; it lives in another cluster
        # slot, so it is kept apart from the script, and renewed once a minute.
        now = time.monotonic()
        if now - self._registered_at.get(queue, 0.0) > REGISTRY_EVERY:
            self.ensure(lambda: self.client.hsetnx(keys.queue_registry(), queue, "{}"), ())
            self._registered_at[queue] = now

    # -- the message a result acks ------------------------------------------------------

    def _message_to_ack(self, request, state, result, queue):
        """``(stream, entry id)`` of the message a terminal result in ``queue`` may ack in
        the same script: an ``acks_late`` task's ``sheppy://`` delivery on this Redis, in
        that queue, unless the worker rejects it after this failure; else None."""
        task = self.app.tasks.get(getattr(request, "task", None) or "")
        if not getattr(task, "acks_late", False):
            return None  # acked when the worker accepted it: a second XACK + XDEL would be wasted
        if getattr(request, "chord", None):
            # A chord part: acked by the worker once the chord counted it and, if it was the
            # last, its body was sent; a worker killed before then has it redelivered.
            return None
        if state == states.FAILURE and (_is_reject(result) or not _acks_on_failure(task)):
            return None  # the worker rejects it next: to the dead letters, not acked here
        properties = getattr(request, "properties", None)
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        entry = keys.entry_of_tag(tag)
        if entry is None or not self.broker_is_here:
            return None
        if keys.queue_of_stream(entry[0]) != queue:
            return None  # another queue may live in another cluster slot
        return entry

    @property
    def broker_is_here(self):
        """True when the broker is ``sheppy://`` on this backend's server and database,
        as the servers say (not the URLs: ``localhost`` and ``127.0.0.1`` are one server,
        two ports behind a proxy may be two). Decided once per connection."""
        if self._same_server is None:
            self._same_server = self._probe_broker()  # None again when it could not tell
        return bool(self._same_server)

    def _probe_broker(self):
        """Write a token with this backend's client, read it with the broker's."""
        url = self.app.conf.broker_write_url or self.app.conf.broker_url
        if isinstance(url, (list, tuple)):
            url = url[0] if url else None
        if not (url or "").split(";")[0].strip().startswith(tuple(params.SCHEMES)):
            return False
        token = uuid.uuid4().hex
        key = keys.server_probe(token)
        try:
            self.client.set(key, token, ex=10)
            with self.app.connection_for_write() as conn:
                seen = conn.default_channel.client.get(key)
            self.client.delete(key)
        except Exception as exc:  # pylint: disable=broad-except
            logger.warning("sheppy: could not tell whether broker and result backend share "
                           "a Redis database (%r); will ask again with the next result", exc)
            return None
        return bytes_to_str(seen or b"") == token


def _is_reject(result):
    """Whether a FAILURE's ``result`` is Celery's Reject: the exception itself, or the dict
    ``encode_result`` makes of it with a non-pickle serializer (json by default)."""
    if isinstance(result, Reject):
        return True
    return (isinstance(result, dict) and result.get("exc_type") == Reject.__name__
            and result.get("exc_module") == Reject.__module__)


def _acks_on_failure(task):
    """Whether the worker acks ``task``'s message when it fails (else it rejects it)."""
    for flag in (getattr(task, "acks_on_failure", None),
                 getattr(task, "acks_on_failure_or_timeout", None)):
        if flag is not None:
            return bool(flag)
    return True

"""Result stores: :class:`ResultStores`, the part of :class:`~celery_sheppy.backend.SheppyBackend`
that writes a task's state as its sheppy record.

Storing one is one script (``store_result.lua``): the record, then an entry in
``sheppy:finished:<q>`` (terminal states) or ``sheppy:celery:<q>:states`` (others), and
sheppy's completed or failed counter; an ``acks_late`` task's message on the same Redis
is acked in the same script. It owns the broker probe (does the broker share this
database?), the queue registry renewal and, in prefork pool children, the deferred
stores (deferred_stores.py).
"""

import threading
import time
import uuid
from functools import cached_property as cached_attribute

from celery import states
from celery.exceptions import BackendStoreError, Reject
from celery.utils.log import get_logger
from kombu.utils.encoding import bytes_to_str, ensure_bytes
from kombu.utils.objects import cached_property

from .. import keys, records, scripts
from ..connect import params
from . import deferred_stores

logger = get_logger(__name__)

#: sheppy keeps finished-stream entries for about this long (seconds).
STREAM_KEEP_SECONDS = 60

#: Seconds between two stores of a process that renew the finished stream's time to
#: live (STREAM_KEEP_SECONDS + twice this): once results stop, it goes within 2 minutes.
FINISHED_TTL_EVERY = 30


class ResultStores:
    """Mixin of SheppyBackend: ``_store_result`` and what it needs. Uses the backend's
    ``client``, ``ensure``, ``queue_for``, ``_check_size`` and expiry settings."""

    #: Is the broker on this backend's server and database? None: not asked yet on
    #: this connection (:attr:`_broker_is_here`).
    _same_server = None

    @cached_attribute  # functools': a plain instance attribute after the first store
    def _registered_at(self):
        return {}  # queue -> when it was last put in sheppy's queue registry

    @cached_attribute
    def _finished_ttl_at(self):
        return {}  # queue -> when this process last renewed its finished stream's TTL

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        payload = None if self._native_json else ensure_bytes(self.encode(meta))
        text = records.dumps(records.build_record(meta["task_id"], meta, request, payload))
        try:
            self._check_size(text)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        expires = self.failure_expires if state == states.FAILURE else self.expires
        terminal = state in records.TERMINAL_STATES
        ack = self._delivery_to_ack(request, state, result) if terminal else None
        sid = records.sheppy_id(task_id)
        store = self._store_call(sid, text, terminal, expires, ack, state == states.FAILURE)
        if self._defers_stores(request):
            self._deferred_stores.send(*store, meta["task_id"])
        else:
            self._settle_stores()  # a deferred STARTED must not land after this SUCCESS
            self._write_record(*store)
        self._register_queue(self.queue_for(sid))
        return result

    def _defers_stores(self, request):
        """Whether this store is sent without waiting for its reply (deferred_stores.py):
        in a prefork pool child's main thread, on one server or behind Sentinel, and not
        a chord part's result (the chord's count and join follow on another connection)."""
        return (deferred_stores.in_pool_child() and self.topology.single_node
                and threading.current_thread() is threading.main_thread()
                and not getattr(request, "chord", None))

    @cached_property
    def _deferred_stores(self):
        return deferred_stores.DeferredStores(self.client, scripts.registry()["store_result"],
                                              self._write_record)

    def _settle_stores(self):
        stores = self.__dict__.get("_deferred_stores")
        if stores is not None:
            stores.settle()

    def _delivery_to_ack(self, request, state, result):
        """``(stream, entry id)`` of the message a terminal result may ack in the same
        script: an ``acks_late`` task's ``sheppy://`` delivery on this Redis, in this
        backend's queue, unless the worker rejects it after this failure; else None."""
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
        if entry is None or not self._broker_is_here:
            return None
        if keys.queue_of_stream(entry[0]) != self.queue_for(records.sheppy_id(request.id)):
            return None  # another queue may live in another cluster slot
        return entry

    @property
    def _broker_is_here(self):
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

    def _store_call(self, sid, text, terminal, expires, ack=None, failed=False):
        """``(keys, args)`` of the store_result script storing record ``text``."""
        queue = self.queue_for(sid)
        min_id = f"{int((time.time() - STREAM_KEEP_SECONDS) * 1000)}-0"
        # ack: (stream, entry id) of the task's message, acked in the same script, so a
        # stored result's message is never redelivered (the worker's own ack is a no-op)
        ack_keys, ack_args = ([ack[0]], [keys.CONSUMER_GROUP, ack[1]]) if ack else ([], [])
        return ([keys.task_record(queue, sid), keys.finished_stream(queue),
                 keys.state_stream(queue), keys.completed_counter(queue),
                 keys.failed_counter(queue), *ack_keys],
                [text, int(expires or 0), (2 if failed else 1) if terminal else 0, sid, min_id,
                 2 * STREAM_KEEP_SECONDS, self._finished_ttl(queue) if terminal else 0,
                 *ack_args])

    def _finished_ttl(self, queue):
        """The finished stream's time to live to give with this store, or 0 (given by
        this process less than FINISHED_TTL_EVERY ago)."""
        now = time.monotonic()
        if now - self._finished_ttl_at.get(queue, -FINISHED_TTL_EVERY) < FINISHED_TTL_EVERY:
            return 0
        self._finished_ttl_at[queue] = now
        return STREAM_KEEP_SECONDS + 2 * FINISHED_TTL_EVERY

    def _write_record(self, store_keys, store_args):
        # Retried on a lost connection like the stock backend's set() (retry_policy:
        # 20 tries a second apart by default), so a Redis restart loses no result. A
        # retry after a lost reply rewrites the same record; a stored SUCCESS stays.
        # Called directly, not in a pipeline: redis-py sends SCRIPT EXISTS before every
        # pipeline holding a script, a round trip per result.
        self.ensure(lambda: scripts.registry()["store_result"](
            self.client, keys=store_keys, args=store_args), ())

    def _register_queue(self, queue):
        # sheppy's tools list queues from the registry; it lives in another cluster
        # slot, so it is kept apart from the script, and renewed once a minute.
        now = time.monotonic()
        if now - self._registered_at.get(queue, 0.0) > 60:
            self.ensure(lambda: self.client.hsetnx(keys.queue_registry(), queue, "{}"), ())
            self._registered_at[queue] = now


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

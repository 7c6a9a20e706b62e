"""Native chords: :class:`NativeChords` joins a chord in Redis instead of polling its
header's results; :class:`ChordKeys` are one chord's keys, worked out once per call.

:meth:`NativeChords.apply` puts the header's task ids in a set, each finished part
removes its own id (``chord_part_return.lua``), and the part that empties the set fires
the body; a part that reports twice removes nothing. The body state key records that
the body is being sent (``firing:<task id>``) and then ``sent``, so a redelivered last
part whose worker died in between sends it, and any other redelivery sends nothing.

A chord's state is its keys alone: the part keeps nothing between calls.
"""

from dataclasses import dataclass

import redis
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, ResultBase, allow_join_result
from celery.utils.log import get_logger
from kombu.exceptions import OperationalError
from kombu.utils.encoding import bytes_to_str

from .. import compat, keys, records, scripts

logger = get_logger(__name__)

#: How long a chord's body state is kept when chords do not expire (result_chord_ttl
#: unset): a redelivery of its last part later than this would send the body again.
CHORD_BODY_STATE_SECONDS = 24 * 3600


@dataclass(frozen=True)
class ChordKeys:
    """The keys of one chord (keys.py has their layout)."""

    __slots__ = ("pending", "added", "group", "lazy_done", "lazy_size", "body_state")

    pending: str  # set: the header task ids not finished yet
    added: str  # list: ids Task.add_to_chord added
    group: str  # the saved GroupResult of the header
    lazy_done: str  # zset: a generator header's finished part ids
    lazy_size: str  # a generator header's size (-1: not known yet)
    body_state: str  # "firing:<task id>", then "sent"

    @classmethod
    def of(cls, queue, sheppy_id):
        return cls(keys.chord_pending_set(queue, sheppy_id), keys.chord_added_list(queue, sheppy_id),
                   keys.group_record(queue, sheppy_id), keys.lazy_chord_done(queue, sheppy_id),
                   keys.lazy_chord_size(queue, sheppy_id), keys.chord_body_state(queue, sheppy_id))


class NativeChords:
    """Celery's chord hooks for the chords kept in ``queues``, on ``client``.

    ``backend``: Celery's side of a chord: its app, its serializer (``encode``), the
    results a body gets (GroupResult.restore, AsyncResult) and chord errors
    (``chord_error_from_stack``); ``ensure(fun, args)``: runs a command under the
    backend's retry policy; ``topology``: the connect package's Topology, which of
    ``queues`` (its ``result_queues`` of the backend's queue) holds a chord;
    ``value_limit``: the server's ValueLimit."""

    def __init__(self, backend, client, ensure, topology, queues, value_limit):
        self.backend = backend
        self.app = backend.app
        self.client = client
        self.ensure = ensure
        self.topology = topology
        self.queues = queues
        self.value_limit = value_limit
        #: Seconds a chord's keys live, 0 for ever.
        self.ttl = compat.chord_ttl(backend)
        self._part_return = scripts.registry()["chord_part_return"]

    def keys_of(self, group_id):
        sid = records.sheppy_id(group_id)
        return ChordKeys.of(self.topology.result_queue(self.queues, sid), sid)

    def apply(self, header_result_args):
        group_id, results = header_result_args[0], header_result_args[1]
        if isinstance(results, compat.LazyTasks):
            return self._apply_lazy(group_id)
        header_result = self.app.GroupResult(*header_result_args)
        chord = self.keys_of(header_result.id)
        group_value = self.backend.encode({"result": header_result.as_tuple()})
        self.value_limit.check(group_value)
        ids = _leaf_ids(header_result)
        ttl = self.ttl

        def record_chord():
            # A re-applied frozen chord reuses its group id: start from an empty set.
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(chord.pending, chord.added)
                pipe.sadd(chord.pending, *ids)
                if ttl:
                    pipe.expire(chord.pending, ttl)
                pipe.set(chord.group, group_value, ex=ttl or None)
                pipe.execute()

        self.ensure(record_chord, ())

    def _apply_lazy(self, group_id):
        """A chord whose header is a generator: Celery freezes and sends it one task at a
        time (celery#3021), so its ids are unknown now; parts are counted as they finish
        against the size :meth:`set_size` stores before the last task is sent."""
        chord, ttl = self.keys_of(group_id), self.ttl

        def record_chord():
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(chord.pending, chord.added, chord.group, chord.lazy_done)
                pipe.set(chord.lazy_size, -1, ex=ttl or None)
                pipe.execute()

        self.ensure(record_chord, ())

    def set_size(self, group_id, chord_size):
        """Store the size of a generator-header chord; other chords count their pending set."""
        key = self.keys_of(group_id).lazy_size
        # xx: only a chord _apply_lazy started, keepttl: its expiry stays.
        self.ensure(lambda: self.client.set(key, chord_size, xx=True, keepttl=True), ())

    def add(self, group_id, result):
        chord = self.keys_of(group_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.sadd(chord.pending, result.id)
            # The body gets the added tasks' results too, after the header's (as with redis://).
            pipe.rpush(chord.added, result.id)
            if self.ttl:
                pipe.expire(chord.pending, self.ttl)
                pipe.expire(chord.added, self.ttl)
            pipe.execute()

    def on_part_return(self, request):
        group_id, task_id = request.group, request.id
        if not group_id or not task_id:
            return
        chord = self.keys_of(group_id)
        index = "+inf" if request.group_index is None else request.group_index
        body_ttl = self.ttl or CHORD_BODY_STATE_SECONDS
        last = self.ensure(lambda: self._part_return(
            self.client,
            keys=[chord.pending, chord.lazy_done, chord.lazy_size, chord.added, chord.body_state],
            args=[task_id, index, self.ttl, body_ttl]), ())
        if last == 1:
            self.fire_body(request, group_id, chord)
            # From here a redelivery of this part (its message is acked next) fires nothing.
            self.ensure(lambda: self.client.set(chord.body_state, "sent", ex=body_ttl), ())

    def fire_body(self, request, group_id, chord):
        """Send the body of the chord ``group_id`` (keys ``chord``) with its header's results,
        or store the chord's error in the body's result."""
        app, backend = self.app, self.backend
        callback = maybe_signature(request.chord, app=app)
        header = GroupResult.restore(group_id, backend=backend)
        if header is not None:
            added = self.client.lrange(chord.added, 0, -1)
            header = app.GroupResult(group_id, header.results + [
                app.AsyncResult(bytes_to_str(task_id), backend=backend) for task_id in added])
        else:
            # A generator header saved no GroupResult: its parts, in header order.
            done = self.client.zrange(chord.lazy_done, 0, -1)
            if done:
                header = app.GroupResult(group_id, [
                    app.AsyncResult(bytes_to_str(task_id), backend=backend) for task_id in done])
        if header is None:
            return backend.chord_error_from_stack(
                callback, ChordError(f"GroupResult {group_id} no longer exists"))
        try:
            with allow_join_result():
                values = header.join_native(timeout=app.conf.result_chord_join_timeout, propagate=True)
        except Exception as exc:  # pylint: disable=broad-except
            try:
                culprit = next(header._failed_join_report())
                reason = f"Dependency {culprit.id} raised {exc!r}"
            except StopIteration:
                reason = repr(exc)
            logger.exception("Chord %r raised: %r", group_id, reason)
            return backend.chord_error_from_stack(
                callback, compat.chord_error(reason, cause=exc))
        def send_body():
            try:
                return compat.publish_callback(app, callback.delay, values)
            except OperationalError as exc:
                # kombu's "broker unreachable": retried as the backend retries its own
                # commands, through a restart of Redis, not only Celery's publish retries
                # (under a second in all)
                raise redis.ConnectionError(f"chord body not sent: {exc}") from exc

        try:
            self.ensure(send_body, ())
        except Exception as exc:  # pylint: disable=broad-except
            logger.exception("Chord callback for %r raised: %r", group_id, exc)
            return backend.chord_error_from_stack(
                callback, compat.chord_error(f"Callback error: {exc!r}", cause=exc))
        return None


def _leaf_ids(result):
    """Ids of the tasks that report to a chord with header ``result``, in header order."""
    ids = []
    for node in result.results:
        if isinstance(node, GroupResult):
            ids.extend(_leaf_ids(node))
        elif isinstance(node, ResultBase):
            ids.append(node.id)
    return ids

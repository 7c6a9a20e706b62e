"""Native chords: :class:`NativeChords`, the part of :class:`~celery_sheppy.backend.SheppyBackend`
that joins a chord in Redis instead of polling its header's results.

:meth:`NativeChords.apply_chord` puts the header's task ids in a set, each finished part
removes its own id (``chord_part_return.lua``), and the part that empties the set fires
the body; a part that reports twice removes nothing. The body state key records that
the body is being sent (``firing:<task id>``) and then ``sent``, so a redelivered last
part whose worker died in between sends it, and any other redelivery sends nothing.
"""

from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, ResultBase, allow_join_result
from celery.utils.log import get_logger
from kombu.utils.encoding import bytes_to_str

from .. import compat, keys, records, scripts

logger = get_logger(__name__)

#: How long a chord's body state is kept when chords do not expire (result_chord_ttl
#: unset): a redelivery of its last part later than this would send the body again.
CHORD_BODY_STATE_SECONDS = 24 * 3600


class NativeChords:
    """Mixin of SheppyBackend: Celery's chord hooks. Uses the backend's ``client``,
    ``ensure``, ``queue_for``, ``get_key_for_*`` and ``value_limit``."""

    @property
    def _chord_ttl(self):
        return compat.chord_ttl(self)

    def apply_chord(self, header_result_args, body, **kwargs):
        self.ensure_chords_allowed()
        group_id, results = header_result_args[0], header_result_args[1]
        if isinstance(results, compat.LazyTasks):
            return self._apply_lazy_chord(group_id)
        header_result = self.app.GroupResult(*header_result_args)
        group_key = self.get_key_for_group(header_result.id)
        chord_key = self.get_key_for_chord(header_result.id)
        added_key = self._chord_added_key(header_result.id)
        group_value = self.encode({"result": header_result.as_tuple()})
        self.value_limit.check(group_value)
        ids = _leaf_ids(header_result)
        ttl = self._chord_ttl

        def record_chord():
            # A re-applied frozen chord reuses its group id: start from an empty set.
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(chord_key, added_key)
                pipe.sadd(chord_key, *ids)
                if ttl:
                    pipe.expire(chord_key, ttl)
                pipe.set(group_key, group_value, ex=ttl or None)
                pipe.execute()

        self.ensure(record_chord, ())

    def _apply_lazy_chord(self, group_id):
        """A chord whose header is a generator: Celery freezes and sends it one task at a
        time (celery#3021), so its ids are unknown now; parts are counted as they finish
        against the size :meth:`set_chord_size` stores before the last task is sent."""
        sid, ttl = records.sheppy_id(group_id), self._chord_ttl
        queue = self.queue_for(sid)

        def record_chord():
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self.get_key_for_chord(group_id), self._chord_added_key(group_id),
                            self.get_key_for_group(group_id), keys.lazy_chord_done(queue, sid))
                pipe.set(keys.lazy_chord_size(queue, sid), -1, ex=ttl or None)
                pipe.execute()

        self.ensure(record_chord, ())

    def set_chord_size(self, group_id, chord_size):
        """Store the size of a generator-header chord; other chords count their pending set."""
        sid = records.sheppy_id(group_id)
        key = keys.lazy_chord_size(self.queue_for(sid), sid)
        # xx: only a chord _apply_lazy_chord started, keepttl: its expiry stays.
        self.ensure(lambda: self.client.set(key, chord_size, xx=True, keepttl=True), ())

    def _chord_added_key(self, group_id):
        sid = records.sheppy_id(group_id)
        return keys.chord_added_list(self.queue_for(sid), sid)

    def add_to_chord(self, group_id, result):
        chord_key = self.get_key_for_chord(group_id)
        added_key = self._chord_added_key(group_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.sadd(chord_key, result.id)
            # The body gets the added tasks' results too, after the header's (as with redis://).
            pipe.rpush(added_key, result.id)
            if self._chord_ttl:
                pipe.expire(chord_key, self._chord_ttl)
                pipe.expire(added_key, self._chord_ttl)
            pipe.execute()

    def on_chord_part_return(self, request, state, result, **kwargs):
        group_id, task_id = request.group, request.id
        if not group_id or not task_id:
            return
        sid = records.sheppy_id(group_id)
        index = "+inf" if request.group_index is None else request.group_index
        queue = self.queue_for(sid)
        body_key = keys.chord_body_state(queue, sid)
        chord_keys = [self.get_key_for_chord(group_id), keys.lazy_chord_done(queue, sid),
                      keys.lazy_chord_size(queue, sid), self._chord_added_key(group_id), body_key]
        body_ttl = self._chord_ttl or CHORD_BODY_STATE_SECONDS
        last = self.ensure(lambda: scripts.registry()["chord_part_return"](
            self.client, keys=chord_keys, args=[task_id, index, self._chord_ttl, body_ttl]), ())
        if last == 1:
            self._fire_chord_body(request, group_id)
            # From here a redelivery of this part (its message is acked next) fires nothing.
            self.ensure(lambda: self.client.set(body_key, "sent", ex=body_ttl), ())

    def _fire_chord_body(self, request, group_id):
        app = self.app
        callback = maybe_signature(request.chord, app=app)
        header = GroupResult.restore(group_id, backend=self)
        if header is not None:
            added = self.client.lrange(self._chord_added_key(group_id), 0, -1)
            header = app.GroupResult(group_id, header.results + [
                app.AsyncResult(bytes_to_str(task_id), backend=self) for task_id in added])
        else:
            # A generator header saved no GroupResult: its parts, in header order.
            sid = records.sheppy_id(group_id)
            done_key = keys.lazy_chord_done(self.queue_for(sid), sid)
            done = self.client.zrange(done_key, 0, -1)
            if done:
                header = app.GroupResult(group_id, [
                    app.AsyncResult(bytes_to_str(task_id), backend=self) for task_id in done])
        if header is None:
            return self.chord_error_from_stack(
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
            return self.chord_error_from_stack(
                callback, compat.chord_error(reason, cause=exc))
        try:
            compat.publish_callback(app, callback.delay, values)
        except Exception as exc:  # pylint: disable=broad-except
            logger.exception("Chord callback for %r raised: %r", group_id, exc)
            return self.chord_error_from_stack(
                callback, compat.chord_error(f"Callback error: {exc!r}", cause=exc))

def _leaf_ids(result):
    """Ids of the tasks that report to a chord with header ``result``, in header order."""
    ids = []
    for node in result.results:
        if isinstance(node, GroupResult):
            ids.extend(_leaf_ids(node))
        elif isinstance(node, ResultBase):
            ids.append(node.id)
    return ids

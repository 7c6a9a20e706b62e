"""Result waiting: :class:`ResultConsumer` owns the read positions in the finished and
states streams, the ids this process waits on, and the one blocking reader among its
threads.

``AsyncResult.get()`` waits on those two streams with ``XREAD BLOCK`` from the last id
read: nothing is lost while a connection is down, and one reader serves every waiter of
the process. No pub/sub.
"""

import threading
import time
import weakref
from contextlib import contextmanager

import redis
from redis.exceptions import RedisClusterException
from celery import states
from celery.backends.asynchronous import BaseResultConsumer
from celery.utils.log import get_logger
from kombu.utils.encoding import bytes_to_str

from .. import keys, records

logger = get_logger(__name__)

#: Longest single XREAD BLOCK of a result waiter, in seconds.
MAX_BLOCK_SECONDS = 1.0

#: On a Redis Cluster, longest wait (s) for a result whose shard is not the one blocked on
#: while several shards are waited for (ResultConsumer._read_shards).
CLUSTER_POLL_SECONDS = 0.05

#: A read position unused for this long (seconds) is renewed before the next wait,
#: so a waiter does not first read a backlog it has no interest in.
POSITION_STALE_SECONDS = 20.0

#: Ids a producer may hold for results nobody waits on before unwaited ones are dropped.
MAX_WATCHED_IDS = 10000


class ResultConsumer(BaseResultConsumer):
    """Delivers stored results to waiting ``AsyncResult`` objects.

    One thread at a time reads the finished and states streams with
    ``XREAD BLOCK`` from the last ids it has seen; other waiting threads sleep
    until it is done, then look at their results. Entries for ids this process
    waits on are fetched with one ``MGET``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        backend = self.backend
        self._connection_errors = backend.connection_errors
        self._streams = tuple(stream for queue in backend.result_queues
                              for stream in (keys.finished_stream(queue), keys.state_stream(queue)))
        self._reset_state()

    def _reset_state(self):
        self._lock = threading.Lock()
        self._read_done = threading.Condition(self._lock)
        self._reading = False
        self._watched = {}  # sheppy id -> Celery task id
        # Celery task id -> {id(object): callable giving the AsyncResult or None}: waiters
        # Celery before 5.7 would not tell (compat.told_by_celery), told by on_state_change
        self._also_told = {}
        self._positions = None  # stream key -> last id read
        self._last_read = 0.0

    def on_after_fork(self):
        self._reset_state()
        self.backend.reset_connections()
        super().on_after_fork()

    def start(self, initial_task_id, **kwargs):
        self.consume_from(initial_task_id)

    def consume_from(self, task_id):
        task_id = bytes_to_str(task_id)
        with self._lock:
            if len(self._watched) >= MAX_WATCHED_IDS:
                self._drop_unwaited()
            self._watched[records.sheppy_id(task_id)] = task_id
            stale = time.monotonic() - self._last_read > POSITION_STALE_SECONDS
        if stale:
            # Before the caller reads the record: a result stored after that read is
            # then announced after this position.
            self._mark_position()

    def also_tell(self, result, weak=False):
        """Hand ``result`` its result too when it comes, though Celery keeps another
        AsyncResult object for its id (before Celery 5.7, compat.told_by_celery); held
        weakly or not as Celery holds its own waiters."""
        holder = weakref.ref(result) if weak else (lambda: result)
        with self._lock:
            self._also_told.setdefault(result.id, {})[id(result)] = holder
        self.consume_from(result.id)

    def stop_telling(self, result):
        """Forget waiter ``result``; whether another object told by :meth:`also_tell`
        still waits on its id."""
        with self._lock:
            waiters = self._also_told.get(result.id)
            if waiters is None:
                return False
            waiters.pop(id(result), None)
            if not any(holder() is not None for holder in waiters.values()):
                del self._also_told[result.id]
                return False
            return True

    def cancel_for(self, task_id):
        with self._lock:
            self._watched.pop(records.sheppy_id(bytes_to_str(task_id)), None)

    def _drop_unwaited(self):
        concrete, weak = self._pending_results
        for sid, task_id in list(self._watched.items()):
            if task_id not in concrete and task_id not in weak and task_id not in self._also_told:
                del self._watched[sid]

    def _mark_position(self):
        client = self.backend.client
        with client.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                pipe.xrevrange(stream, count=1)
            newest = self.backend.ensure(pipe.execute, ())
        positions = {s: (e[0][0] if e else b"0-0") for s, e in zip(self._streams, newest)}
        with self._lock:
            if self._positions is None or time.monotonic() - self._last_read > POSITION_STALE_SECONDS:
                self._positions = positions
                self._last_read = time.monotonic()

    def on_wait_for_pending(self, result, **kwargs):
        for meta in result._iter_meta(**kwargs):
            if meta is not None:
                self.on_state_change(meta, None)

    def on_state_change(self, meta, message):
        others = ()
        if meta["status"] in states.READY_STATES:
            # Taken before Celery tells the object it keeps: its removal then finds no
            # other waiter, and the id is cleared once all are told
            with self._lock:
                others = list(self._also_told.pop(meta["task_id"], {}).values())
        super().on_state_change(meta, message)
        for holder in others:
            result = holder()
            if result is None:
                continue
            result._maybe_set_cache(meta)
            # Celery handed a joining GroupResult's bucket the object it keeps, when that
            # one equals (same id) the bucket's: then it was handed already
            bucket = self.buckets.pop(result, None)
            if bucket is not None:
                bucket.append(result)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def drain_events_until(self, p, timeout=None, on_interval=None):
        # Never block for longer than the caller's timeout in one read.
        interval = MAX_BLOCK_SECONDS if timeout is None else max(min(timeout, MAX_BLOCK_SECONDS), 0.01)
        return self.drainer.drain_events_until(
            p, timeout=timeout, interval=interval, on_interval=on_interval)

    def drain_events(self, timeout=None):
        with self._lock:
            if self._reading:
                self._read_done.wait(MAX_BLOCK_SECONDS if timeout is None else timeout)
                return
            self._reading = True
        try:
            with self.reconnect_on_error():
                self._read_once(timeout)
        finally:
            with self._lock:
                self._reading = False
                self._read_done.notify_all()

    def _read_once(self, timeout):
        if self._positions is None:
            self._mark_position()
        block = MAX_BLOCK_SECONDS if timeout is None else min(timeout, MAX_BLOCK_SECONDS)
        with self._lock:
            positions = dict(self._positions)
        if self.backend.topology.single_node:
            reply = self.backend.blocking_client.xread(
                positions, count=1000, block=max(int(block * 1000), 1) if block > 0 else None)
        else:
            reply = self._read_shards(positions, block)
        wanted = []
        for stream, entries in reply or ():
            stream = bytes_to_str(stream)
            for entry_id, fields in entries:
                positions[stream] = entry_id
                sid = bytes_to_str(fields.get(b"task_id", b""))
                if sid in self._watched:
                    wanted.append(sid)
        with self._lock:
            self._positions = positions
            self._last_read = time.monotonic()
        if wanted:
            self._deliver(list(dict.fromkeys(wanted)))

    def _read_shards(self, positions, block):
        """On a Redis Cluster: read the streams of the result shards holding watched ids.

        One XREAD may name keys of one slot only, so one shard blocks (its two streams);
        several are read without blocking, one pipelined round trip per node, and when
        nothing came the read blocks on the shard with the most waiters for at most
        :data:`CLUSTER_POLL_SECONDS` (the others' results wait that long at most)."""
        backend = self.backend
        with self._lock:
            counts = {}
            for sid in self._watched:
                queue = backend.queue_for(sid)
                counts[queue] = counts.get(queue, 0) + 1
        if not counts:
            if block > 0:
                time.sleep(min(block, CLUSTER_POLL_SECONDS))
            return []
        client = backend.blocking_client

        def streams_of(queue):
            return {stream: positions[stream]
                    for stream in (keys.finished_stream(queue), keys.state_stream(queue))}

        busiest = max(counts, key=counts.get)
        if len(counts) > 1:
            reply = _xread_shards(client, [streams_of(queue) for queue in counts])
            if reply or block <= 0:
                return reply
            block = min(block, CLUSTER_POLL_SECONDS)
        return _xread_shard(client, streams_of(busiest),
                            block=max(int(block * 1000), 1) if block > 0 else None) or []

    def _deliver(self, sids):
        backend = self.backend
        values = backend.mget([keys.task_record(backend.queue_for(sid), sid) for sid in sids])
        for sid, value in zip(sids, values):
            if not value:
                continue
            try:
                meta = backend.decode_result(value)
            except records.RecordError as exc:
                # Other waiters must not suffer; this task's own get() raises when it
                # reads the record.
                logger.error("Unreadable result record %s: %s", sid, exc)
                continue
            self.on_state_change(meta, None)

    @contextmanager
    def reconnect_on_error(self):
        try:
            yield
        except self._connection_errors as lost:
            try:
                self._reconnect()
            except self._connection_errors as exc:
                # The next wait tries again: nothing here needs a restart of the application.
                raise redis.ConnectionError(
                    f"lost the connection to the result backend {self.backend.as_uri()} and "
                    f"could not reconnect within its retry policy: {exc}") from lost

    def _reconnect(self):
        self.backend.ensure(self._resync, ())

    def _resync(self):
        """After a lost connection: fresh connections, then the records of every watched id."""
        self.backend.reset_connections()
        with self._lock:
            sids = list(self._watched)
        for start in range(0, len(sids), 1000):
            self._deliver(sids[start:start + 1000])



# XREAD names its keys after STREAMS, which redis-py's cluster client cannot find without
# asking a node (COMMAND GETKEYS: one more round trip per XREAD, 4 per task in the bench).
# A shard's streams share a slot, so the node is known here; on a redirection (a slot
# moved) the client's own routing, which follows it and refreshes the slot map, is used.

def _xread_shard(client, streams, block=None):
    """XREAD of one shard's ``streams`` ({stream: last id}) on a RedisCluster."""
    try:
        node = client.get_node_from_key(next(iter(streams)))
        return client.execute_command(
            "XREAD", "COUNT", 1000, *(("BLOCK", block) if block is not None else ()),
            "STREAMS", *streams, *streams.values(), target_nodes=node)
    except (redis.ResponseError, redis.ConnectionError, RedisClusterException):
        return client.xread(streams, count=1000, block=block)


def _xread_shards(client, shards):
    """XREAD of several shards' streams without blocking: one pipeline per node."""
    try:
        by_node = {}
        for streams in shards:
            node = client.get_node_from_key(next(iter(streams)))
            by_node.setdefault(node.name, (node, []))[1].append(streams)
        return [item for node, parts in by_node.values()
                for item in _pipelined_xreads(client.get_redis_connection(node), parts)]
    except (redis.ResponseError, redis.ConnectionError, RedisClusterException):
        return _pipelined_xreads(client, shards)


def _pipelined_xreads(client, shards):
    """Non-blocking XREADs of ``shards`` in one pipeline of ``client``; their entries."""
    with client.pipeline(transaction=False) as pipe:
        for streams in shards:
            pipe.xread(streams, count=1000)
        return [item for part in pipe.execute() for item in part or ()]

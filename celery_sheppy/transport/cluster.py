"""The broker on a Redis Cluster (``sheppy+cluster://``): what must be split by slot.

In cluster mode Celery queue ``q`` is sheppy queue ``{q}`` (``keys.broker_queue``): all
of a queue's keys share one slot, so every script and MULTI of the transport names keys
of one slot. What spans queues is split here:

* reads: one XREADGROUP may name keys of one slot only (CROSSSLOT otherwise, even on one
  node), so :class:`ClusterReader` keeps one blocking read per consumed slot, each on a
  connection of its own to the master owning that slot. A read answered by an error
  reply (``MOVED``, ``ASK``, ``READONLY``, ``UNBLOCKED``, ``CLUSTERDOWN``...; ``NOGROUP``
  aside) or a lost connection (resharding, failover) refreshes the slot map and is sent
  again, to the new owner, after :data:`REROUTE_PAUSE`: the worker keeps its connection;
* batched publishes (``Producer.batch()``, a group's tasks): one MULTI per slot
  (:func:`by_slot`);
* acks, lease renewals, reclaims, requeues: single-stream commands and scripts, which
  ``redis.cluster.RedisCluster`` routes (its non-transactional pipeline splits by node).
"""

from time import monotonic

import redis
from kombu.log import get_logger

from .. import connection, keys
from .connections import probe_unblock
from .reading import GROUP, Reader

logger = get_logger(__name__)


#: Errors of a read's connection that a failover or resharding causes.
LOST = (redis.ConnectionError, redis.TimeoutError, OSError)

#: Seconds between checks that an outstanding read's node still serves its slot (one
#: EXISTS of its first stream on that node: a replica answers MOVED). A read that reached
#: a master while a CLUSTER FAILOVER paused it may stay blocked on the new replica.
OWNER_CHECK_INTERVAL = 2.0

#: Seconds past its block after which a read without a reply is dropped (a healthy node
#: answers a blocked XREADGROUP when its block ends; one server waits the health check).
OVERDUE_MARGIN = 3.0

#: Seconds before a slot whose read failed is read again (its node may be failing over:
#: the slot map changes once the cluster has promoted a replica).
REROUTE_PAUSE = 0.5


def command_key(name, args):
    """The key of a publish command (``(name, args)`` as ``PublishBatch.add`` takes it)."""
    return args[1] if name == "execute_command" else args[0]


def by_slot(commands):
    """``[[command, ...], ...]``: ``commands`` split by the slot of their key, in order."""
    groups = {}
    for command in commands:
        name, args, _ = command
        groups.setdefault(keys.slot_of(command_key(name, args)), []).append(command)
    return list(groups.values())


def node_connection(params, node, block_seconds):
    """A connection to cluster ``node`` for blocking reads (outside any pool)."""
    kwargs = connection.blocking_kwargs(params, block_seconds)
    kwargs.pop("cluster", None)
    kwargs.pop("max_connections", None)
    cls = kwargs.pop("connection_class", None) or redis.Connection
    return cls(host=node.host, port=node.port, **kwargs)


class _Read:
    """One outstanding blocking read: its connection, node and streams."""

    __slots__ = ("conn", "fd", "node", "sent_at", "queue_of", "order")

    def __init__(self, conn, node, queue_of, order):
        self.conn = conn
        self.fd = conn._sock.fileno()  # kept: redis-py drops the socket on an error
        self.node = node
        self.sent_at = monotonic()
        self.queue_of = queue_of  # stream -> queue
        self.order = order  # stream -> (priority step, queue index)


class ClusterReader(Reader):
    """The channel's reads on a Redis Cluster: one blocking XREADGROUP per consumed slot."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reads = {}  # slot -> _Read outstanding
        self._conns = {}  # slot -> [node name, connection, client id]
        self._paused = {}  # slot -> monotonic time before which it is not read (rerouted)
        self._node_checked_at = {}  # node name -> when a read on it was last checked

    @property
    def reading(self):
        return bool(self._reads)

    @property
    def fileno(self):
        fds = self.filenos()
        return fds[0] if fds else None

    def filenos(self):
        fds = []
        for read in self._reads.values():
            sock = getattr(read.conn, "_sock", None)
            if sock is not None:
                fds.append(sock.fileno())
        return fds

    def start(self):
        """Send a blocking XREADGROUP for every consumed slot without one, if there is room."""
        may = self._may_read()
        if may is None:
            return False
        ordered, budget = may
        slots = {}  # slot -> [(queue index, queue, streams present)]
        for index, queue in enumerate(ordered):
            present = self.groups.ensure(queue)
            if present:
                slots.setdefault(keys.slot_of(present[0]), []).append((index, queue, present))
        streams = [stream for members in slots.values() for _, _, present in members
                   for stream in present]
        hot = len(self._hot_streams.intersection(streams)) or len(streams)
        per_stream = max(1, budget // hot)
        started = False
        now = monotonic()
        for slot, members in slots.items():
            if slot in self._reads or self._paused.get(slot, 0.0) > now:
                continue
            try:
                self._send(slot, members, per_stream)
            except LOST as exc:  # its master is gone: the slot map will say who took over
                self._reroute(slot, exc)
                continue
            started = True
        return started

    def _send(self, slot, members, per_stream):
        streams = [stream for _, _, present in members for stream in present]
        block_ms = max(int(self.block_seconds() * 1000), 1)
        node, conn = self._connect(slot)
        conn.send_command("XREADGROUP", "GROUP", GROUP, self.consumer_name, "COUNT", per_stream,
                          "BLOCK", block_ms, "STREAMS", *streams, *([">"] * len(streams)))
        order = {stream: (step, index) for index, queue, _ in members
                 for step, stream in enumerate(self.queues.streams(queue))}
        queue_of = {stream: queue for _, queue, present in members for stream in present}
        self._reads[slot] = _Read(conn, node, queue_of, order)

    def _connect(self, slot):
        """``(node, connection)`` to the master of ``slot``, connected; a connection to a
        node that no longer owns the slot is dropped for one to the owner."""
        client = self.conns.client
        node = client.nodes_manager.get_node_from_slot(slot)
        known = self._conns.get(slot)
        if known is not None and known[0] != node.name:
            self._close(known[1])
            known = None
        if known is None:
            conn = node_connection(self.conns.params, node, self.polling_interval)
            known = self._conns[slot] = [node.name, conn, None]
        conn = known[1]
        if conn._sock is None or known[2] is None:
            conn.connect()
            known[2], self._can_unblock = probe_unblock(conn)
        return node, conn

    def finish(self):
        """Read the replies of every outstanding read (``drain_events``: they are ready)."""
        return sum(self._finish(slot) for slot in list(self._reads))

    def readable(self, fd):
        """Read the reply on ``fd``; False when nothing is to be read there any more (the
        read was rerouted and its connection closed: the poller forgets ``fd``)."""
        for slot, read in list(self._reads.items()):
            sock = getattr(read.conn, "_sock", None)
            if sock is not None and sock.fileno() == fd:
                self._finish(slot)
                return slot in self._conns
        for known in self._conns.values():  # an idle connection the server closed
            sock = getattr(known[1], "_sock", None)
            if sock is not None and sock.fileno() == fd:
                self._close(known[1])
        return False

    def _finish(self, slot):
        read = self._reads.pop(slot, None)
        if read is None:
            return 0
        try:
            reply = self.conns.client.get_redis_connection(read.node).parse_response(
                read.conn, "XREADGROUP")
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self.groups.reset()  # a stream expired or was deleted: declare again
                return 0
            self._forget(read.fd)
            # MOVED, ASK (redis-py's MovedError, AskError), READONLY, UNBLOCKED (the master
            # became a replica), CLUSTERDOWN, TRYAGAIN, LOADING...: the slot changed hands
            # or its node cannot serve it now. Ask the slot map again, read again.
            self._reroute(slot, exc)
            return 0
        except LOST as exc:
            self._forget(read.fd)
            self._reroute(slot, exc)
            return 0
        return self._buffer_reply(reply, read.order, read.queue_of, hot=self._hot_streams)

    def _reroute(self, slot, exc):
        """The slot moved or its node failed: drop the connection, learn the slot map."""
        logger.warning("sheppy: read of slot %d on the Redis Cluster failed (%r): asking the "
                       "cluster for its slot map and reading again", slot, exc)
        known = self._conns.pop(slot, None)
        if known is not None:
            self._close(known[1])
        self._paused[slot] = monotonic() + REROUTE_PAUSE
        try:
            self.conns.client.nodes_manager.initialize()
        except redis.RedisError as error:  # the next read tries again
            logger.debug("sheppy: slot map refresh failed: %r", error)

    def interrupt(self):
        if not self._can_unblock:
            return
        client = self.conns.client
        for slot, read in list(self._reads.items()):
            known = self._conns.get(slot)
            if known is None or known[2] is None:
                continue
            try:
                client.get_redis_connection(read.node).client_unblock(known[2])
            except LOST:
                pass
            except redis.ResponseError as exc:  # NOPERM, or MOVED: its read returns anyway
                logger.debug("sheppy: CLIENT UNBLOCK on %s: %r", read.node.name, exc)

    def drop_if_overdue(self, health_check_interval):
        """Drop reads whose reply is late, and reads sent to a node that no longer owns
        their slot as the slot map now says (a read that reached a master during its
        failover may never be answered); ``(True, an fd dropped)`` or ``(False, None)``."""
        limit = self.block_seconds() + min(health_check_interval, OVERDUE_MARGIN)
        owner = self.conns.client.nodes_manager.get_node_from_slot
        dropped, checked = [], {}  # node name -> its check's error (one check per node)
        for slot, read in list(self._reads.items()):
            if monotonic() - read.sent_at > limit:
                reason = TimeoutError("no reply in time")
            elif owner(slot).name != read.node.name:
                reason = redis.ConnectionError(f"slot {slot} moved from {read.node.name}")
            else:
                if read.node.name not in checked:
                    checked[read.node.name] = self._check_owner(read)
                reason = checked[read.node.name]
                if reason is None:
                    continue
            if _has_reply(read.conn):  # answered meanwhile: its entries must not be lost
                self._finish(slot)
                continue
            sock = getattr(read.conn, "_sock", None)
            dropped.append(sock.fileno() if sock is not None else None)
            del self._reads[slot]
            self._reroute(slot, reason)
        return (True, dropped[0]) if dropped else (False, None)

    def _check_owner(self, read):
        """None while ``read``'s node still serves its slot (checked every
        OWNER_CHECK_INTERVAL per node: a failover demotes a whole node, so one check
        answers for every read on it), else the error that says it does not."""
        now = monotonic()
        if now - self._node_checked_at.get(read.node.name, read.sent_at) < OWNER_CHECK_INTERVAL:
            return None
        self._node_checked_at[read.node.name] = now
        try:
            self.conns.client.get_redis_connection(read.node).execute_command(
                "EXISTS", next(iter(read.queue_of)))
        except (redis.ResponseError, *LOST) as exc:  # MOVED: a replica now
            return exc
        return None

    def reset(self):
        self._reads.clear()
        for known in self._conns.values():
            self._close(known[1])
        self._conns.clear()


def _has_reply(conn):
    try:
        return conn.can_read(timeout=0)
    except LOST:
        return False

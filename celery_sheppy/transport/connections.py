"""The Redis connections of one channel, and the redis-py arguments they are made with.

* ``topology``: where the data is (connect/topology.py: Server, Sentinel, Cluster);
* ``client``: a client for every command but the blocking reads (on a Redis Cluster a
  ``redis.cluster.RedisCluster``, which routes each command to the node owning its key);
* ``blocking_pool``: where the connections of blocking reads come from (reading.py; none
  on a Cluster, whose reads connect to the node of their slot);
* ``ack_conn``: the connection acks are sent on without waiting for their replies (one
  node only: ``topology.single_node``);
* ``publish_conn``: a pooled connection kept for lone publish commands (:meth:`send`).

Each is made on first use and made again after :meth:`Connections.disconnect`.
"""

import os
import threading

import redis
from kombu.exceptions import ChannelError
from kombu.utils.objects import cached_property

from .. import compat
from ..connect import params as connection_params
from ..connect import topology_of, urls


def connparams(conninfo, settings):
    """redis-py keyword arguments of kombu's parsed URL ``conninfo`` and the channel's
    :class:`~.options.Settings`; ChannelError names what is wrong."""
    options = settings.connection_options()
    if conninfo.userid:
        options["username"] = conninfo.userid
    if conninfo.password:
        password = conninfo.password
        options["password"] = password() if callable(password) else password
    if isinstance(conninfo.ssl, dict):
        options.update(conninfo.ssl)
    # kombu parsed the URL (as for redis://): rebuild it for our parser.
    host = conninfo.hostname or connection_params.DEFAULT_HOST
    topology_url = urls.kombu_url(conninfo)  # sheppy+sentinel://...
    sentinel = settings.sentinel_options()
    if topology_url or sentinel.get("master_name"):
        return _topology_params(topology_url or "sheppy://", options, sentinel)
    host = f"[{host}]" if ":" in host else host
    scheme = (conninfo.transport_cls if conninfo.transport_cls in connection_params.SCHEMES
              else "sheppy")
    db = str(conninfo.virtual_host or "").strip("/")
    url = f"{scheme}://{host}:{conninfo.port or connection_params.DEFAULT_PORT}/{db}"
    try:
        return connection_params.connection_kwargs(url, options)
    except ValueError as exc:
        raise ChannelError(f"sheppy:// broker: {exc}") from None


def _topology_params(url, options, sentinel):
    try:
        return urls.connection_kwargs(url, options, sentinel)
    except (ValueError, KeyError) as exc:
        raise ChannelError(f"sheppy:// broker: {exc}") from None


class Connections:
    def __init__(self, params, block_seconds):
        self.params = params
        self.topology = topology_of(params)
        self.block_seconds = block_seconds  # longest block of one read
        self._pid = os.getpid()  # a forked child must not share publish_conn's socket
        self._publish_lock = threading.Lock()  # publish_conn: one command at a time

    @property
    def where(self):
        return self.topology.describe()

    @cached_property
    def pool(self):
        return self.topology.pool()

    @cached_property
    def client(self):
        """Client for every command but the blocking reads."""
        if self.topology.single_node:
            return redis.Redis(connection_pool=self.pool)
        return self.topology.client()

    @cached_property
    def blocking_pool(self):
        """Connections for blocking reads, taken out of its rotation for good."""
        return self.topology.blocking_pool(self.block_seconds)

    def read_connection(self, node):
        """A new connection for blocking reads from ``node`` (``topology.read_node``)."""
        return self.topology.read_connection(self.client, self.blocking_pool, node,
                                             self.block_seconds)

    @cached_property
    def ack_conn(self):
        """The connection acks are sent on without waiting (see ``acks.Acker.flush``)."""
        return compat.pool_connection(self.blocking_pool)

    def subscriber_connection(self):
        """A new connection for pub/sub subscriptions (fanout.py), outside any pool's
        rotation; on a Redis Cluster to any master (a PUBLISH reaches every node)."""
        return self.read_connection(None)

    @cached_property
    def publish_conn(self):
        """The connection a lone publish command goes on, kept out of the pool's rotation:
        taking a connection from the pool and giving it back (a lock, a poll of its socket
        for unread data, redis-py's retry wrapper) costs ~20 µs of a ~250 µs publish."""
        return compat.pool_connection(self.pool)

    def send(self, commands):
        """Send publish ``commands`` (``(name, args, kwargs)``, as PublishBatch.add takes
        them) in one round trip; their replies.

        A lone raw command (``execute_command``) goes on :attr:`publish_conn` (one node
        only); when that connection fails it is dropped and the command sent through the
        pool, with redis-py's retry, as every other command is. Several go in one
        pipeline, where a BUSYGROUP reply (the group existed) is no error.
        """
        if len(commands) > 1:
            with self.client.pipeline(transaction=False) as pipe:
                for name, args, kwargs in commands:
                    getattr(pipe, name)(*args, **kwargs)
                replies = pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                    raise reply
            return replies
        (name, args, kwargs), = commands
        if (name == "execute_command" and not kwargs and os.getpid() == self._pid
                and self.topology.single_node):
            with self._publish_lock:
                conn = self.publish_conn
                try:
                    conn.send_command(*args)
                    return [conn.read_response()]
                except (redis.ConnectionError, redis.TimeoutError):
                    conn.disconnect()  # connects again on its next command
        return [getattr(self.client, name)(*args, **kwargs)]

    @property
    def has_ack_conn(self):
        return "ack_conn" in self.__dict__

    def disconnect(self):
        for name in ("pool", "blocking_pool"):
            pool = self.__dict__.pop(name, None)
            if pool is not None:
                pool.disconnect()
        client = self.__dict__.get("client")
        if client is not None:
            client.close()  # a RedisCluster's node pools (one server's pool went above)
        for name in ("client", "ack_conn", "publish_conn"):
            self.__dict__.pop(name, None)


def probe_unblock(conn):
    """``(client id or None, CLIENT UNBLOCK allowed)`` of a fresh connection, in one round
    trip (CLIENT UNBLOCK of id 0, which is no client, only tests the permission)."""
    conn.send_packed_command(conn.pack_commands([("CLIENT", "ID"), ("CLIENT", "UNBLOCK", "0")]))
    replies = []
    for _ in range(2):
        try:
            replies.append(conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    client_id = replies[0] if isinstance(replies[0], int) else None
    return client_id, client_id is not None and not isinstance(replies[1], Exception)

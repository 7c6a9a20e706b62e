"""Server, Sentinel, Cluster: where the data lives, and what that changes, in one object each.

:func:`topology_of` builds one from connection parameters (``urls.connection_kwargs``).
Everything that differs between one Redis server (or a Sentinel-watched primary, the same
to its users) and a Redis Cluster is a method or attribute here, so no caller asks "is
this a Cluster?":

* clients and pools (:meth:`~Topology.client`, :meth:`~Topology.pool`), and a connection
  for a blocking read (:meth:`~Topology.read_connection`) to the node serving a key;
* naming: the sheppy queue a broker queue lives under (:meth:`~Topology.broker_queue`:
  ``{q}`` on a Cluster, one slot for all of its keys) and back, and a result backend's
  queues (:meth:`~Topology.result_queues`: hash-tagged shards on a Cluster);
* grouping by slot (:meth:`~Topology.slot_group`, :meth:`~Topology.by_slot`): a server is
  one group, so code that splits work by slot has no branch for it;
* capabilities: ``single_node`` (every key on one node: a raw publish connection, acks
  sent without waiting on one connection, result stores deferred on one connection,
  ``MGET`` of any keys); ``reroutes_reads`` (a read that fails is sent again to the node
  the slot map names, the worker keeping its connection: a Cluster's failover and
  resharding), with :meth:`~Topology.read_error_reroutes` and
  :meth:`~Topology.read_owner_error`, which only a Cluster answers.
"""

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel as SentinelManager
from redis.sentinel import SentinelConnectionPool, SentinelManagedConnection

from .. import compat, keys
from . import params as connection_params
from .urls import describe

#: Errors of a Cluster read's connection that a failover or resharding causes.
_LOST = (redis.ConnectionError, redis.TimeoutError, OSError)


class Topology:
    """Where a sheppy URL's data lives. Subclasses: :class:`Server`, :class:`Sentinel`,
    :class:`Cluster`."""

    #: Every key lives on one node (see the module docstring).
    single_node = True
    #: A failed read is rerouted by the slot map, not raised to the consumer.
    reroutes_reads = False

    def __init__(self, params):
        self.params = params

    def describe(self):
        """Where the data is, for messages (no password)."""
        return describe(self.params)

    def check_server(self, client, where, tls=False):
        """ValueError when ``client`` reaches a server celery-sheppy cannot use: a Sentinel
        or a Cluster node behind a plain URL (the error names the URL to use), or a server
        lacking a command it needs (``where``: what the URL is for, in the message)."""
        hello = connection_params.server_hello(client) or {"ping": client.ping()}
        connection_params.check_standalone(
            hello, where, (self.params.get("host"), self.params.get("port")), tls)
        connection_params.check_supported(client, where, hello)

    # -- clients ------------------------------------------------------------------------

    def pool(self, blocking_timeout=None, pool_class=None):
        """A connection pool (``blocking_timeout``: threads beyond ``max_connections`` wait
        that long, s; ``pool_class``: the caller's pool class)."""
        kwargs = dict(self.params)
        if pool_class is not None:
            return pool_class(**kwargs)
        if blocking_timeout is not None:
            return redis.BlockingConnectionPool(timeout=blocking_timeout, **kwargs)
        return redis.ConnectionPool(**kwargs)

    def client(self, blocking_timeout=None, pool_class=None, **extra):
        """A redis-py client for every command but a blocking read (arguments: as for
        :meth:`pool`)."""
        return redis.Redis(connection_pool=self.pool(blocking_timeout, pool_class), **extra)

    def blocking_pool(self, block_seconds):
        """A pool of connections for reads that block up to ``block_seconds``, whose
        connections are taken out of its rotation for good (:meth:`read_connection`)."""
        kwargs = connection_params.blocking_kwargs(self.params, block_seconds)
        kwargs.pop("max_connections", None)
        return type(self)(kwargs).pool()

    def read_connection(self, client, blocking_pool, node, block_seconds):
        """A connection to ``node`` (:meth:`read_node`) for reads that block up to
        ``block_seconds``: one of ``blocking_pool`` (:meth:`blocking_pool`)."""
        return compat.pool_connection(blocking_pool)

    def read_node(self, client, group):
        """The node serving slot group ``group``: None, the server itself."""
        return None

    def node_client(self, client, node):
        """A client talking to ``node`` (a read's node, to unblock it or check it)."""
        return client

    # -- naming -------------------------------------------------------------------------

    def broker_queue(self, queue):
        """The sheppy queue name the broker keeps Celery queue ``queue`` under."""
        return queue

    def celery_queue(self, name):
        """The Celery queue of sheppy queue ``name`` (the inverse of :meth:`broker_queue`)."""
        return name

    def result_queues(self, queue):
        """The sheppy queues a result backend of queue ``queue`` stores under."""
        return (queue,)

    def result_queue(self, queues, sheppy_id):
        """The one of ``queues`` (:meth:`result_queues`) holding ``sheppy_id``'s results."""
        return queues[0]

    # -- slots --------------------------------------------------------------------------

    def slot_group(self, key):
        """The group of keys ``key`` is served with: one command may name keys of one
        group only (a server: one group)."""
        return 0

    def by_slot(self, items, key=lambda item: item):
        """``items`` split by the slot group of ``key(item)``, in order."""
        groups = {}
        for item in items:
            groups.setdefault(self.slot_group(key(item)), []).append(item)
        return list(groups.values())

    # -- reads (a Cluster's answers: see Cluster) -------------------------------------

    def read_error_reroutes(self, exc):
        """Whether a read that failed with ``exc`` is sent again elsewhere (True) rather
        than raised to the consumer (False)."""
        return False

    def read_owner_error(self, client, group, node, key):
        """An error saying ``node`` no longer serves ``group`` (``key`` is one of its
        streams), or None."""
        return None

    def refresh(self, client):
        """Learn where the slots are again (a Cluster's slot map)."""


class Server(Topology):
    """One Redis server (``sheppy://``)."""


class Sentinel(Server):
    """A primary found through Redis Sentinel (``sheppy+sentinel://``): one server to its
    users; its pools ask the Sentinels for the current primary."""

    def pool(self, blocking_timeout=None, pool_class=None):
        # (a pool class of the caller's is for one server: a Sentinel pool asks the
        # Sentinels, and waits like a BlockingConnectionPool when blocking_timeout is given)
        kwargs = dict(self.params)
        sentinels = kwargs.pop("sentinel")
        if kwargs.get("connection_class") in (None, redis.Connection):
            kwargs["connection_class"] = SentinelManagedConnection
        manager = _sentinel_manager(sentinels, kwargs)
        if blocking_timeout is not None:
            return SentinelBlockingConnectionPool(sentinels.master_name, manager,
                                                  timeout=blocking_timeout, **kwargs)
        return SentinelConnectionPool(sentinels.master_name, manager, **kwargs)


class Cluster(Topology):
    """A Redis Cluster (``sheppy+cluster://``): a broker queue ``q`` is sheppy queue ``{q}``
    (one slot for every key of the queue, so its scripts stay atomic), results spread over
    :data:`keys.RESULT_SHARDS` hash-tagged shards, one read per consumed slot."""

    single_node = False
    reroutes_reads = True

    def check_server(self, client, where, tls=False):
        # RedisCluster learnt the cluster's nodes from the seeds already
        connection_params.check_supported(client, where)

    def pool(self, blocking_timeout=None, pool_class=None):
        raise ValueError("a Redis Cluster has one pool per node: use client()")

    def client(self, blocking_timeout=None, pool_class=None, **extra):
        # (a Cluster's node pools do not wait: blocking_timeout and pool_class are unused)
        kwargs = dict(self.params)
        seeds = kwargs.pop("cluster")
        if kwargs.pop("connection_class", None) is redis.SSLConnection:
            kwargs["ssl"] = True
        kwargs.pop("health_check_interval", None)  # RedisCluster's node clients do not take it
        if not kwargs.get("retry_on_timeout"):
            kwargs.pop("retry_on_timeout", None)  # deprecated there: timeouts are retried anyway
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in seeds.nodes],
                            **kwargs, **extra)

    def blocking_pool(self, block_seconds):
        return None  # a connection per node instead (read_connection)

    def read_connection(self, client, blocking_pool, node, block_seconds):
        kwargs = connection_params.blocking_kwargs(self.params, block_seconds)
        kwargs.pop("cluster", None)
        kwargs.pop("max_connections", None)
        cls = kwargs.pop("connection_class", None) or redis.Connection
        node = node or client.get_default_node()
        return cls(host=node.host, port=node.port, **kwargs)

    def read_node(self, client, group):
        return client.nodes_manager.get_node_from_slot(group)

    def node_client(self, client, node):
        return client.get_redis_connection(node)

    def broker_queue(self, queue):
        return keys.broker_queue(queue, cluster=True)

    def celery_queue(self, name):
        return keys.celery_queue(name, cluster=True)

    def result_queues(self, queue):
        return keys.result_shards(queue)

    def result_queue(self, queues, sheppy_id):
        return keys.result_shard(queues, sheppy_id)

    def slot_group(self, key):
        return keys.slot_of(key)

    def read_error_reroutes(self, exc):
        # MOVED, ASK (redis-py's MovedError, AskError), READONLY, UNBLOCKED (the master
        # became a replica), CLUSTERDOWN, TRYAGAIN, LOADING, a lost connection: the slot
        # changed hands or its node cannot serve it now. NOGROUP is not the cluster's.
        if isinstance(exc, redis.ResponseError):
            return "NOGROUP" not in str(exc)
        return isinstance(exc, _LOST)

    def read_owner_error(self, client, group, node, key):
        if client.nodes_manager.get_node_from_slot(group).name != node.name:
            return redis.ConnectionError(f"slot {group} moved from {node.name}")
        try:  # a replica now (a failover demoted it) answers MOVED
            client.get_redis_connection(node).execute_command("EXISTS", key)
        except (redis.ResponseError, *_LOST) as exc:
            return exc
        return None

    def refresh(self, client):
        client.nodes_manager.initialize()


def topology_of(params):
    """The :class:`Topology` of connection parameters ``params``."""
    if "cluster" in params:
        return Cluster(params)
    if "sentinel" in params:
        return Sentinel(params)
    return Server(params)


def _sentinel_manager(sentinels, kwargs):
    sentinel_kwargs = dict(sentinels.sentinel_kwargs) or {
        name: value for name, value in kwargs.items()
        if name in ("socket_timeout", "socket_connect_timeout", "socket_keepalive")}
    return SentinelManager(list(sentinels.nodes), min_other_sentinels=sentinels.min_other_sentinels,
                           sentinel_kwargs=sentinel_kwargs)


class SentinelBlockingConnectionPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """A Sentinel pool whose threads wait for a free connection (as the backend's other pool)."""

    def disconnect(self, inuse_connections=True):
        # A new primary makes the Sentinel connection call disconnect(inuse_connections=False).
        compat.disconnect_blocking_pool(self, inuse_connections)

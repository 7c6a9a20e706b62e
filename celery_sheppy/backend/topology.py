"""Where the backend's results live: :class:`ResultTopology`, the one place the backend asks
what kind of Redis it is on (one server, a primary behind Sentinel, or a Cluster).

The backend and its parts hold it as ``backend.topology`` and ask it only this:

- ``single_node``: one node holds every key (a server, or the primary Sentinel names).
  Then the backend checks the server's ``HELLO`` on first use, a prefork child's result
  stores may be sent without waiting (deferred_stores.py), ``MGET`` is one atomic command,
  and one ``XREAD BLOCK`` waits on every result stream. On a Cluster none of these hold.
- ``result_queues(queue)``: the queues whose namespaces hold ``queue``'s results: the queue
  itself, or on a Cluster its result shards (``keys.result_shards``, each one slot).
- ``result_queue(queue, sheppy_id)``: which of those holds the result, group or chord of
  ``sheppy_id``.
- ``make_client(params, server_client)``: a client for connection parameters ``params``;
  on one server (no Sentinel) ``server_client(params)``, the backend's own (its blocking
  pool, or the ``connection_pool`` class Celery gave it).

The ``connect`` package's topology object (Server, Sentinel, Cluster) answers the same
questions; it replaces this one where the backend builds it (``SheppyBackend.__init__``).
"""

from .. import connection, endpoints, keys


class ResultTopology:
    """The Redis topology of connection parameters ``params`` (endpoints.connection_kwargs)."""

    __slots__ = ("single_node", "_server")

    def __init__(self, params):
        #: One node holds every key (not a Redis Cluster).
        self.single_node = not endpoints.is_cluster(params)
        self._server = self.single_node and "sentinel" not in params

    def result_queues(self, queue):
        return (queue,) if self.single_node else keys.result_shards(queue)

    def result_queue(self, queue, sheppy_id):
        if self.single_node:
            return queue
        return keys.result_shard(keys.result_shards(queue), sheppy_id)

    def make_client(self, params, server_client):
        if self._server:
            return server_client(params)
        return endpoints.make_client(params, blocking_timeout=connection.POOL_WAIT_SECONDS)

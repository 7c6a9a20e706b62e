"""Where Redis is: a ``sheppy://`` URL and its options become a :class:`Topology`.

* ``params``: one server's URL and connection options -> redis-py keyword arguments, the
  errors worth a retry, the server checks (standalone, supported);
* ``urls``: the Sentinel and Cluster URL forms and their options;
* ``topology``: :class:`Server`, :class:`Sentinel`, :class:`Cluster`, built once from the
  parameters (:func:`topology_of`): each owns its clients and pools, how a broker queue
  and the result shards are named there, how keys group by slot, and what it can do
  (``single_node``). The transport, the result backend, the operator's view and the beat
  ask it instead of asking "is this a Cluster?".
"""

from .params import CHANNEL_ERRORS, CONNECTION_ERRORS, redact
from .topology import Cluster, Sentinel, Server, Topology, topology_of

__all__ = ["CHANNEL_ERRORS", "CONNECTION_ERRORS", "redact", "Topology", "Server", "Sentinel",
           "Cluster", "topology_of"]

"""The Redis connections of one channel, and the redis-py arguments they are made with.

* ``client``: a pool for every command but the blocking read;
* ``blocking_conn``: the connection the blocking XREADGROUP is sent on, outside the pool's
  rotation, with a socket timeout that outlasts the block;
* ``ack_conn``: the connection acks are sent on without waiting for their replies.

Each is made on first use and made again after :meth:`Connections.disconnect`.
"""

import redis
from kombu.exceptions import ChannelError
from kombu.utils.objects import cached_property

from .. import connection


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
    host = conninfo.hostname or connection.DEFAULT_HOST
    if "://" in host:  # sheppy+<kind>://: kombu leaves "<kind>://..." as the host
        kind = host.split("://")[0]
        raise ChannelError(f"sheppy:// broker: {kind!r} URLs (sheppy+{kind}://) are not "
                           "supported yet; use sheppy://host:port/db")
    host = f"[{host}]" if ":" in host else host
    scheme = conninfo.transport_cls if conninfo.transport_cls in connection.SCHEMES else "sheppy"
    db = str(conninfo.virtual_host or "").strip("/")
    url = f"{scheme}://{host}:{conninfo.port or connection.DEFAULT_PORT}/{db}"
    try:
        return connection.connection_kwargs(url, options)
    except ValueError as exc:
        raise ChannelError(f"sheppy:// broker: {exc}") from None


class Connections:
    def __init__(self, params, block_seconds):
        self.params = params
        self.block_seconds = block_seconds  # longest block of one read

    @property
    def where(self):
        return f"{self.params.get('host')}:{self.params.get('port')}"

    @cached_property
    def pool(self):
        return redis.ConnectionPool(**self.params)

    @cached_property
    def client(self):
        """Client for every command but the blocking read."""
        return redis.Redis(connection_pool=self.pool)

    @cached_property
    def _blocking_pool(self):
        params = connection.blocking_kwargs(self.params, self.block_seconds)
        params.pop("max_connections", None)
        return redis.ConnectionPool(**params)

    @cached_property
    def blocking_conn(self):
        """The connection the blocking XREADGROUP is sent on (never in the pool's rotation)."""
        return self._blocking_pool.get_connection()

    @cached_property
    def ack_conn(self):
        """The connection acks are sent on without waiting (see ``acks.Acker.flush``)."""
        return self._blocking_pool.get_connection()

    @property
    def has_ack_conn(self):
        return "ack_conn" in self.__dict__

    def disconnect(self):
        for name in ("pool", "_blocking_pool"):
            pool = self.__dict__.pop(name, None)
            if pool is not None:
                pool.disconnect()
        for name in ("client", "blocking_conn", "ack_conn"):
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

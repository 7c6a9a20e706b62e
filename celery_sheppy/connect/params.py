"""``sheppy://`` URLs and options -> redis-py connection keyword arguments.

URL form::

    sheppy://[[username]:password@]host[:port][/db][?option=value&...]
    sheppys://...   (TLS; ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile)

Sources, later wins: :data:`DEFAULTS`, the options given in code or settings
(``redis_socket_timeout``, ``broker_transport_options``...), the URL's query.
Every accepted option is in :data:`OPTION_PARSERS`; anything else is refused
with an error that names it. Times are in seconds.
"""

import ssl
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.cluster import RedisCluster
from redis.connection import URL_QUERY_ARGUMENT_PARSERS

SCHEMES = {"sheppy": False, "sheppys": True}  # scheme -> TLS

#: Replies of a Redis Cluster that cannot serve a slot now: CLUSTERDOWN (a master down and
#: not failed over yet), MASTERDOWN, TRYAGAIN (resharding), a slot no node serves, no node
#: reachable. They pass as a failover or a restart ends, as a lost connection does.
CLUSTER_UNAVAILABLE = (
    redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    *((redis.exceptions.RedisClusterUnreachableError,)  # redis-py >= 8.1
      if hasattr(redis.exceptions, "RedisClusterUnreachableError") else ()),
)

#: Errors that mean "the connection is gone or the server is not serving yet": worth a
#: retry. The transport's ``connection_errors``: Celery's consumer and kombu reconnect and
#: retry on these, at a worker's start as later (a channel error would stop the worker).
CONNECTION_ERRORS = (
    redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError,
    redis.exceptions.InvalidResponse, *CLUSTER_UNAVAILABLE,
)

#: Errors of a command that reached the server: a retry would fail the same way.
CHANNEL_ERRORS = (redis.DataError, redis.ResponseError)

#: Where a URL without a host or a port points.
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 6379

#: Seconds a connection may sit idle before its next command is preceded by a PING.
HEALTH_CHECK_INTERVAL = 25

#: Defaults, in seconds. redis-py 8 would otherwise time reads out after 5 s.
DEFAULTS = {
    "socket_timeout": 30.0,
    "socket_connect_timeout": 5.0,
    "health_check_interval": HEALTH_CHECK_INTERVAL,
}

#: Connections of one pool (one process) unless ``max_connections`` says otherwise.
DEFAULT_MAX_CONNECTIONS = 100

#: How long a thread waits for a free pooled connection before ConnectionError, in seconds.
POOL_WAIT_SECONDS = 20

#: Blocking reads (XREAD/XREADGROUP BLOCK) get this much more socket time than they block for.
BLOCKING_READ_MARGIN = 5.0

_CERT_REQS = {
    "required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE,
}


def _cert_reqs(value):
    if isinstance(value, int):
        return value
    try:
        return _CERT_REQS[str(value).lower()]
    except KeyError:
        raise ValueError(
            f"ssl_cert_reqs must be CERT_REQUIRED, CERT_OPTIONAL or CERT_NONE, got {value!r}"
        ) from None


def _bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _float_or_none(value):
    return None if value is None else float(value)


def _int_or_none(value):
    return None if value is None else int(value)


#: Every connection option we accept, with its parser.
OPTION_PARSERS = {
    **URL_QUERY_ARGUMENT_PARSERS,
    "socket_timeout": _float_or_none,
    "socket_connect_timeout": _float_or_none,
    "health_check_interval": int,
    "max_connections": _int_or_none,
    "retry_on_timeout": _bool,
    "socket_keepalive": _bool,
    "client_name": str,
    "username": str,
    "password": str,
    "db": int,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _bool,
}
_TLS_ONLY = {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}


def parse_option(name, value):
    try:
        parser = OPTION_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown sheppy connection option {name!r}; accepted: {', '.join(sorted(OPTION_PARSERS))}"
        ) from None
    try:
        return parser(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad value for sheppy connection option {name!r}: {exc}") from None


def parse_url(url):
    """Keyword arguments for ``redis.Redis`` from a ``sheppy://`` URL (no defaults applied)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"not a sheppy URL: {redact(url)!r} (schemes: sheppy://, sheppys://)")
    kwargs = {"host": parts.hostname or DEFAULT_HOST}
    try:
        kwargs["port"] = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in sheppy URL {redact(url)!r}") from None
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    db = parts.path.strip("/")
    if db:
        if not db.isdigit():
            raise ValueError(f"database in sheppy URL must be a number, got {db!r}")
        kwargs["db"] = int(db)
    for pair in filter(None, parts.query.split("&")):
        name, _, value = pair.partition("=")
        kwargs[name] = parse_option(name, unquote(value))
    return kwargs


def connection_kwargs(url, options=None):
    """``redis.Redis``/``ConnectionPool`` keyword arguments: defaults < ``options`` < URL."""
    tls = SCHEMES.get(urlsplit(url).scheme)
    kwargs = dict(DEFAULTS)
    for name, value in (options or {}).items():
        if value is not None:
            kwargs[name] = parse_option(name, value)
    kwargs.update(parse_url(url))
    tls_options = _TLS_ONLY & set(kwargs)
    if tls:
        kwargs["connection_class"] = redis.SSLConnection
        kwargs.setdefault("ssl_cert_reqs", ssl.CERT_REQUIRED)
    elif tls_options:
        raise ValueError(
            f"TLS options {sorted(tls_options)} given for a plain sheppy:// URL; use sheppys://"
        )
    if kwargs.get("max_connections") is None:
        kwargs.pop("max_connections", None)
    return kwargs


def server_hello(client):
    """The server's ``HELLO`` answer as ``{name: value}`` (``server``, ``version``, ``id``,
    ``mode``, ``role``...), text values decoded; ``{}`` when the server refuses HELLO (an
    ACL, or a proxy). One round trip, and no ACL category a managed Redis denies (``INFO``
    and ``CLIENT LIST`` are in ``@dangerous``)."""
    try:
        reply = client.execute_command("HELLO")
    except redis.ResponseError:
        return {}
    if isinstance(reply, (list, tuple)):  # RESP2: a flat list of names and values
        reply = dict(zip(reply[::2], reply[1::2]))
    return {_text(name): _text(value) for name, value in reply.items()}


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def check_standalone(hello, where, address=None, tls=False):
    """Raise ValueError when ``hello`` is a Sentinel's or a Cluster node's: a plain
    ``sheppy://`` URL needs a Redis server (or primary) it can use directly. The error
    names the URL to use instead (``address``: the ``(host, port)`` asked)."""
    host, port = address or ("host", "port")
    prefix = "sheppys" if tls else "sheppy"
    mode = hello.get("mode")
    if mode == "sentinel":
        raise ValueError(
            f"{where} is a Redis Sentinel, not a Redis server: use "
            f"{prefix}+sentinel://{host}:{port}/0 with the transport option master_name")
    if mode == "cluster":
        raise ValueError(
            f"{where} is a Redis Cluster node: use {prefix}+cluster://{host}:{port}/ "
            "(sheppy:// needs a standalone server or a Sentinel-watched primary)")


#: Commands a server must know (``COMMAND INFO``), for :func:`check_supported`, with the
#: Redis release that brought each: the stream and script commands a Redis-compatible
#: server or proxy may lack, and FUNCTION, which marks Redis 7.0 (Valkey has it too): from
#: 7.0 XAUTOCLAIM forgets entries deleted while leased, where 6.2's returns nils in their
#: place, which the lease reclaim cannot read.
REQUIRED_COMMANDS = {
    "XADD": "5.0", "XREADGROUP": "5.0", "XACK": "5.0", "XCLAIM": "5.0", "XPENDING": "5.0",
    "XGROUP": "5.0", "XINFO": "5.0", "XAUTOCLAIM": "6.2", "EVALSHA": "2.6", "FUNCTION": "7.0",
}


def check_supported(client, where, hello=None):
    """Raise ValueError when the server behind ``client`` lacks one of the
    :data:`REQUIRED_COMMANDS` (asked with one ``COMMAND INFO``; on a Cluster, of one node),
    naming the server and its version (``hello``, else asked: :func:`server_hello`) and
    what celery-sheppy needs. A server that will not say (``COMMAND`` refused by an ACL
    or a proxy) passes: the first command it lacks fails then."""
    if isinstance(client, RedisCluster):  # one node's client: COMMAND has no key to route by
        client = client.get_redis_connection(client.get_random_node())
    try:
        infos = client.execute_command("COMMAND INFO", *REQUIRED_COMMANDS)
    except redis.ResponseError:
        return
    missing = [f"{name} (Redis {since})" for (name, since), info
               in zip(REQUIRED_COMMANDS.items(), infos) if not info]
    if not missing:
        return
    hello = server_hello(client) if hello is None else hello
    server = " ".join(filter(None, (hello.get("server"), hello.get("version"))))
    raise ValueError(
        f"{where} runs {server or 'a server that does not say its version'}, which lacks "
        f"{', '.join(missing)}: celery-sheppy needs Redis 7.0 or newer, or Valkey 7.2 or newer")


def blocking_kwargs(kwargs, block_seconds):
    """``kwargs`` for a connection that blocks up to ``block_seconds`` in one read."""
    timeout = kwargs.get("socket_timeout") or 0
    return dict(kwargs, socket_timeout=max(timeout, block_seconds + BLOCKING_READ_MARGIN))


def redact(url):
    """``url`` with its password replaced by ``**``, for logs and banners."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    user = quote(unquote(parts.username or ""), safe="")
    return parts._replace(netloc=f"{user}:**@{netloc}").geturl()

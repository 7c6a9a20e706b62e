"""Where the data lives: one Redis server, a primary found through Sentinel, or a Cluster.

URL forms (``sheppys`` instead of ``sheppy``: TLS to the Redis servers)::

    sheppy://[[user]:password@]host[:port][/db]               one server (params.py)
    sheppy+sentinel://[[user]:password@]h1:26379;sheppy+sentinel://h2:26379[/db]
    sheppy+sentinel://h1:26379;h2:26379[/db]                   (the same, shorter)
    sheppy+cluster://[[user]:password@]h1:7000;h2:7001[/]       seed nodes of a Cluster

The Sentinel form mirrors Celery's ``sentinel://``; its options come from
``broker_transport_options`` / ``result_backend_transport_options``: ``master_name``
(required), ``sentinel_kwargs`` (connection options for the Sentinels themselves:
their password, TLS...), ``min_other_sentinels``. User and password in the URL are
the primary's (an ACL user), as with Celery. Celery's backend loader strips the
``sheppy+`` of a backend URL; ``sentinel://`` and ``cluster://`` are accepted for that.

A connection-parameter dict (:func:`connection_kwargs`) is redis-py's keyword
arguments plus, for Sentinel, ``"sentinel": Sentinels(...)`` and, for a Cluster,
``"cluster": ClusterSeeds(...)``; build pools and clients from it through its topology
(``topology.topology_of``) only, never with ``redis.ConnectionPool(**params)``.
"""

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from redis.sentinel import SentinelManagedSSLConnection

from .. import compat
from . import params

#: scheme -> (kind, TLS)
SCHEMES = {
    "sheppy": ("server", False), "sheppys": ("server", True),
    "sheppy+sentinel": ("sentinel", False), "sheppys+sentinel": ("sentinel", True),
    "sheppy+cluster": ("cluster", False), "sheppys+cluster": ("cluster", True),
    # what Celery's backend loader passes on (it splits "sheppy+sentinel" at the "+")
    "sentinel": ("sentinel", None), "cluster": ("cluster", None),
}

DEFAULT_SENTINEL_PORT = 26379
DEFAULT_CLUSTER_PORT = 6379

#: Sentinel options (transport options), with their parsers.
SENTINEL_OPTIONS = {
    "master_name": str,
    "sentinel_kwargs": dict,
    "min_other_sentinels": int,
}

#: Stock sentinel:// options that mean nothing here (fanout is not pub/sub): accepted.
SENTINEL_NOOP_OPTIONS = frozenset({"sentinel_fanout_compat"})


@dataclass(frozen=True)
class Sentinels:
    """The Sentinels to ask for the primary of ``master_name``."""
    nodes: tuple  # ((host, port), ...)
    master_name: str
    sentinel_kwargs: tuple = ()  # sorted (name, value) pairs (hashable, for the orphan ledger)
    min_other_sentinels: int = 0

    def describe(self):
        return f"primary {self.master_name!r} via Sentinel {_hosts(self.nodes)}"


@dataclass(frozen=True)
class ClusterSeeds:
    """Nodes to learn a Redis Cluster's layout from."""
    nodes: tuple  # ((host, port), ...)

    def describe(self):
        return f"Redis Cluster {_hosts(self.nodes)}"


def _hosts(nodes):
    return ",".join(f"{host}:{port}" for host, port in nodes)


def kind_of(url):
    """``"server"``, ``"sentinel"`` or ``"cluster"`` for a sheppy URL (its first part)."""
    scheme = (url or "").split(";")[0].strip().partition("://")[0]
    try:
        return SCHEMES[scheme][0]
    except KeyError:
        raise ValueError(f"not a sheppy URL: {redact(url)!r} (schemes: "
                         f"{', '.join(s + '://' for s in SCHEMES if s.startswith('sheppy'))})"
                         ) from None


def is_tls(url):
    return bool(SCHEMES.get((url or "").split(";")[0].strip().partition("://")[0], (0, 0))[1])


def parse_nodes(url):
    """``(kind, tls, nodes, url_kwargs)`` of a Sentinel or Cluster URL: its ``;``-separated
    host list, and user, password and db (from whichever part carries them)."""
    parts = [part.strip() for part in url.split(";") if part.strip()]
    kind, tls = SCHEMES[parts[0].partition("://")[0]]
    default_port = DEFAULT_SENTINEL_PORT if kind == "sentinel" else DEFAULT_CLUSTER_PORT
    nodes, kwargs = [], {}
    for part in parts:
        scheme, sep, rest = part.partition("://")
        if sep:
            if SCHEMES.get(scheme, (None,))[0] != kind:
                raise ValueError(f"a {kind} URL cannot mix in {scheme}:// ({redact(url)!r})")
        else:
            rest = scheme
        split = urlsplit("//" + rest)
        if split.query:
            raise ValueError(f"{kind} URLs take options from the transport options, not "
                             f"from the URL's query ({redact(url)!r})")
        try:
            nodes.append((split.hostname or "localhost", split.port or default_port))
        except ValueError:
            raise ValueError(f"bad port in {redact(url)!r}") from None
        if split.username:
            kwargs.setdefault("username", unquote(split.username))
        if split.password:
            kwargs.setdefault("password", unquote(split.password))
        db = split.path.strip("/")
        if db:
            if not db.isdigit():
                raise ValueError(f"database in {redact(url)!r} must be a number, got {db!r}")
            kwargs["db"] = int(db)
    return kind, tls, tuple(nodes), kwargs


def split_options(options):
    """``(connection options, topology options)`` of a transport-option dict."""
    options = dict(options or {})
    topology = {name: options.pop(name) for name in list(options)
                if name in SENTINEL_OPTIONS or name in SENTINEL_NOOP_OPTIONS}
    return options, topology


def connection_kwargs(url, options=None, topology_options=None, tls=None):
    """Connection parameters for ``url``: defaults < ``options`` < URL (params.py), with
    the Sentinel or Cluster part for those URLs. ``tls``: TLS when the URL cannot say
    (the ``sentinel://`` Celery's loader leaves of ``sheppys+sentinel://``)."""
    kind = kind_of(url)
    topology_options = dict(topology_options or {})
    if kind == "server":
        if topology_options:
            raise ValueError(
                f"options {sorted(topology_options)} are Redis Sentinel options: use a "
                "sheppy+sentinel://host:26379;host:26379/db URL")
        return params.connection_kwargs(url, options)
    _, url_tls, nodes, url_kwargs = parse_nodes(url)
    tls = url_tls if url_tls is not None else bool(tls)
    scheme = "sheppys" if tls else "sheppy"
    # The server part (timeouts, auth, TLS options) goes through params.py's table.
    db = url_kwargs.pop("db", 0)
    kwargs = params.connection_kwargs(f"{scheme}://localhost/{db}", dict(options or {}, **url_kwargs))
    del kwargs["host"], kwargs["port"]
    if kind == "sentinel":
        kwargs["sentinel"] = _sentinels(nodes, topology_options)
        if tls:
            kwargs["connection_class"] = SentinelManagedSSLConnection
        return kwargs
    if topology_options:
        raise ValueError(f"options {sorted(topology_options)} are Redis Sentinel options, "
                         "not for a Redis Cluster")
    if kwargs.get("db"):
        raise ValueError("a Redis Cluster has database 0 only: drop the /db from the "
                         f"sheppy+cluster:// URL {redact(url)!r}")
    kwargs.pop("db", None)
    compat.check_cluster_transactions()
    kwargs["cluster"] = ClusterSeeds(nodes)
    return kwargs


def _sentinels(nodes, options):
    for name, value in options.items():
        if name in SENTINEL_OPTIONS and value is not None:
            try:
                options[name] = SENTINEL_OPTIONS[name](value)
            except (TypeError, ValueError):
                raise ValueError(f"bad value for Sentinel option {name!r}: {value!r}") from None
    master_name = options.get("master_name")
    if not master_name:
        raise ValueError("a sheppy+sentinel:// URL needs the transport option 'master_name' "
                         "(the name the Sentinels monitor the primary by)")
    sentinel_kwargs = options.get("sentinel_kwargs") or {}
    return Sentinels(nodes, master_name, tuple(sorted(sentinel_kwargs.items())),
                     options.get("min_other_sentinels") or 0)


def kombu_url(conninfo):
    """The Sentinel or Cluster URL a kombu connection was made with, else None. kombu keeps
    the ``;``-separated parts in ``alt``, takes ``sheppy+sentinel`` as transport ``sheppy``
    of a URL ``sentinel://...`` (its host), and after a failover to the next part parses
    that part alone."""
    if any("+sentinel://" in part or "+cluster://" in part for part in conninfo.alt or ()):
        return ";".join(conninfo.alt)
    host = conninfo.hostname or ""
    if "+" in conninfo.transport_cls:
        return (f"{conninfo.transport_cls}://{host}:{conninfo.port or ''}/"
                f"{str(conninfo.virtual_host or '').strip('/')}")
    if "://" in host:
        return f"{conninfo.transport_cls}+{host}"
    return None


def redact(url):
    """``url`` with the password of each ``;``-separated part replaced by ``**``."""
    parts = []
    for part in url.split(";"):
        if "://" in part:
            parts.append(params.redact(part))
        else:
            parts.append(params.redact("x://" + part)[len("x://"):])
    return ";".join(parts)


def describe(params):
    """Where ``params`` lead, for messages (no password)."""
    for part in ("sentinel", "cluster"):
        if part in params:
            return params[part].describe()
    return f"{params.get('host')}:{params.get('port')}"

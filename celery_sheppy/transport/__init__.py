"""Kombu transport on Redis Streams in Sheppy's layout: ``broker_url = "sheppy://host:port/db"``.

Features
========
* Type: virtual (``kombu.transport.virtual``), asynchronous (Celery's event loop).
* Exchanges: direct, topic, fanout. Bindings live in Redis, so any process routes.
* Priorities: yes (``priority_steps``; the lower number is delivered first, as with
  the stock ``redis://`` transport).
* Queue expiry (``Queue(expires=...)``) and message TTL (``expiration``,
  ``Queue(message_ttl=...)``): yes.

URL
===
::

    sheppy://[[username]:password@]host[:port][/db][?option=value&...]
    sheppys://...    (TLS, options as for ``rediss://``)
    sheppy+sentinel://h1:26379;h2:26379/db   sheppy+cluster://h1:7000;h2:7001/
                     (Sentinel, Redis Cluster: docs/deployment.md)

The scheme resolves without an import in user code: see ``docs/transport.md``.

Layout
======
Queue ``q`` is the stream ``sheppy:pending:<q>`` (priority step ``n > 0``:
``sheppy:celery:<q>:priority:<n>``), read by consumer group ``workers``; every
channel is one consumer with a unique name. Each entry is ``{"data": <record>}``,
a sheppy task record carrying the kombu message (``records.pending_record``).

* publish: one ``XADD`` (``XADD`` + ``PEXPIRE`` for an expiring queue); a named
  exchange costs one ``ZSCORE`` more in the same round trip, which proves the
  cached binding table current; a fanout exchange is one ``PUBLISH`` (pub/sub,
  ``fanout.py``), whatever the number of receivers.
* consume: a blocking ``XREADGROUP`` over all consumed streams, sent on the
  channel's own connection and read when its socket is readable (Celery's hub, or
  ``drain_events``); ``COUNT`` follows the QoS prefetch budget.
* ack: ``XACK`` + ``XDEL``, one round trip. Requeue and restore of unacked
  messages: ``scripts/requeue.lua`` (``XACK`` + ``XDEL`` + ``XADD``, atomic).
* reliability (``docs/delivery.md``): leases renewed by the upkeep (``renew.lua``)
  and the expired ones of dead consumers put back (``recover.lua``); dead letters in ``sheppy:dead:<q>``
  (``dead_letter.lua``; :func:`dead_letters`, :func:`replay_dead_letters`,
  :func:`purge_dead_letters`); delayed tasks in ``sheppy:scheduled:<q>``
  (``schedule.lua``, ``promote.lua``); revokes kept in ``sheppy:celery::revoked``.

Transport options
=================
Every option, with its parser, default and meaning, is a row of ``options.OPTIONS``;
an unknown name, a refused one (``global_keyprefix``, ``sep``: sheppy's key layout is
fixed) or a bad value raises ChannelError naming it. The stock redis:// transport's
options that mean nothing here are accepted, Sentinel's are refused.

Package
=======
``channel`` (kombu's hooks, delegating) and ``port`` (the one way its parts reach kombu),
``options``, ``connections``, ``streams``, ``groups``, ``routing``, ``fanout``, ``publish``,
``claims``, ``reading`` with ``buffer`` and ``steps`` (what becomes of an entry read),
``limits``, ``poller``, ``acks``, ``orphans``, ``upkeep`` with ``presence``, ``revokes``,
``dead_letters``: each module's docstring says what it owns. Where the data lives (one
server, Sentinel, Cluster) is ``celery_sheppy.connect``'s topology.
"""

import redis
from kombu.transport import virtual

from .. import __version__ as celery_sheppy_version
from .. import patches
from ..patches import group_publish, kombu_aliases
from ..connect import params
from . import options
from .channel import Channel
from .dead_letters import dead_letters, purge_dead_letters, replay_dead_letters
from .poller import Poller

__all__ = ["Transport", "Channel", "dead_letters", "replay_dead_letters", "purge_dead_letters"]

kombu_aliases.register()  # importing the transport is enough for a plain kombu process


class Transport(virtual.Transport):
    """``sheppy://`` transport."""

    Channel = Channel

    polling_interval = None  # no sleeping between reads: they block in Redis
    default_port = params.DEFAULT_PORT
    #: Celery treats us as Redis: events use a fanout exchange, mingle and gossip work.
    driver_type = "redis"
    driver_name = group_publish.DRIVER_NAME  # `celery report`: celery-sheppy:<version> (redis-py ...)

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        batch_publish=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
    )

    connection_errors = params.CONNECTION_ERRORS
    channel_errors = params.CHANNEL_ERRORS

    #: Seconds between upkeep runs (expiring queues, dead consumers, stuck reads).
    upkeep_interval = 1.0

    def __init__(self, client, **kwargs):
        options.check_names(client.transport_options or {})
        super().__init__(client, **kwargs)
        patches.install(Channel)
        self.cycle = Poller()
        self._upkeep_tref = None

    def driver_version(self):
        return f"{celery_sheppy_version} (redis-py {redis.__version__})"

    def register_with_event_loop(self, connection, loop):
        cycle = self.cycle
        cycle.attach(loop)
        loop.on_tick.add(cycle.on_tick)
        if self._upkeep_tref is not None:
            self._upkeep_tref.cancel()
        self._upkeep_tref = loop.call_repeatedly(self.upkeep_interval, cycle.maintain)

    def on_readable(self, fileno):
        self.cycle.on_readable(fileno)

    def _collect(self, connection):
        """kombu's ``Connection.collect``: Celery's consumer after a connection error, and
        connection pools after a fork. Channels are dropped without talking to Redis
        (:meth:`Channel.lose`), never closed the usual way, which would requeue messages
        the worker is still running."""
        for channel in [*self.channels, *self._avail_channels]:
            channel.lose()
        self.channels = []
        self._avail_channels = []
        self.cycle.close()

    def close_connection(self, connection):
        super().close_connection(connection)
        self.cycle.close()

"""Every ``sheppy://`` transport option in one table: name, parser, default, doc line.

:data:`OPTIONS` is the only list of what ``broker_transport_options`` may hold.
:func:`check_names` refuses unknown names when the transport is made; :func:`parse`
turns the options into :class:`Settings` (defaults filled in) when a channel is made,
and a bad value or a refused option raises ChannelError naming it. Times are in seconds.
Connection options are parsed by ``connect/params.py``'s parsers and passed to redis-py.
"""

from collections import namedtuple

from kombu.exceptions import ChannelError

from ..connect import params, urls
from .streams import PRIORITY_STEPS, parse_steps

Option = namedtuple("Option", "name parser default doc")

#: Separator inside binding members (the stock Redis transport's); ``sep`` must keep it.
SEP = "\x06\x16"

def _number(value):
    if isinstance(value, (int, float)):
        return value
    return float(value)


def _int_or_none(value):
    return None if value is None else int(value)


def _as_is(value):
    return value


class _Fixed:
    """Parser of an option sheppy's fixed key layout cannot honour: only its default passes."""

    def __init__(self, default):
        self.default = default

    def __call__(self, value):
        if value != self.default:
            raise _Refused()
        return value


class _Refused(ValueError):
    pass


def _connection_option(name, doc):
    return Option(name, params.OPTION_PARSERS[name], None, doc)


OPTIONS = (
    Option("visibility_timeout", _number, 30,
           "the lease (s): an entry not renewed this long is taken over by another consumer"),
    Option("max_deliveries", int, 5,
           "an entry delivered more often than this goes to the dead-letter stream"),
    Option("delay_threshold", _number, 60,
           "a message due later than this (s) waits in sheppy's scheduled set"),
    Option("dead_letter_maxlen", int, 100000,
           "approximate most entries kept in a queue's dead-letter stream"),
    Option("revoke_expires", _number, 10800, "how long (s) a revoked task id is remembered"),
    Option("rate_limits", _as_is, None,
           "global rate limits, task name -> Celery rate string (transport/limits.py)"),
    Option("polling_interval", _number, 10.0,
           "longest single block of a read (s); a new message ends it at once"),
    Option("priority_steps", parse_steps, PRIORITY_STEPS,
           "a queue's priority steps; the lowest is sheppy's pending stream"),
    Option("queue_order_strategy", _as_is, "round_robin",
           "order the consumed queues are read in: round_robin, sorted, priority"),
    Option("max_batch", int, 100, "most messages per read without a prefetch limit"),
    Option("consumer_reap_after", _number, 300,
           "an idle consumer with nothing pending is removed after this long (s)"),
    Option("max_retries", _int_or_none, None,
           "publish retries on a lost connection (kombu's name); unset: off"),
    Option("interval_start", _number, 0, "first wait (s) between publish retries"),
    Option("interval_step", _number, 0.2, "wait added (s) per publish retry"),
    Option("interval_max", _number, 1, "longest wait (s) between publish retries"),
    Option("body_encoding", _as_is, None,
           "kombu's: an encoding for bodies; unset: text kept as text, bytes as base64"),
    Option("deadletter_queue", _as_is, None,
           "kombu's: the queue a message no binding routes goes to"),
    _connection_option("socket_timeout", "redis-py's, in s (default 30)"),
    _connection_option("socket_connect_timeout", "redis-py's, in s (default 5)"),
    _connection_option("socket_keepalive", "redis-py's"),
    _connection_option("health_check_interval",
                       f"redis-py's, in s (default {params.HEALTH_CHECK_INTERVAL})"),
    _connection_option("max_connections", "redis-py's, per pool"),
    _connection_option("retry_on_timeout", "redis-py's"),
    _connection_option("client_name", "redis-py's: CLIENT SETNAME"),
    _connection_option("username", "ACL user (the URL's wins)"),
    _connection_option("password", "password (the URL's wins)"),
    Option("master_name", _as_is, None,
           "Sentinel (sheppy+sentinel:// URLs): the monitored primary's name"),
    Option("sentinel_kwargs", _as_is, None, "Sentinel: connection options for the Sentinels"),
    Option("min_other_sentinels", _int_or_none, None,
           "Sentinel: how many peers a Sentinel must see to be trusted"),
    Option("global_keyprefix", _Fixed(""), "", "refused: sheppy's key layout is fixed"),
    Option("sep", _Fixed(SEP), SEP, "refused: sheppy's key layout is fixed"),
)

BY_NAME = {option.name: option for option in OPTIONS}

#: Options handed to redis-py (``params.connection_kwargs``).
CONNECTION_OPTIONS = tuple(option.name for option in OPTIONS
                           if option.name in params.OPTION_PARSERS)

#: Options of the stock redis:// transport that mean nothing here (streams have no
#: unacked hash and fanout is not pub/sub): accepted, so a project can switch URLs only.
STOCK_NOOP_OPTIONS = frozenset({
    "ack_emulation", "unacked_key", "unacked_index_key", "unacked_mutex_key",
    "unacked_mutex_expire", "unacked_restore_limit", "unacked_restore_interval",
    "unacked_restore_throttle", "fanout_prefix", "fanout_patterns", "socket_keepalive_options",
    *urls.SENTINEL_NOOP_OPTIONS,
})


class Settings:
    """The parsed transport options of a channel: one attribute per :data:`OPTIONS` row."""

    def __init__(self, values=None):
        values = values or {}
        for option in OPTIONS:
            setattr(self, option.name, values.get(option.name, option.default))

    def sentinel_options(self):
        """``{name: value}`` of the Sentinel options that are set."""
        return {name: getattr(self, name) for name in urls.SENTINEL_OPTIONS
                if getattr(self, name) is not None}

    def connection_options(self):
        """``{name: value}`` of the connection options that are set."""
        return {name: getattr(self, name) for name in CONNECTION_OPTIONS
                if getattr(self, name) is not None}

    def __repr__(self):
        changed = {option.name: getattr(self, option.name) for option in OPTIONS
                   if getattr(self, option.name) != option.default}
        return f"<Settings {changed}>"


def check_names(options):
    """Refuse ``broker_transport_options`` this transport does not know, by name."""
    unknown = sorted(set(options) - set(BY_NAME) - STOCK_NOOP_OPTIONS)
    if unknown:
        accepted = sorted(name for name, option in BY_NAME.items()
                          if not isinstance(option.parser, _Fixed))  # refused: not offered
        raise ChannelError(
            f"unknown broker_transport_options for sheppy://: {unknown}; accepted: "
            f"{', '.join(accepted)}")


def parse(options):
    """:class:`Settings` of ``options`` (unknown names are ignored: see :func:`check_names`)."""
    values = {}
    for name, value in (options or {}).items():
        option = BY_NAME.get(name)
        if option is None:
            continue
        try:
            values[name] = option.parser(value)
        except _Refused:
            raise ChannelError(f"transport option {name!r} is not supported by sheppy://: "
                               "sheppy's key layout is fixed") from None
        except (TypeError, ValueError) as exc:
            raise ChannelError(f"sheppy:// broker: bad value for transport option {name!r}: "
                               f"{exc}") from None
    return Settings(values)

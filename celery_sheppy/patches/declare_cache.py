"""kombu's per-publish declaration check, without its copies, for sheppy:// producers.

Celery passes the task's queue in ``declare`` with every publish, and kombu's
``Producer.maybe_declare`` first binds a copy of the queue (and of its exchange) to
the channel, and wraps the check in ``Connection.ensure``, before it looks in the
connection's ``declared_entities`` and finds the queue there: about 20 µs of a ~300 µs
publish, spent on every publish after the first. :func:`install` wraps
``Producer.maybe_declare`` so that, on a sheppy:// channel, an entity already in that
cache returns at once, as kombu's check would. Anything else (an entity not declared
yet, a channel without a connection, another transport) takes kombu's path, which
declares, retries and raises as before.

Installed when the first sheppy:// transport of a process is made.
"""

import threading

_installed = False
_lock = threading.Lock()


def install(channel_class):
    """Wrap ``kombu.messaging.Producer.maybe_declare`` once per process, for channels of
    ``channel_class`` (the sheppy:// transport's)."""
    global _installed
    with _lock:
        if _installed:
            return True
        from kombu.messaging import Producer

        Channel = channel_class
        stock = Producer.maybe_declare

        def maybe_declare(self, entity, retry=False, **retry_policy):
            if entity and _declared(self._channel, entity, Channel):
                return False
            return stock(self, entity, retry, **retry_policy)

        maybe_declare.__doc__ = stock.__doc__
        maybe_declare.__wrapped__ = stock
        Producer.maybe_declare = maybe_declare
        _installed = True
        return True


def _declared(channel, entity, channel_class):
    """Whether kombu's cache says ``entity`` was declared on ``channel``'s connection.

    The test of ``kombu.common._maybe_declare``, on the producer's channel as it is (a
    ChannelPromise not yet resolved is no sheppy channel: kombu's path resolves it).
    """
    if not isinstance(channel, channel_class) or not entity.can_cache_declaration:
        return False
    connection = channel.connection
    client = getattr(connection, "client", None) if connection is not None else None
    declared = getattr(client, "declared_entities", None)
    return declared is not None and hash(entity) in declared

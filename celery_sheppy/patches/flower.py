"""Flower support: ``import celery_sheppy.flower`` in ``flowerconfig.py`` (it imports this).

Flower's Broker page and ``/api/queues/length`` ask ``flower.views.BaseHandler.get_broker``
for a broker client; its factory (``flower.utils.broker.Broker``) knows amqp, redis and
sentinel URLs only and answers 404 for anything else. Importing this module wraps
``get_broker``: when the Flower app's broker is ``sheppy://`` it returns a
:class:`SheppyQueues`, which reads :func:`celery_sheppy.ops.queue_stats` in a thread
(redis-py blocks; Flower's loop must not) and reports RabbitMQ's field names, which the
Broker page shows as columns. Any other broker keeps Flower's own client.
"""

import logging

import flower
from flower.views import BaseHandler
from tornado.ioloop import IOLoop

from .. import keys
from ..ops.stats import is_sheppy, queue_stats

logger = logging.getLogger(__name__)


class SheppyQueues:
    """Flower's broker client interface (``async queues(names)``) for a sheppy:// app."""

    def __init__(self, app):
        self.app = app

    async def queues(self, names):
        usable = [name for name in names if _usable(name)]
        stats = await IOLoop.current().run_in_executor(None, queue_stats, self.app, usable)
        return [row(s) for s in stats]


def row(stats):
    """One queue as Flower shows it: ``messages`` = ready + unacked, as RabbitMQ counts."""
    return {
        "name": stats.queue,
        "messages": stats.ready + stats.in_flight,
        "messages_ready": stats.ready,
        "messages_unacknowledged": stats.in_flight,
        "consumers": stats.count("alive"),
        "sheppy": stats.as_dict(),
    }


def install():
    """Wrap Flower's ``BaseHandler.get_broker`` (once; importing the module does it)."""
    original = getattr(BaseHandler, "get_broker", None)
    if original is None:  # before 2.2 each view makes Flower's broker client itself
        raise ImportError(f"celery_sheppy.flower needs Flower 2.2 or newer (pip install "
                          f"'celery-sheppy[flower]'); this is Flower {flower.__version__}")
    if getattr(original, "_sheppy", False):
        return

    def get_broker(self):
        if is_sheppy(self.capp):
            return SheppyQueues(self.capp)
        return original(self)

    get_broker._sheppy = True
    BaseHandler.get_broker = get_broker


def _usable(name):
    try:
        keys.check_queue(name)
    except keys.InvalidQueueName:
        logger.warning("sheppy: queue %r cannot be in sheppy's layout; not shown", name)
        return False
    return True


install()

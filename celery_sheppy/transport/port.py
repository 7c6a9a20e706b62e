"""The one way the transport's parts reach kombu: :class:`KombuPort`, held by the channel.

The reader, the limiter, the acker, the publisher and the router are given the channel's
port, not the channel: what they may ask of kombu is this short list (prefetch room,
delivery, the event loop, exchange types, a message's envelope), and nothing reaches
into kombu's channel beside it.
"""


class KombuPort:
    """What the transport's parts need of kombu's virtual channel ``channel``."""

    def __init__(self, channel):
        self._channel = channel
        self.settings = channel.settings
        self.consumer_name = channel.consumer_name
        self.connection_errors = channel.connection_errors

    # -- prefetch room (kombu's QoS) -------------------------------------------------

    def prefetch_estimate(self):
        """Messages the QoS lets the channel take now (None: no prefetch limit)."""
        return self._channel.qos.can_consume_max_estimate()

    def can_consume(self):
        return self._channel.qos.can_consume()

    @property
    def prefetch_count(self):
        return self._channel.qos.prefetch_count

    # -- queues and delivery -----------------------------------------------------------

    def read_queues(self):
        """The consumed queues read from their streams (channel.read_queues)."""
        return self._channel.read_queues

    def deliver(self, message, queue):
        """Hand ``message`` to ``queue``'s consumer (kombu's ``Connection._deliver``)."""
        self._channel.connection._deliver(message, queue)

    @property
    def closed(self):
        return self._channel.closed

    # -- the event loop ----------------------------------------------------------------

    @property
    def poller(self):
        """The transport's Poller (poller.py); None once the connection is closed."""
        return getattr(self._channel.connection, "cycle", None)

    @property
    def hub(self):
        """Celery's event loop, or None (``drain_events``)."""
        poller = self.poller
        return poller.hub if poller is not None else None

    def forget(self, fd):
        """``fd`` is about to be closed: the poller stops watching it."""
        poller = self.poller
        if poller is not None:
            poller.forget(fd)

    # -- exchanges and a message's envelope ------------------------------------------

    def exchange_type(self, exchange):
        """kombu's exchange type object of ``exchange`` (``channel.typeof``)."""
        return self._channel.typeof(exchange)

    @property
    def deadletter_queue(self):
        return self._channel.deadletter_queue

    def address(self, message, exchange, routing_key):
        """Fill in a message's envelope before it is published: its body encoding and its
        ``delivery_info`` (kombu's ``_inplace_augment_message``, less the delivery tag)."""
        self._channel._inplace_augment_message(message, exchange, routing_key)

    def priority_of(self, message):
        return self._channel._get_message_priority(message)

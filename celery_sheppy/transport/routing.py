"""Exchange bindings, kept in Redis so that any process routes, and this channel's cache.

Exchange ``x``'s bindings are the zset ``sheppy:celery::exchange:<x>`` (``bind.lua``):
member ``routing_key SEP pattern SEP queue SEP expires_ms``, score the binding's
deadline (epoch ms; ``inf``: permanent), and :data:`VERSION_MEMBER`, whose score
changes with every binding change. A publisher routes by its cached table and reads
the version in the same round trip as its XADDs (``publish.py``): a changed version
reloads the table and corrects the delivery.

A binding of an expiring queue lives :data:`BINDING_EXPIRES_FACTOR` times the queue's
expiry (at least :data:`MIN_BINDING_MS`) and is renewed by the queue's consumer.
"""

from time import monotonic, time

from kombu.utils.encoding import bytes_to_str

from .. import keys, scripts
from .options import SEP

#: Member of an exchange's binding zset whose score versions the table.
VERSION_MEMBER = "\x00version"

#: A binding of an expiring queue lives this many times the queue's expiry,
#: and never less than MIN_BINDING_MS, and is renewed by its consumer.
BINDING_EXPIRES_FACTOR = 2
MIN_BINDING_MS = 60 * 60 * 1000


class Router:
    """Bindings of the exchanges a channel publishes to or binds queues to."""

    def __init__(self, conns, queues, port):
        self.conns = conns
        self.queues = queues
        self.port = port  # kombu's exchange types and deadletter_queue (port.py)
        self._tables = {}  # exchange -> (version, [(routing_key, pattern, queue, expires_ms)])
        self._renewed = {}  # queue -> when its bindings' lifetime was renewed

    def binding_ms(self, queue):
        """Lifetime of ``queue``'s bindings (ms); 0: permanent."""
        expires = self.queues.expires.get(queue)
        return max(expires * BINDING_EXPIRES_FACTOR, MIN_BINDING_MS) if expires else 0

    def _call(self, exchange, routing_key, pattern, queue, action):
        """``(keys, args)`` of a ``bind.lua`` call."""
        prefix = SEP.join([routing_key or "", pattern or "", queue, ""])
        if action == "add":
            args = [prefix, self.queues.expires.get(queue, 0), self.binding_ms(queue)]
        else:
            args = [prefix, 0, 0]
        return [keys.exchange_bindings(exchange)], [*args, action, VERSION_MEMBER]

    def bind(self, exchange, routing_key, pattern, queue):
        call_keys, args = self._call(exchange, routing_key, pattern, queue, "add")
        scripts.registry()["bind"](self.conns.client, keys=call_keys, args=args)
        self._tables.pop(exchange, None)
        self._renewed[queue] = monotonic()  # just given its full lifetime

    def unbind(self, exchange, routing_key, pattern, queue):
        call_keys, args = self._call(exchange, routing_key, pattern, queue, "remove")
        scripts.registry()["bind"](self.conns.client, keys=call_keys, args=args)
        self._tables.pop(exchange, None)

    def renewals(self, queue, bindings):
        """``bind.lua`` calls renewing ``queue``'s ``bindings`` (kombu's ``queue_bindings``)
        when a third of their lifetime passed since the last renewal; else []."""
        lifetime = self.binding_ms(queue)
        if not lifetime or monotonic() - self._renewed.get(queue, 0.0) < lifetime / 3000:
            return []
        self._renewed[queue] = monotonic()
        calls = []
        for exchange, routing_key, arguments in bindings:
            _, pattern, _ = self.port.exchange_type(exchange).prepare_bind(
                queue, exchange, routing_key, arguments)
            calls.append(self._call(exchange, routing_key, pattern, queue, "add"))
        return calls

    def load(self, exchange):
        """``(version, bindings)`` of ``exchange`` read from Redis (and cached)."""
        rows = self.conns.client.zrange(keys.exchange_bindings(exchange), 0, -1, withscores=True)
        self._tables[exchange] = table = parse_table(rows)
        return table

    def table(self, exchange):
        """``(version, bindings)`` of ``exchange``, cached."""
        return self._tables.get(exchange) or self.load(exchange)

    def route(self, exchange, routing_key, bindings):
        """``{queue: expires_ms}`` that a message with ``routing_key`` goes to (a direct or
        topic exchange: a fanout exchange's messages are published, fanout.py)."""
        table = [(rk, pattern, queue) for rk, pattern, queue, _ in bindings]
        queues = self.port.exchange_type(exchange).lookup(table, exchange, routing_key, None)
        deadletter_queue = self.port.deadletter_queue
        if not queues and deadletter_queue:
            queues = {deadletter_queue}
        expires = {queue: ms for _, _, queue, ms in bindings}
        return {queue: expires.get(queue, 0) for queue in queues if queue}


def parse_table(rows):
    """``(version, [(routing_key, pattern, queue, expires_ms)])`` from a binding zset."""
    version = None
    bindings = []
    now_ms = time() * 1000
    for member, score in rows:
        member = bytes_to_str(member)
        if member == VERSION_MEMBER:
            version = score
            continue
        if score <= now_ms:
            continue
        parts = member.split(SEP)
        if len(parts) != 4:
            continue
        routing_key, pattern, queue, expires = parts
        bindings.append((routing_key, pattern or None, queue, int(expires or 0)))
    return version, bindings

"""Prometheus metrics of ``sheppy://`` queues, from :func:`celery_sheppy.ops.queue_stats`.

:data:`METRICS` is the one table of metric names: :func:`exposition` writes it in the
text exposition format (0.0.4) by hand, so ``celery sheppy metrics`` needs no extra
package; :func:`serve` answers ``GET /metrics`` with the standard library's HTTP server;
:class:`SheppyCollector` yields the same families to a ``prometheus_client`` registry
(``pip install celery-sheppy[metrics]``) for an exporter that already runs one.
"""

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .stats import ALIVE, DEAD, queue_stats

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (name, type, help, value of a QueueStats; None: no sample). Counters end in _total.
METRICS = [
    ("sheppy_queue_ready", "gauge",
     "Messages in the queue's streams not yet delivered to a consumer.", lambda s: s.ready),
    ("sheppy_queue_in_flight", "gauge",
     "Messages delivered to a consumer and not acked yet (running, prefetched, waiting for "
     "their ETA).", lambda s: s.in_flight),
    ("sheppy_queue_oldest_ready_age_seconds", "gauge",
     "Age of the oldest ready message (0 when none is ready).",
     lambda s: s.oldest_ready_age or 0.0),
    ("sheppy_queue_scheduled", "gauge",
     "Messages waiting in sheppy's scheduled set for their ETA or countdown.",
     lambda s: s.scheduled),
    ("sheppy_queue_dead_letters", "gauge", "Messages in the queue's dead-letter stream.",
     lambda s: s.dead_letters),
    ("sheppy_queue_stuck", "gauge",
     "In-flight messages held by dead consumers (past the lease, not taken over yet).",
     lambda s: s.stuck),
    ("sheppy_queue_completed_total", "counter",
     "Results stored with a terminal state (success, failure, revoke) under this queue: "
     "the sheppy:// result backend counts every task queue's results under its own queue "
     "(sheppy's counter).", lambda s: s.completed),
    ("sheppy_queue_failed_total", "counter",
     "FAILURE results stored under this queue (of every task queue, as completed).",
     lambda s: s.failed),
]

CONSUMERS = ("sheppy_queue_consumers", "gauge",
             "Consumers of the queue's group by state: alive (renews its messages' lease, or "
             "holds nothing and its worker's registration lasts), dead (past the lease, or "
             "gone).")


def samples(stats):
    """``[(name, type, help, [(labels, value)])]`` for a list of QueueStats."""
    families = []
    for name, kind, text, value_of in METRICS:
        values = [({"queue": s.queue}, value_of(s)) for s in stats]
        families.append((name, kind, text, [(labels, v) for labels, v in values if v is not None]))
    name, kind, text = CONSUMERS
    families.append((name, kind, text, [({"queue": s.queue, "state": state}, s.count(state))
                                        for s in stats for state in (ALIVE, DEAD)]))
    return families


def exposition(stats):
    """The text exposition format of ``stats`` (what Prometheus scrapes)."""
    lines = []
    for name, kind, text, values in samples(stats):
        lines.append(f"# HELP {name} {_escape_help(text)}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in values:
            pairs = ",".join(f'{key}="{_escape_label(str(val))}"' for key, val in labels.items())
            lines.append(f"{name}{{{pairs}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def serve(app, port, host="", queues=None, ready=None):
    """Serve ``GET /metrics`` on ``host:port`` until interrupted; each scrape reads Redis.

    ``ready(server)`` is called once listening (the CLI prints the address).
    """
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's name
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                return self._reply(404, "not found: metrics are at /metrics\n")
            try:
                body = exposition(queue_stats(app, queues))
            except Exception as exc:  # noqa: BLE001 -- a scrape must fail visibly, not the server
                logger.warning("sheppy metrics: scrape failed: %r", exc)
                return self._reply(503, f"cannot read the sheppy:// broker: {exc}\n")
            return self._reply(200, body, CONTENT_TYPE)

        def _reply(self, code, body, content_type="text/plain; charset=utf-8"):
            data = body.encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # noqa: A002 -- http.server's signature
            logger.debug("sheppy metrics: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    try:
        if ready is not None:
            ready(server)
        server.serve_forever()
    finally:
        server.server_close()


class SheppyCollector:
    """A ``prometheus_client`` collector of :data:`METRICS` for ``app``'s queues.

    ``prometheus_client.REGISTRY.register(SheppyCollector(app))``; each collection opens
    one broker connection and reads :func:`queue_stats`.
    """

    def __init__(self, app, queues=None):
        self.app = app
        self.queues = queues

    def collect(self):
        return families(queue_stats(self.app, self.queues))


def families(stats):
    """``prometheus_client`` metric families of ``stats`` (the same samples as :func:`exposition`)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for name, kind, text, values in samples(stats):
        label_names = list(values[0][0]) if values else ["queue"]
        if kind == "counter":
            family = CounterMetricFamily(name[:-len("_total")], text, labels=label_names)
        else:
            family = GaugeMetricFamily(name, text, labels=label_names)
        for labels, value in values:
            family.add_metric([labels[key] for key in label_names], value)
        yield family


def _number(value):
    """A sample value as prometheus_client writes it (its ``floatToGoString``): Go's
    float format, which turns to an exponent above 1e6."""
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text):
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

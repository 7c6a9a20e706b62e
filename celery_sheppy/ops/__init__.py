"""The operator's read side of ``sheppy://`` queues: what they hold, from a few commands.

* ``stats``: :func:`queue_stats` (ready, in flight, scheduled, dead, results, consumers
  per queue), the one API behind ``celery sheppy status``, the metrics and Flower;
* ``listings``: bounded listings of dead letters, scheduled, stuck and revoked tasks;
* ``metrics``: the Prometheus exporter;
* ``tables``: text tables for the command line (``celery_sheppy.cli``).
"""

from .stats import QueueStats, inspector, queue_stats

__all__ = ["QueueStats", "inspector", "queue_stats"]

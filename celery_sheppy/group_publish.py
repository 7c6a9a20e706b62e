"""A Celery group's (and chord header's) tasks published as one pipelined batch on sheppy://.

Celery 5.7's ``group.apply_async`` publishes its tasks one ``producer.publish`` at a
time: one round trip per task. kombu 5.7's ``Producer.batch()`` buffers publishes and
sends them together, but Celery never opens one. :func:`install` wraps
``group._apply_tasks`` (which ``group.apply_async`` and ``chord.run`` both call) so that,
when the producer's transport is sheppy://, its publishes run inside ``producer.batch()``.
Other transports take Celery's path unchanged.

What changes for the caller: the tasks reach Redis when the group's last task has been
prepared, before ``apply_async`` returns (the generator is consumed by ``list()`` in
``group.apply_async``); an error while preparing a task sends none of them instead of
the ones before it. A flush is one MULTI/EXEC, retried as a whole on a lost connection
(see ``transport.PublishBatch``).

Installed by the transport when it is first used; a Celery without ``group._apply_tasks``
keeps its own path (publishes are then one round trip each, as with redis://).
"""

import threading

_installed = False
_lock = threading.Lock()


def install():
    """Wrap ``celery.canvas.group._apply_tasks`` once per process; False if not possible."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from celery.canvas import group
        except ImportError:  # kombu without Celery: nothing to wrap
            return False
        stock = getattr(group, "_apply_tasks", None)
        if stock is None or getattr(stock, "_sheppy_batched", False):
            return False

        def _apply_tasks(self, tasks, producer=None, app=None, *args, **kwargs):
            app = app or self.app
            with app.producer_or_acquire(producer) as producer:
                if not _is_sheppy(producer):
                    yield from stock(self, tasks, producer, app, *args, **kwargs)
                    return
                with producer.batch():
                    yield from stock(self, tasks, producer, app, *args, **kwargs)

        _apply_tasks._sheppy_batched = True
        _apply_tasks.__doc__ = stock.__doc__
        _apply_tasks.__wrapped__ = stock
        group._apply_tasks = _apply_tasks
        _installed = True
        return True


def _is_sheppy(producer):
    from .transport import Transport

    connection = getattr(producer, "connection", None)
    return isinstance(getattr(connection, "transport", None), Transport) and hasattr(
        producer, "batch")

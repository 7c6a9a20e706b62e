"""A Celery group's (and chord header's) tasks published as one pipelined batch on sheppy://.

Celery 5.7's ``group.apply_async`` publishes its tasks one ``producer.publish`` at a
time: one round trip per task. kombu 5.7's ``Producer.batch()`` buffers publishes and
sends them together, but Celery never opens one. :func:`install` wraps
``group._apply_tasks`` (which ``group.apply_async`` and ``chord.run`` both call) so that,
when the producer's transport is sheppy://, its publishes run inside ``producer.batch()``.
Other transports take Celery's path unchanged.

What changes for the caller: the tasks reach Redis FLUSH_EVERY at a time, the last ones
before ``apply_async`` returns (``group.apply_async`` consumes ``_apply_tasks`` with
``list()``); an error while preparing a task sends none of the tasks since the last
flush, instead of every task before it. A flush is one MULTI/EXEC, retried as a whole
on a lost connection (see ``transport.publish.PublishBatch``). A group made from a generator
keeps Celery's path: Celery reads it ahead by two tasks at most and sends each task
as soon as it can, and a user's slow generator must not see its tasks held back.

Installed when the first sheppy:// transport or result backend of a process is made. A
group is batched only if that happened before it was applied: a process whose very first
broker use is a group (and whose result backend is not sheppy://) sends that one group
task by task. A Celery without ``group._apply_tasks``, or a kombu without
``Producer.batch()`` (before 5.7), keeps Celery's path (one round trip per task, as with
redis://).
"""

import threading

#: Most publish commands per flush: a worker starts on the first tasks of a large group
#: while the rest are still being prepared (Celery spends ~0.2 ms on each).
FLUSH_EVERY = 100

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
        from ..compat import LazyTasks
        stock = getattr(group, "_apply_tasks", None)
        if stock is None or getattr(stock, "_sheppy_batched", False):
            return False

        def _apply_tasks(self, tasks, producer=None, app=None, *args, **kwargs):
            app = app or self.app
            with app.producer_or_acquire(producer) as producer:
                # A group made from a generator (so a lazy chord header) is sent task by
                # task as it yields (celery#3021): a batch would hold its tasks back.
                if isinstance(self.tasks, LazyTasks) or not _is_sheppy(producer):
                    yield from stock(self, tasks, producer, app, *args, **kwargs)
                    return
                with producer.batch(max_size=FLUSH_EVERY):
                    yield from stock(self, tasks, producer, app, *args, **kwargs)

        _apply_tasks._sheppy_batched = True
        _apply_tasks.__doc__ = stock.__doc__
        _apply_tasks.__wrapped__ = stock
        group._apply_tasks = _apply_tasks
        _installed = True
        return True


#: ``driver_name`` of the sheppy:// transport (``transport.Transport``): compared, not
#: imported, so this module and the transport do not import each other.
DRIVER_NAME = "celery-sheppy"


def _is_sheppy(producer):
    connection = getattr(producer, "connection", None)
    transport = getattr(connection, "transport", None)
    return getattr(transport, "driver_name", None) == DRIVER_NAME and hasattr(producer, "batch")


"""What differs between the Celery, kombu and redis-py releases setup.cfg declares.

The one module that imports a private name of Celery, kombu or redis-py, or asks
which release it runs on; each name has a fallback for the releases without it
(tests/test_compat.py runs on the oldest cell too, docs/compatibility.md).
"""

import functools
import inspect
import sys

import redis
import redis.cluster
from celery.backends.asynchronous import AsyncBackendMixin
from celery.exceptions import ChordError

try:  # Celery 5.7
    from celery.backends.base import _create_chord_error_with_cause
except ImportError:  # Celery 5.3-5.6
    _create_chord_error_with_cause = None

try:  # every Celery 5: the type of a group made from a generator (celery#3021)
    from celery.utils.functional import _regen as LazyTasks
except ImportError:  # pragma: no cover - a Celery without it has no lazy groups to tell apart
    class LazyTasks:
        """Stands for Celery's ``_regen``: nothing is an instance of it."""

try:  # every Celery 5
    from celery._state import task_join_will_block
except ImportError:  # pragma: no cover
    def task_join_will_block():
        """Without Celery's flag, assume a join is allowed (what a client process sees)."""
        return False


def chord_error(message, cause=None):
    """A ChordError with ``cause`` as its ``__cause__``, as Celery 5.7 raises it (older
    Celery passes the message alone; the cause only adds to the traceback)."""
    if _create_chord_error_with_cause is not None:
        return _create_chord_error_with_cause(message=message, original_exc=cause)
    error = ChordError(message)
    if isinstance(cause, Exception):
        error.__cause__ = cause
    return error


def publish_callback(app, publish, *args):
    """``publish(*args)`` (a chord body's ``delay``) as the app's backends publish it:
    Celery 5.7 retries each message on its own policy (``AMQP._retry_publish``); older
    Celery calls it directly, as its own result backends do."""
    retry_publish = getattr(app.amqp, "_retry_publish", None)
    if retry_publish is None:
        return publish(*args)
    return retry_publish(publish, *args)


def chord_ttl(backend):
    """Seconds a chord's keys live, 0 for ever. Celery 5.7 has ``result_chord_expires`` (the
    join keys) and keeps a chord's results no shorter than ``result_expires``
    (``_chord_result_expires``); before 5.7 both follow ``result_expires``."""
    result_expires = getattr(backend, "_chord_result_expires", None)
    if result_expires is None:
        return backend.expires or 0
    return result_expires or backend.chord_expires or 0


#: Celery 5.7 keeps every AsyncResult object waiting on an id (celery#4925); before, one
#: per id, and ``_remove_pending_result(task_id)`` forgets the id whichever object asks.
_WAITERS_PER_OBJECT = "result" in inspect.signature(
    AsyncBackendMixin._remove_pending_result).parameters


def waited_on_by_another(backend, result):
    """Whether an AsyncResult object other than ``result`` waits on its id, where Celery
    (before 5.7) would still stop that wait when ``result`` goes: the garbage collector
    deleting a spare AsyncResult of a group member mid-publish (``AsyncResult.__del__``)
    left the group's ``get()`` waiting for ever. Celery 5.7 counts the waiters itself."""
    if _WAITERS_PER_OBJECT:
        return False
    waiting = (mapping.get(result.id) for mapping in backend._pending_results)
    # "is not", never "!=": AsyncResults of one id compare equal. One that has its
    # result (``_cache``, set only once ready) waits no more.
    return any(other is not None and other is not result and not other._cache
               for other in waiting)


def told_by_celery(backend, result):
    """Whether Celery hands AsyncResult ``result`` its result when the result comes.
    Celery 5.7 tells every object waiting on an id; before, only the one it keeps per id,
    the first added: a chord's header restored by its last part in the worker process
    that applied the chord (and so made the header's first objects) was never told, and
    the body's join timed out."""
    if _WAITERS_PER_OBJECT:
        return True
    return any(mapping.get(result.id) is result for mapping in backend._pending_results)


def result_compression(backend):
    """The backend's ``result_compression`` method, or None: Celery 5.7 compresses results
    and sets ``backend.compression``; older Celery never compresses results."""
    return getattr(backend, "compression", None)


def pool_connection(pool):
    """A connection of redis-py connection pool ``pool`` (its ``get_connection``), taken
    out of the pool's rotation until released."""
    if _needs_command_name(type(pool)):
        return pool.get_connection("_")  # redis-py < 5.3: a required name, unused
    return pool.get_connection()  # 5.3+: a name is deprecated


@functools.lru_cache(maxsize=None)
def _needs_command_name(pool_class):
    parameter = inspect.signature(pool_class.get_connection).parameters.get("command_name")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def disconnect_blocking_pool(pool, inuse_connections=True):
    """``redis.BlockingConnectionPool.disconnect`` of ``pool``: before redis-py 7.0 it takes
    no argument and closes every connection, the ones in use too (their next command
    reconnects); from 7.0 it leaves connections in use alone when asked."""
    disconnect = redis.BlockingConnectionPool.disconnect
    if "inuse_connections" in inspect.signature(disconnect).parameters:
        return disconnect(pool, inuse_connections)
    return disconnect(pool)


def check_cluster_transactions():
    """ValueError unless redis-py runs MULTI/EXEC on a Redis Cluster (redis-py 6.1+): a
    chord's bookkeeping and a batch of publishes are one transaction each."""
    if not hasattr(redis.cluster, "TransactionStrategy"):
        raise ValueError(
            f"a Redis Cluster (sheppy+cluster://) needs redis-py 6.1 or newer, for MULTI/EXEC "
            f"on a cluster; this is redis-py {redis.__version__}: pip install 'redis>=6.1'")


def written_to_pool_process(task_id):
    """Whether this process's worker pool has begun writing task ``task_id`` to a child
    process (``Request._apply_result``, a weakref to billiard's job; ``job._write_to``,
    set by Celery's AsynPool as it starts writing). On a lost connection Celery's
    ``pool.flush()`` discards every job a child has not yet accepted, written or not: a
    written one still runs in that child, and its result is not reported back. False for
    the other pools, an unknown id, or releases without these names."""
    state = sys.modules.get("celery.worker.state")
    request = getattr(state, "requests", {}).get(str(task_id)) if task_id else None
    apply_result = getattr(request, "_apply_result", None)
    job = apply_result() if callable(apply_result) else None
    return getattr(job, "_write_to", None) is not None

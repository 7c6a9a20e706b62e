"""Result stores a prefork pool child sends without waiting for their reply.

With Celery's default ``-O fair`` a prefork child gets its next task only once it has
reported the last one, so the result script's round trip (about 1 ms per task on a
loaded 2-CPU machine; ``rpc://``, which sends the result as a message, waits 0.3 ms) is
on every child's critical path. In a pool child the result writer (stores.py) sends
the store on a connection of its own and a thread of the child reads the reply while
the child reports the task and takes the next one. :class:`DeferredStores` owns that
connection, the store whose reply is unread and the thread; this module knows whether
this process is a pool child.

What stays: every store gets its reply read; a lost connection or a NOSCRIPT sends it
again, waiting, with the backend's retry policy, so a Redis restart loses no result;
one store at a time on one connection keeps a child's stores in order (STARTED before
SUCCESS: the next store, or a read of results by the child, waits for the reply of the
last). The store is on the socket before the child reports the task done.
What changes: the task has finished when the reply comes, so an error it brings
(say, maxmemory reached) is logged with the task's id instead of raised in the task.
"""

import os
import queue
import threading

import redis
from celery import signals
from celery.utils.log import get_logger
from redis.exceptions import NoScriptError

from .. import compat

logger = get_logger(__name__)

#: The pid of this process if it is a Celery prefork pool child (set by worker_process_init).
_pool_child_pid = None

#: Every DeferredStores of this process, settled when the child exits.
_open = []

def in_pool_child():
    return _pool_child_pid == os.getpid()


@signals.worker_process_init.connect
def _mark_pool_child(**_):
    global _pool_child_pid
    _pool_child_pid = os.getpid()


@signals.worker_process_shutdown.connect
def _settle_all(**_):
    for stores in _open:
        stores.settle()


class DeferredStores:
    """Result-store script calls on one connection of ``client``; a thread reads each reply.

    ``store_now(keys, args)`` runs a store waiting for its reply, retrying on a lost
    connection (the backend's ``ensure``): used when a send or its reply fails."""

    def __init__(self, client, script, store_now):
        self._client = client
        self._script = script
        self._store_now = store_now
        self._connection = None
        self._sent = queue.Queue(maxsize=1)  # (keys, args, task id) whose reply is unread
        self._settled = threading.Event()  # set while no reply is unread
        self._settled.set()
        self._reader = None
        _open.append(self)

    def send(self, keys, args, task_id):
        self.settle()
        try:
            if self._connection is None:
                self._connection = compat.pool_connection(self._client.connection_pool)
            self._connection.send_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
        except (redis.ConnectionError, redis.TimeoutError):
            self._drop()
            self._store(keys, args, task_id)
            return
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_replies, daemon=True,
                                            name="sheppy-result-replies")
            self._reader.start()
        self._settled.clear()
        self._sent.put((keys, args, task_id))

    def settle(self):
        """Wait until the reply of the store sent last has been read (and acted on)."""
        self._settled.wait()

    def _read_replies(self):
        while True:
            keys, args, task_id = self._sent.get()
            try:
                self._connection.read_response()
            except NoScriptError:  # it did not run; the waiting call loads the script
                self._store(keys, args, task_id)
            except redis.ResponseError as exc:
                logger.error("sheppy: the result of task %s was not stored: %s", task_id, exc)
            except Exception:  # pylint: disable=broad-except
                # A lost connection, a timeout or anything else that broke the read: the
                # reply is lost with the connection, so the store is sent again, waiting;
                # the thread lives on (the child's next store waits for it).
                self._drop()
                self._store(keys, args, task_id)
            finally:
                self._settled.set()

    def _store(self, keys, args, task_id):
        try:
            self._store_now(keys, args)
        except Exception as exc:  # pylint: disable=broad-except
            # The task that stored has finished: raising here would fail another task.
            logger.error("sheppy: the result of task %s was not stored: %r", task_id, exc)

    def _drop(self):
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.disconnect()
            finally:
                self._client.connection_pool.release(connection)

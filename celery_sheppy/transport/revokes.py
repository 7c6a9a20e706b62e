"""Durable revokes: task ids of ``revoke`` (and ``terminate``) broadcasts, kept in
``sheppy:celery::revoked``.

A worker that is online gets revokes as broadcasts (fanout.py: not kept for a worker
that is not connected). The zset (task id -> revoke time, epoch ms, trimmed to
``revoke_expires``) is for those that were not: it is read in full when a queue is first
consumed (and so after every reconnect), then every :data:`REVOKE_READ_INTERVAL`
seconds; a revoked task's message is dropped instead of delivered, and in a Celery worker
the ids read are also added to Celery's own revoked set, for tasks the worker already
holds (reserved, or waiting for their countdown).
"""

import base64
import json
import sys
from time import monotonic, time

from kombu.utils.encoding import bytes_to_str

from .. import keys

#: Seconds between reads of the revoked set.
REVOKE_READ_INTERVAL = 30.0

#: Revokes are read again this far back (ms): their times come from publishers' clocks.
REVOKE_CLOCK_SLACK_MS = 60000


class Revokes:
    def __init__(self, conns, expires_seconds):
        self.conns = conns
        self.expires_seconds = expires_seconds
        self._revoked = {}  # Celery task id -> revoke time (epoch ms)
        self._read_ms = None  # newest revoke time read
        self._read_at = 0.0

    def is_revoked(self, task_id):
        return str(task_id) in self._revoked

    def remember(self, message):
        """Keep the ids of a ``revoke`` broadcast in Redis, for workers that are not listening."""
        ids = revoked_ids(message)
        if not ids:
            return
        now_ms = int(time() * 1000)
        expires_ms = int(self.expires_seconds * 1000)
        key = keys.revoked_set()
        with self.conns.client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {task_id: now_ms for task_id in ids})
            pipe.zremrangebyscore(key, "-inf", now_ms - expires_ms)
            pipe.pexpire(key, expires_ms)
            pipe.execute()
        for task_id in ids:
            self._revoked[task_id] = now_ms

    def read(self, force=False, leased=True):
        """Read revokes newer than the last read (all of them the first time); unless
        ``force``, only every REVOKE_READ_INTERVAL, and never before the first read while
        no ``leased`` queue is consumed."""
        if not force and (self._read_ms is None and not leased):
            return
        if not force and monotonic() - self._read_at < REVOKE_READ_INTERVAL:
            return
        self._read_at = monotonic()
        now_ms = time() * 1000
        expires_ms = self.expires_seconds * 1000
        since = self._read_ms
        # revoke times come from publishers' clocks: read a minute back every time
        start = now_ms - expires_ms if since is None else since - REVOKE_CLOCK_SLACK_MS
        rows = self.conns.client.zrangebyscore(keys.revoked_set(), start, "+inf",
                                               withscores=True)
        newest = since or now_ms
        for member, score in rows:
            task_id = bytes_to_str(member)
            if task_id not in self._revoked:
                # A worker that was not connected when the broadcast went out (fanout
                # messages are not kept) may hold the task already: tell Celery.
                hand_to_celery(task_id)
            self._revoked[task_id] = score
            newest = max(newest, score)
        self._read_ms = min(newest, now_ms)
        if len(self._revoked) > 1000 and rows:
            self._revoked = {task_id: at for task_id, at in self._revoked.items()
                             if at > now_ms - expires_ms}


#: Remote-control commands that revoke the tasks of their ``task_id`` argument
#: (``celery control terminate SIGNAL ID`` sends ``terminate``, which revokes too).
REVOKING_COMMANDS = frozenset({"revoke", "terminate"})


def revoked_ids(message):
    """Task ids of a ``revoke`` or ``terminate`` remote-control message, else []."""
    body = message.get("body")
    try:
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)
    except (TypeError, ValueError):
        return []
    if not isinstance(payload, dict) or payload.get("method") not in REVOKING_COMMANDS:
        return []
    ids = (payload.get("arguments") or {}).get("task_id")
    if isinstance(ids, (str, bytes)):
        ids = [ids]
    return [bytes_to_str(task_id) for task_id in ids or () if task_id]


def hand_to_celery(task_id):
    """In a Celery worker, let Celery itself handle a revoked task (it stores REVOKED
    and acks); returns False elsewhere."""
    state = sys.modules.get("celery.worker.state")
    if state is None:
        return False
    state.revoked.add(str(task_id))
    return True

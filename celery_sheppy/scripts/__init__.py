"""Lua scripts, one per operation (see each file's header for KEYS/ARGV).

:func:`registry` maps each ``scripts/<name>.lua`` file stem to a :class:`Script`, read
once. A script is called with EVALSHA and loaded on NOSCRIPT; never inside a redis-py
pipeline, which would send SCRIPT EXISTS before every execute.
"""

import hashlib
from functools import lru_cache
from pathlib import Path

from redis.exceptions import NoScriptError

_HERE = Path(__file__).parent


def source(name):
    """The text of ``scripts/<name>.lua``."""
    return (_HERE / f"{name}.lua").read_text()


class Script:
    """One Lua script: ``script(client, keys=[...], args=[...])``."""

    def __init__(self, name, text):
        self.name = name
        self.source = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()

    def __call__(self, client, keys=(), args=()):
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a new or flushed server: EVAL also caches it
            return client.eval(self.source, len(keys), *keys, *args)

    def __repr__(self):
        return f"<Script {self.name} {self.sha[:8]}>"


@lru_cache(maxsize=None)
def registry():
    """``{file stem: Script}`` for every ``scripts/*.lua``."""
    return {path.stem: Script(path.stem, path.read_text())
            for path in sorted(_HERE.glob("*.lua"))}


STORE_RESULT = source("store_result")
CHORD_PART_RETURN = source("chord_part_return")
REQUEUE = source("requeue")
READ = source("read")
PURGE = source("purge")
BIND = source("bind")
REAP_CONSUMERS = source("reap_consumers")
RENEW = source("renew")
RECLAIM = source("reclaim")
DEAD_LETTER = source("dead_letter")
REPLAY = source("replay")
SCHEDULE = source("schedule")
PROMOTE = source("promote")

"""Lua scripts, one per operation, read once at import (see each file's header for KEYS/ARGV)."""

from pathlib import Path

_HERE = Path(__file__).parent


def source(name):
    """The text of ``scripts/<name>.lua``."""
    return (_HERE / f"{name}.lua").read_text()


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

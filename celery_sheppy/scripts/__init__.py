"""Lua scripts, one per operation (see each file's header for KEYS/ARGV).

:func:`registry` maps each ``scripts/<name>.lua`` file stem to a :class:`Script`, read
once: the one way to call a script. A call is an EVALSHA, and an EVAL on NOSCRIPT;
:meth:`Script.many` sends several calls in one round trip. redis-py's own Script objects
are not used: in a pipeline they send SCRIPT EXISTS before every execute.
"""

import hashlib
from functools import lru_cache
from pathlib import Path

from redis.exceptions import NoScriptError

_HERE = Path(__file__).parent


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

    def with_commands(self, client, keys, args, commands):
        """The script's reply, sent in one round trip with plain ``commands`` after it
        (``[(name, *args)]``, their replies unread); on NOSCRIPT the script alone is
        sent again (an EVAL)."""
        with client.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            for command in commands:
                pipe.execute_command(*command)
            reply = pipe.execute(raise_on_error=False)[0]
        if isinstance(reply, NoScriptError):
            return self(client, keys=keys, args=args)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def many(self, client, calls, raise_on_error=True):
        """Run ``calls`` (``[(keys, args)]``) in one round trip; returns their replies.

        A plain pipeline of EVALSHA: on NOSCRIPT (which means the call did not run) the
        script is loaded and those calls alone are sent again. ``raise_on_error=False``
        returns a failed call's exception in its place."""
        replies = self._pipelined(client, calls)
        missing = [index for index, reply in enumerate(replies)
                   if isinstance(reply, NoScriptError)]
        if missing:
            client.script_load(self.source)
            again = self._pipelined(client, [calls[index] for index in missing])
            for index, reply in zip(missing, again):
                replies[index] = reply
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    def _pipelined(self, client, calls):
        if not calls:
            return []
        with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                # (pipe.evalsha is refused by a Redis Cluster's pipeline; this is the
                # same command, routed by its first key there)
                pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            return pipe.execute(raise_on_error=False)

    def __repr__(self):
        return f"<Script {self.name} {self.sha[:8]}>"


@lru_cache(maxsize=None)
def registry():
    """``{file stem: Script}`` for every ``scripts/*.lua``."""
    return {path.stem: Script(path.stem, path.read_text())
            for path in sorted(_HERE.glob("*.lua"))}


"""The largest value the backend's server takes: :class:`ValueLimit`, asked once per backend.

A value over the server's ``proto-max-bulk-len`` makes Redis drop the connection instead
of answering with an error, so results, groups and chords are measured before they go.
"""

import redis
from celery.exceptions import BackendStoreError


class ValueLimit:
    """Checks values against the server of ``client``: ``proto-max-bulk-len``, capped at
    ``ceiling`` bytes (Redis's largest string value)."""

    def __init__(self, client, ceiling):
        self._client = client
        self._ceiling = ceiling
        self._limit = None  # bytes, asked on the first check

    @property
    def limit(self):
        """The largest value this server takes, in bytes."""
        if self._limit is None:
            try:
                reply = self._client.config_get("proto-max-bulk-len")
                self._limit = min(int(reply["proto-max-bulk-len"]), self._ceiling)
            except (redis.ResponseError, KeyError, ValueError):  # CONFIG denied by ACL, or a proxy
                self._limit = self._ceiling
        return self._limit

    def check(self, value):
        """Raise BackendStoreError when ``value`` (str or bytes, or None) is over the limit."""
        if value is None:
            return
        size = len(value)
        limit = self.limit
        if isinstance(value, str) and size * 4 > limit:
            size = len(value.encode("utf-8"))  # only worth counting bytes near the limit
        if size > limit:
            raise BackendStoreError(
                f"result of {size} bytes is over this Redis server's value limit of "
                f"{limit} bytes (proto-max-bulk-len)")

"""Celery on Redis Streams, stored in Sheppy's Redis layout.

Set ``result_backend = "sheppy://host:port/db"`` (``sheppys://`` for TLS); the
scheme resolves through Celery's ``celery.result_backends`` entry point, so
user code needs no import.
"""

__version__ = "0.1.0"

# sheppy imports ``celery_sheppy:celery_task`` (records.SPEC_FUNC) when it reads our records.
from .records import celery_task  # noqa: E402,F401

# Registers the sheppy:// broker scheme with kombu for processes that import us first.
from .patches import kombu_aliases  # noqa: E402,F401

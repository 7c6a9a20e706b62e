"""``celery -A proj sheppy …``: the operator's commands (Celery's ``celery.commands`` plugin).

Every command reads the app's own broker (``app.connection_for_read()``: URL, TLS, ACL
and transport options as the workers use them) through :mod:`celery_sheppy.ops`
(``stats``, ``listings``); these modules only parse options and print.
``base`` holds the group, the shared options and the exit codes; ``status`` the
counts (status, metrics); ``dead`` the dead letters; ``entries`` the other listings.
"""

from . import dead, entries, status  # noqa: F401 -- each module adds its commands
from .base import EXIT_CODES, sheppy  # noqa: F401

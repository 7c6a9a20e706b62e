"""Makes kombu resolve the ``sheppy://`` and ``sheppys://`` broker schemes in any process.

kombu has no entry point group for transports, and it refuses ``module:Class``
names taken from a URL. It does load every ``kombu.serializers`` entry point when
``kombu.serialization`` is first imported, which Celery does on import. Our entry
point (setup.cfg) points at :data:`SERIALIZER` in this module, so importing it
adds the schemes to ``kombu.transport.TRANSPORT_ALIASES`` first.

Limits (docs/transport.md): a process that creates a ``kombu.Connection`` before
anything imported ``kombu.serialization`` (plain kombu, no Celery) must import
``celery_sheppy.transport`` (or this module) itself; the package must be
installed (entry points come from its metadata), not merely on ``sys.path``.
"""

from kombu.transport import TRANSPORT_ALIASES

TRANSPORT = "celery_sheppy.transport:Transport"
#: kombu reads ``sheppy+sentinel://h1;sheppy+sentinel://h2`` as transport ``sheppy``, but
#: when it fails over to the next ``;`` part it parses that alone: its scheme is the name.
SCHEMES = ("sheppy", "sheppys", "sheppy+sentinel", "sheppys+sentinel", "sheppy+cluster",
           "sheppys+cluster")


def register():
    """Add our schemes to kombu's transport aliases (idempotent)."""
    for scheme in SCHEMES:
        TRANSPORT_ALIASES.setdefault(scheme, TRANSPORT)


register()

#: What the ``kombu.serializers`` entry point loads: the arguments of
#: ``kombu.serialization.register`` after the name. Without an encoder and a
#: decoder it only names a content type nobody sends, so no serializer changes.
SERIALIZER = (None, None, "application/x-celery-sheppy-transport", "utf-8")

"""What celery-sheppy changes in other libraries, in one place, installed by :func:`install`.

* ``kombu_aliases``: kombu resolves the ``sheppy://`` schemes (a ``kombu.serializers`` entry
  point registers them in any process that imports ``kombu.serialization``);
* ``declare_cache``: kombu's per-publish declaration check returns at once for an entity
  already declared on a sheppy:// channel;
* ``group_publish``: a Celery group's tasks are published in one pipelined batch;
* ``flower``: Flower's Broker page reads sheppy:// queues (installed by
  ``import celery_sheppy.flower`` in ``flowerconfig.py``, since it needs Flower).

:func:`install` runs when the first sheppy:// transport or result backend of a process is
made; each patch is installed once per process.
"""

from . import declare_cache, group_publish, kombu_aliases


def install(channel_class=None):
    """Install the patches of kombu and Celery (``channel_class``: the sheppy:// channel's
    class, for the declaration cache; the transport passes it, the backend need not)."""
    kombu_aliases.register()
    group_publish.install()
    if channel_class is not None:
        declare_cache.install(channel_class)

"""Flower support: one line in ``flowerconfig.py`` shows ``sheppy://`` queue lengths.

::

    import celery_sheppy.flower

Importing this module wraps Flower's ``BaseHandler.get_broker`` (patches/flower.py).
"""

from .patches.flower import SheppyQueues, install, row  # noqa: F401  (installs on import)

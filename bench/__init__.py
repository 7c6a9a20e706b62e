"""Benchmarks: Celery on stock ``redis://`` against ``sheppy://``, run with ``python -m bench``.

What each scenario measures, and the numbers of a full run: docs/performance.md.
"""

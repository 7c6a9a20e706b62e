"""Runnable examples of celery-sheppy (``python -m examples.demo``)."""

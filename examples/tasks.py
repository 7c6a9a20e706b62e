"""The demo's Celery app, imported by both the demo and its worker.

Broker and result backend come from the environment the demo sets:
``DEMO_BROKER_URL`` and ``DEMO_RESULT_BACKEND``.
"""

import os
import time

from celery import Celery

BROKER_URL = os.environ.get("DEMO_BROKER_URL", "redis://127.0.0.1:6379/1")
RESULT_BACKEND = os.environ.get("DEMO_RESULT_BACKEND", "sheppy://127.0.0.1:6379/0")

if BROKER_URL.startswith("sheppy"):
    import celery_sheppy.transport  # noqa: F401  (makes sheppy:// known to kombu)

app = Celery("examples.tasks")
app.conf.update(
    broker_url=BROKER_URL,
    result_backend=RESULT_BACKEND,
    result_extended=True,  # records keep name, args, kwargs, worker
    result_expires=3600,  # every key the backend writes gets this TTL (seconds)
    task_track_started=True,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("DEMO_MASTER_NAME"):  # sheppy+sentinel:// URLs (scripts/demo --topology sentinel)
    sentinel = {"master_name": os.environ["DEMO_MASTER_NAME"]}
    app.conf.update(broker_transport_options=sentinel, result_backend_transport_options=sentinel)


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(values):
    return sum(values)


@app.task
def fail(message):
    raise ValueError(message)


@app.task(bind=True)
def progress(self, steps, delay=0.3):
    """Reports a custom PROGRESS state at every step, then returns ``steps``."""
    for step in range(1, steps + 1):
        time.sleep(delay)
        self.update_state(state="PROGRESS", meta={"step": step, "of": steps})
    return steps

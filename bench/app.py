"""The Celery app of the bench: noop tasks, for the bench process and its workers.

Workers run ``celery -A bench.app worker``; their broker and result backend come
from BENCH_BROKER and BENCH_BACKEND. A worker touches the file BENCH_READY_FILE
once it consumes, so the bench knows when it is warm without parsing its log
(workers log at WARNING, to keep per-task log lines out of the measurement).
"""

import os
from pathlib import Path

from celery import Celery
from celery.signals import worker_ready

NOOP = "bench.noop"
COUNT = "bench.count"


def make_app(broker, backend, current=True):
    """An app with Celery's defaults (results enabled, json) and the two bench tasks."""
    app = Celery("bench", broker=broker, backend=backend, set_as_current=current)
    app.conf.broker_connection_retry_on_startup = True

    # shared=False: the bench process makes one app per measurement; tasks must not
    # leak from one app into the next.
    @app.task(name=NOOP, shared=False)
    def noop():
        return None

    @app.task(name=COUNT, shared=False)
    def count(results):
        """A chord body: how many header results it got."""
        return len(results)

    return app


app = make_app(os.environ.get("BENCH_BROKER"), os.environ.get("BENCH_BACKEND"))


@worker_ready.connect
def _touch_ready_file(**_):
    path = os.environ.get("BENCH_READY_FILE")
    if path:
        Path(path).touch()

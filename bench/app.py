"""The Celery app of the bench: noop tasks, for the bench process and its workers.

Workers run ``celery -A bench.app worker``; their broker and result backend come
from BENCH_BROKER and BENCH_BACKEND. A worker touches the file BENCH_READY_FILE
once it consumes, so the bench knows when it is warm without parsing its log
(workers log at WARNING, to keep per-task log lines out of the measurement).
With BENCH_PROFILE_CHILDREN set to a directory, each pool child runs under cProfile
and writes ``child-<pid>.prof`` there when it exits (bench/worker_profile.py).
"""

import cProfile
import os
from pathlib import Path

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

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


_child_profile = None


@worker_process_init.connect
def _profile_child(**_):
    global _child_profile
    if os.environ.get("BENCH_PROFILE_CHILDREN"):
        _child_profile = cProfile.Profile()
        _child_profile.enable()


@worker_process_shutdown.connect
def _write_child_profile(**_):
    if _child_profile is not None:
        _child_profile.disable()
        _child_profile.dump_stats(
            os.path.join(os.environ["BENCH_PROFILE_CHILDREN"], f"child-{os.getpid()}.prof"))

"""``celery migrate`` (Celery's own command) between the stock ``redis://`` broker and
``sheppy://``, both ways, as docs/migration.md tells an operator to run it.

Queued tasks are published with no worker running, moved with ``celery migrate -a``,
counted on both sides, then run by a real worker on the destination.
"""

import json
import time
import uuid

from celery import states

from celery_sheppy import keys
from t.helpers import celery_cli, client_app, sig


def migrate(source, destination, *args, broker=None, backend=None):
    result = celery_cli(broker or destination, "migrate", *args, source, destination,
                        backend=backend or destination, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def sheppy_counts(url, backend):
    result = celery_cli(url, "sheppy", "status", "-Q", "celery", "--json", backend=backend)
    assert result.returncode == 0, result.stderr
    queue = json.loads(result.stdout)["queues"][0]
    return queue["ready"], queue["in_flight"], queue["scheduled"]


def test_celery_migrate_moves_queued_tasks_from_redis_into_sheppy_and_a_worker_runs_them(
        make_redis_server, workers):
    server = make_redis_server()
    stock_url, sheppy_url = server.url.replace("/0", "/1"), server.sheppy_url(2)
    backend = server.sheppy_url(3)
    stock_db = server.client(db=1)
    # Given 20 tasks and one countdown task queued on a stock redis:// broker, no worker
    stock = client_app(stock_url, backend)
    results = [sig(stock, "add", i, i).delay() for i in range(20)]
    later = sig(stock, "add", 50, 50).apply_async(countdown=3600)
    assert stock_db.llen("celery") == 21

    # Without --ack-messages the tasks are copied: the source keeps them
    migrate(stock_url, server.sheppy_url(4), "-t", "3", backend=backend)
    assert stock_db.llen("celery") == 21
    assert sheppy_counts(server.sheppy_url(4), backend) == (20, 0, 1)

    # When they are migrated with -a (--ack-messages)
    output = migrate(stock_url, sheppy_url, "-a", "-t", "3", backend=backend).stdout
    assert "Migrating task 21/" in output

    # Then the stock queue is empty, sheppy holds 20 ready tasks and the countdown task
    # waits in its scheduled set
    assert stock_db.llen("celery") == 0 and stock_db.hlen("unacked") == 0
    assert sheppy_counts(sheppy_url, backend) == (20, 0, 1)
    assert server.client(db=2).zscore(keys.scheduled_set("celery"),
                                      later.id) is not None  # a UUID id is its sheppy id

    # And a sheppy:// worker runs them, their results readable through the producer's app
    workers.start(sheppy_url, backend=backend, pool="threads", concurrency=4)
    assert [r.get(timeout=60) for r in results] == [2 * i for i in range(20)]
    stock.close()


def test_celery_migrate_moves_queued_tasks_from_sheppy_back_to_redis_scheduled_ones_when_due(
        make_redis_server, workers):
    server = make_redis_server()
    stock_url, sheppy_url = server.url.replace("/0", "/1"), server.sheppy_url(2)
    backend = server.sheppy_url(3)
    # Given 10 tasks queued on sheppy://, and one sent to its scheduled set (delay_threshold
    # 1 s), due 4 s from now
    app = client_app(sheppy_url, backend, broker_transport_options={"delay_threshold": 1})
    results = [sig(app, "add", i, 1).delay() for i in range(10)]
    soon = sig(app, "add", 7, 7).apply_async(countdown=4)
    sent = time.monotonic()
    assert sheppy_counts(sheppy_url, backend) == (10, 0, 1)

    # When they are migrated back with -a, waiting (-t) longer than the scheduled one needs
    output = migrate(sheppy_url, stock_url, "-a", "-t", "15", broker=sheppy_url,
                     backend=backend).stdout

    # Then all 11 are on the stock queue (the migrating consumer moved the due one into the
    # stream first), none left in sheppy
    assert time.monotonic() - sent > 4
    assert "Migrating task 11/" in output
    assert server.client(db=1).llen("celery") == 11
    assert sheppy_counts(sheppy_url, backend) == (0, 0, 0)

    # And a stock redis:// worker runs them
    workers.start(stock_url, backend=backend, pool="threads", concurrency=4)
    assert [r.get(timeout=60) for r in results] == [i + 1 for i in range(10)]
    assert soon.get(timeout=60) == 14
    app.close()


def test_results_stay_with_the_backend_that_stored_them(redis_server):
    # docs/migration.md: switching result_backend between redis:// and sheppy:// leaves the
    # results already stored readable through the old URL only (other keys, other format)
    stock = client_app(redis_server.url, redis_server.url)
    sheppy = client_app(redis_server.url, redis_server.sheppy_url())
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    stock.backend.store_result(old, "stored by redis://", states.SUCCESS)
    sheppy.backend.store_result(new, "stored by sheppy://", states.SUCCESS)

    assert stock.AsyncResult(old).get(timeout=5) == "stored by redis://"
    assert sheppy.AsyncResult(new).get(timeout=5) == "stored by sheppy://"
    assert sheppy.AsyncResult(old).state == states.PENDING  # unknown to the other backend
    assert stock.AsyncResult(new).state == states.PENDING
    stock.close()
    sheppy.close()

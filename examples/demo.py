"""celery-sheppy demo: a Celery app with a real worker, results in Sheppy's Redis layout.

    python -m examples.demo            # starts a private redis-server on a free loopback port
    python -m examples.demo URL        # uses the Redis server at URL (redis://, sheppy://, ...)
    python -m examples.demo --topology sentinel   # behind a local Sentinel set (sheppy+sentinel://)
    python -m examples.demo --topology cluster    # on a local Redis Cluster (sheppy+cluster://)

It starts ``celery worker -P prefork -c 2`` on ``examples/tasks.py``, runs a
task, a failing task, a group, a chord and a task that reports progress,
prints their results and the Redis keys they left, then stops the worker and
the redis-server it started (by PID). Broker and results share db N of the
server (N from the URL, default 0), both ``sheppy://``; results expire after an hour.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from t.redis_server import MissingRedisServer, RedisCluster, RedisServer, SentinelSet

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30  # seconds, for every wait on a result or a process


def urls(server_url):
    """(broker URL, result backend URL, plain redis:// URL for display) for a server URL."""
    parts = urlsplit(server_url)
    tls = parts.scheme in ("rediss", "sheppys")
    if parts.scheme not in ("redis", "rediss", "sheppy", "sheppys"):
        sys.exit(f"not a Redis URL: {server_url!r} (redis://host:port/db or sheppy://...)")
    db = int(parts.path.strip("/") or 0)
    query = f"?{parts.query}" if parts.query else ""

    def url(scheme, db):
        return f"{scheme}{'s' if tls else ''}://{parts.netloc}/{db}{query}"

    return url("sheppy", db), url("sheppy", db), url("redis", db)


def redact(url):
    from celery_sheppy.connect import redact as redact_sheppy_url

    return redact_sheppy_url(url)


# -- processes: an ephemeral redis-server and a worker, both stopped by PID ----------------


class Worker:
    """``celery worker -P prefork -c 2`` on examples.tasks, in its own process group."""

    def __init__(self, broker, backend):
        self.log = tempfile.NamedTemporaryFile(prefix="celery-sheppy-demo-worker-", suffix=".log",
                                               delete=False)
        env = dict(os.environ, DEMO_BROKER_URL=broker, DEMO_RESULT_BACKEND=backend,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "examples.tasks", "worker",
             "-P", "prefork", "-c", "2", "-l", "INFO", "-n", f"demo{os.getpid()}@%h"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=str(ROOT), start_new_session=True)
        try:
            self._wait_for_log(" ready.")
        except BaseException:
            self.stop()
            raise

    def output(self):
        return Path(self.log.name).read_text(errors="replace")

    def _wait_for_log(self, text):
        deadline = time.monotonic() + TIMEOUT * 2
        while text not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the worker did not start; its log:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()  # warm shutdown
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # any pool process left behind
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


# -- the demo ------------------------------------------------------------------------------


def show(step, text):
    print(f"{step:<22}{text}", flush=True)


def run_tasks():
    from celery import chord, group

    from examples.tasks import add, fail, progress, tsum

    result = add.delay(2, 3)
    show("task", f"add(2, 3) -> {result.get(timeout=TIMEOUT)}   (id {result.id})")
    first_id = result.id

    result = fail.delay("boom")
    try:
        result.get(timeout=TIMEOUT)
    except ValueError as exc:
        last_line = (result.traceback or "").strip().splitlines()[-1:]
        show("failing task", f"fail('boom') -> {result.state}: {exc!r}; traceback ends {last_line}")

    result = group(add.s(i, i) for i in range(10))()
    show("group", f"add(i, i) for i in 0..9 -> {result.get(timeout=TIMEOUT)}")

    result = chord(add.s(i, i) for i in range(10))(tsum.s())
    show("chord", f"tsum(add(i, i) for i in 0..9) -> {result.get(timeout=TIMEOUT)}")

    def on_message(meta):
        show("", f"  on_message: {meta['status']} {meta['result']}")

    result = progress.delay(3)
    show("progress", "progress(3), custom PROGRESS states delivered to get(on_message=...):")
    show("", f"-> {result.get(timeout=TIMEOUT, on_message=on_message)}")
    return first_id


def show_keys(display_urls, task_id):
    """The keys the demo left in Sheppy's layout (on every server of ``display_urls``),
    grouped by shape, and one task record."""
    import redis

    from examples.tasks import app

    clients = [redis.Redis.from_url(url, decode_responses=True) for url in display_urls]
    try:
        shapes = Counter()
        for client in clients:
            for key in client.scan_iter("sheppy:*", count=1000):
                shape = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                               "<id>", key)
                shapes[(shape, client.type(key))] += 1
        print("\nRedis keys in Sheppy's layout:")
        for (shape, kind), count in sorted(shapes.items()):
            print(f"  {shape:<48}{kind:<8}x {count}")
        key = app.backend.get_key_for_task(task_id)
        record = app.backend.get(key)
        print(f"\nthe record of add(2, 3), {key}:")
        print("  " + json.dumps(json.loads(record), indent=2).replace("\n", "\n  "))
    finally:
        for client in clients:
            client.close()


def start_topology(topology):
    """``(servers, broker URL, backend URL, redis:// URLs to show keys from)``."""
    if topology == "sentinel":
        sentinels = SentinelSet()
        os.environ["DEMO_MASTER_NAME"] = sentinels.master_name
        print(f"Redis: a primary, a replica and 3 Sentinels (primary 127.0.0.1:"
              f"{sentinels.primary_port()}, master_name {sentinels.master_name!r})")
        return ([sentinels], sentinels.sheppy_url(), sentinels.sheppy_url(short=True),
                [sentinels.primary().url])
    cluster = RedisCluster()
    print(f"Redis: broker and results on a Redis Cluster of 3 masters + 3 replicas "
          f"({', '.join(str(port) for port in cluster.ports)})")
    return ([cluster], cluster.sheppy_url(), cluster.sheppy_url(),
            [node.url for node in cluster.masters()])


def main(argv):
    topology = None
    if argv[:1] == ["--topology"] and len(argv) == 2 and argv[1] in ("sentinel", "cluster"):
        topology, argv = argv[1], []
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # A plain SIGTERM should clean up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    server = worker = None
    servers = []
    try:
        if topology:
            servers, broker, backend, display_urls = start_topology(topology)
        elif argv:
            server_url = argv[0]
            print(f"Redis: {redact(server_url)} (given)")
        else:
            try:
                server = RedisServer()
            except MissingRedisServer as exc:
                sys.exit(f"{exc}, or pass the URL of a Redis server")
            server_url = server.url
            print(f"Redis: redis-server started on 127.0.0.1:{server.port} (pid {server.process.pid})")
        if not topology:
            broker, backend, display_url = urls(server_url)
            display_urls = [display_url]
        os.environ.update(DEMO_BROKER_URL=broker, DEMO_RESULT_BACKEND=backend)
        print(f"broker_url     = {redact(broker)!r}")
        print(f"result_backend = {redact(backend)!r}")

        worker = Worker(broker, backend)
        print(f"worker: celery worker -P prefork -c 2 (pid {worker.process.pid}) is ready\n")
        task_id = run_tasks()
        show_keys(display_urls, task_id)
    finally:
        # Stopping takes at most a few seconds; a second Ctrl-C must not leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if worker:
            worker.stop()
            print("\nworker stopped")
        if server:
            server.close()
            print(f"redis-server (pid {server.process.pid}) stopped")
        for started in servers:
            started.close()
        if servers:
            print("redis-servers stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

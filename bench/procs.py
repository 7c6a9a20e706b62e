"""The processes a bench run starts: one redis-server (and, for the cluster side, a local
Redis Cluster) and ``celery worker`` subprocesses.

Both are stopped by their PID (a worker by its process group, which holds its pool
children), also when the run fails half-way.
"""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from t.redis_server import RedisCluster, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent

#: Commands the bench itself sends to Redis between a stats reset and a snapshot;
#: left out of the commands counted per task.
OWN_COMMANDS = {"info", "config|resetstat"}


class BenchServer(RedisServer):
    """The private redis-server of a bench run, with the counters the bench reads."""

    def __init__(self):
        super().__init__()
        self.admin = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def start(self):
        super().start()
        try:
            # Redis 7 allocates a latency histogram (tens of kB) per command name on
            # its first call: that would show up as memory of the first results.
            self.client().config_set("latency-tracking", "no")
        except redis.ResponseError:
            pass  # Redis < 7: no such setting, no such histograms

    def url_for(self, scheme="redis"):
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def version(self):
        return self.admin.info("server")["redis_version"]

    def reset(self):
        """A fresh server process on the same port: each measurement starts from nothing.

        FLUSHALL would not do: Redis keeps its grown hash tables (pub/sub channels
        of the stock backend, for one), so used_memory would depend on what ran before.
        """
        self.stop()
        self.start()
        self.admin.config_resetstat()

    def drop_clients(self):
        """Close every connection but ours: what a finished measurement left open."""
        self.admin.client_kill_filter(_type="normal", skipme=True)
        self.admin.client_kill_filter(_type="pubsub", skipme=True)

    def commandstats(self):
        """{command: calls} since the last reset, without the bench's own commands."""
        stats = self.admin.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
        return {name: n for name, n in calls.items() if name not in OWN_COMMANDS}

    def reset_stats(self):
        self.admin.config_resetstat()

    def cpu_seconds(self):
        """CPU seconds (user + system, all its threads) redis-server has used since it started."""
        cpu = self.admin.info("cpu")
        return cpu["used_cpu_sys"] + cpu["used_cpu_user"]

    def key_bytes(self, key):
        return self.admin.memory_usage(key, samples=0)

    def used_memory(self):
        return self.admin.info("memory")["used_memory"]

    def keyspace_bytes(self):
        """Sum of MEMORY USAGE over every key: the data, without Redis's own tables and buffers."""
        with self.admin.pipeline(transaction=False) as pipe:
            for key in self.admin.scan_iter(count=1000):
                pipe.memory_usage(key, samples=0)
            return sum(pipe.execute())

    def stop(self):
        self.admin.close()  # reconnects by itself after a restart
        super().stop()


class ClusterBenchServer(RedisCluster):
    """The bench's local Redis Cluster: 3 masters, no replicas (the cost of spreading keys
    over nodes, not of replication), with :class:`BenchServer`'s counters summed over the
    masters. On one 2-CPU machine it shows what the cluster costs, not how it scales."""

    def __init__(self):
        super().__init__(masters=3, replicas=0)
        self._admins = [redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
                        for port in self.ports]

    def url_for(self, scheme="sheppy"):
        return f"{scheme}+cluster://" + ";".join(f"127.0.0.1:{port}" for port in self.ports) + "/"

    def reset(self):
        """Every node emptied and its counters zeroed (a restart of the whole cluster would
        cost seconds per measurement; the memory rows of this side are sums, for reading
        beside the others, not targets)."""
        for admin in self._admins:
            admin.flushall()
        self.reset_stats()

    def reset_stats(self):
        for admin in self._admins:
            admin.config_resetstat()

    def drop_clients(self):
        for admin in self._admins:
            admin.client_kill_filter(_type="normal", skipme=True)
            admin.client_kill_filter(_type="pubsub", skipme=True)

    def commandstats(self):
        total = {}
        for admin in self._admins:
            for name, value in admin.info("commandstats").items():
                name = name.removeprefix("cmdstat_")
                if name not in OWN_COMMANDS:
                    total[name] = total.get(name, 0) + value["calls"]
        return total

    def key_bytes(self, key):
        for admin in self._admins:
            try:
                return admin.memory_usage(key, samples=0)
            except redis.ResponseError:  # MOVED: another master owns the key's slot
                continue
        return None

    def used_memory(self):
        return sum(admin.info("memory")["used_memory"] for admin in self._admins)

    def keyspace_bytes(self):
        total = 0
        for admin in self._admins:
            with admin.pipeline(transaction=False) as pipe:
                for key in admin.scan_iter(count=1000):
                    pipe.memory_usage(key, samples=0)
                total += sum(pipe.execute())
        return total

    def close(self):
        for admin in self._admins:
            admin.close()
        super().close()


class Worker:
    """``celery -A bench.app worker`` in its own process group; use it as a context manager."""

    def __init__(self, broker, backend, pool, concurrency, profile_to=None, queues=("celery",)):
        """``profile_to``: a path where the worker's main process writes its cProfile
        stats when it exits; its pool children write theirs beside it (bench/app.py).
        ``queues``: the task queues it consumes (``-Q``)."""
        self.ready_file = Path(tempfile.mkdtemp(prefix="celery-sheppy-bench-worker-"), "ready")
        self.log = self.ready_file.with_name("worker.log")
        env = dict(os.environ, BENCH_BROKER=broker, BENCH_BACKEND=backend,
                   BENCH_READY_FILE=str(self.ready_file),
                   **({"BENCH_PROFILE_CHILDREN": str(Path(profile_to).parent)} if profile_to else {}),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        # Celery's defaults (mingle, gossip, heartbeat on), as users run workers.
        profile = ["-m", "cProfile", "-o", str(profile_to)] if profile_to else []
        cmd = [sys.executable, *profile, "-m", "celery", "-A", "bench.app", "worker", "-P", pool,
               "-c", str(concurrency), "-Q", ",".join(queues), "-l", "WARNING",
               "-n", f"bench{free_port()}@%h"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=ROOT, start_new_session=True)
        atexit.register(self._clean_up)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:  # the worker's own words are the best clue
            print(f"worker log (end):\n{self.tail()}", file=sys.stderr)
        self.stop()

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start")
            time.sleep(0.05)

    def cpu_seconds(self):
        """``(main process, pool children)`` CPU seconds (user + system) so far; Linux only."""
        tick = os.sysconf("SC_CLK_TCK")
        main, children = 0.0, 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid, used = int(stat.parent.name), int(fields[1]), int(fields[11]) + int(fields[12])
            if pid == self.process.pid:
                main += used / tick
            elif ppid == self.process.pid:
                children += used / tick
        return main, children

    def is_ready(self):
        """Whether the worker has consumed (its ready file exists); raise when it has exited."""
        if self.ready_file.exists():
            return True
        self.check()
        return False

    def check(self):
        """Raise when the worker has exited: waiting for its results would be in vain."""
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited with status {self.process.returncode}")

    def tail(self, chars=3000):
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout=20):
        """Warm shutdown (SIGTERM), then SIGKILL for whatever is left of the group."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        shutil.rmtree(self.ready_file.parent, ignore_errors=True)

    def _clean_up(self):
        """At exit, for a worker whose ``stop()`` never came (an interrupted run)."""
        if self.process.poll() is None:
            self.kill()
        shutil.rmtree(self.ready_file.parent, ignore_errors=True)

    def kill(self):
        """SIGKILL the worker's process group: the worker and its pool children."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def process_tree_usage(roots):
    """``(CPU seconds, resident bytes)`` of the processes ``roots`` and all their descendants:
    user + system time so far, and the sum of their RSS now. Linux only (reads /proc once)."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    stats = {}  # pid: (ppid, CPU ticks, resident pages)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we read
            continue
        # After the name: state, ppid, ... utime (14th field of the line), stime, ..., rss (24th).
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]),
                                        int(fields[21]))
    children = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks = pages = 0
    todo = [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        ticks += stats[pid][1]
        pages += stats[pid][2]
        todo.extend(children.get(pid, ()))
    return ticks / tick, pages * page

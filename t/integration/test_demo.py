"""The README's main command, ``scripts/demo`` (``python -m examples.demo``), runs to the end.

The demo starts its own redis-server (or topology) and a default ``celery worker -P prefork
-c 2``, runs a task, a failing task, a group, a chord and a task reporting progress, and
prints the keys they left. Each case runs it as a user does, in a subprocess, and checks
what it printed; a result that never comes makes the demo exit non-zero (its waits time out).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_cluster

ROOT = Path(__file__).resolve().parents[2]

#: Lines the demo prints once every step worked.
EXPECTED = [
    r"add\(2, 3\) -> 5 ",
    r"fail\('boom'\) -> FAILURE: ValueError\('boom'\)",
    r"add\(i, i\) for i in 0\.\.9 -> \[0, 2, 4, 6, 8, 10, 12, 14, 16, 18\]",
    r"tsum\(add\(i, i\) for i in 0\.\.9\) -> 90",
    r"on_message: PROGRESS",
    r"sheppy:tasks:\{?celery[.0-9]*\}?:<id>\s+string",  # {celery.N}: a Cluster's result shards
    r"sheppy:finished:\{?celery[.0-9]*\}?\s+stream",
    r"worker stopped",
]


def run_demo(*args):
    proc = subprocess.run([sys.executable, "-m", "examples.demo", *args], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    for pattern in EXPECTED:
        assert re.search(pattern, output), f"{pattern!r} not in the demo's output:\n{output}"
    return output


def test_demo_on_its_own_redis_server_runs_every_step_and_stops_what_it_started():
    output = run_demo()
    pid = re.search(r"redis-server started on 127\.0\.0\.1:\d+ \(pid (\d+)\)", output)
    assert pid and f"redis-server (pid {pid[1]}) stopped" in output
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid[1]), 0)  # gone, not only said to be


@pytest.mark.parametrize("topology", ["sentinel", pytest.param("cluster", marks=needs_cluster)])
def test_demo_on_a_local_topology_runs_every_step(topology):
    assert "redis-servers stopped" in run_demo("--topology", topology)

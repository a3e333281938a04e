# Shared shell bits for scripts/*. Source it:  . "$(dirname "$0")/lib.sh"
# shellcheck shell=bash

set -euo pipefail

# Repository root: the parent of the directory holding this file.
PG_REDIS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PG_REDIS_ROOT

# cargo-pgrx reads its config (which pg_config to use) from $PGRX_HOME/config.toml.
# Keep it in the repo so nothing depends on ~/.pgrx.
# An already exported PGRX_HOME wins (a relocated PostgreSQL for a second checkout).
export PGRX_HOME="${PGRX_HOME:-$PG_REDIS_ROOT/pgrx-config}"

PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
PG_BINDIR="${PG_BINDIR:-$("$PG_CONFIG" --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)}"
export PG_CONFIG PG_BINDIR

# cargo installs binaries under ~/.cargo/bin; make sure they are found.
if [ -d "${CARGO_HOME:-$HOME/.cargo}/bin" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    export PATH
fi

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if is_root; then "$@"; else sudo "$@"; fi
}

# Run a command as the `postgres` OS user when we are root (initdb refuses root),
# as ourselves otherwise.
as_pg_user() {
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# A free TCP port on 127.0.0.1 (the kernel picks one).
free_port() {
    /usr/bin/python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

"""Integration harness for pg_redis: throwaway PostgreSQL 15 clusters and redis-servers.

Everything here starts real processes on free ports in temporary directories and
guarantees they are stopped and the directories removed, even when a test fails
(pytest finalizers, plus an atexit hook that kills whatever is still registered).

    from harness import RedisServer, PgCluster, expect_error

    r = RedisServer()                 # started, PING answered
    pg = PgCluster(conf_lines=[f"pg_redis.url = '{r.url}'"])
    pg.sql("SELECT redis_ping()")     # -> [('PONG',)]
    pg.stop(); r.stop()

Run as root, PostgreSQL runs as the `postgres` OS user (initdb refuses root);
otherwise as the current user. The PostgreSQL superuser is always `postgres`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import psycopg
import redis as redis_py

PG_BINDIR = Path(os.environ.get("PG_REDIS_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
REDIS_SERVER = os.environ.get("PG_REDIS_REDIS_SERVER", shutil.which("redis-server") or "/usr/bin/redis-server")
TMP_BASE = os.environ.get("PG_REDIS_TEST_TMP", "/tmp")

IS_ROOT = os.geteuid() == 0
PG_OS_USER = "postgres" if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name

# Everything started and not yet cleaned up; the atexit hook stops it.
_LIVE: "set[object]" = set()
_LIVE_LOCK = threading.Lock()


def _register(obj) -> None:
    with _LIVE_LOCK:
        _LIVE.add(obj)


def _unregister(obj) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(obj)


@atexit.register
def _cleanup_all() -> None:
    with _LIVE_LOCK:
        objs = list(_LIVE)
    for obj in objs:
        with contextlib.suppress(Exception):
            obj.cleanup()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll pred() until it returns a truthy value; raise TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - we retry on anything
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def _make_tmpdir(prefix: str, owner: str | None = None) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=TMP_BASE))
    if owner and IS_ROOT:
        pw = pwd.getpwnam(owner)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    d.chmod(0o755)
    return d


def _rmtree(d: Path | None) -> None:
    if d is not None:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Redis


class RedisServer:
    """A redis-server on 127.0.0.1:port that we own (not daemonized: we hold its pid).

    extra_args go to redis-server as is, e.g. ["--requirepass", "secret123"] or
    ["--unixsocket", "/tmp/x/redis.sock", "--unixsocketperm", "777"].
    """

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = (), start: bool = True):
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.dir = _make_tmpdir("pg_redis_redis_")
        self.logfile = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.password = None
        args = self.extra_args
        for i, a in enumerate(args):
            if a == "--requirepass" and i + 1 < len(args):
                self.password = args[i + 1]
        _register(self)
        if start:
            self.start()

    # -- addresses
    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unixsocket(self) -> str | None:
        for i, a in enumerate(self.extra_args):
            if a == "--unixsocket" and i + 1 < len(self.extra_args):
                return self.extra_args[i + 1]
        return None

    def client(self, **kw) -> redis_py.Redis:
        """A redis-py client (bytes replies). Keyword arguments override the defaults."""
        opts = dict(host="127.0.0.1", port=self.port, db=0, password=self.password,
                    decode_responses=False, socket_timeout=30)
        opts.update(kw)
        return redis_py.Redis(**opts)

    # -- lifecycle
    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--enable-debug-command", "yes",
               "--dir", str(self.dir), "--logfile", str(self.logfile), "--daemonize", "no",
               *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.read_log()[-2000:]}")
            c = self.client(socket_timeout=1, socket_connect_timeout=1)
            try:
                return c.ping()
            finally:
                c.close()
        try:
            wait_for(up, timeout, what=f"redis-server on port {self.port}")
        except RuntimeError:
            raise

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN NOSAVE; terminate/kill if that does not work."""
        if not self.running():
            return
        with contextlib.suppress(Exception):
            self.resume()  # a stopped process cannot shut down
            c = self.client(socket_timeout=2, socket_connect_timeout=1)
            with contextlib.suppress(redis_py.exceptions.ConnectionError):
                c.shutdown(nosave=True)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL the server (and its process group)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering; connections stay open."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGCONT)

    def client_pause(self, ms: int, mode: str = "ALL") -> None:
        """CLIENT PAUSE ms: Redis holds every client's commands for ms milliseconds."""
        c = self.client()
        try:
            c.execute_command("CLIENT", "PAUSE", str(ms), mode)
        finally:
            c.close()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port (data is lost: no persistence)."""
        self.stop()
        self.start(timeout)

    def read_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self.stop(timeout=3)
        finally:
            self.kill()
            _rmtree(self.dir)
            _unregister(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def __repr__(self):
        return f"RedisServer(port={self.port}, pid={self.pid})"


# --------------------------------------------------------------------------------------
# PostgreSQL


class PgCluster:
    """A throwaway PostgreSQL 15 cluster, reachable only over a unix socket in its temp dir.

    conf_lines are appended to postgresql.conf; preload adds
    shared_preload_libraries = 'pg_redis'; fsync=False (default) turns fsync and
    synchronous_commit off for speed.
    """

    def __init__(self, conf_lines: Iterable[str] = (), preload: bool = True, fsync: bool = False,
                 start: bool = True, port: int | None = None):
        self.port = port or free_port()
        self.preload = preload
        self.dir = _make_tmpdir("pg_redis_pg_", owner=PG_OS_USER)
        self.datadir = self.dir / "data"
        self.sockdir = self.dir  # unix socket .s.PGSQL.<port> lives here
        self.logfile = self.dir / "postgresql.log"
        _register(self)
        self._run([str(PG_BINDIR / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                  what="initdb")
        lines = [
            "# --- pg_redis test harness ---",
            f"port = {self.port}",
            "listen_addresses = ''",
            f"unix_socket_directories = '{self.sockdir}'",
            "max_connections = 50",
            "shared_buffers = 32MB",
            "log_min_messages = info",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "log_statement = 'none'",
        ]
        if not fsync:
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        if preload:
            lines.append("shared_preload_libraries = 'pg_redis'")
        lines += list(conf_lines)
        self.set_conf(lines)
        if start:
            self.start()

    # -- helpers
    def _run(self, cmd: list[str], what: str, check: bool = True, timeout: float = 120,
             input: str | None = None) -> subprocess.CompletedProcess:
        if IS_ROOT:
            cmd = ["runuser", "-u", PG_OS_USER, "--", *cmd]
        # The server must not inherit RUST_BACKTRACE: pgrx would put a Rust backtrace in the
        # DETAIL of every error (users never see that).
        env = {k: v for k, v in os.environ.items() if k not in ("RUST_BACKTRACE", "RUST_LIB_BACKTRACE")}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                           cwd=str(self.dir), env=env)
        if check and p.returncode != 0:
            raise RuntimeError(f"{what} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}\n"
                               f"--- server log tail ---\n{self.read_log()[-3000:]}")
        return p

    def _pg_ctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self._run([str(PG_BINDIR / "pg_ctl"), "-D", str(self.datadir), *args],
                         what=f"pg_ctl {' '.join(args)}", check=check, timeout=timeout)

    # -- configuration
    def set_conf(self, lines: Iterable[str]) -> None:
        """Append lines to postgresql.conf (later lines win). Call reload() or restart() after."""
        conf = self.datadir / "postgresql.conf"
        with open(conf, "a") as f:
            for line in lines:
                f.write(line.rstrip("\n") + "\n")

    def reload(self) -> None:
        self._pg_ctl("reload")
        time.sleep(0.2)  # the postmaster signals backends asynchronously

    # -- lifecycle
    def start(self, timeout: int = 60) -> None:
        self._pg_ctl("start", "-w", "-t", str(timeout), "-l", str(self.logfile), timeout=timeout + 10)

    def stop(self, mode: str = "fast") -> None:
        if self.running():
            self._pg_ctl("stop", "-w", "-m", mode, check=False)

    def crash(self) -> None:
        """Immediate shutdown: no checkpoint, crash recovery at the next start."""
        self.stop(mode="immediate")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def cleanup(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self._pg_ctl("stop", "-w", "-m", "immediate", check=False, timeout=30)
            pid = self.postmaster_pid()
            if pid and self.running():
                with contextlib.suppress(Exception):
                    os.kill(pid, signal.SIGKILL)
        finally:
            _rmtree(self.dir)
            _unregister(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    # -- clients
    def conninfo(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host={self.sockdir} port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname: str = "postgres", user: str = "postgres", autocommit: bool = True,
                **kw) -> psycopg.Connection:
        return psycopg.connect(host=str(self.sockdir), port=self.port, dbname=dbname, user=user,
                               autocommit=autocommit, connect_timeout=10, **kw)

    def sql(self, query: str, *params, dbname: str = "postgres", user: str = "postgres"):
        """Run one statement in a fresh autocommit session; return its rows (or [])."""
        with self.connect(dbname=dbname, user=user) as conn:
            cur = conn.execute(query, params if params else None)
            return cur.fetchall() if cur.description else []

    def create_role(self, name: str, superuser: bool = False, login: bool = True) -> str:
        opts = ("SUPERUSER" if superuser else "NOSUPERUSER") + (" LOGIN" if login else "")
        self.sql(f'CREATE ROLE "{name}" {opts}')
        return name

    def psql(self, args: Sequence[str] = (), input: str | None = None, dbname: str = "postgres",
             user: str = "postgres", check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(PG_BINDIR / "psql"), "-X", "-h", str(self.sockdir), "-p", str(self.port),
               "-U", user, "-d", dbname, "-v", "ON_ERROR_STOP=1", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=120)
        if check and p.returncode != 0:
            raise RuntimeError(f"psql failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    # -- server log
    def read_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_position(self) -> int:
        """Current size of the log: pass to read_log_since() to see only what came after."""
        try:
            return self.logfile.stat().st_size
        except FileNotFoundError:
            return 0

    def read_log_since(self, pos: int) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(pos)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self):
        return f"PgCluster(port={self.port}, dir={self.dir})"


# --------------------------------------------------------------------------------------
# Assertions


def expect_error(conn: psycopg.Connection, query: str, params=None, sqlstate: str | Sequence[str] | None = None,
                 prefix: str = "pg_redis:") -> psycopg.Error:
    """Run query, assert it fails; check the SQLSTATE (exact code, or a 2-char class, or any of a
    list) and that the primary message starts with prefix. Returns the exception."""
    try:
        cur = conn.execute(query, params)
        rows = cur.fetchall() if cur.description else None
    except psycopg.Error as e:
        msg = e.diag.message_primary or str(e)
        if sqlstate is not None:
            wanted = [sqlstate] if isinstance(sqlstate, str) else list(sqlstate)
            ok = any(e.sqlstate == w or (len(w) == 2 and (e.sqlstate or "").startswith(w)) for w in wanted)
            assert ok, (f"{query!r}: expected SQLSTATE {wanted}, got {e.sqlstate}: {msg!r} "
                        f"(detail: {e.diag.message_detail!r})")
        if prefix is not None:
            assert msg.startswith(prefix), f"{query!r}: message should start with {prefix!r}: {msg!r}"
        return e
    raise AssertionError(f"{query!r} should have failed (sqlstate {sqlstate}) but returned {rows!r}")


def backend_alive(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT 1").fetchone() == (1,)

"""Fault injection: one thread runs a schedule's faults, one after the other, on the run's
redis-server and PostgreSQL cluster, and records when each began and ended."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .schedules import Fault


@dataclass
class Done:
    fault: Fault
    start: float          # seconds since the run's start
    end: float
    detail: str = ""
    error: str = ""


class Log:
    """Timestamped, thread-safe printing (and a copy of every line)."""

    def __init__(self, t0: float, quiet: bool = False):
        self.t0 = t0
        self.quiet = quiet
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, msg: str, always: bool = False):
        line = f"[{self.now():8.3f}s] {msg}"
        with self._lock:
            self.lines.append(line)
            if always or not self.quiet:
                print(line, flush=True)


def pg_sql(pg, query: str, params=None, tries: int = 50):
    """One statement in a fresh session, retried while PostgreSQL starts."""
    last = None
    for _ in range(tries):
        try:
            with pg.connect(application_name="checker-admin") as c:
                cur = c.execute(query, params)
                return cur.fetchall() if cur.description else []
        except Exception as e:  # noqa: BLE001
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"{query!r} failed: {last!r}")


class FaultRunner(threading.Thread):
    def __init__(self, env, faults: list[Fault], log: Log, stop: threading.Event):
        super().__init__(name="faults", daemon=True)
        self.env = env
        self.faults = faults
        self.log = log
        self.stop_ev = stop
        self.done: list[Done] = []
        self.oom_seen = False
        self.wiped = False
        self.current: Fault | None = None
        self.load_t0 = 0.0   # log time at which the load started (fault times are relative to it)

    def run(self):
        for f in self.faults:
            delay = self.load_t0 + f.at - self.log.now()
            if delay > 0 and self.stop_ev.wait(delay):
                break
            self.current = f
            start = self.log.now()
            self.log(f"FAULT {f} begins")
            d = Done(f, start, start)
            try:
                d.detail = getattr(self, f"_{f.kind}")(f) or ""
            except Exception as e:  # noqa: BLE001 - recorded and reported
                d.error = repr(e)
                self.log(f"FAULT {f.kind} failed: {e!r}", always=True)
            d.end = self.log.now()
            self.done.append(d)
            self.current = None
            self.log(f"FAULT {f.kind} ends ({d.end - d.start:.2f}s){': ' + d.detail if d.detail else ''}")

    # -- the faults
    def _redis_kill(self, f: Fault):
        r = self.env.redis
        r.kill()
        time.sleep(f.length)
        r.start()
        return f"pid {r.pid} after restart"

    def _redis_pause(self, f: Fault):
        r = self.env.redis
        r.pause()
        try:
            time.sleep(f.length)
        finally:
            r.resume()

    def _client_kill(self, f: Fault):
        c = self.env.redis.client(socket_timeout=5)
        try:
            n = c.execute_command("CLIENT", "KILL", "TYPE", "normal")
        finally:
            c.close()
        return f"{n} connections killed"

    def _worker_kill(self, f: Fault):
        """Terminate the worker; it must be back (a new pid in redis_stats) within 5 s: the docs
        say a worker that stops is restarted after 1 s."""
        rows = pg_sql(self.env.pg, "SELECT worker_pid, pg_terminate_backend(worker_pid) FROM redis_stats "
                                   "WHERE worker_pid IS NOT NULL LIMIT 1")
        if not rows:
            raise RuntimeError("no worker was running to terminate")
        old = rows[0][0]
        t = time.monotonic()
        while time.monotonic() - t < 5.0:
            new = pg_sql(self.env.pg, "SELECT max(worker_pid) FROM redis_stats")[0][0]
            if new is not None and new != old:
                return f"worker {old} terminated; restarted as {new} after {time.monotonic() - t:.1f}s"
            time.sleep(0.1)
        raise RuntimeError(f"worker {old} terminated and not restarted within 5 s (no delivery until the "
                           f"server restarts)")

    def _pg_crash(self, f: Fault):
        pg = self.env.pg
        pg.crash()
        time.sleep(f.length)
        pg.start()
        return f"postmaster {pg.postmaster_pid()} after recovery"

    def _oom(self, f: Fault):
        c = self.env.redis.client(socket_timeout=5)
        try:
            used = int(c.info("memory")["used_memory"])
            c.config_set("maxmemory-policy", "noeviction")
            c.config_set("maxmemory", str(max(1, used // 2)))
            self.oom_seen = True
            self.env.oom_active = True
            time.sleep(f.length)
        finally:
            with contextlib.suppress(Exception):
                c.config_set("maxmemory", "0")
            self.env.oom_active = False
            c.close()
        return f"maxmemory {used // 2} (used {used})"

    def _failover(self, f: Fault):
        """Crash the primary under load (immediate shutdown, left down), promote the standby, and
        point everyone at it."""
        env = self.env
        old = env.pg.target
        sb = env.standby
        if sb is None:
            raise RuntimeError("no standby to fail over to")
        held = ""
        if getattr(env, "standby_mode", None) == "async":
            # Replication falls behind (a slow network): the walreceiver is held for 1.5 s while the
            # primary goes on committing (asynchronously) and its worker delivering; then the crash.
            import os
            import signal
            wr = sb.sql("SELECT pid FROM pg_stat_wal_receiver")
            if wr and wr[0][0]:
                os.kill(wr[0][0], signal.SIGSTOP)
                time.sleep(1.5)
                held = f"walreceiver {wr[0][0]} held (SIGSTOP) for 1.5 s before the crash; "
                env.held_walreceiver = wr[0][0]
        lag = None
        with contextlib.suppress(Exception):
            lag = old.sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, sync_state "
                          "FROM pg_stat_replication")
        old.crash()
        t = time.monotonic()
        if getattr(env, "held_walreceiver", None):
            import os
            import signal
            with contextlib.suppress(ProcessLookupError):
                os.kill(env.held_walreceiver, signal.SIGCONT)
        time.sleep(f.length)
        sb.promote()
        env.pg.target = sb
        env.standby = None
        env.old_primaries.append(old)
        return (f"{held}primary crashed and left down (standby replay lag then: {lag}); standby promoted "
                f"{time.monotonic() - t:.2f}s later, postmaster {sb.postmaster_pid()}")

    _redis_oom = _oom
    _redis_oom_long = _oom

    def _redis_wipe(self, f: Fault):
        r = self.env.redis
        r.kill()
        for p in Path(r.dir).iterdir():
            if p.name.startswith("appendonly") or p.suffix in (".aof", ".rdb"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        r.start()
        self.wiped = True
        rows = pg_sql(self.env.pg, "SELECT sum(redis_resync(mirror)) FROM redis_mirrors")
        return f"Redis restarted empty; redis_resync scheduled {rows[0][0]} rows"

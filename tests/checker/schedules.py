"""Fault schedules. A schedule turns (seed, duration) into a list of faults, one after the other
with random gaps, plus the server settings it needs.

Fault kinds (see faults.py for what each does):
  redis_kill     SIGKILL redis-server, keep it down 0.5-4 s, start it again (AOF with
                 appendfsync always: acknowledged writes survive, as with a real persistent Redis)
  redis_pause    SIGSTOP redis-server for 1.5-4 s (past pg_redis.command_timeout = 1s), SIGCONT
  client_kill    CLIENT KILL TYPE normal: every connection of the worker and the backends
  worker_kill    pg_terminate_backend(worker_pid) (the postmaster restarts it after 1 s)
  pg_crash       pg_ctl stop -m immediate, down 0-2 s, start (crash recovery)
  redis_oom      CONFIG SET maxmemory below used_memory, maxmemory-policy noeviction for 2-8 s
                 (every write is refused with OOM; DEL still works), then maxmemory 0
  redis_oom_long as redis_oom for 25-40 s: past pg_redis.max_attempts, changes go to the dead
                 letters; the checker then runs redis_retry() before comparing
  redis_wipe     SIGKILL redis-server, delete its AOF, start it empty, then redis_resync() every
                 mirror under the running load (Redis lost its data)
  failover       (schedules with a standby) the primary crashed (immediate shutdown) under load and
                 left down, the streaming standby promoted; clients reconnect to it
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

ALL_KINDS = ["redis_kill", "redis_pause", "client_kill", "worker_kill", "pg_crash", "redis_oom"]


@dataclass
class Fault:
    at: float            # seconds after the load started
    kind: str
    length: float = 0.0  # how long the fault lasts (down / paused / full)

    def __str__(self):
        return f"{self.kind}" + (f" for {self.length:.1f}s" if self.length else "")


@dataclass
class Schedule:
    name: str
    description: str
    kinds: list[str]                 # drawn at random (weights equal) unless `fixed`
    gap: tuple[float, float] = (1.0, 4.0)
    conf: list[str] = field(default_factory=list)   # extra postgresql.conf lines
    fixed: list[str] | None = None   # a fixed order, repeated while time remains (unless not repeat)
    first_at: float = 2.0
    repeat: bool = True
    standby: str | None = None       # 'sync' / 'async': a streaming standby (for 'failover')

    def faults(self, seed: int, duration: float) -> list[Fault]:
        rnd = random.Random(f"{seed}:{self.name}")
        out: list[Fault] = []
        if not (self.fixed or self.kinds):
            return out
        t = self.first_at
        i = 0
        while True:
            if self.fixed is not None:
                if not self.repeat and i >= len(self.fixed):
                    break
                kind = self.fixed[i % len(self.fixed)]
            else:
                kind = rnd.choice(self.kinds)
            i += 1
            length = fault_length(kind, rnd)
            if t + length > duration - 1.0:
                break
            out.append(Fault(round(t, 2), kind, round(length, 2)))
            t += length + rnd.uniform(*self.gap)
        return out


def fault_length(kind: str, rnd: random.Random) -> float:
    return {
        "redis_kill": rnd.uniform(0.5, 4.0),
        "redis_pause": rnd.uniform(1.5, 4.0),
        "client_kill": 0.0,
        "worker_kill": 0.0,
        "pg_crash": rnd.uniform(0.0, 2.0),
        "redis_oom": rnd.uniform(2.0, 8.0),
        "redis_oom_long": rnd.uniform(25.0, 40.0),
        "redis_wipe": 0.0,
        "failover": rnd.uniform(0.2, 1.0),
    }[kind]


SCHEDULES: dict[str, Schedule] = {s.name: s for s in [
    Schedule("none", "no faults: the baseline (concurrency only)", kinds=[], fixed=[], first_at=1e9),
    Schedule("mixed", "every fault kind, in random order, 1-4 s apart", kinds=ALL_KINDS),
    Schedule("redis", "Redis faults only: killed, paused, full, its clients killed", gap=(0.5, 3.0),
             kinds=["redis_kill", "redis_pause", "client_kill", "redis_oom"]),
    Schedule("postgres", "PostgreSQL faults only: crashes (immediate shutdown) and the worker terminated",
             kinds=["pg_crash", "pg_crash", "worker_kill"], gap=(1.0, 5.0)),
    Schedule("sync-commit-off",
             "synchronous_commit = off (wal_writer_delay 2s, so commits sit unflushed) and frequent "
             "crashes: acknowledged commits are lost, and Redis must not hold any of them",
             kinds=["pg_crash", "pg_crash", "pg_crash", "worker_kill", "redis_pause"], gap=(1.0, 4.0),
             conf=["synchronous_commit = off", "wal_writer_delay = '2s'", "wal_writer_flush_after = '1GB'"]),
    Schedule("wipe", "Redis loses its data (killed, AOF removed) and every mirror is resynced under load",
             kinds=["redis_wipe", "client_kill", "redis_pause"], gap=(3.0, 8.0)),
    Schedule("oom-long", "Redis full long enough for changes to reach max_attempts: dead letters, "
             "then redis_retry() before the comparison", kinds=["redis_oom_long"], fixed=["redis_oom_long", "pg_crash"],
             gap=(3.0, 6.0)),
    Schedule("failover", "a streaming standby with synchronous replication (synchronous_standby_names = '*'); "
             "the primary crashed under load and the standby promoted; Redis must equal the promoted "
             "database", kinds=[], fixed=["redis_pause", "client_kill", "failover", "redis_kill", "pg_crash",
                                          "client_kill"], repeat=False, gap=(2.0, 4.0), standby="sync"),
    Schedule("failover-async", "as failover, with asynchronous streaming replication (the default), the "
             "standby's walreceiver held 1.5 s before the crash: the old primary's worker may have delivered "
             "commits the standby never received", kinds=[],
             fixed=["redis_pause", "failover", "redis_kill", "pg_crash"], repeat=False, gap=(2.0, 4.0),
             standby="async", first_at=8.0),
    Schedule("failover-async-wait", "as failover-async, with pg_redis.standby_names = '*': the worker "
             "delivers only what the standby has flushed, so Redis is never ahead of the promoted database",
             kinds=[], fixed=["redis_pause", "failover", "redis_kill", "pg_crash"], repeat=False, gap=(2.0, 4.0),
             standby="async", first_at=8.0, conf=["pg_redis.standby_names = '*'"]),
    Schedule("ci", "short fixed sequence for CI: one fault of each kind", kinds=ALL_KINDS, gap=(1.0, 2.0),
             fixed=["redis_pause", "client_kill", "pg_crash", "redis_kill", "worker_kill", "redis_oom"]),
]}

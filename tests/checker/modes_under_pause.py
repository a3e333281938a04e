"""Guarantees per mode, measured (issue 6, item 3).

    /usr/bin/python3 -m tests.checker.modes_under_pause [--n 100] [--outage SECONDS --rate N]

With Redis paused (SIGSTOP: connections stay open, nothing answers) and then with Redis stopped
(connections refused), one session per mode runs single-row autocommit INSERTs on a mirrored table:

  queue   COMMIT latency must stay normal (the change waits in the queue);
  commit  COMMIT must return within pg_redis.commit_wait_timeout (1s here), with a WARNING, and
          the row committed (delivered after Redis is back);
  sync    the statement must fail within pg_redis.command_timeout (1s here) with a pg_redis:
          error of class 08 or 57014, and nothing commit.

Afterwards Redis is resumed / restarted and every table must equal Redis (redis_verify).
Prints a table of latencies; exits non-zero when a bound is broken.

--outage SECONDS (e.g. 1800 for the 30-minute outage of issue 6): Redis stopped for that long
while a steady load (--rate commits per second, queue mode) runs; every 10 s it prints the queue
depth, the queue table's size and dead tuples and the commit latency, then restarts Redis and
reports how long the backlog takes to drain and what the queue table looks like afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import psycopg  # noqa: E402

from harness import PgCluster, RedisServer  # noqa: E402

COMMAND_TIMEOUT = 1.0
COMMIT_WAIT = 1.0


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(x):
    return f"{x * 1000:8.1f}"


class Session:
    def __init__(self, pg, table):
        self.table = table
        self.conn = pg.connect(application_name=f"modes-{table}")
        self.warnings = []
        self.conn.add_notice_handler(lambda d: self.warnings.append(d.message_primary or "")
                                     if d.severity == "WARNING" else None)
        self.next_id = 1

    def insert(self):
        """One autocommit INSERT; returns (seconds, error or None, warned)."""
        i = self.next_id
        self.next_id += 1
        self.warnings.clear()
        t = time.monotonic()
        try:
            self.conn.execute(f"INSERT INTO {self.table} VALUES (%s, %s)", (i, f"v{i}"))
            err = None
        except psycopg.Error as e:
            err = e
        dt = time.monotonic() - t
        return dt, err, any("pg_redis" in w for w in self.warnings), i


def measure(sessions, n_fast, n_slow):
    out = {}
    for mode, s in sessions.items():
        n = n_fast if mode == "queue" else n_slow
        out[mode] = [s.insert() for _ in range(n)]
    return out


def table_rows(pg, table):
    return {r[0] for r in pg.sql(f"SELECT id FROM {table}")}


def wait_drained(pg, timeout=120):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if pg.sql("SELECT coalesce(sum(queue_depth), 0) FROM redis_stats")[0][0] == 0:
            return time.monotonic() - t
        time.sleep(0.05)
    return None


def verify_all(pg, tables):
    bad = {}
    for t in tables:
        row = pg.sql("SELECT checked, missing, stale, extra FROM redis_verify(%s::regclass)", t)[0]
        if row[1] or row[2] or row[3]:
            bad[t] = row
    return bad


def run_modes(n: int) -> int:
    redis = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
    pg = PgCluster(conf_lines=[f"pg_redis.url = '{redis.url}'", "synchronous_commit = on"])
    failures = []
    try:
        with pg.connect() as c:
            c.execute("CREATE EXTENSION pg_redis")
            c.execute(f"ALTER SYSTEM SET pg_redis.command_timeout = '{int(COMMAND_TIMEOUT * 1000)}ms'")
            c.execute(f"ALTER SYSTEM SET pg_redis.commit_wait_timeout = '{int(COMMIT_WAIT * 1000)}ms'")
            c.execute("SELECT pg_reload_conf()")
            for mode in ("queue", "commit", "sync"):
                c.execute(f"CREATE TABLE m_{mode} (id int PRIMARY KEY, v text)")
                c.execute(f"SELECT redis_mirror('m_{mode}', mode => '{mode}')")
        time.sleep(1.0)
        tables = [f"m_{m}" for m in ("queue", "commit", "sync")]
        connect_timeout = pg.sql("SELECT current_setting('pg_redis.connect_timeout')")[0][0]
        sessions = {m: Session(pg, f"m_{m}") for m in ("queue", "commit", "sync")}
        measure(sessions, 20, 5)  # warm-up: connections to Redis opened, plans cached
        results = {"up": measure(sessions, n, max(10, n // 5)), "connect_timeout": connect_timeout}
        for phase, down, up in (("paused", redis.pause, redis.resume), ("stopped", redis.stop, redis.start)):
            down()
            t_down = time.monotonic()
            try:
                results[phase] = measure(sessions, n, max(10, n // 5))
            finally:
                held = time.monotonic() - t_down
                up()
            drained = wait_drained(pg)
            results[phase + "_drain"] = drained
            results[phase + "_held"] = held
            if drained is None:
                failures.append(f"{phase}: the queue did not drain within 120 s after Redis came back")
        bad = verify_all(pg, tables)
        if bad:
            failures.append(f"Redis differs from the tables after the outages: {bad}")

        # -- the bounds
        committed = {m: table_rows(pg, f"m_{m}") for m in ("queue", "commit", "sync")}
        up_q = [d for d, e, w, i in results["up"]["queue"]]
        for phase in ("paused", "stopped"):
            r = results[phase]
            q = [d for d, e, w, i in r["queue"]]
            if any(e for d, e, w, i in r["queue"]):
                failures.append(f"{phase}: a queue-mode INSERT failed: {[str(e) for d, e, w, i in r['queue'] if e][:1]}")
            if pct(q, 99) > max(0.05, 5 * pct(up_q, 99)):
                failures.append(f"{phase}: queue-mode commit p99 {pct(q, 99) * 1000:.1f} ms vs {pct(up_q, 99) * 1000:.1f} ms with Redis up")
            silent = [i for d, e, w, i in r["commit"] if e is None and not w]
            if silent:
                failures.append(f"{phase}: {len(silent)}/{len(r['commit'])} commit-mode COMMITs returned without a "
                                f"WARNING although nothing can reach Redis while it is {phase} (docs/guarantees.md: "
                                f"'with a WARNING to the client')")
            for d, e, w, i in r["commit"]:
                if e is not None:
                    failures.append(f"{phase}: a commit-mode INSERT failed: {e}")
                if d > COMMIT_WAIT + 0.3:
                    failures.append(f"{phase}: a commit-mode COMMIT took {d:.3f}s (> commit_wait_timeout {COMMIT_WAIT}s)")
                if i not in committed["commit"]:
                    failures.append(f"{phase}: commit-mode row {i} not committed")
            for d, e, w, i in r["sync"]:
                if e is None:
                    failures.append(f"{phase}: a sync-mode INSERT succeeded with Redis {phase}")
                    continue
                st = e.sqlstate or ""
                msg = e.diag.message_primary or ""
                if not (st.startswith("08") or st == "57014") or not msg.startswith("pg_redis:"):
                    failures.append(f"{phase}: sync-mode error {st} {msg!r} (want 08xxx/57014, 'pg_redis:')")
            slow = [d for d, e, w, i in r["sync"] if e is not None and d > COMMAND_TIMEOUT + 0.5]
            if slow:
                failures.append(f"{phase}: {len(slow)}/{len(r['sync'])} sync-mode statements failed after more than "
                                f"command_timeout ({COMMAND_TIMEOUT:.0f}s): p50 {pct(slow, 50):.3f}s, max {max(slow):.3f}s "
                                f"(= command_timeout + connect_timeout {results['connect_timeout']}: the abandoned link is "
                                f"replaced by a new one whose handshake waits on the stopped server)")
                if i in committed["sync"]:
                    failures.append(f"{phase}: sync-mode row {i} committed although the statement failed")

        # -- the table
        print()
        print(f"pg_redis.command_timeout = {COMMAND_TIMEOUT:.0f}s, pg_redis.commit_wait_timeout = {COMMIT_WAIT:.0f}s, "
              f"pg_redis.connect_timeout = {results['connect_timeout']} (default); "
              f"single-row autocommit INSERTs; latencies in ms (p50 / p99 / max)")
        print(f"{'mode':7s} | {'Redis up':>26s} | {'Redis paused (SIGSTOP)':>26s} | {'Redis stopped':>26s} | outcome while paused / stopped")
        print("-" * 130)
        for mode in ("queue", "commit", "sync"):
            cells = []
            for phase in ("up", "paused", "stopped"):
                ds = [d for d, e, w, i in results[phase][mode]]
                cells.append(f"{ms(pct(ds, 50))}/{ms(pct(ds, 99))}/{ms(max(ds))}")
            outcome = []
            for phase in ("paused", "stopped"):
                r = results[phase][mode]
                if mode == "queue":
                    outcome.append(f"{sum(1 for x in r if x[1] is None)}/{len(r)} committed")
                elif mode == "commit":
                    outcome.append(f"{sum(1 for x in r if x[1] is None)}/{len(r)} committed, {sum(1 for x in r if x[2])} WARNINGs")
                else:
                    sts = sorted({x[1].sqlstate for x in r if x[1] is not None})
                    outcome.append(f"{sum(1 for x in r if x[1] is not None)}/{len(r)} failed ({','.join(sts)})")
            print(f"{mode:7s} | {cells[0]:>26s} | {cells[1]:>26s} | {cells[2]:>26s} | {' / '.join(outcome)}")
        print()
        for phase in ("paused", "stopped"):
            d = results[phase + "_drain"]
            print(f"Redis {phase} for {results[phase + '_held']:.1f}s; backlog delivered "
                  f"{'in %.2fs' % d if d is not None else 'NOT within 120 s'} after it came back")
        sync_err = [x[1] for x in results["paused"]["sync"] if x[1] is not None][:1]
        if sync_err:
            print(f"sync-mode error while paused: {sync_err[0].sqlstate}: {sync_err[0].diag.message_primary}")
        sync_err = [x[1] for x in results["stopped"]["sync"] if x[1] is not None][:1]
        if sync_err:
            print(f"sync-mode error while stopped: {sync_err[0].sqlstate}: {sync_err[0].diag.message_primary}")
        print(f"redis_verify after both outages: {'all equal' if not bad else bad}")
        for f in failures:
            print(f"FAILURE: {f}")
        print("OK" if not failures else f"FAILED ({len(failures)})")
        return 0 if not failures else 1
    finally:
        pg.cleanup()
        redis.cleanup()


def run_outage(seconds: float, rate: float) -> int:
    """A long Redis outage under steady queue-mode load; the queue's growth and the drain."""
    redis = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
    pg = PgCluster(conf_lines=[f"pg_redis.url = '{redis.url}'", "synchronous_commit = on",
                               "autovacuum_naptime = '10s'"])
    failures = []
    try:
        with pg.connect() as c:
            c.execute("CREATE EXTENSION pg_redis")
            c.execute("CREATE TABLE o (id int PRIMARY KEY, v text, n int)")
            c.execute("SELECT redis_mirror('o')")
        stop = threading.Event()
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def load():
            conn = pg.connect(application_name="outage-load")
            i = 0
            period = 1.0 / rate
            nxt = time.monotonic()
            while not stop.is_set():
                i += 1
                t = time.monotonic()
                try:
                    if i % 3 == 0:
                        conn.execute("UPDATE o SET n = n + 1, v = %s WHERE id = %s", (f"u{i}", i // 3))
                    else:
                        conn.execute("INSERT INTO o VALUES (%s, %s, 0)", (i, f"v{i}"))
                except psycopg.Error as e:
                    errors.append(str(e))
                with lock:
                    lat.append(time.monotonic() - t)
                nxt += period
                time.sleep(max(0.0, nxt - time.monotonic()))
            conn.close()

        def sample(label):
            r = pg.sql("SELECT (SELECT coalesce(sum(queue_depth), 0)::bigint FROM redis_stats), "
                       "pg_total_relation_size('redis_internal.queue'), "
                       "(SELECT coalesce(n_dead_tup, 0) FROM pg_stat_all_tables WHERE relid = 'redis_internal.queue'::regclass), "
                       "(SELECT coalesce(n_live_tup, 0) FROM pg_stat_all_tables WHERE relid = 'redis_internal.queue'::regclass), "
                       "(SELECT last_autovacuum FROM pg_stat_all_tables WHERE relid = 'redis_internal.queue'::regclass), "
                       "pg_database_size(current_database())")[0]
            with lock:
                xs = lat[:]
                lat.clear()
            print(f"{label:>10s} queue_depth {r[0]:9d}  queue table {r[1] / 2**20:8.1f} MB  dead {r[2]:8d}  "
                  f"live {r[3]:9d}  db {r[5] / 2**20:8.1f} MB  commit p50 {pct(xs, 50) * 1000:6.2f} ms "
                  f"p99 {pct(xs, 99) * 1000:6.2f} ms  last autovacuum {r[4]}", flush=True)
            return r, xs

        th = threading.Thread(target=load, daemon=True)
        th.start()
        time.sleep(10)
        sample("before")
        redis.stop()
        t0 = time.monotonic()
        print(f"Redis stopped; outage of {seconds:.0f}s under {rate:.0f} commits/s", flush=True)
        p99s = []
        while time.monotonic() - t0 < seconds:
            time.sleep(min(10, seconds - (time.monotonic() - t0)) or 0.01)
            _, xs = sample(f"+{time.monotonic() - t0:.0f}s")
            if xs:
                p99s.append(pct(xs, 99))
        redis.start()
        t1 = time.monotonic()
        print("Redis started again", flush=True)
        while True:
            r, _ = sample(f"drain+{time.monotonic() - t1:.0f}s")
            if r[0] == 0:
                break
            if time.monotonic() - t1 > max(600, seconds):
                failures.append("the backlog did not drain")
                break
            time.sleep(5)
        drain = time.monotonic() - t1
        stop.set()
        th.join(10)
        print(f"backlog drained in {drain:.1f}s (while the load went on)")
        time.sleep(30)
        sample("after+30s")
        bad = verify_all(pg, ["o"])
        print(f"redis_verify: {'equal' if not bad else bad}; load errors: {len(errors)}")
        if bad:
            failures.append(f"Redis differs: {bad}")
        if errors:
            failures.append(f"{len(errors)} load errors, e.g. {errors[0]}")
        for f in failures:
            print(f"FAILURE: {f}")
        return 0 if not failures else 1
    finally:
        pg.cleanup()
        redis.cleanup()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.checker.modes_under_pause", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="queue-mode commits per phase (commit/sync: n/5, at least 10)")
    ap.add_argument("--outage", type=float, default=None, help="seconds of Redis outage under steady load instead")
    ap.add_argument("--rate", type=float, default=200, help="commits per second during --outage")
    a = ap.parse_args(argv)
    if a.outage:
        return run_outage(a.outage, a.rate)
    return run_modes(a.n)


if __name__ == "__main__":
    sys.exit(main())

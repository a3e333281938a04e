"""A long Redis outage under a steady write load (issue 6, item 3): what the queue costs and how it recovers.

    /usr/bin/python3 -m tests.checker.outage --minutes 30 --rate 300        # ~40 minutes in all
    /usr/bin/python3 -m tests.checker.outage --minutes 2 --rate 300 --baseline 30 --after 60   # quick

Starts its own redis-server (AOF, `appendfsync always`, so a SIGKILLed Redis keeps what it
acknowledged) and PostgreSQL 15 cluster (fsync on, `synchronous_commit` as --synchronous-commit
says, autovacuum on with its default settings; only its logging is turned on), creates a table `t`
of ~--rows rows and mirrors it in queue mode (`redis_mirror('t', key_template => 't:{id}')`).
Then pgbench runs an open-loop load (`-R --rate`, Poisson arrivals) of single-statement
transactions by primary key for the whole run: 60 % UPDATE of a stable row, 20 % INSERT ... ON
CONFLICT DO NOTHING and 20 % DELETE in a churn range that stays about half full.

Phases (samples every --sample seconds: queue depth, queue table + index size, live/dead tuples,
autovacuum of the queue, database size, WAL written, commit latency p50/p99 of the period):

  warmup    --warmup s, Redis up (not counted)
  baseline  --baseline s, Redis up: commit latency with the worker delivering
  outage    Redis SIGKILLed for --minutes; the load goes on
  drain     Redis started again; until the queue depth is back to ~0 (the drain time and rate)
  after     --after s more load, autovacuum alone (does the queue's size stay bounded?)
  vacuum    a manual VACUUM (VERBOSE) of the queue under load: sizes before / after
  post      --post s more load after the VACUUM
then the load stops, the queue empties, and Redis is compared with the table twice:
`redis_verify('t')` and an independent comparison (SCAN + MGET of every key against every row).
Finally `VACUUM FULL` of the queue (load stopped) shows the size the space can shrink back to.

Writes report.txt, samples.csv, summary.json, the pgbench per-transaction logs (gzip) and the
server logs into a directory it prints (default /tmp/pg_redis_outage/<time>-<minutes>min-<rate>tps).
Exits 1 if Redis differs from the table at the end, a transaction failed (pgbench error or aborted
client), the backlog did not drain, a dead letter appeared or the server log has a crash; else 0.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import csv
import glob
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import psycopg  # noqa: E402

from harness import PG_BINDIR, PgCluster, RedisServer  # noqa: E402

from .runner import LOG_BAD, installed_build  # noqa: E402

PGBENCH = str(PG_BINDIR / "pgbench")
MB = 2 ** 20

SCRIPT = """\\set r random(1, 100)
\\if :r <= 60
\\set id random(1, {stable})
UPDATE t SET n = n + 1, v = md5(random()::text), updated_at = now() WHERE id = :id;
\\elif :r <= 80
\\set id random({lo}, {hi})
INSERT INTO t (id, n, v, note, updated_at) VALUES (:id, 0, md5(random()::text), 'inserted by pgbench as row ' || :id, now()) ON CONFLICT (id) DO NOTHING;
\\else
\\set id random({lo}, {hi})
DELETE FROM t WHERE id = :id;
\\endif
"""

SAMPLE_SQL = """
SELECT s.queue_depth, s.captured, s.delivered, s.failed, s.dead_letters, s.state, s.worker_state, s.last_error,
       pg_total_relation_size('redis_internal.queue'), pg_relation_size('redis_internal.queue'),
       pg_indexes_size('redis_internal.queue'),
       a.n_live_tup, a.n_dead_tup, a.last_autovacuum, a.autovacuum_count, a.vacuum_count,
       EXISTS (SELECT 1 FROM pg_stat_progress_vacuum p WHERE p.relid = 'redis_internal.queue'::regclass),
       pg_database_size(current_database()), pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'),
       pg_total_relation_size('t'), ta.n_dead_tup, ta.autovacuum_count, a.n_tup_ins, a.n_tup_del,
       a.n_ins_since_vacuum
  FROM redis_stats s, pg_stat_all_tables a, pg_stat_all_tables ta
 WHERE s.mirror = 't'::regclass AND a.relid = 'redis_internal.queue'::regclass AND ta.relid = 't'::regclass
"""
SAMPLE_COLS = ["queue_depth", "captured", "delivered", "failed", "dead_letters", "state", "worker_state",
               "last_error", "queue_total", "queue_heap", "queue_index", "n_live", "n_dead", "last_autovacuum",
               "autovacuum_count", "vacuum_count", "vacuum_running", "db_size", "wal_lsn", "t_size", "t_dead",
               "t_autovacuum_count", "n_tup_ins", "n_tup_del", "n_ins_since_vacuum"]


def pct(xs, p):
    """Nearest-rank percentile of a list (nan when empty)."""
    if not len(xs):
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def fmt_ms(us):
    return "   n/a" if us != us else f"{us / 1000:6.2f}"


class PgbenchLog:
    """Tails pgbench's per-transaction logs (-l; one file per thread) as they grow.

    PostgreSQL 15 line: client_id tx_no time script_no epoch_s epoch_us schedule_lag, where time is
    measured from the scheduled start (so includes the schedule lag) and the epoch is the end."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.pos: dict[str, int] = {}
        self.rest: dict[str, bytes] = {}
        self.end = array.array("d")      # completion time (epoch seconds)
        self.lat = array.array("d")      # service time: time - schedule lag (us)
        self.tot = array.array("d")      # time from the scheduled start (us)
        self.failed = 0                  # 'failed' transactions (serialization/deadlock after retries)
        self.skipped = 0
        self.sorted = False

    def read(self) -> None:
        for f in sorted(glob.glob(self.prefix + ".*")):
            if f.endswith(".gz"):
                continue
            with open(f, "rb") as fh:
                fh.seek(self.pos.get(f, 0))
                data = fh.read()
                self.pos[f] = fh.tell()
            data = self.rest.get(f, b"") + data
            lines = data.split(b"\n")
            self.rest[f] = lines.pop()
            for ln in lines:
                p = ln.split()
                if len(p) < 6:
                    continue
                if p[2] == b"failed":
                    self.failed += 1
                    continue
                if p[2] == b"skipped":
                    self.skipped += 1
                    continue
                tot = float(p[2])
                lag = float(p[6]) if len(p) > 6 else 0.0
                self.end.append(int(p[4]) + int(p[5]) / 1e6)
                self.tot.append(tot)
                self.lat.append(tot - lag)

    def window(self, t0: float, t1: float):
        """(service latencies, total latencies) of transactions that completed in [t0, t1).

        While the run goes on, entries are appended in about completion order (one file per
        thread): scan back from the newest. After finish(), a binary search in the sorted arrays."""
        lat, tot = [], []
        end = self.end
        if self.sorted:
            i, j = bisect.bisect_left(end, t0), bisect.bisect_left(end, t1)
            return list(self.lat[i:j]), list(self.tot[i:j])
        for i in range(len(end) - 1, -1, -1):
            e = end[i]
            if e < t0 - 30:
                break
            if t0 <= e < t1:
                lat.append(self.lat[i])
                tot.append(self.tot[i])
        return lat, tot

    def finish(self) -> None:
        """Sort by completion time (after the last read)."""
        order = sorted(range(len(self.end)), key=self.end.__getitem__)
        self.end = array.array("d", (self.end[i] for i in order))
        self.lat = array.array("d", (self.lat[i] for i in order))
        self.tot = array.array("d", (self.tot[i] for i in order))
        self.sorted = True


class Run:
    def __init__(self, a):
        self.a = a
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.out = Path(a.out or f"/tmp/pg_redis_outage/{stamp}-{a.minutes:g}min-{a.rate:g}tps")
        self.out.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.samples: list[dict] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.marks: dict[str, float] = {}       # phase name -> wall time it started
        self.summary: dict = {}
        self.redis = self.pg = self.bench = None
        self.conn = None
        self.rc = None

    # -- output
    def say(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.time()
        self.phase = phase
        self.say(f"-- {time.strftime('%H:%M:%S')} phase {phase}")

    # -- servers
    def start_servers(self) -> None:
        a = self.a
        self.redis = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", a.appendfsync])
        conf = [f"pg_redis.url = '{self.redis.url}'",
                f"synchronous_commit = {a.synchronous_commit}",
                f"shared_buffers = {a.shared_buffers}",
                "log_autovacuum_min_duration = 0",      # logging only: autovacuum itself keeps its defaults
                "log_checkpoints = on"]
        self.pg = PgCluster(conf_lines=conf, preload=True, fsync=True)
        self.conn = self.pg.connect(application_name="outage-sampler")
        self.rc = self.redis.client(socket_timeout=30)

    def q(self, sql: str, *params):
        cur = self.conn.execute(sql, params if params else None)
        return cur.fetchall() if cur.description else []

    def setup(self) -> None:
        a = self.a
        stable = int(a.rows * 0.8)
        churn = int(a.rows * 0.4)          # half full at equilibrium (inserts = deletes)
        self.ids = (stable, stable + 1, stable + churn)
        self.q("CREATE EXTENSION pg_redis")
        with contextlib.suppress(psycopg.Error):
            self.q("CREATE EXTENSION pgstattuple")
        self.have_pgstattuple = bool(self.q("SELECT 1 FROM pg_extension WHERE extname = 'pgstattuple'"))
        self.q("CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, v text, note text, "
               "updated_at timestamptz NOT NULL DEFAULT now())")
        self.q("INSERT INTO t SELECT g, 0, md5(g::text), 'loaded row ' || g || ' ' || repeat('.', 40), now() "
               "FROM generate_series(1, %s) g", stable)
        self.q("INSERT INTO t SELECT g, 0, md5(g::text), 'loaded row ' || g || ' ' || repeat('.', 40), now() "
               "FROM generate_series(%s, %s) g WHERE random() < 0.5", stable + 1, stable + churn)
        self.q("VACUUM ANALYZE t")
        t = time.monotonic()
        scheduled = self.q("SELECT redis_mirror('t', key_template => 't:{id}', mode => 'queue')")[0][0]
        while True:
            st, depth = self.q("SELECT state, queue_depth FROM redis_stats WHERE mirror = 't'::regclass")[0]
            if st == "active" and depth == 0:
                break
            if time.monotonic() - t > 600:
                raise RuntimeError(f"backfill did not finish in 600 s: {st} {depth}")
            time.sleep(0.5)
        rows = self.q("SELECT count(*) FROM t")[0][0]
        self.say(f"table t: {rows} rows (ids 1..{stable} updated, {stable + 1}..{stable + churn} inserted/deleted); "
                 f"redis_mirror scheduled {scheduled}, backfilled in {time.monotonic() - t:.1f}s; "
                 f"Redis DBSIZE {self.rc.dbsize()}")
        self.q("VACUUM redis_internal.queue")
        self.q("CHECKPOINT")
        settings = self.q("SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
                          "('synchronous_commit', 'fsync', 'shared_buffers', 'autovacuum', 'autovacuum_naptime', "
                          "'autovacuum_vacuum_scale_factor', 'autovacuum_vacuum_threshold', "
                          "'autovacuum_vacuum_insert_scale_factor', 'autovacuum_vacuum_cost_delay', "
                          "'autovacuum_vacuum_cost_limit', 'vacuum_cost_limit', 'max_wal_size', "
                          "'pg_redis.batch_size', 'pg_redis.max_queue_size', 'checkpoint_timeout') ORDER BY 1")
        self.summary["settings"] = dict(settings)
        self.say("settings: " + ", ".join(f"{k}={v}" for k, v in settings))
        self.say(f"redis-server {self.redis.port} (AOF, appendfsync {a.appendfsync}); PostgreSQL {self.pg.dir}")

    # -- load
    def start_load(self) -> None:
        a = self.a
        stable, lo, hi = self.ids
        script = self.out / "load.sql"
        script.write_text(SCRIPT.format(stable=stable, lo=lo, hi=hi))
        self.log_prefix = str(self.out / "pgbench_log")
        total = int(a.warmup + a.baseline + a.minutes * 60 + a.drain_max + a.after + a.post + 3600)
        cmd = [PGBENCH, "-n", "-h", str(self.pg.sockdir), "-p", str(self.pg.port), "-U", "postgres",
               "-c", str(a.clients), "-j", str(min(a.clients, 2)), "-R", str(a.rate), "-T", str(total),
               "-M", "prepared", "-P", "10", "-l", f"--log-prefix={self.log_prefix}", "-f", str(script), "postgres"]
        self.bench_err = open(self.out / "pgbench.stderr", "wb")
        self.bench_out = open(self.out / "pgbench.stdout", "wb")
        self.bench = subprocess.Popen(cmd, stdout=self.bench_out, stderr=self.bench_err, stdin=subprocess.DEVNULL,
                                      cwd=str(self.out), start_new_session=True)
        self.plog = PgbenchLog(self.log_prefix)
        self.load_t0 = time.time()
        self.say(f"pgbench pid {self.bench.pid}: {' '.join(cmd[1:])}")

    def check_load(self) -> None:
        """pgbench must still run, with no aborted client and no error."""
        if self.bench is None:
            return
        err = (self.out / "pgbench.stderr").read_text(errors="replace")
        bad = [ln for ln in err.splitlines() if not ln.startswith("progress:") and ln.strip()
               and not ln.startswith("pgbench (")]
        if bad and not getattr(self, "_bad_seen", None):
            self._bad_seen = True
            self.failures.append(f"pgbench reported errors: {bad[:5]}")
            self.say(f"!! pgbench: {bad[:5]}")
        if self.bench.poll() is not None and not getattr(self, "_stopping", False) and not getattr(self, "_dead_seen", None):
            self._dead_seen = True
            self.failures.append(f"pgbench exited early with status {self.bench.returncode}")
            self.say(f"!! pgbench exited with {self.bench.returncode}")

    def stop_load(self) -> None:
        self._stopping = True
        if self.bench is not None and self.bench.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.bench.pid, signal.SIGINT)
            try:
                self.bench.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.bench.pid, signal.SIGKILL)
                self.bench.wait(5)
        self.load_t1 = time.time()
        self.plog.read()

    # -- sampling
    def sample(self) -> dict:
        now = time.time()
        r = dict(zip(SAMPLE_COLS, self.q(SAMPLE_SQL)[0]))
        r["t"] = now
        r["phase"] = self.phase
        r["phase_s"] = now - self.marks[self.phase]
        r["load_s"] = now - self.load_t0
        r["loadavg"] = float(Path("/proc/loadavg").read_text().split()[0])
        try:
            r["redis_keys"] = self.rc.dbsize() if self.redis.running() else None
        except Exception:  # noqa: BLE001
            r["redis_keys"] = None
        self.plog.read()
        prev = self.samples[-1]["t"] if self.samples else self.load_t0
        lat, tot = self.plog.window(prev, now)
        self.samples.append(r)
        wal0 = self.samples[0]["wal_lsn"]
        self.say(f"{r['phase']:>8s} +{r['phase_s']:6.0f}s depth {r['queue_depth']:8d} queue {r['queue_total'] / MB:7.1f} MB "
                 f"(idx {r['queue_index'] / MB:5.1f}) live {r['n_live']:8d} dead {r['n_dead']:8d} "
                 f"av {r['autovacuum_count']}{'*' if r['vacuum_running'] else ' '} db {r['db_size'] / MB:7.1f} MB "
                 f"wal {(r['wal_lsn'] - wal0) / MB:7.0f} MB tx {len(lat):5d} p50 {fmt_ms(pct(lat, 50))} "
                 f"p99 {fmt_ms(pct(lat, 99))} ms load {r['loadavg']:.2f}" + (f"  [{r['last_error'][:50]}]" if r["last_error"] and
                                                       self.phase == "outage" and r["phase_s"] < 15 else ""))
        self.check_load()
        return r

    def sleep_sampling(self, seconds: float, every: float) -> None:
        """Sample every `every` s for `seconds`."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0.05:
                break
            time.sleep(min(every, left))
            self.sample()

    def stattuple(self) -> dict:
        if not self.have_pgstattuple:
            return {}
        r = self.q("SELECT table_len, tuple_count, dead_tuple_count, free_space, free_percent "
                   "FROM pgstattuple('redis_internal.queue')")[0]
        i = self.q("SELECT index_size, leaf_pages, deleted_pages, empty_pages, avg_leaf_density "
                   "FROM pgstatindex('redis_internal.queue_pkey')")[0]
        return dict(table_mb=round(r[0] / MB, 1), live=r[1], dead=r[2], free_mb=round(r[3] / MB, 1),
                    free_pct=float(r[4]), index_mb=round(i[0] / MB, 1), leaf_pages=i[1], deleted_pages=i[2],
                    empty_pages=i[3], leaf_density=float(i[4]))

    def sizes(self) -> dict:
        r = self.q("SELECT pg_total_relation_size('redis_internal.queue'), pg_relation_size('redis_internal.queue'), "
                   "pg_indexes_size('redis_internal.queue'), (SELECT count(*) FROM redis_internal.queue)")[0]
        return dict(total_mb=round(r[0] / MB, 1), heap_mb=round(r[1] / MB, 1), index_mb=round(r[2] / MB, 1), rows=r[3])

    # -- the run
    def run(self) -> int:
        a = self.a
        self.say(f"== pg_redis outage run: Redis down {a.minutes:g} min under {a.rate:g} tx/s "
                 f"(pgbench -c {a.clients}), ~{a.rows} rows, synchronous_commit = {a.synchronous_commit}")
        self.say(f"   report directory: {self.out}")
        self.say(f"   started {time.strftime('%Y-%m-%d %H:%M:%S')}, load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        build0 = installed_build()
        lib = [v for k, v in build0.items() if k.endswith(".so")]
        self.say(f"   extension build: pg_redis.so {lib[0] if lib else 'missing'} (size, mtime, sha256)")
        self.start_servers()
        self.setup()
        self.phase = "warmup"
        self.start_load()
        self.mark("warmup")
        self.sleep_sampling(a.warmup, min(a.sample, a.warmup))

        self.mark("baseline")
        self.sleep_sampling(a.baseline, a.sample)
        base = [s for s in self.samples if s["phase"] == "baseline"]
        base_max_depth = max((s["queue_depth"] for s in base), default=0)

        # -- the outage
        self.mark("outage")
        self.redis.kill()
        self.say(f"redis-server SIGKILLed; down for {a.minutes:g} min")
        at_kill = self.samples[-1]
        self.sleep_sampling(a.minutes * 60, a.sample)
        at_restart = self.samples[-1]

        # -- the drain
        self.mark("drain")
        self.redis.start()
        t_start = time.time()
        self.say(f"redis-server started again (AOF reloaded: DBSIZE {self.rc.dbsize()}); queue depth "
                 f"{at_restart['queue_depth']}")
        thr = a.drain_threshold if a.drain_threshold is not None else max(10, 2 * base_max_depth)
        d0 = self.q("SELECT sum(delivered) FROM redis_internal.mirror_stats")[0][0]
        first = None
        drained = None
        next_sample = time.monotonic() + min(a.sample, 5)
        t_mono = time.monotonic()
        while time.monotonic() - t_mono < a.drain_max:
            time.sleep(0.5)
            d = self.q("SELECT sum(delivered) FROM redis_internal.mirror_stats")[0][0]
            if first is None and d > d0:
                first = time.time() - t_start
                self.say(f"first delivery {first:.1f}s after the restart")
            n = self.q("SELECT count(*) FROM (SELECT 1 FROM redis_internal.queue ORDER BY id LIMIT %s) x", thr + 1)[0][0]
            if n <= thr:
                drained = time.time() - t_start
                break
            if time.monotonic() >= next_sample:
                self.sample()
                next_sample = time.monotonic() + min(a.sample, 5)
        at_drained = self.sample()
        if drained is None:
            self.failures.append(f"the backlog did not drain within {a.drain_max:.0f}s after Redis came back "
                                 f"(queue depth {at_drained['queue_depth']})")
        else:
            self.say(f"backlog drained (depth <= {thr}) {drained:.1f}s after the restart; depth now "
                     f"{at_drained['queue_depth']}")
        st_drained = self.stattuple()

        # -- autovacuum alone
        self.mark("after")
        self.sleep_sampling(a.after, a.sample)
        at_after = self.samples[-1]
        st_after = self.stattuple()

        # -- manual VACUUM under load
        self.mark("vacuum")
        before = self.sizes()
        msgs = []

        def on_notice(d):
            msgs.append(d.message_primary or "")
        self.conn.add_notice_handler(on_notice)
        t = time.monotonic()
        self.q("VACUUM (VERBOSE) redis_internal.queue")
        vac_s = time.monotonic() - t
        self.conn.remove_notice_handler(on_notice)
        after_vac = self.sizes()
        st_vac = self.stattuple()
        self.say(f"VACUUM redis_internal.queue ({vac_s:.1f}s): {before} -> {after_vac}")
        for m in msgs:
            for ln in m.splitlines()[:6]:
                self.say(f"   | {ln}")
        self.sample()

        self.mark("post")
        self.sleep_sampling(a.post, a.sample)
        at_post = self.samples[-1]

        # -- stop the load, settle, compare
        self.mark("final")
        self.stop_load()
        self.check_load()
        t = time.monotonic()
        depth = None
        while time.monotonic() - t < 120:
            depth = self.q("SELECT queue_depth FROM redis_stats WHERE mirror = 't'::regclass")[0][0]
            if depth == 0:
                break
            time.sleep(0.5)
        if depth != 0:
            self.failures.append(f"the queue did not empty within 120 s after the load stopped (depth {depth})")
        t = time.monotonic()
        ver = self.q("SELECT checked, missing, stale, extra FROM redis_verify('t')")[0]
        ver_s = time.monotonic() - t
        rows = self.q("SELECT count(*) FROM t")[0][0]
        self.say(f"redis_verify('t') ({ver_s:.1f}s): checked {ver[0]}, missing {ver[1]}, stale {ver[2]}, extra {ver[3]} "
                 f"(table rows {rows})")
        if ver[1] or ver[2] or ver[3] or ver[0] != rows:
            self.failures.append(f"redis_verify: checked {ver[0]} of {rows}, missing {ver[1]}, stale {ver[2]}, extra {ver[3]}")
        own = self.compare()
        st = self.q("SELECT captured, delivered, failed, dead_letters, state, last_error FROM redis_stats "
                    "WHERE mirror = 't'::regclass")[0]
        self.say(f"redis_stats: captured {st[0]}, delivered {st[1]}, failed {st[2]}, dead letters {st[3]}, state {st[4]}")
        if st[3]:
            self.failures.append(f"{st[3]} dead letters")
        if st[4] != "active":
            self.failures.append(f"mirror state {st[4]}")

        # -- VACUUM FULL with the load stopped: the space that can be given back
        full_before = self.sizes()
        t = time.monotonic()
        self.q("VACUUM FULL redis_internal.queue")
        full_s = time.monotonic() - t
        full_after = self.sizes()
        self.say(f"VACUUM FULL redis_internal.queue ({full_s:.1f}s, load stopped): {full_before} -> {full_after}")
        # the worker still delivers after the rewrite
        self.q("UPDATE t SET n = n + 1000000 WHERE id = 1")
        want = self.q("SELECT n FROM t WHERE id = 1")[0][0]
        t = time.monotonic()
        ok = False
        while time.monotonic() - t < 10:
            v = self.rc.get("t:1")
            if v and json.loads(v)["n"] == want:
                ok = True
                break
            time.sleep(0.1)
        if not ok:
            self.failures.append("after VACUUM FULL of the queue, an UPDATE did not reach Redis within 10 s")

        # -- server log
        log = self.pg.read_log()
        bad = [ln for ln in log.splitlines() if LOG_BAD.search(ln)]
        if bad:
            self.failures.append(f"server log: {bad[:3]}")
        avs = [ln for ln in log.splitlines() if 'automatic vacuum of table "postgres.redis_internal.queue"' in ln]
        s0, s1 = self.samples[0], at_drained
        if s1["delivered"] - s0["delivered"] > 1000 and (s1["n_tup_del"] - s0["n_tup_del"]) < (s1["delivered"] - s0["delivered"]) / 10:
            self.notes.append(
                f"pg_stat_all_tables does not see the worker's deletes from the queue: {s1['delivered'] - s0['delivered']} "
                f"changes delivered (and deleted) between the first sample and the end of the drain, n_tup_del of "
                f"redis_internal.queue grew by {s1['n_tup_del'] - s0['n_tup_del']}, n_dead_tup {s1['n_dead']} (the worker "
                f"seems not to flush its table statistics, pgstat_report_stat): autovacuum of the queue is then "
                f"triggered by its inserts (autovacuum_vacuum_insert_threshold/scale_factor), not by its dead tuples")
        build1 = installed_build()
        if build1 != build0:
            changed = [os.path.basename(k) for k in set(build0) | set(build1) if build0.get(k) != build1.get(k)]
            self.notes.append(f"the installed extension changed during the run ({', '.join(changed)}); this run never "
                              f"restarts PostgreSQL, so the servers kept the library they had loaded at the start")

        self.report(base, at_kill, at_restart, at_drained, at_after, at_post, thr, first, drained,
                    dict(before=before, after=after_vac, seconds=round(vac_s, 1)),
                    dict(before=full_before, after=full_after, seconds=round(full_s, 1)),
                    dict(drained=st_drained, after=st_after, vacuumed=st_vac), ver, own, avs, log)
        return 0 if not self.failures else 1

    def compare(self) -> dict:
        """Every row against its key, independently of redis_verify: SCAN + MGET, fields id, n, v, note."""
        rows = {r[0]: r for r in self.q("SELECT id, n, v, note FROM t")}
        keys = [k for k in self.rc.scan_iter(match="t:*", count=5000)]
        missing = stale = extra = 0
        examples = []
        seen = set()
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            for k, v in zip(chunk, self.rc.mget(chunk)):
                ks = k.decode()
                try:
                    id_ = int(ks[2:])
                except ValueError:
                    extra += 1
                    examples.append(("extra", ks))
                    continue
                seen.add(id_)
                r = rows.get(id_)
                if r is None:
                    extra += 1
                    examples.append(("extra", ks))
                    continue
                d = json.loads(v)
                if (d.get("id"), d.get("n"), d.get("v"), d.get("note")) != r:
                    stale += 1
                    examples.append(("stale", ks, d, r))
        for id_ in rows:
            if id_ not in seen:
                missing += 1
                examples.append(("missing", f"t:{id_}"))
        other = [k for k in self.rc.scan_iter(count=5000) if not k.startswith(b"t:")]
        self.say(f"independent comparison: {len(rows)} rows, {len(keys)} keys t:*: missing {missing}, stale {stale}, "
                 f"extra {extra}; other keys {len(other)}")
        if missing or stale or extra:
            self.failures.append(f"independent comparison: missing {missing}, stale {stale}, extra {extra}, "
                                 f"e.g. {examples[:3]}")
        return dict(rows=len(rows), keys=len(keys), missing=missing, stale=stale, extra=extra, other_keys=len(other))

    # -- the report
    def report(self, base, at_kill, at_restart, at_drained, at_after, at_post, thr, first, drained,
               vac, full, stt, ver, own, avs, log) -> None:
        a = self.a
        plog = self.plog
        plog.finish()
        wal0 = self.samples[0]["wal_lsn"]
        # per-sample latency, recomputed from the complete logs
        prev = self.load_t0
        for s in self.samples:
            lat, tot = plog.window(prev, s["t"])
            dt = s["t"] - prev
            s["tx"] = len(lat)
            s["tps"] = len(lat) / dt if dt > 0 else float("nan")
            s["p50_ms"] = pct(lat, 50) / 1000
            s["p99_ms"] = pct(lat, 99) / 1000
            s["max_ms"] = max(lat) / 1000 if lat else float("nan")
            s["p99_total_ms"] = pct(tot, 99) / 1000
            prev = s["t"]
        with open(self.out / "samples.csv", "w", newline="") as f:
            w = csv.writer(f)
            cols = ["time", "load_s", "phase", "phase_s", "queue_depth", "captured", "delivered", "queue_total_mb",
                    "queue_heap_mb", "queue_index_mb", "n_live_tup", "n_dead_tup", "n_tup_ins", "n_tup_del",
                    "n_ins_since_vacuum", "autovacuum_count",
                    "vacuum_running", "last_autovacuum", "db_size_mb", "wal_written_mb", "t_size_mb", "t_dead_tup",
                    "tx", "tps", "commit_p50_ms", "commit_p99_ms", "commit_max_ms", "p99_incl_schedule_lag_ms",
                    "redis_keys", "loadavg_1min", "worker_state", "last_error"]
            w.writerow(cols)
            for s in self.samples:
                w.writerow([time.strftime("%H:%M:%S", time.localtime(s["t"])), round(s["load_s"], 1), s["phase"],
                            round(s["phase_s"], 1), s["queue_depth"], s["captured"], s["delivered"],
                            round(s["queue_total"] / MB, 2), round(s["queue_heap"] / MB, 2),
                            round(s["queue_index"] / MB, 2), s["n_live"], s["n_dead"], s["n_tup_ins"], s["n_tup_del"],
                            s["n_ins_since_vacuum"], s["autovacuum_count"],
                            int(s["vacuum_running"]), s["last_autovacuum"], round(s["db_size"] / MB, 1),
                            round((s["wal_lsn"] - wal0) / MB, 1), round(s["t_size"] / MB, 1), s["t_dead"],
                            s["tx"], round(s["tps"], 1), round(s["p50_ms"], 3), round(s["p99_ms"], 3),
                            round(s["max_ms"], 3), round(s["p99_total_ms"], 3), s["redis_keys"], s["loadavg"], s["worker_state"],
                            (s["last_error"] or "")[:80]])

        # per-phase latency
        bounds = list(self.marks.items())
        phases = {}
        for i, (name, t0) in enumerate(bounds):
            t1 = bounds[i + 1][1] if i + 1 < len(bounds) else self.load_t1
            if name == "final":
                continue
            lat, tot = plog.window(t0, min(t1, self.load_t1))
            la = [s["loadavg"] for s in self.samples if s["phase"] == name]
            phases[name] = dict(loadavg=round(sum(la) / len(la), 2) if la else None,
                                seconds=round(t1 - t0, 1), tx=len(lat), tps=round(len(lat) / max(t1 - t0, 1e-9), 1),
                                p50_ms=round(pct(lat, 50) / 1000, 3), p99_ms=round(pct(lat, 99) / 1000, 3),
                                p999_ms=round(pct(lat, 99.9) / 1000, 3),
                                max_ms=round(max(lat) / 1000, 3) if lat else None,
                                p99_incl_lag_ms=round(pct(tot, 99) / 1000, 3))
        peak = max(self.samples, key=lambda s: s["queue_total"])
        peak_depth = max(self.samples, key=lambda s: s["queue_depth"])
        outage_s = at_restart["t"] - self.marks["outage"]
        queued = at_restart["captured"] - at_kill["captured"]
        dd = at_drained["delivered"] - at_restart["delivered"]
        out_samples = [s for s in self.samples if s["phase"] == "outage"]
        p99s = [s["p99_ms"] for s in out_samples if s["tx"]]
        S = self.summary
        S.update(
            out=str(self.out), minutes=a.minutes, rate=a.rate, clients=a.clients, rows=a.rows,
            synchronous_commit=a.synchronous_commit, phases=phases,
            outage=dict(seconds=round(outage_s, 1), changes_queued=queued,
                        depth_at_restart=at_restart["queue_depth"],
                        queue_mb_at_kill=round(at_kill["queue_total"] / MB, 1),
                        queue_mb_at_restart=round(at_restart["queue_total"] / MB, 1),
                        queue_heap_mb_at_restart=round(at_restart["queue_heap"] / MB, 1),
                        queue_index_mb_at_restart=round(at_restart["queue_index"] / MB, 1),
                        bytes_per_change=round(at_restart["queue_total"] / max(at_restart["queue_depth"], 1)),
                        peak_queue_mb=round(peak["queue_total"] / MB, 1), peak_at=f"{peak['phase']} +{peak['phase_s']:.0f}s",
                        peak_depth=peak_depth["queue_depth"],
                        db_mb_at_kill=round(at_kill["db_size"] / MB, 1), db_mb_at_restart=round(at_restart["db_size"] / MB, 1),
                        wal_mb=round((at_restart["wal_lsn"] - at_kill["wal_lsn"]) / MB, 1),
                        autovacuums_of_queue=at_restart["autovacuum_count"] - at_kill["autovacuum_count"],
                        worst_10s_p99_ms=round(max(p99s), 3) if p99s else None),
            drain=dict(threshold=thr, first_delivery_s=None if first is None else round(first, 1),
                       seconds=None if drained is None else round(drained, 1), delivered=dd,
                       rate_per_s=None if not drained else round(dd / drained),
                       # meaningful only when the drain lasted a while after the first delivery
                       # (both instants are polled every 0.5 s)
                       rate_after_first_per_s=None if not drained or first is None or drained - first < 2
                       else round(dd / (drained - first)),
                       backlog_rate_per_s=None if not drained else round(at_restart["queue_depth"] / drained),
                       queue_mb_when_drained=round(at_drained["queue_total"] / MB, 1),
                       dead_when_drained=at_drained["n_dead"],
                       autovacuums_during=at_drained["autovacuum_count"] - at_restart["autovacuum_count"]),
            after=dict(seconds=a.after, queue_mb=round(at_after["queue_total"] / MB, 1), n_dead=at_after["n_dead"],
                       autovacuums=at_after["autovacuum_count"] - at_drained["autovacuum_count"],
                       last_autovacuum=str(at_after["last_autovacuum"])),
            vacuum=vac, post=dict(seconds=a.post, queue_mb=round(at_post["queue_total"] / MB, 1)),
            vacuum_full=full, pgstattuple=stt,
            verify=dict(checked=ver[0], missing=ver[1], stale=ver[2], extra=ver[3]), compare=own,
            transactions=len(plog.end), failed_tx=plog.failed, failures=self.failures, notes=self.notes,
        )
        (self.out / "summary.json").write_text(json.dumps(S, indent=2, default=str) + "\n")

        L = self.say
        L("")
        L(f"== Redis outage of {outage_s / 60:.1f} min under {a.rate:g} tx/s (pgbench -R, {a.clients} clients), "
          f"synchronous_commit = {a.synchronous_commit}, fsync on")
        L(f"   {len(plog.end)} transactions in all, {plog.failed} failed; report directory {self.out}")
        L("")
        L(f"{'phase':9s} {'seconds':>8s} {'tx':>8s} {'tx/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99.9 ms':>9s} "
          f"{'max ms':>8s} {'p99 incl. lag':>14s} {'load avg':>9s}")
        for name, p in phases.items():
            L(f"{name:9s} {p['seconds']:8.0f} {p['tx']:8d} {p['tps']:7.1f} {p['p50_ms']:8.2f} {p['p99_ms']:8.2f} "
              f"{p['p999_ms']:9.2f} {p['max_ms'] or float('nan'):8.2f} {p['p99_incl_lag_ms']:14.2f} "
              f"{p['loadavg'] if p['loadavg'] is not None else float('nan'):9.2f}")
        o = S["outage"]
        L("")
        L(f"outage: {o['seconds'] / 60:.1f} min; {o['changes_queued']} changes queued (depth {o['depth_at_restart']} at the "
          f"restart, {o['bytes_per_change']} bytes each on disk); queue {o['queue_mb_at_kill']} MB -> "
          f"{o['queue_mb_at_restart']} MB (heap {o['queue_heap_mb_at_restart']}, index {o['queue_index_mb_at_restart']}); "
          f"peak {o['peak_queue_mb']} MB at {o['peak_at']}; database {o['db_mb_at_kill']} -> {o['db_mb_at_restart']} MB; "
          f"WAL written {o['wal_mb']} MB; autovacuums of the queue during the outage {o['autovacuums_of_queue']}; "
          f"worst 10-s window p99 {o['worst_10s_p99_ms']} ms")
        d = S["drain"]
        L(f"drain: first delivery {d['first_delivery_s']}s after the restart; depth <= {thr} after {d['seconds']}s; "
          f"{d['delivered']} changes delivered meanwhile ({d['rate_per_s']}/s, {d['rate_after_first_per_s']}/s from the "
          f"first delivery on; backlog cleared at "
          f"{d['backlog_rate_per_s']}/s net of the new load); queue {d['queue_mb_when_drained']} MB, "
          f"{d['dead_when_drained']} dead tuples when drained; autovacuums during the drain {d['autovacuums_during']}")
        f_ = S["after"]
        L(f"after {a.after:g}s more load with autovacuum alone: queue {f_['queue_mb']} MB, {f_['n_dead']} dead tuples, "
          f"{f_['autovacuums']} autovacuums (last {f_['last_autovacuum']})")
        L(f"manual VACUUM under load ({vac['seconds']}s): {vac['before']} -> {vac['after']}; "
          f"{a.post:g}s later: {S['post']['queue_mb']} MB")
        L(f"VACUUM FULL, load stopped ({full['seconds']}s): {full['before']} -> {full['after']}")
        for k, v in stt.items():
            if v:
                L(f"pgstattuple {k}: {v}")
        L(f"autovacuum of the queue (server log, {len(avs)} runs):")
        for ln in avs:
            i = log.find(ln)
            block = log[i:i + 900].splitlines()
            detail = " ".join(x.strip() for x in block[1:8] if x.startswith(("\t", " ")) and
                              any(w in x for w in ("pages:", "tuples:", "index scan", "system usage", "removable")))
            L(f"   {ln[:23]} {detail[:400]}")
        L(f"redis_verify('t'): checked {ver[0]}, missing {ver[1]}, stale {ver[2]}, extra {ver[3]}; "
          f"independent comparison: {own}")
        for n in self.notes:
            L(f"note: {n}")
        for f in self.failures:
            L(f"FAILURE: {f}")
        L(f"== {'OK' if not self.failures else 'FAILED'}")

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_load()
        for f in ("bench_out", "bench_err"):
            with contextlib.suppress(Exception):
                getattr(self, f).close()
        for f in glob.glob(str(self.out / "pgbench_log.*")):
            if not f.endswith(".gz"):
                with open(f, "rb") as src, gzip.open(f + ".gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.unlink(f)
        with contextlib.suppress(Exception):
            self.conn.close()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                (self.out / "postgresql.log").write_text(self.pg.read_log())
            self.pg.cleanup()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                (self.out / "redis.log").write_text(self.redis.read_log())
            self.redis.cleanup()
        (self.out / "report.txt").write_text("\n".join(self.lines) + "\n")
        print(f"report: {self.out}/report.txt, samples: {self.out}/samples.csv", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.checker.outage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30, help="Redis down for this long (default 30)")
    ap.add_argument("--rate", type=float, default=300, help="transactions per second, open loop (default 300)")
    ap.add_argument("--rows", type=int, default=100_000, help="rows in the mirrored table (default 100000)")
    ap.add_argument("--clients", type=int, default=4, help="pgbench connections (default 4)")
    ap.add_argument("--warmup", type=float, default=15, help="seconds of load before the baseline (default 15)")
    ap.add_argument("--baseline", type=float, default=120, help="seconds with Redis up before the outage (default 120)")
    ap.add_argument("--after", type=float, default=360,
                    help="seconds of load after the drain, autovacuum alone (default 360)")
    ap.add_argument("--post", type=float, default=60, help="seconds of load after the manual VACUUM (default 60)")
    ap.add_argument("--sample", type=float, default=10, help="seconds between samples (default 10)")
    ap.add_argument("--drain-max", type=float, default=1800, help="bound on the drain (s)")
    ap.add_argument("--drain-threshold", type=int, default=None,
                    help="queue depth that counts as drained (default: max(10, twice the baseline's deepest sample))")
    ap.add_argument("--synchronous-commit", default="on", choices=["on", "off", "local", "remote_write"])
    ap.add_argument("--appendfsync", default="always", choices=["always", "everysec"], help="Redis AOF fsync policy")
    ap.add_argument("--shared-buffers", dest="shared_buffers", default="128MB")
    ap.add_argument("--out", help="report directory (default /tmp/pg_redis_outage/<time>-<minutes>min-<rate>tps)")
    a = ap.parse_args(argv)
    r = Run(a)
    try:
        return r.run()
    except BaseException as e:  # noqa: BLE001
        r.say(f"== ERROR: {e!r}")
        import traceback
        r.say(traceback.format_exc())
        return 1
    finally:
        r.cleanup()


if __name__ == "__main__":
    sys.exit(main())

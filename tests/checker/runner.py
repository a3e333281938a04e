"""One checker run: servers, tables and mirrors, clients + faults, then settle and compare."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness import PgCluster, RedisServer

from .clients import Client, ErrorEvent
from .compare import Diff, compare_mirror, internal_keys, unknown_keys
from .faults import FaultRunner, Log, pg_sql
from .schedules import SCHEDULES, Schedule
from .tables import FORMATS, MODES, Table, make_tables
from .standby import ClusterRef, Standby
from .tracer import Tracer, key_history

REDIS_FAULTS = {"redis_kill", "redis_pause", "client_kill", "redis_oom", "redis_oom_long", "redis_wipe"}


@dataclass
class Options:
    seed: int = 42
    duration: float = 60.0          # seconds of load with faults
    schedule: str = "mixed"
    modes: tuple = MODES
    formats: tuple = FORMATS
    clients: int = 6
    settle: float = 60.0            # bound on the wait for queue_depth = 0 after the faults
    tail: float = 3.0               # seconds of load after the last fault
    rows: int = 150                 # rows per table before the mirrors are created (backfilled)
    command_timeout: str = "1s"
    commit_wait_timeout: str = "1s"
    strict_errors: bool = True      # unexpected client errors fail the run
    quiet: bool = False
    keep: bool = False              # leave the servers running at the end (debugging)
    faults: tuple | None = None     # override the schedule's fault kinds (drawn at random)
    fetch_weight: float = 8         # relative weight of redis_fetch calls among the statements
    inject: bool = False            # negative control: corrupt a few keys before comparing; the run
                                    # must report exactly those (Result.injected / Result.control_ok)
    trace: bool = True              # record Redis MONITOR (explains differences key by key)
    artifacts: str | None = None    # where logs go on failure (default /tmp/pg_redis_checker/...)


@dataclass
class Result:
    ok: bool = False
    differences: list = field(default_factory=list)      # Diff, or str for non-data failures
    failures: list = field(default_factory=list)         # str: everything that fails the run
    notes: list = field(default_factory=list)
    report: list = field(default_factory=list)           # the printed summary lines
    numbers: dict = field(default_factory=dict)
    invalid: bool = False                                # the extension was reinstalled during the run
    injected: list = field(default_factory=list)         # (table, key, kind) corrupted on purpose
    control_ok: bool | None = None                       # with inject: found exactly what was injected
    retry_diffs: list = field(default_factory=list)      # differences left by redis_retry (before repair)

    def summary(self) -> str:
        return "\n".join(self.report)


class Env:
    def __init__(self, redis: RedisServer, pg):
        self.redis = redis
        self.pg = pg                 # a ClusterRef: the current primary
        self.standby = None          # a Standby, until a failover promotes it
        self.old_primaries: list = []
        self.oom_active = False


def _heal(env: Env, log: Log):
    r = env.redis
    if not r.running():
        log("heal: starting redis-server")
        r.start()
    r.resume()
    with contextlib.suppress(Exception):
        c = r.client(socket_timeout=5)
        c.config_set("maxmemory", "0")
        c.close()
    if not env.pg.running():
        log("heal: starting PostgreSQL")
        env.pg.start()


def _stats(pg):
    return pg_sql(pg, "SELECT mirror::text, captured, delivered, failed, queue_depth, dead_letters, state, "
                      "last_error FROM redis_stats ORDER BY 1")


def _registry(rc) -> list[bytes]:
    return list(rc.scan_iter(match="pg_redis:sync:*", count=1000))


def wait_quiet(env: Env, rc, timeout: float, log: Log) -> tuple[bool, str]:
    """Until every queue is empty, no backfill runs and the sync registry is empty, twice in a row."""
    deadline = time.monotonic() + timeout
    calm = 0
    last = ""
    while time.monotonic() < deadline:
        try:
            st = _stats(env.pg)
            depth = sum(r[4] for r in st)
            busy = [r[0] for r in st if r[6] != "active"]
            reg = _registry(rc)
            last = f"queue_depth {depth}, not active: {busy}, sync registry keys: {len(reg)}"
            if depth == 0 and not busy and not reg:
                calm += 1
                if calm >= 2:
                    return True, last
            else:
                calm = 0
        except Exception as e:  # noqa: BLE001
            last = repr(e)
            calm = 0
        time.sleep(0.5)
    return False, last


def _in_windows(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def classify_errors(events: list[ErrorEvent], done, load_t0: float) -> tuple[Counter, list[ErrorEvent]]:
    """Expected: constraint/deadlock errors; a sync-mode statement failing with 'pg_redis:' around a
    Redis fault; lost connections around a PostgreSQL crash. Anything else is unexpected."""
    pg_win = [(d.start - 0.5, d.end + 5.0) for d in done if d.fault.kind in ("pg_crash", "failover")]
    redis_win = [(d.start - 0.5, d.end + 3.0) for d in done if d.fault.kind in REDIS_FAULTS]
    counts: Counter = Counter()
    unexpected = []
    for e in events:
        st = e.sqlstate or ""
        if st in ("23505", "40P01", "40001", "55P03"):
            counts[f"{st} (conflict, expected)"] += 1
        elif e.broken or st.startswith("57P") or (st.startswith("08") and not e.message.startswith("pg_redis:")):
            if _in_windows(e.t, pg_win):
                counts["connection lost during a PostgreSQL crash (expected)"] += 1
            else:
                counts["connection lost outside any crash (UNEXPECTED)"] += 1
                unexpected.append(e)
        elif e.message.startswith("pg_redis:") and e.where == "fetch":
            if _in_windows(e.t, redis_win):
                counts[f"redis_fetch failed, {st} (expected during a Redis fault)"] += 1
            else:
                counts[f"redis_fetch failed, {st}, no Redis fault (UNEXPECTED)"] += 1
                unexpected.append(e)
        elif e.message.startswith("pg_redis:") and e.mode == "sync" and e.where == "stmt":
            if _in_windows(e.t, redis_win):
                counts[f"sync-mode statement failed, {st} (expected during a Redis fault)"] += 1
            else:
                counts[f"sync-mode statement failed, {st}, no Redis fault (UNEXPECTED)"] += 1
                unexpected.append(e)
        else:
            counts[f"{st or '-'} {e.where} (UNEXPECTED)"] += 1
            unexpected.append(e)
    return counts, unexpected


LOG_BAD = re.compile(r"PANIC:|TRAP:|was terminated by signal|stuck spinlock|server process .* exited with exit code [^01]")


def scan_server_log(text: str) -> tuple[list[str], Counter]:
    bad = [ln for ln in text.splitlines() if LOG_BAD.search(ln)]
    pr = Counter()
    for ln in text.splitlines():
        m = re.search(r"(WARNING|ERROR|FATAL|LOG):\s+(pg_redis:.*)", ln)
        if m:
            msg = re.sub(r"\d+", "N", m.group(2))[:110]
            pr[f"{m.group(1)}: {msg}"] += 1
    return bad, pr


def installed_build() -> dict:
    """The installed extension's files (library, control, SQL scripts): size, mtime and sha256,
    so that a run during which the extension was rebuilt and reinstalled is flagged: a restarted
    postmaster would load the new library against objects created by the old SQL script."""
    import glob
    import hashlib
    from harness import PG_BINDIR
    import subprocess
    out = {}
    try:
        pc = subprocess.run([str(PG_BINDIR / "pg_config"), "--pkglibdir", "--sharedir"], capture_output=True,
                            text=True, check=True).stdout.split()
    except Exception:  # noqa: BLE001
        pc = ["/usr/lib/postgresql/15/lib", "/usr/share/postgresql/15"]
    files = [os.path.join(pc[0], "pg_redis.so")] + sorted(glob.glob(os.path.join(pc[1], "extension", "pg_redis*")))
    for f in files:
        try:
            st = os.stat(f)
            with open(f, "rb") as fh:
                h = hashlib.sha256(fh.read()).hexdigest()[:16]
            out[f] = (st.st_size, time.strftime("%H:%M:%S", time.localtime(st.st_mtime)), h)
        except OSError:
            out[f] = None
    return out


def inject_corruption(rc, tables: list[Table]) -> list[tuple[str, str, str]]:
    """Corrupt Redis on purpose (negative control): one missing key, one changed value, one number
    rendered differently (1.50 -> 1.5 style), one key with no row, one hash field removed."""
    import json as _json
    out = []

    def keys_of(t):
        return sorted(rc.scan_iter(match=t.key_prefix.replace("*", "\\*") + "*", count=1000))

    js = [t for t in tables if t.fmt == "json" and t.layout == "acct"]
    hs = [t for t in tables if t.fmt == "hash"]
    if js:
        t = js[0]
        ks = keys_of(t)
        if len(ks) >= 3:
            rc.delete(ks[0])
            out.append((t.name, ks[0].decode(), "missing"))
            v = _json.loads(rc.get(ks[1]))
            v["grp"] = (v.get("grp") or 0) + 1000
            rc.set(ks[1], _json.dumps(v))
            out.append((t.name, ks[1].decode(), "stale"))
            for k in ks[2:]:
                raw = rc.get(k).decode()
                m = re.search(r'"amount":(-?\d+\.\d)0([,}])', raw)
                if m:
                    rc.set(k, raw[:m.start()] + f'"amount":{m.group(1)}{m.group(2)}' + raw[m.end():])
                    out.append((t.name, k.decode(), "stale"))
                    break
        rc.set(f"{t.key_prefix}987654321", '{"id": 987654321}')
        out.append((t.name, f"{t.key_prefix}987654321", "extra"))
    for t in hs:
        ks = keys_of(t)
        for k in ks:
            fields = rc.hkeys(k)
            if len(fields) >= 2:
                rc.hdel(k, fields[-1])
                out.append((t.name, k.decode(), "stale"))
                break
        if out and out[-1][0] == t.name:
            break
    return out


def run(opts: Options) -> Result:
    t0 = time.monotonic()
    log = Log(t0, quiet=opts.quiet)
    res = Result()
    out = res.report

    def say(line=""):
        out.append(line)
        print(line, flush=True)

    sched: Schedule = SCHEDULES[opts.schedule]
    if opts.faults is not None:
        import dataclasses
        sched = dataclasses.replace(sched, kinds=list(opts.faults), fixed=None,
                                    description=sched.description + f" [fault kinds overridden: {','.join(opts.faults)}]")
    faults = sched.faults(opts.seed, opts.duration)
    tables = make_tables(opts.modes, opts.formats)
    say(f"== pg_redis history checker: seed {opts.seed}, schedule {sched.name!r}, {opts.duration:.0f}s, "
        f"{opts.clients} clients, {len(tables)} mirrored tables ({','.join(opts.modes)} x {','.join(opts.formats)})")
    say(f"   {sched.description}")
    say("   planned faults (seconds after the load starts): " + (", ".join(f"+{f.at:.1f}s {f}" for f in faults) or "none"))

    wall_t0 = time.time() - (time.monotonic() - t0)
    art = Path(opts.artifacts or f"/tmp/pg_redis_checker/{sched.name}-seed{opts.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    art.mkdir(parents=True, exist_ok=True)
    build0 = installed_build()
    lib = [v for k, v in build0.items() if k.endswith(".so")]
    say(f"   extension build: pg_redis.so {lib[0] if lib else 'missing'} (size, mtime, sha256)")
    redis = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    conf = [f"pg_redis.url = '{redis.url}'", "synchronous_commit = on", "max_connections = 60",
            "deadlock_timeout = '200ms'", "track_commit_timestamp = on", *sched.conf]
    primary = PgCluster(conf_lines=conf, preload=True)
    pg = ClusterRef(primary)
    env = Env(redis, pg)
    standby = None
    rc = redis.client(socket_timeout=30)
    stop_clients = threading.Event()
    stop_faults = threading.Event()
    clients: list[Client] = []
    fr: FaultRunner | None = None
    stop_trace = threading.Event()
    tracer = None
    if opts.trace:
        tracer = Tracer(redis.port, art / "redis-monitor.txt", stop_trace)
        tracer.start()
    try:
        log(f"redis-server pid {redis.pid} port {redis.port}; PostgreSQL port {pg.port} dir {pg.dir}")
        with pg.connect() as c:
            c.execute("CREATE EXTENSION pg_redis")
            # the server's clock at the run's t=0, to place commit timestamps on the run clock
            pg_t0 = c.execute("SELECT clock_timestamp() - make_interval(secs => %s)", (log.now(),)).fetchone()[0]
            c.execute(f"ALTER SYSTEM SET pg_redis.command_timeout = '{opts.command_timeout}'")
            c.execute(f"ALTER SYSTEM SET pg_redis.commit_wait_timeout = '{opts.commit_wait_timeout}'")
            c.execute("ALTER SYSTEM SET pg_redis.connect_timeout = '1s'")
            c.execute("SELECT pg_reload_conf()")
            c.execute("CREATE TABLE chk_log (client int, seq bigint, PRIMARY KEY (client, seq))")
            import random
            prnd = random.Random(opts.seed * 7 + 1)
            for t in tables:
                c.execute(t.ddl)
                n = tries = 0
                while n < opts.rows and tries < 10 * opts.rows:
                    tries += 1
                    st = t.random_stmt(prnd, 0)
                    if st.kind not in ("insert1", "insert_many", "copy"):
                        continue
                    with contextlib.suppress(Exception):
                        cur = c.cursor()
                        if st.copy_rows is not None:
                            with c.transaction(), cur.copy(st.sql) as cp:
                                for row in st.copy_rows:
                                    cp.write_row(row)
                        else:
                            cur.execute(st.sql, st.params or None)
                        n += max(cur.rowcount, 1)
            for t in tables:
                q, p = t.mirror_sql()
                c.execute(q, p)
            settings = dict(c.execute("SELECT name, setting FROM pg_settings WHERE name IN "
                                      "('pg_redis.command_timeout', 'pg_redis.commit_wait_timeout', "
                                      "'synchronous_commit', 'pg_redis.max_attempts', 'wal_writer_delay')").fetchall())
        log(f"{len(tables)} tables created with ~{opts.rows} rows each and mirrored (backfill runs under the load); "
            f"settings {settings}")
        if sched.standby:
            standby = Standby(primary)
            env.standby = standby
            env.standby_mode = sched.standby
            standby.wait_streaming(primary)
            if sched.standby == "sync":
                primary.set_conf(["synchronous_standby_names = '*'"])
                primary.reload()
            rep = pg_sql(primary, "SELECT application_name, state, sync_state FROM pg_stat_replication")
            log(f"standby on port {standby.port} streaming: {rep}")

        # -- load + faults
        load_t0 = log.now()
        stop_clients.clear()
        for i in range(opts.clients):
            cl = Client(i, pg, tables, seed=opts.seed * 1000 + i, stop=stop_clients, t0=t0,
                        fetch_weight=opts.fetch_weight)
            clients.append(cl)
            cl.start()
        fr = FaultRunner(env, faults, log, stop_faults)
        fr.load_t0 = load_t0
        fr.start()
        end = load_t0 + opts.duration
        while log.now() < end:
            time.sleep(min(5.0, max(0.05, end - log.now())))
            if log.now() < end - 0.1:
                tot = sum(sum(cl.stats.txns.values()) for cl in clients)
                log(f"load: {tot} transactions so far")
        stop_faults.set()
        fr.join(timeout=120)
        _heal(env, log)
        log(f"faults over; {opts.tail:.0f}s more load")
        time.sleep(opts.tail)
        stop_clients.set()
        for cl in clients:
            cl.join(timeout=60)
        load_end = log.now()
        log("clients stopped; waiting for delivery to catch up")

        # -- settle
        _heal(env, log)
        t_settle = time.monotonic()
        quiet, why = wait_quiet(env, rc, opts.settle, log)
        settle_s = time.monotonic() - t_settle
        if not quiet:
            res.failures.append(f"delivery did not catch up within {opts.settle:.0f}s: {why}")
        log(f"settled in {settle_s:.1f}s: {why}")

        dead = pg_sql(pg, "SELECT mirror::text, key, op, error, attempts FROM redis_dead_letters ORDER BY 1, 2")
        retried = 0
        if dead:
            oom = fr.oom_seen if fr else False
            say(f"-- dead letters: {len(dead)}" + (" (the schedule filled Redis: expected)" if oom else ""))
            for d in dead[:10]:
                say(f"   {d}")
            if not oom:
                res.failures.append(f"{len(dead)} dead letters without an OOM fault")
            retried = pg_sql(pg, "SELECT redis_retry()")[0][0]
            log(f"redis_retry() queued {retried} dead letters again")
            quiet, why = wait_quiet(env, rc, opts.settle, log)
            if not quiet:
                res.failures.append(f"delivery after redis_retry did not catch up: {why}")

        if opts.inject:
            res.injected = inject_corruption(rc, tables)
            log(f"negative control: corrupted {res.injected}")

        # -- compare
        st_rows = _stats(pg)
        diffs: list[Diff] = []
        per_table = []
        with pg.connect() as c:
            for t in tables:
                d, nexp, nkeys = compare_mirror(c, rc, t, res.notes, pg_t0)
                per_table.append((t, nexp, nkeys, d))
                diffs += d
            if diffs and retried:
                # Documented (docs/reference.md, redis_retry): a dead letter is re-applied with the
                # value it had; redis_verify(tbl, true) repairs keys changed after it. Show what
                # retry left, then repair and compare again.
                say(f"-- after redis_retry, {len(diffs)} keys differ (a dead letter re-applied over a newer "
                    f"change); running redis_verify(tbl, true) as docs/reference.md says")
                for d in diffs[:10]:
                    say(f"   {d}")
                res.notes.append(f"redis_retry left {len(diffs)} keys different from the table")
                res.retry_diffs = list(diffs)
                for t in tables:
                    c.execute("SELECT * FROM redis_verify(%s::regclass, true)", (t.name,)).fetchall()
                quiet, why = wait_quiet(env, rc, opts.settle, log)
                diffs, per_table = [], []
                for t in tables:
                    d, nexp, nkeys = compare_mirror(c, rc, t, res.notes, pg_t0)
                    per_table.append((t, nexp, nkeys, d))
                    diffs += d
            verify = {}
            for t in tables:
                row = c.execute("SELECT checked, missing, stale, extra, repaired FROM redis_verify(%s::regclass)",
                                (t.name,)).fetchone()
                verify[t.name] = row
            present = set(c.execute("SELECT client, seq FROM chk_log").fetchall())
        res.differences = diffs
        if opts.inject:
            found = {(d.table, d.key, d.kind) for d in diffs}
            want = set(res.injected)
            res.control_ok = found == want
            say(f"-- negative control: injected {len(want)} corruptions, the comparison found {len(found & want)} of "
                f"them and {len(found - want)} other differences: {'OK' if res.control_ok else 'FAILED'}")
            for x in sorted(want - found):
                say(f"   NOT FOUND: {x}")
            for x in sorted(found - want):
                say(f"   unexpected: {x}")

        # -- report
        say("-- operations")
        ops, rows, txns, sps = Counter(), Counter(), Counter(), Counter()
        events: list[ErrorEvent] = []
        warns = reconn = 0
        for cl in clients:
            ops.update(cl.stats.ops)
            rows.update(cl.stats.rows)
            txns.update(cl.stats.txns)
            sps.update(cl.stats.savepoints)
            events += cl.stats.errors
            warns += cl.stats.commit_warnings
            reconn += cl.stats.reconnects
        say("   statements: " + ", ".join(f"{k} {v} ({rows[k]} rows)" for k, v in sorted(ops.items())))
        say("   transactions: " + ", ".join(f"{k} {v}" for k, v in sorted(txns.items()))
            + f"; savepoints: " + ", ".join(f"{k} {v}" for k, v in sorted(sps.items())))
        say(f"   commit-mode COMMITs that returned with a pg_redis WARNING: {warns}; client reconnects: {reconn}")
        say("-- faults (time since start)")
        for d in (fr.done if fr else []):
            say(f"   {d.start:7.2f}s - {d.end:7.2f}s  {d.fault.kind:12s} {d.detail}{'  ERROR ' + d.error if d.error else ''}")
            if d.error:
                res.failures.append(f"fault {d.fault.kind} at {d.start:.2f}s failed: {d.error}")
        counts, unexpected = classify_errors(events, fr.done if fr else [], load_t0)
        say("-- client errors")
        for k, v in sorted(counts.items()):
            say(f"   {v:6d}  {k}")
        for e in unexpected[:15]:
            say(f"   unexpected: t={e.t:.2f}s client {e.client} {e.where} {e.table or ''} {e.sqlstate}: {e.message}")
        if unexpected and opts.strict_errors:
            res.failures.append(f"{len(unexpected)} unexpected client errors")

        # acknowledged commits against chk_log
        lost, lost_waited, phantom = [], [], []
        for cl in clients:
            for seq, waited in cl.stats.acked:
                if (cl.idx, seq) not in present:
                    lost.append((cl.idx, seq))
                    if waited:
                        lost_waited.append((cl.idx, seq))
            for seq in cl.stats.rolled_back:
                if (cl.idx, seq) in present:
                    phantom.append((cl.idx, seq))
        indoubt = sum(len(cl.stats.in_doubt) for cl in clients)
        acked = sum(len(cl.stats.acked) for cl in clients)
        sco = any("synchronous_commit = off" in x for x in sched.conf) or sched.standby == "async"
        say(f"-- commits: {acked} acknowledged, {indoubt} in doubt (connection lost during COMMIT), "
            f"{len(lost)} acknowledged but lost in a crash"
            + (" (synchronous_commit = off or asynchronous replication: allowed)" if sco else ""))
        if lost and not sco:
            res.failures.append(f"{len(lost)} acknowledged commits lost with synchronous_commit = on: {lost[:5]}")
        if lost_waited:
            res.failures.append(f"{len(lost_waited)} commit-mode transactions whose COMMIT returned after delivery "
                                f"(no WARNING) were lost in a crash: {lost_waited[:5]}")
        if phantom:
            res.failures.append(f"{len(phantom)} rolled-back transactions are in the table: {phantom[:5]}")

        say("-- mirrors: rows (in filter) / keys in Redis / captured / delivered / failed / dead / verify (checked missing stale extra)")
        stm = {r[0]: r for r in st_rows}
        for t, nexp, nkeys, d in per_table:
            s = stm.get(t.name)
            v = verify.get(t.name)
            say(f"   {t.name:18s} {nexp:5d} {nkeys:5d}  {s[1] if s else '?':>7} {s[2] if s else '?':>7} "
                f"{s[3] if s else '?':>5} {s[5] if s else '?':>4}   {v[0]} {v[1]} {v[2]} {v[3]}"
                + (f"   {len(d)} DIFFERENCES" if d else ""))
            if v and (v[1] or v[2] or v[3]):
                res.failures.append(f"redis_verify({t.name}) = checked {v[0]} missing {v[1]} stale {v[2]} extra {v[3]}")
            if v and v[0] != nexp:
                res.failures.append(f"redis_verify({t.name}) checked {v[0]} rows, the table has {nexp} in the filter")

        unk = unknown_keys(rc, tables)
        internal = internal_keys(rc)
        if internal:
            say("-- the extension's own keys in Redis after settling (name, type, size)")
            for k, ty, size in internal[:20]:
                say(f"   {k:40s} {ty:6s} {size}")
        reg = _registry(rc)
        if unk:
            res.failures.append(f"{len(unk)} keys of no mirror in Redis: {unk[:5]}")
        if reg:
            res.failures.append(f"sync registry not empty after settling: {[k.decode() for k in reg[:5]]}")

        bad, prmsgs = scan_server_log("\n".join(c.read_log() for c in [*env.old_primaries, pg.target]))
        if bad:
            res.failures.append(f"server log: {len(bad)} crash lines: {bad[:3]}")
        say("-- pg_redis messages in the server log (digits as N)")
        for k, v in prmsgs.most_common(12):
            say(f"   {v:6d}  {k}")

        if diffs:
            res.failures.append(f"{len(diffs)} differences between Redis and the tables")
            say(f"-- DIFFERENCES: {len(diffs)}")
            for d in diffs[:60]:
                say(f"   {d}")
            if len(diffs) > 60:
                say(f"   ... and {len(diffs) - 60} more")
        nc = Counter(n.split(" (e.g.")[0] for n in res.notes)
        first = {}
        for n in res.notes:
            first.setdefault(n.split(" (e.g.")[0], n)
        for k, v in nc.items():
            say(f"   note ({v}x): {first[k]}")

        res.numbers = dict(statements=sum(ops.values()), rows=sum(rows.values()), transactions=sum(txns.values()),
                           committed=txns["committed"], rolled_back=txns["rolled_back"] + txns["failed"],
                           acked=acked, lost=len(lost), faults=len(fr.done) if fr else 0,
                           captured=sum(r[1] for r in st_rows), differences=len(diffs), settle_s=round(settle_s, 1),
                           load_s=round(load_end - load_t0, 1))
        build1 = installed_build()
        if build1 != build0:
            changed = [os.path.basename(k) for k in set(build0) | set(build1) if build0.get(k) != build1.get(k)]
            res.invalid = True
            res.failures.insert(0, f"INVALID RUN: the extension was reinstalled during the run ({', '.join(changed)} "
                                   f"changed); a restarted server ran the new library against the old SQL objects. "
                                   f"Run again.")
        res.ok = not res.failures
        say(f"== {'OK' if res.ok else ('INVALID' if res.invalid else 'FAILED')}: " + (", ".join(f"{k} {v}" for k, v in res.numbers.items())))
        for f in res.failures:
            say(f"   FAILURE: {f}")
        if res.retry_diffs and tracer is not None:
            say("-- Redis history of keys that redis_retry left different (MONITOR; run clock)")
            for d in res.retry_diffs[:4]:
                say(f"   {d.table} {d.key!r} ({d.kind}{', ' + d.info if d.info else ''}):")
                for ln in key_history(art / "redis-monitor.txt", d.key, wall_t0):
                    say(f"      {ln}")
        if not res.ok:
            if tracer is not None and diffs:
                stop_trace.set()
                tracer.join(timeout=5)
                say("-- Redis history of the first differing keys (MONITOR; run clock)")
                for d in diffs[:8]:
                    say(f"   {d.table} {d.key!r} ({d.kind}{', ' + d.info if d.info else ''}):")
                    for ln in key_history(art / "redis-monitor.txt", d.key, wall_t0):
                        say(f"      {ln}")
            say("-- server log, pg_redis WARNING/ERROR and crash lines (last 40)")
            lines = [ln for ln in "\n".join(c.read_log() for c in [*env.old_primaries, pg.target]).splitlines()
                     if ("pg_redis" in ln and "NOTICE" not in ln) or "PANIC" in ln or "terminated" in ln]
            for ln in lines[-40:]:
                say(f"   {ln[:300]}")
        return res
    finally:
        stop_faults.set()
        stop_clients.set()
        stop_trace.set()
        with contextlib.suppress(Exception):
            (art / "postgresql.log").write_text(primary.read_log())
            if standby is not None:
                (art / "postgresql-standby.log").write_text(standby.read_log())
            (art / "redis.log").write_text(redis.read_log())
            (art / "report.txt").write_text("\n".join(log.lines + [""] + out) + "\n")
        keep_art = (opts.keep or (not res.ok and not (opts.inject and res.control_ok and not res.invalid))
                    or any("redis_retry left" in n for n in res.notes))
        if not keep_art:
            shutil.rmtree(art, ignore_errors=True)
        else:
            print(f"artifacts (server logs, Redis MONITOR trace, report): {art}", flush=True)
        for cl in clients:
            cl.join(timeout=10)
        if fr is not None:
            fr.join(timeout=60)
        with contextlib.suppress(Exception):
            rc.close()
        if opts.keep:
            print(f"servers kept: redis port {redis.port} (dir {redis.dir}), PostgreSQL {pg.conninfo()} (dir {pg.dir}); "
                  f"press Enter to clean up", flush=True)
            with contextlib.suppress(Exception):
                input()
        primary.cleanup()
        if standby is not None:
            standby.cleanup()
        redis.cleanup()

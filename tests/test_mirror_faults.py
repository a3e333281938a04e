"""Mirroring under faults (SPEC §3 queue-mode guarantees; issue 4): Redis stopped or stalled while
changes commit, PostgreSQL crashed with a backlog, the worker terminated, synchronous_commit = off
and a crash, Redis refusing writes (OOM -> dead letters, redis_retry), and delivery without the
worker (redis_drain, CALL redis_backfill).

Each test starts its own PostgreSQL cluster (postgresql.conf points pg_redis.url at the test's own
redis-server, since the worker reads it from there) so that crashing or reconfiguring one does not
disturb the others.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from test_mirror import assert_redis_equals_table, loads, one, scan_keys, stats, wait_idle, wait_until


class Env:
    def __init__(self, make_pg, make_redis, conf=(), preload=True, **pgkw):
        self.redis = make_redis()
        self.pg = make_pg(conf_lines=[f"pg_redis.url = '{self.redis.url}'", *conf], preload=preload, **pgkw)
        self.rc = self.redis.client(decode_responses=True)
        self.conn = None
        self.reconnect()
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")

    def reconnect(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass
        self.conn = self.pg.connect()
        return self.conn

    def equal(self, table, **kw):
        assert_redis_equals_table(self.pg, self.rc, table, **kw)


@pytest.fixture
def env(make_pg, make_redis):
    def factory(**kw):
        return Env(make_pg, make_redis, **kw)
    return factory


def timed(conn, sql, params=None):
    t0 = time.monotonic()
    conn.execute(sql, params)
    return time.monotonic() - t0


def write_workload(conn, table, base=0):
    """About 7,500 changes in a mix of transactions; returns the commit/statement durations."""
    durations = []
    for b in range(40):  # 4,000 inserts, 100 per transaction
        t0 = time.monotonic()
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} SELECT g, 'v' || g, 0 FROM generate_series(%s::int, %s::int) g",
                         (base + b * 100 + 1, base + b * 100 + 100))
        durations.append(time.monotonic() - t0)
    for i in range(200):  # 200 single-row commits
        durations.append(timed(conn, f"INSERT INTO {table} VALUES (%s, 'single', 0)", (base + 10_000 + i,)))
    for lo in range(0, 4000, 1000):  # 2,000 updates in 4 statements
        durations.append(timed(conn, f"UPDATE {table} SET n = n + 1, v = 'upd' WHERE id > %s AND id <= %s AND id %% 2 = 0",
                               (base + lo, base + lo + 1000)))
    durations.append(timed(conn, f"DELETE FROM {table} WHERE id % 4 = 1"))                      # ~1,000 deletes
    durations.append(timed(conn, f"UPDATE {table} SET id = id + 100000 WHERE id % 10 = 0"))    # ~400 key changes
    return durations


# ----------------------------------------------------------------------------------------


def test_redis_stopped_while_changes_commit(env):
    e = env()
    c = e.conn
    c.execute("CREATE TABLE f_down (id int PRIMARY KEY, v text, n int)")
    c.execute("SELECT redis_mirror('f_down')")
    c.execute("INSERT INTO f_down VALUES (0, 'before', 0)")
    wait_until(lambda: e.rc.exists("f_down:0"), 5, what="first row")
    e.redis.stop()
    c.execute("DELETE FROM f_down WHERE id = 0")  # Redis will come back empty: everything is written while down

    t0 = time.monotonic()
    durations = write_workload(c, "f_down")
    total = time.monotonic() - t0
    captured = one(c, "SELECT count(*) FROM f_down")
    assert max(durations) < 1.0, f"a commit took {max(durations):.2f}s while Redis was down"
    assert total < 20, f"the workload took {total:.1f}s with Redis down"
    s = wait_until(lambda: (lambda s: s if s["last_error"] else None)(stats(c, "f_down")), 10,
                   what="redis_stats.last_error while Redis is down")
    assert s["queue_depth"] > 1000, f"the changes should wait in the queue: {s}"
    assert s["last_error_at"] is not None, s
    assert "pg_redis" in s["last_error"] or "connect" in s["last_error"].lower() or "refused" in s["last_error"].lower(), s
    assert "secret" not in s["last_error"]

    e.redis.start()
    e.equal("f_down", timeout=30)
    s = wait_idle(c, "f_down")
    assert s["queue_depth"] == 0 and captured > 3000
    assert s["delivered"] >= 7000, s


def test_redis_stalled_commits_not_slowed(env):
    e = env(conf=["pg_redis.command_timeout = '1s'"])
    c = e.conn
    c.execute("CREATE TABLE f_stall (id int PRIMARY KEY, v text, n int)")
    c.execute("SELECT redis_mirror('f_stall')")
    c.execute("INSERT INTO f_stall VALUES (0, 'x', 0)")
    e.equal("f_stall")
    e.redis.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        durations = [timed(c, "INSERT INTO f_stall VALUES (%s, 'paused', 0)", (i,)) for i in range(1, 301)]
        durations.append(timed(c, "UPDATE f_stall SET n = n + 1"))
        time.sleep(2)
        durations += [timed(c, "UPDATE f_stall SET v = 'late' WHERE id = %s", (i,)) for i in range(1, 50)]
    finally:
        e.redis.resume()
    assert max(durations) < 1.0, f"a commit took {max(durations):.2f}s while Redis was stalled"
    e.equal("f_stall", timeout=30)


def test_postgres_crash_with_backlog_delivered_after_restart(env):
    # synchronous_commit on: every commit below survives the crash, so its change must reach Redis
    e = env(conf=["synchronous_commit = on"])
    c = e.conn
    c.execute("CREATE TABLE f_crash (id int PRIMARY KEY, v text, n int)")
    c.execute("SELECT redis_mirror('f_crash')")
    e.redis.stop()
    write_workload(c, "f_crash")
    depth = stats(c, "f_crash")["queue_depth"]
    assert depth > 1000, depth
    before = c.execute("SELECT id, v, n FROM f_crash ORDER BY id").fetchall()
    c.close()
    e.conn = None
    e.pg.crash()
    e.redis.start()
    e.pg.start()
    c = e.reconnect()
    after = c.execute("SELECT id, v, n FROM f_crash ORDER BY id").fetchall()
    assert after == before, "committed rows lost in the crash (synchronous_commit = on)"
    e.equal("f_crash", timeout=30)
    wait_idle(c, "f_crash")


def test_worker_terminated_is_restarted_and_nothing_lost(env):
    e = env()
    c = e.conn
    c.execute("CREATE TABLE f_kill (id int PRIMARY KEY, v text, n int)")
    c.execute("INSERT INTO f_kill SELECT g, 'x', 0 FROM generate_series(1, 1000) g")
    c.execute("SELECT redis_mirror('f_kill')")
    wait_idle(c, "f_kill")
    postmaster = e.pg.postmaster_pid()
    bystander = e.pg.connect()  # a session that must survive (no server-wide restart)
    stop = threading.Event()
    errors = []

    def writer():
        try:
            with e.pg.connect() as w:
                i = 0
                while not stop.is_set():
                    i += 1
                    with w.transaction():
                        w.execute("UPDATE f_kill SET n = n + 1, v = %s WHERE id = %s", (f"w{i}", i % 1000 + 1))
                        w.execute("INSERT INTO f_kill VALUES (%s, 'new', 0)", (10_000 + i,))
        except Exception as ex:  # noqa: BLE001
            errors.append(ex)

    th = threading.Thread(target=writer)
    th.start()
    pids = []
    try:
        for _ in range(3):
            time.sleep(0.3)
            pid = wait_until(lambda: stats(c, "f_kill")["worker_pid"], 15, what="a worker pid")
            assert pid not in pids
            pids.append(pid)
            assert one(c, "SELECT pg_terminate_backend(%s)", (pid,)) is True
            wait_until(lambda: (stats(c, "f_kill")["worker_pid"] or pid) != pid, 15, 0.05,
                       what=f"a new worker after terminating {pid}")
        time.sleep(0.3)
    finally:
        stop.set()
        th.join()
    assert not errors, errors
    assert e.pg.postmaster_pid() == postmaster
    assert one(bystander, "SELECT 1") == 1
    bystander.close()
    new = wait_until(lambda: stats(c, "f_kill")["worker_pid"], 15, what="a worker pid")
    assert new not in pids
    e.equal("f_kill", timeout=20)
    wait_idle(c, "f_kill")


def test_synchronous_commit_off_never_delivers_what_a_crash_loses(env):
    """With synchronous_commit = off (set for the whole cluster here, so the worker's own commits do
    not flush WAL either) and a WAL writer that sleeps 10 s, a commit record can stay in shared
    memory and die in an immediate shutdown. Whatever Redis received must then still be in the
    table after recovery; and after the restart Redis equals the table."""
    e = env(conf=["synchronous_commit = off", "wal_writer_delay = 10000ms", "wal_writer_flush_after = 1GB"])
    c = e.conn
    c.execute("CREATE TABLE f_async (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('f_async')")
    c.execute("CREATE TABLE f_async_control (id int PRIMARY KEY)")  # not mirrored
    c.execute("CHECKPOINT")
    outcomes = []
    for rnd in range(3):
        with e.pg.connect() as w:
            w.execute("SET synchronous_commit = off")
            for i in range(5):
                w.execute("INSERT INTO f_async VALUES (%s, 'async')", (rnd * 100 + i,))
            time.sleep(0.4)
            in_redis = set(scan_keys(e.rc, "f_async:*"))
            w.execute("INSERT INTO f_async_control VALUES (%s)", (rnd,))
        c.close()
        e.pg.crash()
        e.pg.start()
        c = e.reconnect()
        in_table = {f"f_async:{i}" for (i,) in c.execute("SELECT id FROM f_async").fetchall()}
        control = one(c, "SELECT count(*) FROM f_async_control WHERE id = %s", (rnd,))
        outcomes.append((rnd, len(in_redis), len(in_table), control))
        ghosts = in_redis - in_table
        assert not ghosts, (f"round {rnd}: Redis received {sorted(ghosts)} before the crash, but the table lost "
                            f"them: a change was delivered before its commit record was flushed")
        e.equal("f_async", timeout=15)
    # the control row, committed just before each crash with nobody flushing WAL, shows that this
    # setup does lose unflushed commits (else the test above proves nothing)
    print("rounds (round, keys in Redis before crash, mirrored rows after recovery, control survived):", outcomes)
    assert sum(o[3] for o in outcomes) < len(outcomes), f"no async commit was ever lost: {outcomes}"


def test_worker_steps_do_not_each_wait_for_a_wal_flush(env):
    """With synchronous_commit = on for the whole cluster (PostgreSQL's default) every writer's
    COMMIT flushes the WAL; the worker's step that delivers it commits asynchronously (losing it
    in a crash only sends the changes again), so single-row commits do not cost two flushes each."""
    e = env(conf=["synchronous_commit = on"], fsync=True)
    c = e.conn
    c.execute("CREATE TABLE f_flush (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('f_flush')")
    wait_idle(c, "f_flush")
    n = 40
    before = one(c, "SELECT wal_sync FROM pg_stat_wal")
    for i in range(n):
        c.execute("INSERT INTO f_flush VALUES (%s, 'x')", (i,))
        wait_until(lambda: e.rc.exists(f"f_flush:{i}"), 5, 0.001, f"f_flush:{i}")
    # Processes report their WAL counters at most once a second: wait, then wake the worker once
    # more (one more commit) so that it reports too, and read from a fresh session.
    time.sleep(1.2)
    c.execute("INSERT INTO f_flush VALUES (%s, 'x')", (n,))
    wait_until(lambda: e.rc.exists(f"f_flush:{n}"), 5, 0.001, f"f_flush:{n}")
    time.sleep(1.2)
    with e.pg.connect() as r:
        flushes = one(r, "SELECT wal_sync FROM pg_stat_wal") - before
    print(f"{n + 1} single-row commits delivered one by one: {flushes} WAL flushes")
    assert n <= flushes < 1.5 * n, f"{n} commits delivered one by one took {flushes} WAL flushes"
    e.equal("f_flush")


def test_redis_refusing_writes_dead_letters_then_retry(env):
    e = env(conf=["pg_redis.max_attempts = 2"])
    c = e.conn
    c.execute("CREATE TABLE f_oom (id int PRIMARY KEY, v text)")
    c.execute("INSERT INTO f_oom SELECT g, 'small' FROM generate_series(1, 10) g")
    c.execute("SELECT redis_mirror('f_oom')")
    e.equal("f_oom")
    # Redis over its memory limit with noeviction: every write is refused (OOM), DEL still works
    e.rc.config_set("maxmemory-policy", "noeviction")
    e.rc.config_set("maxmemory", "1")
    t0 = time.monotonic()
    c.execute("INSERT INTO f_oom SELECT g, repeat('x', 1000) FROM generate_series(11, 15) g")
    c.execute("DELETE FROM f_oom WHERE id = 1")
    assert time.monotonic() - t0 < 1
    wait_until(lambda: not e.rc.exists("f_oom:1"), 10, what="the DEL behind the refused writes")
    s = wait_until(lambda: (lambda s: s if s["dead_letters"] == 5 and s["queue_depth"] == 0 else None)(stats(c, "f_oom")),
                   30, 0.1, what="5 dead letters after max_attempts = 2")
    assert s["failed"] >= 5 and s["last_error"] and s["last_error_at"] is not None, s
    dl = c.execute("SELECT mirror::text, key, op, error, attempts, first_failure, last_failure "
                   "FROM redis_dead_letters ORDER BY key").fetchall()
    assert [d[1] for d in dl] == [f"f_oom:{i}" for i in range(11, 16)], dl
    for d in dl:
        assert d[0] == "f_oom" and d[2] == "write" and "OOM" in d[3] and d[4] == 2, d
        assert d[5] is not None and d[6] is not None and d[6] >= d[5], d
    # later changes still flow: a delete now, writes once Redis has room again
    e.rc.config_set("maxmemory", "0")
    c.execute("INSERT INTO f_oom VALUES (100, 'after')")
    wait_until(lambda: e.rc.exists("f_oom:100"), 10, what="a write after the dead letters")
    assert not e.rc.exists("f_oom:11")
    assert one(c, "SELECT redis_retry('f_oom')") == 5
    e.equal("f_oom")
    wait_until(lambda: one(c, "SELECT count(*) FROM redis_dead_letters") == 0, 5, what="dead letters gone after retry")
    assert stats(c, "f_oom")["dead_letters"] == 0
    # SPEC §6: the error says what Redis answered
    assert "OOM" in s["last_error"], f"redis_stats.last_error does not say what Redis answered: {s['last_error']!r}"


def test_multi_row_statements_share_queue_rows(env):
    """The changes of a multi-row INSERT or DELETE share queue rows (packed: op 'S' / 'D'); the
    status view counts changes, not rows, and every change is delivered once Redis is back."""
    e = env()
    c = e.conn
    c.execute("CREATE TABLE f_pack (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('f_pack')")
    c.execute("INSERT INTO f_pack VALUES (0, 'first')")
    wait_until(lambda: e.rc.exists("f_pack:0"), 5, what="first row")
    e.redis.stop()
    c.execute("INSERT INTO f_pack SELECT g, 'v' || g FROM generate_series(1, 1000) g")
    c.execute("DELETE FROM f_pack WHERE id % 3 = 0")                                      # 334 deletes
    c.execute("INSERT INTO f_pack SELECT g, repeat('x', 5000) FROM generate_series(2001, 2010) g")  # too big to pack
    c.execute("UPDATE f_pack SET v = 'upd' WHERE id BETWEEN 1 AND 50")                    # 34 updates
    changes = 1000 + 334 + 10 + 34
    rows, writes, deletes = c.execute("SELECT count(*), count(*) FILTER (WHERE op = 'S'), "
                                      "count(*) FILTER (WHERE op = 'D') FROM redis_internal.queue").fetchone()
    assert writes > 0 and deletes > 0, (rows, writes, deletes)
    assert rows < changes / 5, f"{rows} queue rows for {changes} changes: multi-row statements were not packed"
    assert stats(c, "f_pack")["queue_depth"] == changes
    e.redis.start()
    e.equal("f_pack", timeout=30)
    s = wait_idle(c, "f_pack")
    assert s["queue_depth"] == 0 and s["delivered"] == changes + 1, s


def test_packed_row_partly_refused_keeps_only_what_failed(env):
    """Redis refuses some changes of a packed row (an ACL that allows only some keys): the row
    keeps only those (a retry never sends again a value a later change replaced), and they become
    dead letters of their own, which redis_retry delivers once Redis accepts them."""
    e = env(conf=["pg_redis.max_attempts = 3"])
    c = e.conn
    c.execute("CREATE TABLE f_pp (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('f_pp')")
    e.rc.execute_command("ACL", "SETUSER", "default", "resetkeys", "~f_pp:1*")
    try:
        c.execute("INSERT INTO f_pp SELECT g, 'old' FROM generate_series(1, 20) g")
        wait_until(lambda: e.rc.get("f_pp:1") is not None, 10, what="the allowed keys of the packed row")
        c.execute("UPDATE f_pp SET v = 'new' WHERE id = 1")
        wait_until(lambda: loads(e.rc.get("f_pp:1"))["v"] == "new", 10, what="the update of an allowed key")
        refused = [f"f_pp:{i}" for i in [*range(2, 10), 20]]
        wait_until(lambda: stats(c, "f_pp")["dead_letters"] == len(refused), 30, 0.1,
                   what=f"{len(refused)} dead letters after max_attempts = 3")
        assert loads(e.rc.get("f_pp:1"))["v"] == "new", "a retry of the packed row sent an old value again"
        dl = c.execute("SELECT key, op, error, attempts FROM redis_dead_letters WHERE mirror = 'f_pp'::regclass "
                       "ORDER BY key").fetchall()
        assert sorted(d[0] for d in dl) == sorted(refused), dl
        assert all(d[1] == "write" and "NOPERM" in d[2] and d[3] == 3 for d in dl), dl
        assert one(c, "SELECT count(DISTINCT id) FROM redis_internal.dead_letters") == len(refused)
        assert stats(c, "f_pp")["queue_depth"] == 0
    finally:
        e.rc.execute_command("ACL", "SETUSER", "default", "allkeys")
    assert one(c, "SELECT redis_retry('f_pp')") == len(refused)
    e.equal("f_pp")
    assert loads(e.rc.get("f_pp:1"))["v"] == "new"


def test_dead_letter_retry_does_not_regress_a_key(env):
    """A dead letter holds an old value; a retry after the row changed must not put it back."""
    e = env(conf=["pg_redis.max_attempts = 1"])
    c = e.conn
    c.execute("CREATE TABLE f_dl (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('f_dl')")
    e.rc.config_set("maxmemory-policy", "noeviction")
    e.rc.config_set("maxmemory", "1")
    c.execute("INSERT INTO f_dl VALUES (1, 'old')")
    wait_until(lambda: stats(c, "f_dl")["dead_letters"] == 1, 30, 0.1, what="a dead letter")
    e.rc.config_set("maxmemory", "0")
    c.execute("UPDATE f_dl SET v = 'new'")
    wait_until(lambda: e.rc.get("f_dl:1") is not None, 10, what="the new value")
    one(c, "SELECT redis_retry()")
    time.sleep(1)
    e.equal("f_dl")


def test_truncate_supersedes_writes_redis_refused(env):
    """Writes refused (OOM) then a TRUNCATE that lands: once Redis has room again, the refused
    writes must not come back (found by the history checker: keys of truncated rows reappeared)."""
    e = env(conf=["pg_redis.max_attempts = 1000"])
    c = e.conn
    c.execute("CREATE TABLE f_tr (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('f_tr')")
    e.rc.config_set("maxmemory-policy", "noeviction")
    e.rc.config_set("maxmemory", "1")
    c.execute("INSERT INTO f_tr SELECT g, 'refused' FROM generate_series(1, 20) g")
    wait_until(lambda: stats(c, "f_tr")["failed"] >= 20, 10, 0.05, what="the writes refused")
    c.execute("TRUNCATE f_tr")
    wait_until(lambda: stats(c, "f_tr")["queue_depth"] == 0, 10, 0.05,
               what="the TRUNCATE delivered and the refused writes before it dropped")
    e.rc.config_set("maxmemory", "0")
    c.execute("INSERT INTO f_tr VALUES (100, 'after')")
    wait_until(lambda: e.rc.exists("f_tr:100"), 10, what="a write after the TRUNCATE")
    time.sleep(0.5)
    assert scan_keys(e.rc, "f_tr:*") == ["f_tr:100"]
    e.equal("f_tr")


def test_backfill_leaves_keys_with_waiting_changes_to_the_queue(env):
    """A backfill step reads rows and sends them straight to Redis, except a row whose key has a
    change waiting in the queue: that change (and its later ones) is delivered after the step,
    so a key never goes back to an older value. A TRUNCATE waiting in the queue would purge what
    the step sent: then the step goes through the queue, after it."""
    e = env(preload=False)
    c = e.conn
    c.execute("CREATE TABLE f_bw (id int PRIMARY KEY, v text)")
    c.execute("INSERT INTO f_bw SELECT g, 'old' FROM generate_series(1, 3000) g")
    assert one(c, "SELECT redis_mirror('f_bw')") == 3000
    c.execute("UPDATE f_bw SET v = 'v1' WHERE id <= 20")
    c.execute("UPDATE f_bw SET v = 'v2' WHERE id <= 10")  # two waiting changes for ids 1..10
    # one step (CALL redis_backfill would also drain the queue after each): the whole table
    assert c.execute("SELECT queued, done FROM redis_backfill_step('f_bw')").fetchone() == (2980, True)
    assert stats(c, "f_bw")["state"] == "active"
    present = {int(k.split(":")[1]) for k in scan_keys(e.rc, "f_bw:*")}
    assert present == set(range(21, 3001)), \
        f"keys with waiting changes sent by the backfill: {sorted(present & set(range(1, 21)))}; missing: " \
        f"{len(set(range(21, 3001)) - present)}"
    assert one(c, "SELECT queue_depth FROM redis_stats WHERE mirror = 'f_bw'::regclass") == 30, \
        "the backfill queued rows it could send itself"
    assert loads(e.rc.get("f_bw:2999")) == {"id": 2999, "v": "old"}
    c.execute("SELECT redis_drain()")
    e.equal("f_bw")

    # Rows whose every key has a waiting change (inserted after a TRUNCATE): nothing to send.
    c.execute("TRUNCATE f_bw")
    c.execute("INSERT INTO f_bw SELECT g, 'new' FROM generate_series(1, 500) g")
    assert one(c, "SELECT redis_resync('f_bw')") == 500
    c.execute("SELECT * FROM redis_backfill_step('f_bw')")
    assert one(c, "SELECT queue_depth FROM redis_stats WHERE mirror = 'f_bw'::regclass") == 1 + 500
    c.execute("SELECT redis_drain()")
    e.equal("f_bw")

    # A re-key queues a purge of the old layout: the backfill's rows must come after it, so the
    # step goes through the queue.
    c.execute("SELECT redis_mirror('f_bw', key_template => 'f_bw_new:{id}')")
    c.execute("SELECT * FROM redis_backfill_step('f_bw')")
    assert one(c, "SELECT queue_depth FROM redis_stats WHERE mirror = 'f_bw'::regclass") == 1 + 500
    assert scan_keys(e.rc, "f_bw_new:*") == [], "something was sent before the purge"
    c.execute("SELECT redis_drain()")
    e.equal("f_bw", key_sql="'f_bw_new:' || id", pattern="f_bw_new:*")
    assert scan_keys(e.rc, "f_bw:*") == [], "the old layout was not purged"


def test_without_preload_drain_and_backfill_in_session(env):
    e = env(preload=False)
    c = e.conn
    notices = []
    c.add_notice_handler(lambda d: notices.append(d.message_primary))
    c.execute("CREATE TABLE f_np (id int PRIMARY KEY, v text)")
    c.execute("INSERT INTO f_np SELECT g, 'x' || g FROM generate_series(1, 2500) g")
    assert one(c, "SELECT redis_mirror('f_np')") == 2500
    assert any("worker" in n and n.startswith("pg_redis:") for n in notices), notices
    s = stats(c, "f_np")
    assert s["worker_pid"] is None and s["worker_state"] and "not" in s["worker_state"], s
    c.execute("INSERT INTO f_np VALUES (5000, 'queued')")
    time.sleep(0.5)
    assert scan_keys(e.rc, "f_np:*") == [], "something delivered without a worker or a drain"

    # a procedure that commits between batches cannot run inside a transaction block
    with pytest.raises(psycopg.Error):
        with c.transaction():
            c.execute("CALL redis_backfill('f_np')")
    notices.clear()
    c.execute("CALL redis_backfill('f_np')")
    assert any("backfill" in n for n in notices), notices
    c.execute("SELECT redis_drain()")
    e.equal("f_np")
    assert stats(c, "f_np")["state"] == "active"

    c.execute("UPDATE f_np SET v = 'u' WHERE id <= 10")
    c.execute("DELETE FROM f_np WHERE id > 2000")
    assert one(c, "SELECT redis_drain(3)") <= 3
    n = one(c, "SELECT redis_drain()")
    assert n >= 1, n
    assert one(c, "SELECT redis_drain()") == 0
    e.equal("f_np", timeout=0)
    assert stats(c, "f_np")["queue_depth"] == 0


def test_worker_waits_quietly_for_the_extension(make_pg, make_redis):
    """A served database without CREATE EXTENSION yet (every fresh install): the worker must wait
    quietly, not fail and restart every second filling the log; then mirroring works once created."""
    rs = make_redis()
    pg = make_pg(conf_lines=[f"pg_redis.url = '{rs.url}'"])
    time.sleep(3)
    log = pg.read_log()
    errors = [line for line in log.splitlines() if "ERROR:" in line or "exited with exit code" in line]
    assert not errors, f"{len(errors)} ERROR/exit lines in 3 s before CREATE EXTENSION, e.g. {errors[:2]}"
    with pg.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        c.execute("CREATE TABLE f_late (id int PRIMARY KEY)")
        c.execute("SELECT redis_mirror('f_late')")
        c.execute("INSERT INTO f_late VALUES (1)")
    rc = rs.client(decode_responses=True)
    wait_until(lambda: loads(rc.get("f_late:1") or "null") == {"id": 1}, 10, what="delivery after CREATE EXTENSION")

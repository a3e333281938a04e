"""Delivery modes `commit` and `sync` (SPEC §3; issue 5, items 1-2).

commit: COMMIT returns only once the transaction's changes are in Redis (read-your-writes, checked
the instant COMMIT returns, 1 and 5,000 rows per transaction, several sessions at once), or after
pg_redis.commit_wait_timeout when Redis is down or stalled (the changes are delivered later from the
queue); a cancel ends the wait; a rolled-back transaction pushes nothing; PREPARE TRANSACTION is
refused.

sync: the change is in Redis before COMMIT; Redis unreachable -> the statement fails (08xxx,
'pg_redis:') and nothing commits; ROLLBACK, ROLLBACK TO SAVEPOINT and a backend killed with SIGKILL
all end with the keys restored to the committed state; the registry keys pg_redis:sync:* are
cleaned up.

Tests that need the module cluster use `m` (module cluster, whose postgresql.conf points at
`module_redis`, so the worker delivers there; the module cluster also has
max_prepared_transactions > 0). Tests that stop/pause Redis or crash PostgreSQL start their own
cluster + redis-server (`env`).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time

import psycopg
import pytest

from harness import PgCluster, expect_error
from helpers import REFERENCE_SETTINGS, MirrorCtx, one, queue_len, wait_for_worker, wait_until  # noqa: F401

# ----------------------------------------------------------------------------------------
# Local helpers


def jget(rc, key):
    v = rc.get(key)
    return None if v is None else json.loads(v)


def stats(conn, table):
    cur = conn.execute("SELECT * FROM redis_stats WHERE mirror = %s::regclass", (table,))
    row = cur.fetchone()
    assert row is not None, f"no redis_stats row for {table}"
    return dict(zip([c.name for c in cur.description], row))


def wait_for_worker(pg, conn):
    """The worker serving the database is up (before measuring commit times)."""
    try:
        wait_until(lambda: one(conn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_redis worker'"),
                   10, 0.05, "the pg_redis worker to run")
    except AssertionError as ex:
        log = "\n".join(ln for ln in pg.read_log().splitlines() if " UTC [" in ln)
        raise AssertionError(f"{ex}\n--- server log ---\n{log[-3000:]}") from None


def diag(pg, since=0):
    """Server-log lines that explain a commit that did not see its write: worker exits, WAL flush
    failures, commit waits that timed out."""
    marks = ("is not satisfied", "exited with exit code", "commit_wait_timeout", "PANIC", "FATAL")
    lines = [ln for ln in pg.read_log_since(since).splitlines() if any(k in ln for k in marks)]
    return ("\n  server log:\n  " + "\n  ".join(lines[-8:])) if lines else ""


def sync_registry(rc):
    return sorted(rc.scan_iter(match="pg_redis:sync:*", count=1000))


class Ctx(MirrorCtx):
    """A superuser session of a cluster whose worker delivers to `redis_srv`, and that Redis."""


@pytest.fixture(scope="module")
def pg(module_redis):
    """The module cluster, with prepared transactions enabled (PREPARE TRANSACTION tests)."""
    cluster = PgCluster(conf_lines=[f"pg_redis.url = '{module_redis.url}'",
                                    "max_prepared_transactions = 5"])
    with cluster.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        wait_for_worker(cluster, c)
    yield cluster
    cluster.cleanup()


@pytest.fixture
def m(pg, module_redis):
    module_redis.client().flushall()
    ctx = Ctx(pg, module_redis)
    yield ctx
    ctx.close()


@pytest.fixture
def env(make_pg, make_redis):
    """A cluster of its own whose worker delivers to a redis-server of its own (for faults)."""
    made = []

    def factory(conf=()):
        srv = make_redis()
        cluster = make_pg(conf_lines=[f"pg_redis.url = '{srv.url}'", *conf])
        ctx = Ctx(cluster, srv)
        made.append(ctx)
        wait_for_worker(cluster, ctx.conn)
        return ctx

    yield factory
    for ctx in made:
        ctx.redis.resume()
        try:
            ctx.conn.close()
        except Exception:  # noqa: BLE001
            pass


def row(i, v=None, n=None):
    return {"id": i, "v": v if v is not None else f"v{i}", "n": n if n is not None else i * 2}


# ----------------------------------------------------------------------------------------
# Refusals


def test_commit_and_sync_need_the_worker(make_pg, make_redis, pg):
    # No preload: no worker at all.
    srv = make_redis()
    nopre = make_pg(conf_lines=[f"pg_redis.url = '{srv.url}'"], preload=False)
    with nopre.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        c.execute("CREATE TABLE np (id int PRIMARY KEY, v text)")
        for mode in ("commit", "sync"):
            expect_error(c, "SELECT redis_mirror('np', mode => %s)", (mode,), sqlstate="22023")
        assert one(c, "SELECT count(*) FROM redis_mirrors") == 0
        assert one(c, "SELECT redis_mirror('np', mode => 'queue')") == 0  # queue mode is fine

    # Preloaded, but a database that pg_redis.databases (default 'postgres') does not list.
    pg.sql("DROP DATABASE IF EXISTS modes_other")
    pg.sql("CREATE DATABASE modes_other")
    try:
        with pg.connect(dbname="modes_other") as c:
            c.execute("CREATE EXTENSION pg_redis")
            c.execute("CREATE TABLE od (id int PRIMARY KEY, v text)")
            for mode in ("commit", "sync"):
                expect_error(c, "SELECT redis_mirror('od', mode => %s)", (mode,), sqlstate="22023")
            expect_error(c, "SELECT redis_mirror('od', mode => 'sometimes')", sqlstate="22023")
    finally:
        pg.sql("DROP DATABASE IF EXISTS modes_other WITH (FORCE)")


@pytest.mark.parametrize("mode", ["commit", "sync"])
def test_prepare_transaction_refused(m, mode):
    t = m.table(f"md_prep_{mode}", "id int PRIMARY KEY, v text")
    m.mirror(t, mode=mode)
    m.conn.execute(f"INSERT INTO {t} VALUES (1, 'one')")
    m.idle()
    assert jget(m.rc, f"{t}:1") == {"id": 1, "v": "one"}
    c = m.conn
    c.execute("BEGIN")
    c.execute(f"INSERT INTO {t} VALUES (2, 'two')")
    c.execute(f"UPDATE {t} SET v = 'uno' WHERE id = 1")
    expect_error(c, f"PREPARE TRANSACTION 'md_prep_{mode}'", sqlstate="0A000")
    if c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        c.execute("ROLLBACK")
    assert one(c, "SELECT count(*) FROM pg_prepared_xacts") == 0
    assert c.execute(f"SELECT id, v FROM {t} ORDER BY id").fetchall() == [(1, "one")]
    # Nothing of the refused transaction survives in Redis (sync mode pushed it: repaired).
    wait_until(lambda: jget(m.rc, f"{t}:1") == {"id": 1, "v": "one"} and not m.rc.exists(f"{t}:2"),
               5, what="Redis back to the committed state after the refused PREPARE")
    wait_until(lambda: not sync_registry(m.rc), 5, what="the sync registry to be cleaned")


def test_prepare_transaction_allowed_for_queue_mode(m):
    q = m.table("md_prep_queue", "id int PRIMARY KEY, v text")
    other = m.table("md_prep_commit_untouched", "id int PRIMARY KEY, v text")
    m.mirror(q)
    m.mirror(other, mode="commit")
    c = m.conn
    c.execute("BEGIN")
    c.execute(f"INSERT INTO {q} VALUES (1, 'one')")
    c.execute(f"SELECT * FROM {other}")  # reading a commit-mode table is not touching it
    c.execute("PREPARE TRANSACTION 'md_prep_q'")
    assert not m.rc.exists(f"{q}:1")
    c.execute("COMMIT PREPARED 'md_prep_q'")
    wait_until(lambda: jget(m.rc, f"{q}:1") == {"id": 1, "v": "one"}, 5, what="queue-mode row after COMMIT PREPARED")


# ----------------------------------------------------------------------------------------
# commit mode


def test_commit_read_your_writes_single_row(m):
    t = m.table("md_c1", "id int PRIMARY KEY, v text, n int")
    m.mirror(t, mode="commit")
    c = m.conn
    pos = m.pg.log_position()
    durations = []
    for i in range(1, 151):
        t0 = time.monotonic()
        c.execute(f"INSERT INTO {t} VALUES (%s, %s, %s)", (i, f"v{i}", i * 2))
        durations.append(time.monotonic() - t0)
        got = jget(m.rc, f"{t}:{i}")  # the instant COMMIT returned
        assert got == row(i), f"insert {i}: Redis has {got!r} right after COMMIT" + diag(m.pg, pos)
    for i in range(1, 51):
        c.execute(f"UPDATE {t} SET v = 'upd', n = NULL WHERE id = %s", (i,))
        got = jget(m.rc, f"{t}:{i}")
        assert got == {"id": i, "v": "upd", "n": None}, \
            f"update {i}: Redis has {got!r} right after COMMIT" + diag(m.pg, pos)
    for i in range(51, 101):
        c.execute(f"DELETE FROM {t} WHERE id = %s", (i,))
        assert not m.rc.exists(f"{t}:{i}"), f"delete {i}: key still in Redis right after COMMIT" + diag(m.pg, pos)
    # key change: old key gone and new key there at once
    c.execute(f"UPDATE {t} SET id = 1000 WHERE id = 101")
    assert not m.rc.exists(f"{t}:101") and jget(m.rc, f"{t}:1000") == {"id": 1000, "v": "v101", "n": 202}
    # explicit transaction with several statements
    with c.transaction():
        c.execute(f"INSERT INTO {t} VALUES (2000, 'a', 1)")
        c.execute(f"UPDATE {t} SET v = 'b' WHERE id = 2000")
    assert jget(m.rc, f"{t}:2000") == {"id": 2000, "v": "b", "n": 1}
    p50 = statistics.median(durations)
    print(f"commit mode single-row INSERT: p50 {p50 * 1000:.2f} ms, max {max(durations) * 1000:.1f} ms")
    assert p50 < 0.05, f"median commit-mode single-row commit {p50 * 1000:.1f} ms"
    assert max(durations) < 4.0, f"a commit waited {max(durations):.2f}s with Redis up (timeout is 5s)" + diag(m.pg, pos)
    m.idle(5)  # the worker's own transaction (deleting what it delivered) commits just after


def test_commit_read_your_writes_5000_rows(m):
    t = m.table("md_c5k", "id int PRIMARY KEY, v text, n int")
    m.mirror(t, mode="commit")
    c = m.conn
    pos = m.pg.log_position()
    keys = [f"{t}:{i}" for i in range(1, 5001)]

    def snapshot():
        return [None if v is None else json.loads(v) for v in m.rc.mget(keys)]

    t0 = time.monotonic()
    with c.transaction():
        c.execute(f"INSERT INTO {t} SELECT g, 'v' || g, g * 2 FROM generate_series(1, 5000) g")
    took = time.monotonic() - t0
    got = snapshot()
    bad = [(i + 1, g) for i, g in enumerate(got) if g != row(i + 1)]
    assert not bad, f"{len(bad)} of 5000 rows not in Redis right after COMMIT, e.g. {bad[:3]}" + diag(m.pg, pos)
    assert took < 4.5, f"5,000-row commit took {took:.2f}s (did it hit the 5s commit_wait_timeout?)"

    with c.transaction():
        c.execute(f"UPDATE {t} SET v = 'u' || id WHERE id % 2 = 0")
        c.execute(f"UPDATE {t} SET n = -1 WHERE id % 2 = 0")
    got = snapshot()
    bad = [(i, g) for i, g in enumerate(got, 1)
           if g != (row(i, f"u{i}", -1) if i % 2 == 0 else row(i))]
    assert not bad, f"{len(bad)} rows stale right after the 5,000-row UPDATE commit, e.g. {bad[:3]}" + diag(m.pg, pos)

    with c.transaction():
        c.execute(f"DELETE FROM {t}")
    left = sum(1 for v in m.rc.mget(keys) if v is not None)
    assert left == 0, f"{left} keys still in Redis right after the 5,000-row DELETE commit" + diag(m.pg, pos)
    print(f"5,000-row insert commit: {took * 1000:.0f} ms")


def test_commit_rolled_back_pushes_nothing(m):
    t = m.table("md_crb", "id int PRIMARY KEY, v text")
    m.mirror(t, mode="commit")
    m.conn.execute(f"INSERT INTO {t} VALUES (1, 'one')")
    m.idle()
    c = m.conn
    c.execute("BEGIN")
    c.execute(f"INSERT INTO {t} VALUES (2, 'two')")
    c.execute(f"UPDATE {t} SET v = 'changed' WHERE id = 1")
    c.execute(f"DELETE FROM {t} WHERE id = 1")
    c.execute("ROLLBACK")
    # savepoint rolled back inside a committed transaction
    with c.transaction():
        c.execute(f"INSERT INTO {t} VALUES (3, 'three')")
        try:
            with c.transaction():
                c.execute(f"INSERT INTO {t} VALUES (4, 'four')")
                c.execute(f"UPDATE {t} SET v = 'sp' WHERE id = 1")
                raise RuntimeError("roll back the savepoint")
        except RuntimeError:
            pass
    assert jget(m.rc, f"{t}:3") == {"id": 3, "v": "three"}
    time.sleep(0.3)
    assert not m.rc.exists(f"{t}:2"), "a rolled-back insert reached Redis"
    assert not m.rc.exists(f"{t}:4"), "an insert rolled back to a savepoint reached Redis"
    assert jget(m.rc, f"{t}:1") == {"id": 1, "v": "one"}
    m.idle(5)


def test_commit_many_sessions_at_once(m):
    """Eight sessions committing concurrently: every COMMIT sees its own write (no lost wake-up)."""
    t = m.table("md_cconc", "id int PRIMARY KEY, v text, n int")
    m.mirror(t, mode="commit")
    pos = m.pg.log_position()
    errors = []
    durations = []
    lock = threading.Lock()

    def worker(w):
        rc = m.redis.client(decode_responses=True)
        try:
            with m.pg.connect() as c:
                for k in range(40):
                    i = w * 1000 + k
                    t0 = time.monotonic()
                    c.execute(f"INSERT INTO {t} VALUES (%s, %s, %s)", (i, f"v{i}", i * 2))
                    d = time.monotonic() - t0
                    got = jget(rc, f"{t}:{i}")
                    with lock:
                        durations.append(d)
                        if got != row(i):
                            errors.append((i, got))
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(("exception", repr(e)))
        finally:
            rc.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, f"{len(errors)} commits not visible in Redis when COMMIT returned: {errors[:5]}" + diag(m.pg, pos)
    assert len(durations) == 320
    assert max(durations) < 4.0, f"a commit waited {max(durations):.2f}s with Redis up"


def test_commit_wait_bounded_when_redis_down_then_delivered(env):
    e = env()
    t = e.table("md_cdown", "id int PRIMARY KEY, v text")
    e.mirror(t, mode="commit")
    c = e.conn
    c.execute("ALTER SYSTEM SET pg_redis.commit_wait_timeout = '1s'")
    c.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)
    c.execute(f"INSERT INTO {t} VALUES (1, 'before')")
    assert jget(e.rc, f"{t}:1") == {"id": 1, "v": "before"}

    e.redis.stop()
    times = []
    for i in range(2, 8):
        t0 = time.monotonic()
        c.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, f"down{i}"))
        times.append(time.monotonic() - t0)
    print("commit times with Redis down:", [f"{x:.3f}" for x in times])
    assert max(times) < 2.0, f"COMMIT with Redis down took {max(times):.2f}s (bound 1s): {times}"
    assert one(c, f"SELECT count(*) FROM {t}") == 7  # the commits themselves went through
    s = stats(c, t)
    assert s["queue_depth"] >= 6, s
    wait_until(lambda: stats(c, t)["last_error"] is not None or stats(c, t)["failed"] > 0, 10,
               what="the failed push to show in redis_stats")

    e.redis.start()  # empty: no persistence; the queue delivers what it holds
    e.rc = e.redis.client(decode_responses=True)
    wait_until(lambda: all(jget(e.rc, f"{t}:{i}") == {"id": i, "v": f"down{i}"} for i in range(2, 8)),
               30, 0.1, "the changes queued while Redis was down to be delivered")
    e.idle()
    # read-your-writes again once Redis is back
    ok = False
    for i in range(100, 110):  # allow the worker to notice Redis is up again
        c.execute(f"INSERT INTO {t} VALUES (%s, 'up')", (i,))
        if jget(e.rc, f"{t}:{i}") == {"id": i, "v": "up"}:
            ok = True
            break
        time.sleep(0.5)
    assert ok, "commit mode never went back to read-your-writes after Redis came back"
    c.execute(f"INSERT INTO {t} VALUES (200, 'up2')")
    assert jget(e.rc, f"{t}:200") == {"id": 200, "v": "up2"}


def test_commit_wait_bounded_when_redis_stalled_and_cancel_ends_it(env):
    e = env()
    t = e.table("md_cstall", "id int PRIMARY KEY, v text")
    e.mirror(t, mode="commit")
    c = e.conn
    c.execute(f"INSERT INTO {t} VALUES (1, 'before')")
    assert jget(e.rc, f"{t}:1") == {"id": 1, "v": "before"}

    # SIGSTOP: connections stay open, nothing answers. The wait ends at the (session) timeout.
    c.execute("SET pg_redis.commit_wait_timeout = '700ms'")
    e.redis.pause()
    try:
        t0 = time.monotonic()
        c.execute(f"INSERT INTO {t} VALUES (2, 'stalled')")
        took = time.monotonic() - t0
        assert took < 2.0, f"COMMIT with Redis stalled took {took:.2f}s (bound 0.7s)"

        # A long timeout, and a cancel while the COMMIT waits: the wait ends at once, committed.
        c.execute("SET pg_redis.commit_wait_timeout = '60s'")
        pid = c.info.backend_pid
        out = {}

        def commit_in_thread():
            t0 = time.monotonic()
            try:
                c.execute(f"INSERT INTO {t} VALUES (3, 'cancelled-wait')")
                out["ok"] = True
            except Exception as ex:  # noqa: BLE001
                out["error"] = ex
            out["took"] = time.monotonic() - t0

        th = threading.Thread(target=commit_in_thread)
        th.start()
        with e.pg.connect() as other:
            # wait until the insert has committed and is waiting
            wait_until(lambda: one(other, f"SELECT count(*) FROM {t} WHERE id = 3") == 1, 10,
                       what="the row to commit (the COMMIT waits for Redis after that)")
            time.sleep(0.3)
            assert th.is_alive(), f"COMMIT did not wait for the stalled Redis: {out}"
            t_cancel = time.monotonic()
            assert one(other, "SELECT pg_cancel_backend(%s)", (pid,))
        th.join(10)
        ended = time.monotonic() - t_cancel
        assert not th.is_alive(), "COMMIT still waiting 10s after pg_cancel_backend"
        assert ended < 1.5, f"the cancelled commit wait took {ended:.2f}s to end"
        assert "error" not in out, f"the committed transaction reported an error: {out.get('error')!r}"
        assert backend_ok(c)
    finally:
        e.redis.resume()
    wait_until(lambda: jget(e.rc, f"{t}:2") == {"id": 2, "v": "stalled"}
               and jget(e.rc, f"{t}:3") == {"id": 3, "v": "cancelled-wait"}, 20, 0.05,
               "the stalled commits to be delivered after SIGCONT")


def backend_ok(conn):
    return conn.execute("SELECT 1").fetchone() == (1,)


# ----------------------------------------------------------------------------------------
# sync mode


def test_sync_pushed_inside_the_statement(m):
    t = m.table("md_s", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    m.mirror(t, mode="sync")
    m.idle()
    c = m.conn
    with m.pg.connect() as other:
        c.execute("BEGIN")
        c.execute(f"INSERT INTO {t} VALUES (2, 'two')")
        # before COMMIT: in Redis already (the documented window), not yet in the table for others
        assert jget(m.rc, f"{t}:2") == {"id": 2, "v": "two"}
        assert one(other, f"SELECT count(*) FROM {t} WHERE id = 2") == 0
        c.execute(f"UPDATE {t} SET v = 'uno' WHERE id = 1")
        assert jget(m.rc, f"{t}:1") == {"id": 1, "v": "uno"}
        c.execute(f"UPDATE {t} SET id = 20 WHERE id = 2")
        assert not m.rc.exists(f"{t}:2") and jget(m.rc, f"{t}:20") == {"id": 20, "v": "two"}
        c.execute("COMMIT")
    assert jget(m.rc, f"{t}:1") == {"id": 1, "v": "uno"}
    assert jget(m.rc, f"{t}:20") == {"id": 20, "v": "two"}
    m.idle()  # (the queue's redelivery racing a newer push: test_sync_never_regresses_to_an_older_value)
    c.execute(f"DELETE FROM {t} WHERE id = 1")  # autocommit: gone when the statement returns
    assert not m.rc.exists(f"{t}:1")
    m.idle()
    time.sleep(0.2)  # the queue's redelivery of the committed state changes nothing
    assert jget(m.rc, f"{t}:20") == {"id": 20, "v": "two"} and not m.rc.exists(f"{t}:1")
    wait_until(lambda: not sync_registry(m.rc), 5, what="the sync registry to be cleaned after COMMIT")


def test_sync_rollback_restores_committed_state(m):
    t = m.table("md_srb", "id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 5) g")
    m.mirror(t, mode="sync")
    m.idle()
    c = m.conn
    c.execute("BEGIN")
    c.execute(f"UPDATE {t} SET v = 'dirty' WHERE id = 1")
    c.execute(f"DELETE FROM {t} WHERE id = 2")
    c.execute(f"INSERT INTO {t} VALUES (6, 'new')")
    c.execute(f"UPDATE {t} SET id = 30 WHERE id = 3")
    assert jget(m.rc, f"{t}:1") == {"id": 1, "v": "dirty"}
    assert not m.rc.exists(f"{t}:2") and not m.rc.exists(f"{t}:3")
    assert m.rc.exists(f"{t}:6") and m.rc.exists(f"{t}:30")
    assert sync_registry(m.rc), "no pg_redis:sync:* registry keys while a sync transaction is open"
    c.execute("ROLLBACK")
    t0 = time.monotonic()
    expected = {f"{t}:{i}": {"id": i, "v": f"v{i}"} for i in range(1, 6)}

    def restored():
        keys = sorted(m.rc.scan_iter(match=f"{t}:*"))
        return keys == sorted(expected) and all(jget(m.rc, k) == expected[k] for k in keys)
    wait_until(restored, 5, 0.005, "the keys of the rolled-back transaction to be restored")
    took = time.monotonic() - t0
    print(f"sync rollback restored in {took * 1000:.0f} ms")
    assert took < 1.0, f"restoring after ROLLBACK took {took:.2f}s"
    wait_until(lambda: not sync_registry(m.rc), 5, what="the sync registry to be cleaned after ROLLBACK")

    # 5,000 rows pushed in one statement, then rolled back
    c.execute("BEGIN")
    c.execute(f"INSERT INTO {t} SELECT g, 'big' FROM generate_series(100, 5099) g")
    assert m.rc.exists(f"{t}:100") and m.rc.exists(f"{t}:5099")
    c.execute("ROLLBACK")
    wait_until(lambda: len(list(m.rc.scan_iter(match=f"{t}:*", count=10000))) == 5, 15, 0.05,
               "the 5,000 rolled-back keys to be removed")
    assert all(jget(m.rc, k) == v for k, v in expected.items())
    wait_until(lambda: not sync_registry(m.rc), 5, what="the sync registry to be cleaned")


def test_sync_repair_does_not_undo_a_newer_transaction(m):
    """A rolled-back push is repaired while another transaction has already pushed the same key
    and commits only after the repair read the table: its value must stay (found by the history
    checker: the repair's delete, queued under a newer id, won over the committed row)."""
    t = m.table("md_srace", "id int PRIMARY KEY, v text")
    m.mirror(t, mode="sync")
    m.idle()
    worker = one(m.conn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_redis worker'")
    b = m.pg.connect()
    os.kill(worker, signal.SIGSTOP)  # the repair must run between B's push and B's COMMIT
    try:
        m.conn.execute("BEGIN")
        m.conn.execute(f"INSERT INTO {t} VALUES (1, 'rolled back')")
        a_xid = one(m.conn, "SELECT pg_current_xact_id()")
        m.conn.execute("ROLLBACK")
        b.execute("BEGIN")
        b.execute(f"INSERT INTO {t} VALUES (1, 'committed')")
        assert jget(m.rc, f"{t}:1") == {"id": 1, "v": "committed"}
    finally:
        os.kill(worker, signal.SIGCONT)
    # the worker repairs the rolled-back push while B is still open: no row is visible to it
    wait_until(lambda: not list(m.rc.scan_iter(match=f"pg_redis:sync:*:{a_xid}@*")), 5, 0.01,
               "the rolled-back push repaired")
    time.sleep(0.3)
    b.execute("COMMIT")
    b.close()
    m.idle()
    time.sleep(0.3)
    assert jget(m.rc, f"{t}:1") == {"id": 1, "v": "committed"}


def test_sync_savepoint_rollback(m):
    t = m.table("md_ssp", "id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 4) g")
    m.mirror(t, mode="sync")
    m.idle()
    c = m.conn
    c.execute("BEGIN")
    c.execute(f"UPDATE {t} SET v = 'outer' WHERE id = 1")
    c.execute("SAVEPOINT s1")
    c.execute(f"UPDATE {t} SET v = 'inner' WHERE id = 2")
    c.execute(f"INSERT INTO {t} VALUES (9, 'inner')")
    c.execute(f"DELETE FROM {t} WHERE id = 3")
    assert jget(m.rc, f"{t}:2") == {"id": 2, "v": "inner"} and m.rc.exists(f"{t}:9")
    c.execute("ROLLBACK TO SAVEPOINT s1")
    t0 = time.monotonic()
    wait_until(lambda: jget(m.rc, f"{t}:2") == {"id": 2, "v": "v2"} and not m.rc.exists(f"{t}:9")
               and jget(m.rc, f"{t}:3") == {"id": 3, "v": "v3"}, 5, 0.005,
               "the keys pushed inside the savepoint to be restored")
    took = time.monotonic() - t0
    # the outer transaction's own push is untouched and it goes on
    assert jget(m.rc, f"{t}:1") == {"id": 1, "v": "outer"}
    c.execute(f"UPDATE {t} SET v = 'after' WHERE id = 4")
    assert jget(m.rc, f"{t}:4") == {"id": 4, "v": "after"}
    # a key written by the outer transaction, then again inside a savepoint that rolls back
    c.execute(f"UPDATE {t} SET v = 'outer2' WHERE id = 1")
    c.execute("SAVEPOINT s2")
    c.execute(f"UPDATE {t} SET v = 'inner2' WHERE id = 1")
    c.execute("ROLLBACK TO SAVEPOINT s2")
    c.execute("COMMIT")
    print(f"savepoint rollback restored in {took * 1000:.0f} ms")
    assert took < 1.0, f"restoring after ROLLBACK TO SAVEPOINT took {took:.2f}s"
    final = {f"{t}:1": {"id": 1, "v": "outer2"}, f"{t}:2": {"id": 2, "v": "v2"},
             f"{t}:3": {"id": 3, "v": "v3"}, f"{t}:4": {"id": 4, "v": "after"}}

    def settled():
        keys = sorted(m.rc.scan_iter(match=f"{t}:*"))
        return keys == sorted(final) and all(jget(m.rc, k) == v for k, v in final.items())
    wait_until(settled, 5, what="Redis to equal the committed table")
    m.idle()
    time.sleep(0.3)
    assert settled(), {k: jget(m.rc, k) for k in sorted(m.rc.scan_iter(match=f"{t}:*"))}
    wait_until(lambda: not sync_registry(m.rc), 5, what="the sync registry to be cleaned")


def test_sync_never_regresses_to_an_older_value(m):
    """Issue 5, item 3: a sync push and the queue's later delivery of an earlier commit both write
    the key; the late write of the older state must not overwrite the newer one. 300 updates of
    one row, each its own transaction: right after each statement Redis holds its value, and a
    reader polling all along never sees the value go back."""
    t = m.table("md_sreg", "id int PRIMARY KEY, n int")
    m.mirror(t, mode="sync")
    m.conn.execute(f"INSERT INTO {t} VALUES (1, 0)")
    m.idle()
    stop, seen = threading.Event(), []

    def watch():
        rc = m.redis.client(decode_responses=True)
        try:
            while not stop.is_set():
                v = rc.get(f"{t}:1")
                n = None if v is None else json.loads(v)["n"]
                if not seen or seen[-1] != n:
                    seen.append(n)
        finally:
            rc.close()

    th = threading.Thread(target=watch)
    th.start()
    stale = []
    try:
        for i in range(1, 301):
            m.conn.execute(f"UPDATE {t} SET n = %s WHERE id = 1", (i,))
            got = jget(m.rc, f"{t}:1")
            if got != {"id": 1, "n": i}:
                stale.append((i, got))
        m.idle()
        time.sleep(0.2)
    finally:
        stop.set()
        th.join()
    back = [(a, b) for a, b in zip(seen, seen[1:]) if a is not None and (b is None or b < a)]
    assert jget(m.rc, f"{t}:1") == {"id": 1, "n": 300}
    assert not stale and not back, (
        f"{len(stale)} of 300 sync statements were followed by an older value in Redis "
        f"(e.g. {stale[:3]}); a reader saw the value go back {len(back)} times (e.g. {back[:3]})")


def test_sync_version_hash_removed_by_purge_and_drop(m):
    """One server: a sync mirror's versions are one hash per mirror (no per-key companions as on a
    cluster); redis_unmirror(purge) and DROP TABLE delete it."""
    for how in ("unmirror", "drop"):
        t = m.table(f"md_sver_{how}", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
        m.mirror(t, mode="sync")
        m.idle()
        mid = one(m.conn, f"SELECT id FROM redis_internal.mirrors WHERE tbl = '{t}'::regclass")
        m.conn.execute(f"INSERT INTO {t} VALUES (2, 'two')")
        versions = f"pg_redis:ver:{mid}"
        assert m.rc.type(versions) in (b"hash", "hash") and m.rc.hexists(versions, f"{t}:2")
        assert sorted(m.rc.scan_iter(match="pg_redis:ver:*")) in ([versions], [versions.encode()])
        if how == "unmirror":
            m.conn.execute(f"SELECT redis_unmirror('{t}', purge => true)")
        else:
            m.conn.execute(f"DROP TABLE {t}")
        m.idle()
        wait_until(lambda: not m.rc.exists(versions) and not m.keys(f"{t}:*"), 5,
                   what=f"the version hash and keys removed ({how})")


def test_sync_redis_down_fails_the_statement(env):
    e = env()
    t = e.table("md_sdown", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    e.mirror(t, mode="sync")
    e.idle()
    c = e.conn
    e.redis.stop()
    expect_error(c, f"INSERT INTO {t} VALUES (2, 'two')", sqlstate="08", prefix="pg_redis:")
    expect_error(c, f"UPDATE {t} SET v = 'changed' WHERE id = 1", sqlstate="08", prefix="pg_redis:")
    expect_error(c, f"DELETE FROM {t} WHERE id = 1", sqlstate="08", prefix="pg_redis:")
    c.execute("BEGIN")
    expect_error(c, f"INSERT INTO {t} VALUES (3, 'three')", sqlstate="08", prefix="pg_redis:")
    c.execute("ROLLBACK")
    assert c.execute(f"SELECT id, v FROM {t} ORDER BY id").fetchall() == [(1, "one")], \
        "a sync-mode change committed although Redis was unreachable"

    # stalled Redis (SIGSTOP): the statement fails after pg_redis.command_timeout (a timeout: 57014)
    e.redis.start()
    e.rc = e.redis.client(decode_responses=True)
    c.execute(f"INSERT INTO {t} VALUES (4, 'four')")  # Redis back: works
    assert jget(e.rc, f"{t}:4") == {"id": 4, "v": "four"}
    c.execute("SET pg_redis.command_timeout = 500")
    e.redis.pause()
    try:
        t0 = time.monotonic()
        expect_error(c, f"INSERT INTO {t} VALUES (5, 'five')", sqlstate=["57014", "08"], prefix="pg_redis:")
        took = time.monotonic() - t0
        assert took < 3.0, f"a sync statement against a stalled Redis took {took:.2f}s (command_timeout 500ms)"
    finally:
        e.redis.resume()
    assert one(c, f"SELECT count(*) FROM {t} WHERE id = 5") == 0
    c.execute("RESET pg_redis.command_timeout")
    c.execute(f"INSERT INTO {t} VALUES (6, 'six')")
    assert jget(e.rc, f"{t}:6") == {"id": 6, "v": "six"}


def test_sync_backend_killed_keys_repaired_after_restart(env):
    e = env()
    t = e.table("md_skill", "id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 3) g")
    e.mirror(t, mode="sync")
    e.idle()
    victim = e.pg.connect()
    victim.execute("BEGIN")
    victim.execute(f"UPDATE {t} SET v = 'dirty' WHERE id = 1")
    victim.execute(f"INSERT INTO {t} VALUES (4, 'ghost')")
    victim.execute(f"DELETE FROM {t} WHERE id = 2")
    assert jget(e.rc, f"{t}:1") == {"id": 1, "v": "dirty"} and e.rc.exists(f"{t}:4")
    assert not e.rc.exists(f"{t}:2")
    pid = victim.info.backend_pid
    pos = e.pg.log_position()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        victim.close()
    except Exception:  # noqa: BLE001
        pass
    try:
        e.conn.close()
    except Exception:  # noqa: BLE001
        pass
    wait_until(lambda: "ready to accept connections" in e.pg.read_log_since(pos), 30, 0.05,
               "the postmaster to reinitialize after the SIGKILL")
    e.conn = wait_until(lambda: e.pg.connect(), 30, 0.1, "the cluster to accept connections after the crash")
    expected = {f"{t}:1": {"id": 1, "v": "v1"}, f"{t}:2": {"id": 2, "v": "v2"}, f"{t}:3": {"id": 3, "v": "v3"}}

    def repaired():
        keys = sorted(e.rc.scan_iter(match=f"{t}:*"))
        return keys == sorted(expected) and all(jget(e.rc, k) == v for k, v in expected.items())
    wait_until(repaired, 15, 0.02, "the keys pushed by the killed backend to be repaired")
    took = time.monotonic() - t0
    print(f"keys of the SIGKILLed backend repaired {took:.2f}s after the kill")
    assert took < 5.0, f"repair after SIGKILL took {took:.2f}s"
    wait_until(lambda: not sync_registry(e.rc), 10, what="the sync registry to be cleaned after the crash")
    assert e.conn.execute(f"SELECT id, v FROM {t} ORDER BY id").fetchall() == [(1, "v1"), (2, "v2"), (3, "v3")]
    # still working afterwards
    e.conn.execute(f"UPDATE {t} SET v = 'later' WHERE id = 3")
    assert jget(e.rc, f"{t}:3") == {"id": 3, "v": "later"}


# ----------------------------------------------------------------------------------------
# Worker-side issues found while testing the modes


def test_commit_mode_backfill_does_not_stall_the_worker(env):
    """The backfill of a commit-mode mirror runs in the worker: its own COMMIT must not wait
    (pg_redis.commit_wait_timeout) for itself, stalling every delivery and commit-mode COMMIT."""
    e = env()
    t = e.table("md_cbf", "id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 100) g")
    t0 = time.monotonic()
    assert e.mirror(t, mode="commit") == 100
    wait_until(lambda: len(list(e.rc.scan_iter(match=f"{t}:*"))) == 100, 15, 0.01, "the backfill of 100 rows")
    took = time.monotonic() - t0
    e.idle()
    t1 = time.monotonic()
    e.conn.execute(f"INSERT INTO {t} VALUES (1000, 'after')")
    ins = time.monotonic() - t1
    log = e.pg.read_log()
    assert took < 2.0 and ins < 1.0, (
        f"backfill of a 100-row commit-mode mirror took {took:.2f}s, the next commit {ins:.2f}s; "
        f"worker waited at its own commit: {'commit_wait_timeout' in log}")
    assert jget(e.rc, f"{t}:1000") == {"id": 1000, "v": "after"}


def test_worker_does_not_crash_loop_without_the_extension(make_pg, make_redis):
    """A database in pg_redis.databases where CREATE EXTENSION has not run yet: the worker idles.
    (While it is dead its pid stays registered, so a commit-mode COMMIT waits for nobody.)"""
    srv = make_redis()
    cluster = make_pg(conf_lines=[f"pg_redis.url = '{srv.url}'"])
    time.sleep(2.5)
    log = cluster.read_log()
    crashes = log.count('"pg_redis worker" (PID')
    errors = [ln for ln in log.splitlines() if " ERROR: " in ln]
    assert crashes == 0, f"the worker exited {crashes} times in 2.5s without the extension: {errors[:2]}"


def test_delivery_when_wal_insert_position_is_at_a_page_boundary(make_pg, make_redis):
    """Delivery flushes the WAL up to the insert position before sending. When that position is
    exactly at the start of a WAL page, GetXLogInsertRecPtr() points past the page header, beyond
    the WAL written so far, and XLogFlush fails ('xlog flush request ... is not satisfied'): in
    the worker that is an exit and restart every second for as long as nothing else writes WAL,
    and a commit-mode COMMIT waits its full pg_redis.commit_wait_timeout meanwhile. Reproduced
    deterministically with redis_drain() (no worker), padding the WAL with logical messages."""
    srv = make_redis()
    cluster = make_pg(conf_lines=[f"pg_redis.url = '{srv.url}'", "autovacuum = off"], preload=False)
    rc = srv.client(decode_responses=True)
    with cluster.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        c.execute("CREATE TABLE md_wal (id int PRIMARY KEY, v text)")
        c.execute("SELECT redis_mirror('md_wal')")
        c.execute("INSERT INTO md_wal VALUES (0, 'warm-up')")
        assert one(c, "SELECT redis_drain()") == 1  # the session's first drain writes some WAL itself
        c.execute("INSERT INTO md_wal VALUES (1, 'x')")

        def offset():
            return int(one(c, "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")) % 8192

        def emit(n):
            c.execute("SELECT pg_logical_emit_message(false, 'p', repeat('x', %s))", (n,))

        # A non-transactional message of n bytes (n > 255, prefix 'p') takes MAXALIGN(56 + n) bytes.
        for _ in range(10):
            o = offset()
            if o == 24:
                break
            if 8192 - o - 56 < 300:
                emit(1000)
                continue
            emit(8192 - o - 56)
        assert offset() == 24, "could not put the WAL insert position at a page boundary"
        try:
            delivered = one(c, "SELECT redis_drain()")
        except psycopg.Error as ex:
            raise AssertionError(f"redis_drain() with the WAL insert position at a page boundary: "
                                 f"{ex.sqlstate}: {ex.diag.message_primary}") from None
        assert delivered == 1
        assert json.loads(rc.get("md_wal:1")) == {"id": 1, "v": "x"}

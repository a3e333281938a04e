"""Read-through: redis_fetch(tbl, VARIADIC key_values) (SPEC §4; issue 5, item 4).

Hit, miss, absent row, the same jsonb for a hit and a miss (json and hash formats, hash values
typed back by the columns' types), TTL, columns, key templates of several columns, the filter,
privileges, bad key values, no fill inside a transaction that has written or is read-only, the
counters in redis_stats, and the cache-aside race with two sessions (the fill reads the row FOR
SHARE: a concurrent update is waited for, and cannot commit until the fill has landed).

All tests use the module cluster (its postgresql.conf points at `module_redis`, where the worker
delivers), each with tables of its own; Redis is flushed before each test.
"""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from harness import expect_error
from helpers import REFERENCE_SETTINGS, MirrorCtx, one, queue_len, wait_for_worker, wait_until  # noqa: F401



def counters(conn, table):
    cur = conn.execute("SELECT hits, misses, hit_ratio FROM redis_stats WHERE mirror = %s::regclass", (table,))
    row = cur.fetchone()
    assert row is not None, f"no redis_stats row for {table}"
    return row


class Ctx(MirrorCtx):
    def fetch(self, table, *keys, conn=None):
        c = conn or self.conn
        ph = ", ".join(["%s"] * len(keys))
        return one(c, f"SELECT redis_fetch(%s::regclass{', ' if keys else ''}{ph})", (table, *keys))

    def reference(self, table, where):
        """row_to_json(t)::jsonb under the documented renderings (UTC, ISO)."""
        with self.pg.connect() as c:
            c.execute(REFERENCE_SETTINGS)
            return one(c, f"SELECT row_to_json(t)::jsonb FROM {table} t WHERE {where}")




@pytest.fixture
def f(ext, module_redis):
    module_redis.client().flushall()
    ctx = Ctx(ext, module_redis)
    yield ctx
    ctx.close()


# ----------------------------------------------------------------------------------------


def test_miss_then_hit_json(f):
    t = f.table("ft_json", "id int PRIMARY KEY, name text, score numeric, ok bool, tags text[], doc jsonb, "
                           "at timestamptz, nothing text",
                "VALUES (1, 'Ann', 12.50, true, '{a,\"b c\"}', '{\"k\": [1, null]}', '2024-05-06 07:08:09+02', NULL), "
                "(2, 'Bob', -1, false, '{}', 'null', NULL, 'x')")
    assert f.mirror(t, backfill=False) == 0
    f.idle()
    assert not f.rc.exists(f"{t}:1")
    h0, m0, _ = counters(f.conn, t)
    h0, m0 = h0 or 0, m0 or 0
    ref = f.reference(t, "id = 1")

    miss = f.fetch(t, "1")
    assert miss == ref
    assert json.loads(f.rc.get(f"{t}:1")) == ref, "the miss did not write the row to Redis"
    assert f.rc.ttl(f"{t}:1") == -1  # no TTL on this mirror
    hit = f.fetch(t, "1")
    assert hit == miss
    # exact jsonb equality (numeric 12.50, the timestamp in UTC) done by PostgreSQL
    assert one(f.conn, "SELECT redis_fetch('ft_json', '1') = %s::jsonb", (json.dumps(ref),))
    assert one(f.conn, "SELECT redis_fetch('ft_json', '1') ->> 'at'") == "2024-05-06T05:08:09+00:00"

    # absent row: NULL, nothing written
    assert f.fetch(t, "999") is None
    assert not f.rc.exists(f"{t}:999")

    # a hit is served from Redis (what Redis holds is what comes back)
    f.rc.set(f"{t}:2", json.dumps({"id": 2, "name": "from-redis"}))
    assert f.fetch(t, "2") == {"id": 2, "name": "from-redis"}

    # hits: the second fetch of id 1, the two SELECTs after it, the id-2 fetch = 4; misses: id 1, id 999
    hits, misses, ratio = counters(f.conn, t)
    assert (hits - h0, misses - m0) == (4, 2), (hits, misses)
    assert ratio == pytest.approx(hits / (hits + misses))


def test_hash_format_hit_and_miss_return_the_same_typed_row(f):
    t = f.table("ft_hash", "id int PRIMARY KEY, n int, big bigint, fl float8, num numeric(10,3), b bool, "
                           "arr int[], tarr text[], j json, jb jsonb, txt text, numtxt text, booltxt text, "
                           "ts timestamptz, d date, nul int",
                "VALUES (1, -7, 9007199254740993, 0.1, 3.140, false, '{1,2,NULL}', '{x,y}', '{\"a\": 1}', "
                "'[true, {\"b\": null}]', 'hello', '42', 'true', '2020-01-02 03:04:05+00', '2021-12-31', NULL)")
    f.mirror(t, format="hash", backfill=False)
    f.idle()
    ref = f.reference(t, "id = 1")
    miss = f.fetch(t, "1")
    assert miss == ref, f"miss returned {miss!r}, row_to_json gives {ref!r}"
    fields = f.rc.hgetall(f"{t}:1")
    assert fields, "the miss did not fill the hash"
    assert "nul" not in fields, "a NULL column must be left out of the hash"
    assert fields["numtxt"] == "42" and fields["txt"] == "hello"
    hit = f.fetch(t, "1")
    assert hit == miss
    # exact: text '42' and 'true' stay strings, numbers are numbers, NULL is null, bigints exact
    same = one(f.conn, "SELECT redis_fetch('ft_hash', '1') = (SELECT row_to_json(x)::jsonb FROM ft_hash x WHERE id = 1)"
                       " FROM (SELECT set_config('TimeZone', 'UTC', true)) s")
    assert same, one(f.conn, "SELECT redis_fetch('ft_hash', '1')::text")
    types = one(f.conn, "SELECT jsonb_object_agg(k, jsonb_typeof(v)) FROM jsonb_each(redis_fetch('ft_hash', '1')) e(k, v)")
    assert types == {"id": "number", "n": "number", "big": "number", "fl": "number", "num": "number",
                     "b": "boolean", "arr": "array", "tarr": "array", "j": "object", "jb": "array",
                     "txt": "string", "numtxt": "string", "booltxt": "string", "ts": "string", "d": "string",
                     "nul": "null"}

    # a hash written by the worker (not by a fill) reads back the same way
    f.conn.execute(f"INSERT INTO {t} (id, n, txt, numtxt) VALUES (2, 5, 'five', '007')")
    wait_until(lambda: f.rc.exists(f"{t}:2"), 5, what="the worker to write ft_hash:2")
    assert f.fetch(t, "2") == f.reference(t, "id = 2")


def test_ttl_columns_and_multi_column_template(f):
    t = f.table("ft_cols", "region text, id int, v text, secret text, PRIMARY KEY (region, id)",
                "VALUES ('eu', 1, 'one', 's1'), ('us', 1, 'uno', 's2')")
    f.mirror(t, key_template="ftc:{region}:{id}", columns=["id", "region", "v"], ttl_seconds=300, backfill=False)
    f.idle()
    assert f.fetch(t, "eu", "1") == {"id": 1, "region": "eu", "v": "one"}
    assert json.loads(f.rc.get("ftc:eu:1")) == {"id": 1, "region": "eu", "v": "one"}
    assert 0 < f.rc.ttl("ftc:eu:1") <= 300
    assert f.fetch(t, "eu", "1") == {"id": 1, "region": "eu", "v": "one"}  # hit
    assert f.fetch(t, "us", "1") == {"id": 1, "region": "us", "v": "uno"}
    assert f.fetch(t, "us", "2") is None

    # wrong number of key values, a value that does not fit the column's type, NULL
    expect_error(f.conn, "SELECT redis_fetch('ft_cols', 'eu')", sqlstate="22023")
    expect_error(f.conn, "SELECT redis_fetch('ft_cols', 'eu', '1', 'x')", sqlstate="22023")
    expect_error(f.conn, "SELECT redis_fetch('ft_cols', 'eu', 'abc')", sqlstate="22023")
    expect_error(f.conn, "SELECT redis_fetch('ft_cols', 'eu', NULL)", sqlstate="22023")
    expect_error(f.conn, "SELECT redis_fetch('ft_cols', VARIADIC ARRAY[]::text[])", sqlstate="22023")
    # a bad value inside a transaction: an error, and the transaction can still roll back cleanly
    with pytest.raises(psycopg.Error):
        with f.conn.transaction():
            f.conn.execute("SELECT redis_fetch('ft_cols', 'eu', '99999999999')")
    assert f.conn.execute("SELECT 1").fetchone() == (1,)

    # a table that is not mirrored
    f.table("ft_plain", "id int PRIMARY KEY")
    expect_error(f.conn, "SELECT redis_fetch('ft_plain', '1')", sqlstate="22023")


def test_filter_rows_returned_but_not_cached(f):
    t = f.table("ft_filt", "id int PRIMARY KEY, status text",
                "VALUES (1, 'active'), (2, 'archived')")
    f.mirror(t, filter="status = 'active'", backfill=False)
    f.idle()
    assert f.fetch(t, "2") == {"id": 2, "status": "archived"}
    assert not f.rc.exists(f"{t}:2"), "a row outside the filter was written to Redis"
    _, m1, _ = counters(f.conn, t)
    assert f.fetch(t, "2") == {"id": 2, "status": "archived"}
    _, m2, _ = counters(f.conn, t)
    assert m2 == m1 + 1, "a row outside the filter must be a miss every time"
    assert f.fetch(t, "1") == {"id": 1, "status": "active"}
    assert json.loads(f.rc.get(f"{t}:1")) == {"id": 1, "status": "active"}


def test_privileges(f):
    t = f.table("ft_priv", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    f.mirror(t, backfill=False)
    f.idle()
    role = f.role("ft_reader")
    f.conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    with f.pg.connect(user=role) as rc:  # nothing of pg_redis is executable by PUBLIC
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            rc.execute("SELECT redis_fetch('ft_priv', '1')")
    f.conn.execute(f"GRANT EXECUTE ON FUNCTION redis_fetch(regclass, text[]) TO {role}")
    # non-superusers use the server's pg_redis.url, i.e. module_redis: same as ours
    with f.pg.connect(user=role) as rc:
        e = expect_error(rc, "SELECT redis_fetch('ft_priv', '1')", sqlstate="42501")
        assert "ft_priv" in e.diag.message_primary
    assert not f.rc.exists(f"{t}:1")
    f.conn.execute(f"GRANT SELECT ON {t} TO {role}")
    with f.pg.connect(user=role) as rc:
        assert one(rc, "SELECT redis_fetch('ft_priv', '1')") == {"id": 1, "v": "one"}  # miss: fills
        assert one(rc, "SELECT redis_fetch('ft_priv', '1')") == {"id": 1, "v": "one"}  # hit
    assert json.loads(f.rc.get(f"{t}:1")) == {"id": 1, "v": "one"}
    f.conn.execute(f"REVOKE SELECT ON {t} FROM {role}")
    with f.pg.connect(user=role) as rc:
        expect_error(rc, "SELECT redis_fetch('ft_priv', '1')", sqlstate="42501")  # also on a hit


def test_no_fill_in_a_writing_or_read_only_transaction(f):
    t = f.table("ft_tx", "id int PRIMARY KEY, v text", "VALUES (1, 'one'), (2, 'two')")
    f.mirror(t, backfill=False)
    f.idle()
    other = f.table("ft_tx_other", "x int")
    c = f.conn
    # a transaction that has written (another table): the row comes back, Redis is not filled
    c.execute("BEGIN")
    c.execute(f"INSERT INTO {other} VALUES (1)")
    assert f.fetch(t, "1") == {"id": 1, "v": "one"}
    c.execute("ROLLBACK")
    assert not f.rc.exists(f"{t}:1"), "a fetch in a transaction that had written filled Redis"
    # its own uncommitted change: returned to itself, never pushed
    c.execute("BEGIN")
    c.execute(f"UPDATE {t} SET v = 'uncommitted' WHERE id = 1")
    assert f.fetch(t, "1") == {"id": 1, "v": "uncommitted"}
    c.execute("ROLLBACK")
    time.sleep(0.2)
    assert not f.rc.exists(f"{t}:1"), f"an uncommitted value reached Redis: {f.rc.get(f'{t}:1')!r}"
    # read-only transaction
    c.execute("BEGIN READ ONLY")
    assert f.fetch(t, "2") == {"id": 2, "v": "two"}
    c.execute("COMMIT")
    assert not f.rc.exists(f"{t}:2"), "a fetch in a read-only transaction filled Redis"
    # a transaction that has only read: fills
    c.execute("BEGIN")
    c.execute(f"SELECT * FROM {t}")
    assert f.fetch(t, "2") == {"id": 2, "v": "two"}
    c.execute("COMMIT")
    assert json.loads(f.rc.get(f"{t}:2")) == {"id": 2, "v": "two"}


def test_invalidate_mirror_is_refilled_by_fetch(f):
    """SPEC §3: action 'invalidate' only DELs the key on every change (cache-aside: readers refill
    it, e.g. with redis_fetch)."""
    t = f.table("ft_inv", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    f.mirror(t, action="invalidate", backfill=False)
    f.idle()
    assert f.fetch(t, "1") == {"id": 1, "v": "one"}
    assert f.rc.get(f"{t}:1") is not None, "redis_fetch did not refill the key of an invalidate mirror"
    hits0 = counters(f.conn, t)[0] or 0
    assert f.fetch(t, "1") == {"id": 1, "v": "one"}
    assert (counters(f.conn, t)[0] or 0) == hits0 + 1
    f.conn.execute(f"UPDATE {t} SET v = 'changed' WHERE id = 1")
    wait_until(lambda: not f.rc.exists(f"{t}:1"), 5, what="the update to invalidate the key")
    assert f.fetch(t, "1") == {"id": 1, "v": "changed"}
    assert json.loads(f.rc.get(f"{t}:1")) == {"id": 1, "v": "changed"}


# ----------------------------------------------------------------------------------------
# The cache-aside race, with two sessions


def _wait_event(conn, pid):
    return conn.execute("SELECT wait_event_type, wait_event, state FROM pg_stat_activity WHERE pid = %s",
                        (pid,)).fetchone()


def _watch(rc, key, stop, seen):
    """Record every distinct value of key until stop is set."""
    while not stop.is_set():
        v = rc.get(key)
        if not seen or seen[-1] != v:
            seen.append(v)
        time.sleep(0.001)


@pytest.mark.parametrize("change", ["update", "delete"])
def test_fetch_waits_for_an_uncommitted_change(f, change):
    t = f.table(f"ft_race_{change}", "id int PRIMARY KEY, v text", "VALUES (1, 'old')")
    f.mirror(t, backfill=False)
    f.idle()
    key = f"{t}:1"
    b = f.pg.connect()
    a = f.pg.connect()
    try:
        b.execute("BEGIN")
        if change == "update":
            b.execute(f"UPDATE {t} SET v = 'new' WHERE id = 1")
        else:
            b.execute(f"DELETE FROM {t} WHERE id = 1")
        out = {}

        def fetch_a():
            try:
                out["value"] = f.fetch(t, "1", conn=a)
            except Exception as ex:  # noqa: BLE001
                out["error"] = ex
            out["at"] = time.monotonic()

        th = threading.Thread(target=fetch_a)
        th.start()
        apid = a.info.backend_pid
        wait_until(lambda: (_wait_event(f.conn, apid) or (None,))[0] == "Lock", 10, 0.01,
                   "session A's fetch to wait for B's row lock")
        assert th.is_alive() and not f.rc.exists(key), f"the fill did not wait for B: {out}, {f.rc.get(key)!r}"
        committed = time.monotonic()  # A may return before B's client has the COMMIT reply
        b.execute("COMMIT")
        th.join(10)
        assert not th.is_alive(), "A's fetch still blocked after B committed"
        assert "error" not in out, f"A's fetch failed: {out['error']!r}"
        if change == "update":
            assert out["value"] == {"id": 1, "v": "new"}, f"A returned {out['value']!r} after B committed 'new'"
            assert json.loads(f.rc.get(key)) == {"id": 1, "v": "new"}
        else:
            assert out["value"] is None, f"A returned {out['value']!r} for a row B deleted"
        assert out["at"] >= committed
        f.idle()
        stop, seen = threading.Event(), []
        w = threading.Thread(target=_watch, args=(f.rc, key, stop, seen))
        w.start()
        time.sleep(0.3)
        stop.set()
        w.join()
        final = json.loads(f.rc.get(key)) if f.rc.exists(key) else None
        if change == "update":
            assert final == {"id": 1, "v": "new"}
        else:
            assert final is None, f"a deleted row is in Redis: {final!r}"
        assert all(v is None or json.loads(v)["v"] != "old" for v in seen), f"Redis went back to 'old': {seen}"
    finally:
        b.close()
        a.close()


def test_update_cannot_commit_between_the_read_and_the_fill(f, module_redis):
    """Force the classic interleaving: A misses and reads the row, its fill is held up (Redis pauses
    writes), B updates and commits, the worker delivers B's value, then A's fill lands. With the row
    read FOR SHARE, B's UPDATE waits for A instead, and Redis ends with B's value."""
    t = f.table("ft_race_fill", "id int PRIMARY KEY, v text", "VALUES (1, 'old')")
    f.mirror(t, backfill=False)
    f.idle()
    key = f"{t}:1"
    a = f.pg.connect()
    b = f.pg.connect()
    out = {}
    try:
        module_redis.client_pause(1500, "WRITE")
        paused_at = time.monotonic()

        def fetch_a():
            try:
                out["a"] = f.fetch(t, "1", conn=a)
            except Exception as ex:  # noqa: BLE001
                out["a_error"] = ex
            out["a_at"] = time.monotonic()

        def update_b():
            try:
                b.execute(f"UPDATE {t} SET v = 'new' WHERE id = 1")  # autocommit
            except Exception as ex:  # noqa: BLE001
                out["b_error"] = ex
            out["b_at"] = time.monotonic()

        ta = threading.Thread(target=fetch_a)
        ta.start()
        apid = a.info.backend_pid
        # A has read the row FOR SHARE (it holds a transaction id) and waits for Redis to take the fill
        wait_until(lambda: one(f.conn, "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'transactionid'",
                               (apid,)), 1.0, 0.005, "A to read the row FOR SHARE")
        assert ta.is_alive(), f"A's fetch finished during the write pause: {out}"
        tb = threading.Thread(target=update_b)
        tb.start()
        bpid = b.info.backend_pid
        time.sleep(0.2)
        b_state = _wait_event(f.conn, bpid)
        assert time.monotonic() - paused_at < 1.4, "the test was too slow: the pause ended early"
        ta.join(10)
        tb.join(10)
        assert "a_error" not in out and "b_error" not in out, out
        assert out["a"] == {"id": 1, "v": "old"}
        assert b_state[0] == "Lock", f"B's UPDATE was not waiting for A's FOR SHARE lock: {b_state}"
        assert out["b_at"] >= out["a_at"] - 0.05, "B committed before A's fill had landed"
        f.idle()
        wait_until(lambda: json.loads(f.rc.get(key) or "null") == {"id": 1, "v": "new"}, 5,
                   what="Redis to end with B's value")
        time.sleep(0.3)
        assert json.loads(f.rc.get(key)) == {"id": 1, "v": "new"}
    finally:
        a.close()
        b.close()


def test_fetch_without_preload(make_pg, make_redis):
    srv = make_redis()
    cluster = make_pg(conf_lines=[f"pg_redis.url = '{srv.url}'"], preload=False)
    rc = srv.client(decode_responses=True)
    with cluster.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        c.execute("CREATE TABLE ft_np (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO ft_np VALUES (1, 'one')")
        c.execute("SELECT redis_mirror('ft_np', backfill => false)")
        assert one(c, "SELECT redis_fetch('ft_np', '1')") == {"id": 1, "v": "one"}
        assert json.loads(rc.get("ft_np:1")) == {"id": 1, "v": "one"}
        assert one(c, "SELECT redis_fetch('ft_np', '1')") == {"id": 1, "v": "one"}
        assert one(c, "SELECT redis_fetch('ft_np', '2')") is None
        c.execute("SELECT * FROM redis_stats")  # readable without the shared counters

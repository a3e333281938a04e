"""Integration tests of mirroring (SPEC §3, with §1, §6, §7; issue 4) against real PostgreSQL 15
and real redis-server processes, in the module's preloaded cluster.

The background worker reads pg_redis.url from postgresql.conf, so these tests do not use the `db`
fixture (whose session-level SET only points that session at the test's own Redis): they write
through `m.conn`, a superuser session of the module cluster `pg`, and read the module's Redis
(`module_redis`), which the worker delivers to. Each test uses its own table names, and the `m`
fixture drops every table (and so every mirror) a test made, waits for the queue to empty and
flushes Redis, so tests do not see each other's keys or layouts.

Faults (Redis down, crashes, the worker killed, synchronous_commit = off, OOM and dead letters,
no preload) are in test_mirror_faults.py, each with clusters of its own.

The helpers here (wait_until, assert_redis_equals_table, ...) are imported by test_mirror_faults.py.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from decimal import Decimal

import psycopg
import pytest

from harness import expect_error
from helpers import one, wait_until  # noqa: F401

BAD_ARG = "22023"
PRIVILEGE = "42501"
WRONG_OBJECT = "42809"

# The settings under which `SELECT row_to_json(t)` gives the documented renderings
# (UTC ISO timestamps, hex bytea, shortest-exact floats): the reference the mirror is compared with.
REFERENCE_SETTINGS = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
                      "SET bytea_output = 'hex'; SET extra_float_digits = 1")
# A writing session whose own renderings all differ from the documented ones.
ODD_SETTINGS = ("SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, DMY'; "
                "SET bytea_output = 'escape'; SET extra_float_digits = 0")


# ----------------------------------------------------------------------------------------
# Helpers (also used by test_mirror_faults.py)


def loads(text):
    """JSON with exact numbers: 0.333333333333333 and 0.3333333333333333 differ."""
    return json.loads(text, parse_float=Decimal)


def _where(where):
    return f" WHERE {where}" if where else ""


def expected_json(pg, table, key_sql, where=None, columns=None, dbname="postgres"):
    """{key: row} as `SELECT row_to_json(t)` gives it under the reference settings."""
    with pg.connect(dbname=dbname) as c:
        c.execute(REFERENCE_SETTINGS)
        rows = c.execute(f"SELECT {key_sql}, row_to_json(mxrow)::text FROM {table} mxrow{_where(where)}").fetchall()
    out = {}
    for k, v in rows:
        d = loads(v)
        if columns is not None:
            d = {c: d[c] for c in columns}
        out[k] = d
    return out


def expected_hash(pg, table, key_sql, where=None, columns=None, dbname="postgres"):
    """{key: {field: text}}: the JSON text renderings (json_each_text), NULL columns left out;
    json/jsonb columns hold their value's JSON text (a JSON string keeps its quotes)."""
    with pg.connect(dbname=dbname) as c:
        c.execute(REFERENCE_SETTINGS)
        rows = c.execute(
            f"SELECT {key_sql}, j.key, CASE WHEN json_typeof(j.value) = 'null' THEN NULL "
            f"WHEN j.key IN (SELECT attname FROM pg_attribute WHERE attrelid = '{table}'::regclass "
            f"AND atttypid IN ('json'::regtype, 'jsonb'::regtype)) THEN j.value::text "
            f"ELSE j.value #>> '{{}}' END "
            f"FROM {table} mxrow, json_each(row_to_json(mxrow)) j"
            f"{_where(where)}").fetchall()
        keys = c.execute(f"SELECT {key_sql} FROM {table} mxrow{_where(where)}").fetchall()
    out = {k: {} for (k,) in keys}
    for k, f, v in rows:
        if v is not None and (columns is None or f in columns):
            out[k][f] = _norm_field(v)
    return out


def scan_keys(rc, pattern):
    return sorted(_s(k) for k in rc.scan_iter(match=pattern, count=5000))


def _s(x):
    return x.decode() if isinstance(x, bytes) else x


def redis_json(rc, pattern):
    keys = scan_keys(rc, pattern)
    out = {}
    for i in range(0, len(keys), 5000):
        chunk = keys[i:i + 5000]
        for k, v in zip(chunk, rc.mget(chunk)):
            if v is not None:
                try:
                    out[k] = loads(_s(v))
                except (ValueError, UnicodeDecodeError):
                    out[k] = ("NOT JSON", v)
    return out


def _norm_field(v):
    """Hash fields holding JSON documents (json, jsonb, arrays) compare by content, not spacing."""
    if isinstance(v, str) and v[:1] in "[{\"":
        try:
            return loads(v)
        except ValueError:
            pass
    return v


def redis_hash(rc, pattern):
    keys = scan_keys(rc, pattern)
    out = {}
    for i in range(0, len(keys), 2000):
        chunk = keys[i:i + 2000]
        p = rc.pipeline(transaction=False)
        for k in chunk:
            p.hgetall(k)
        for k, h in zip(chunk, p.execute()):
            out[k] = {_s(f): _norm_field(_s(v)) for f, v in h.items()}
    return out


def diff_maps(expected: dict, actual: dict, limit: int = 5):
    """None when equal, else a readable description of what differs."""
    if expected == actual:
        return None
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    different = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    lines = [f"expected {len(expected)} keys, Redis has {len(actual)}"]
    if missing:
        lines.append(f"{len(missing)} missing in Redis, e.g. {missing[:limit]}")
    if extra:
        lines.append(f"{len(extra)} extra in Redis, e.g. " + ", ".join(f"{k}={actual[k]!r}" for k in extra[:limit]))
    if different:
        lines.append(f"{len(different)} differ, e.g. " + "; ".join(
            f"{k}: table {expected[k]!r} != redis {actual[k]!r}" for k in different[:limit]))
    return "\n  ".join(lines)


def redis_table_diff(pg, rc, table, key_sql=None, pattern=None, where=None, columns=None, fmt="json",
                     dbname="postgres"):
    key_sql = key_sql or f"'{table}:' || id"
    pattern = pattern or f"{table}:*"
    if fmt == "json":
        return diff_maps(expected_json(pg, table, key_sql, where, columns, dbname), redis_json(rc, pattern))
    return diff_maps(expected_hash(pg, table, key_sql, where, columns, dbname), redis_hash(rc, pattern))


def assert_redis_equals_table(pg, rc, table, key_sql=None, pattern=None, where=None, columns=None,
                              fmt="json", timeout=10.0, dbname="postgres"):
    """Wait until the keys under `pattern` in Redis are exactly the rows of `table` (those matching
    `where`), keyed by `key_sql`, with values equal to parsed `row_to_json(t)` computed under
    TimeZone UTC (or, for fmt='hash', its json_each_text fields, NULLs left out)."""
    deadline = time.monotonic() + timeout
    while True:
        d = redis_table_diff(pg, rc, table, key_sql, pattern, where, columns, fmt, dbname)
        if d is None:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"Redis does not equal table {table} after {timeout}s:\n  {d}")
        time.sleep(0.1)


def stats(conn, table):
    cur = conn.execute("SELECT * FROM redis_stats WHERE mirror = %s::regclass", (table,))
    row = cur.fetchone()
    assert row is not None, f"no redis_stats row for {table}"
    return dict(zip([c.name for c in cur.description], row))


def wait_idle(conn, table, timeout=15.0):
    """Wait until the mirror is active with an empty queue."""
    seen = {}

    def idle():
        s = stats(conn, table)
        seen.update(s)
        return s if (s["queue_depth"] == 0 and s["state"] == "active") else None
    try:
        return wait_until(idle, timeout, 0.05, f"{table}: queue empty and state active")
    except AssertionError as e:
        raise AssertionError(f"{e}; redis_stats: {seen}") from None


def notices_of(conn):
    got = []
    conn.add_notice_handler(lambda d: got.append(d))
    return got


# ----------------------------------------------------------------------------------------
# Fixtures


class Ctx:
    def __init__(self, pg, redis_srv):
        self.pg = pg
        self.redis = redis_srv
        self.conn = pg.connect()
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")
        self.rc = redis_srv.client(decode_responses=True)
        self.tables: list[str] = []
        self.roles: list[str] = []
        self.extra_sql: list[str] = []

    def table(self, name, ddl, rows_sql=None):
        """CREATE TABLE name (ddl) [+ INSERT rows_sql], dropped at teardown."""
        self.tables.append(name)
        self.conn.execute(f"CREATE TABLE {name} ({ddl})")
        if rows_sql:
            self.conn.execute(f"INSERT INTO {name} {rows_sql}")
        return name

    def role(self, name):
        self.roles.append(name)
        self.conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        self.conn.execute(f'CREATE ROLE "{name}" LOGIN')
        return name

    def connect(self, **kw):
        return self.pg.connect(**kw)

    def equal(self, table, **kw):
        assert_redis_equals_table(self.pg, self.rc, table, **kw)

    def get(self, key):
        v = self.rc.get(key)
        return None if v is None else loads(v)

    def close(self):
        c = self.conn
        with_errors = []
        for t in reversed(self.tables):
            try:
                c.execute(f"DROP TABLE IF EXISTS {t} CASCADE")
            except psycopg.Error as e:
                with_errors.append(e)
        for s in self.extra_sql:
            try:
                c.execute(s)
            except psycopg.Error:
                pass
        for r in self.roles:
            try:
                c.execute(f'DROP OWNED BY "{r}" CASCADE')
                c.execute(f'DROP ROLE IF EXISTS "{r}"')
            except psycopg.Error:
                pass
        try:
            for (mirror,) in c.execute("SELECT mirror::text FROM redis_mirrors").fetchall():
                c.execute(f"SELECT redis_unmirror({_lit(mirror)}::regclass, true)")
            wait_until(lambda: one(c, "SELECT count(*) FROM redis_internal.queue") == 0, 10, 0.05,
                       "the queue to empty at teardown")
        except Exception:  # noqa: BLE001 - best effort; the next test flushes anyway
            pass
        c.execute("RESET ALL")
        c.close()
        self.rc.flushall()
        self.rc.close()


def _lit(s):
    return "'" + s.replace("'", "''") + "'"


@pytest.fixture
def m(pg, module_redis):
    module_redis.client().flushall()
    ctx = Ctx(pg, module_redis)
    yield ctx
    ctx.close()


# ----------------------------------------------------------------------------------------
# Basics: each kind of change


def test_insert_update_delete_reach_redis_promptly(m):
    m.table("mx_basic", "id int PRIMARY KEY, v text, n int")
    assert one(m.conn, "SELECT redis_mirror('mx_basic')") == 0
    lags = []
    for i in range(1, 21):
        t0 = time.monotonic()
        m.conn.execute("INSERT INTO mx_basic VALUES (%s, %s, %s)", (i, f"v{i}", i * 10))
        wait_until(lambda: m.rc.exists(f"mx_basic:{i}"), 5, 0.001, f"mx_basic:{i}")
        lags.append(time.monotonic() - t0)
    assert m.get("mx_basic:3") == {"id": 3, "v": "v3", "n": 30}
    # "within milliseconds of commit": the median round trip (commit + delivery + our polling)
    assert statistics.median(lags) < 0.1, f"median insert-to-Redis time {statistics.median(lags):.3f}s, all {lags}"

    m.conn.execute("UPDATE mx_basic SET v = 'changed', n = NULL WHERE id = 3")
    wait_until(lambda: m.get("mx_basic:3") == {"id": 3, "v": "changed", "n": None}, 5, what="update of mx_basic:3")
    m.conn.execute("DELETE FROM mx_basic WHERE id = 4")
    wait_until(lambda: not m.rc.exists("mx_basic:4"), 5, what="delete of mx_basic:4")
    m.conn.execute("UPDATE mx_basic SET n = n + 1 WHERE id > 10")  # multi-row statement
    m.conn.execute("DELETE FROM mx_basic WHERE id BETWEEN 15 AND 17")
    m.equal("mx_basic")


def test_batch_delay_holds_back_no_light_load_and_loses_nothing_of_a_stream(m):
    """pg_redis.batch_delay (postgresql.conf, reload): the worker spaces its steps only under a
    heavy stream; single commits go out at once even with a long delay, and a stream from
    several sessions arrives whole."""
    assert one(m.conn, "SHOW pg_redis.batch_delay") == "5ms"
    expect_error(m.conn, "SET pg_redis.batch_delay = '1ms'", sqlstate="55P02", prefix=None)
    m.table("mx_delay", "id int PRIMARY KEY, v text")
    assert one(m.conn, "SELECT redis_mirror('mx_delay')") == 0
    try:
        m.conn.execute("ALTER SYSTEM SET pg_redis.batch_delay = '1s'")
        m.conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.3)
        assert one(m.conn, "SHOW pg_redis.batch_delay") == "1s"
        lags = []
        for i in range(1, 11):
            t0 = time.monotonic()
            m.conn.execute("INSERT INTO mx_delay VALUES (%s, 'light')", (i,))
            wait_until(lambda: m.rc.exists(f"mx_delay:{i}"), 5, 0.001, f"mx_delay:{i}")
            lags.append(time.monotonic() - t0)
        assert statistics.median(lags) < 0.1, f"light load held back: {lags}"

        def writer(first):
            with m.pg.connect() as c:
                for i in range(first, first + 1000):
                    c.execute("INSERT INTO mx_delay VALUES (%s, 'stream')", (i,))

        threads = [threading.Thread(target=writer, args=(1000 * k,)) for k in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: m.rc.dbsize() >= 3010, 20, what="the stream's 3010 keys")
        m.equal("mx_delay")
    finally:
        m.conn.execute("ALTER SYSTEM RESET pg_redis.batch_delay")
        m.conn.execute("SELECT pg_reload_conf()")


def test_only_committed_changes_reach_redis(m):
    m.table("mx_tx", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    m.conn.execute("SELECT redis_mirror('mx_tx')")
    m.equal("mx_tx")
    with m.connect(autocommit=False) as c:
        c.execute("INSERT INTO mx_tx VALUES (2, 'two')")
        c.execute("UPDATE mx_tx SET v = 'uncommitted' WHERE id = 1")
        time.sleep(0.5)
        assert m.rc.get("mx_tx:2") is None, "an uncommitted insert reached Redis"
        assert m.get("mx_tx:1") == {"id": 1, "v": "one"}, "an uncommitted update reached Redis"
        c.commit()
    wait_until(lambda: m.get("mx_tx:2") == {"id": 2, "v": "two"}, 5, what="committed insert")
    assert m.get("mx_tx:1") == {"id": 1, "v": "uncommitted"}


def test_rolled_back_transaction_leaves_nothing(m):
    m.table("mx_rb", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    m.conn.execute("SELECT redis_mirror('mx_rb')")
    m.equal("mx_rb")
    with m.connect(autocommit=False) as c:
        c.execute("INSERT INTO mx_rb SELECT g, 'x' FROM generate_series(2, 100) g")
        c.execute("UPDATE mx_rb SET v = 'rolled back' WHERE id = 1")
        c.execute("DELETE FROM mx_rb WHERE id = 1")
        c.execute("TRUNCATE mx_rb")
        c.rollback()
    # a later committed change is the marker that everything queued before it was handled
    m.conn.execute("INSERT INTO mx_rb VALUES (1000, 'marker')")
    wait_until(lambda: m.rc.exists("mx_rb:1000"), 5, what="marker")
    time.sleep(0.2)
    assert scan_keys(m.rc, "mx_rb:*") == ["mx_rb:1", "mx_rb:1000"]
    assert m.get("mx_rb:1") == {"id": 1, "v": "one"}


def test_savepoint_rolled_back(m):
    m.table("mx_sp", "id int PRIMARY KEY, v text", "VALUES (1, 'one'), (2, 'two')")
    m.conn.execute("SELECT redis_mirror('mx_sp')")
    m.equal("mx_sp")
    with m.connect(autocommit=False) as c:
        c.execute("INSERT INTO mx_sp VALUES (3, 'three')")
        c.execute("SAVEPOINT a")
        c.execute("INSERT INTO mx_sp VALUES (4, 'four')")
        c.execute("UPDATE mx_sp SET v = 'in savepoint' WHERE id = 1")
        c.execute("DELETE FROM mx_sp WHERE id = 2")
        c.execute("ROLLBACK TO SAVEPOINT a")
        c.execute("SAVEPOINT b")
        c.execute("UPDATE mx_sp SET v = 'kept' WHERE id = 2")
        c.execute("RELEASE SAVEPOINT b")
        c.commit()
    m.equal("mx_sp")
    assert m.get("mx_sp:1") == {"id": 1, "v": "one"}
    assert m.get("mx_sp:2") == {"id": 2, "v": "kept"}
    assert m.rc.get("mx_sp:4") is None


def test_update_changing_the_key_removes_the_old_key(m):
    m.table("mx_kc", "id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 10) g")
    m.conn.execute("SELECT redis_mirror('mx_kc')")
    m.equal("mx_kc")
    m.conn.execute("UPDATE mx_kc SET id = 100 WHERE id = 1")
    m.conn.execute("UPDATE mx_kc SET id = id + 1000 WHERE id BETWEEN 5 AND 8")  # several at once
    m.equal("mx_kc")
    assert not m.rc.exists("mx_kc:1") and m.get("mx_kc:100") == {"id": 100, "v": "v1"}


def test_key_swaps(m):
    # Swapping keys within one statement needs a deferrable key in PostgreSQL itself.
    m.table("mx_sw", "id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, v text",
            "VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')")
    m.conn.execute("SELECT redis_mirror('mx_sw')")
    m.equal("mx_sw")
    m.conn.execute("UPDATE mx_sw SET id = 3 - id WHERE id IN (1, 2)")            # swap
    m.conn.execute("UPDATE mx_sw SET id = CASE id WHEN 3 THEN 4 WHEN 4 THEN 5 END WHERE id IN (3, 4)")  # shift onto a taken key
    m.equal("mx_sw")
    assert m.get("mx_sw:1") == {"id": 1, "v": "b"} and m.get("mx_sw:2") == {"id": 2, "v": "a"}
    assert m.get("mx_sw:4") == {"id": 4, "v": "c"} and not m.rc.exists("mx_sw:3")

    # Swaps across transactions committed back to back (one worker batch): every DEL of an old key
    # must come before the SET of the transaction that reuses the key.
    with m.connect() as c:
        for i in range(200):
            with c.transaction():
                c.execute("UPDATE mx_sw SET id = 1000 WHERE id = 1")
                c.execute("UPDATE mx_sw SET id = 1 WHERE id = 2")
                c.execute("UPDATE mx_sw SET id = 2 WHERE id = 1000")
                c.execute("UPDATE mx_sw SET v = %s WHERE id = 1", (f"r{i}",))
            c.execute("UPDATE mx_sw SET id = 6 WHERE id = 5")
            c.execute("UPDATE mx_sw SET id = 5 WHERE id = 6")
    m.equal("mx_sw")


def test_copy_and_multirow_statements(m):
    m.table("mx_copy", "id int PRIMARY KEY, v text, ts timestamptz")
    m.conn.execute("SELECT redis_mirror('mx_copy')")
    with m.connect() as c:
        c.execute(ODD_SETTINGS)
        with c.cursor() as cur:
            with cur.copy("COPY mx_copy (id, v, ts) FROM STDIN") as cp:
                for i in range(1, 2001):
                    cp.write_row((i, f"row {i}\ttab \"q\"", "2024-03-10 01:30:00-05"))
    m.equal("mx_copy")
    assert m.get("mx_copy:7")["ts"] == "2024-03-10T06:30:00+00:00"
    m.conn.execute("COPY mx_copy FROM PROGRAM 'printf \"5000\\tfrom program\\t\\\\N\\n\"'")
    m.equal("mx_copy")
    assert m.get("mx_copy:5000") == {"id": 5000, "v": "from program", "ts": None}


def test_upserts(m):
    m.table("mx_up", "id int PRIMARY KEY, v text, hits int DEFAULT 0", "VALUES (1, 'one', 0), (2, 'two', 0)")
    m.conn.execute("SELECT redis_mirror('mx_up')")
    m.equal("mx_up")
    m.conn.execute("""INSERT INTO mx_up VALUES (1, 'uno', 1), (3, 'three', 1)
                      ON CONFLICT (id) DO UPDATE SET v = excluded.v, hits = mx_up.hits + 1""")
    m.conn.execute("INSERT INTO mx_up VALUES (2, 'ignored', 9), (4, 'four', 0) ON CONFLICT DO NOTHING")
    m.equal("mx_up")
    assert m.get("mx_up:1") == {"id": 1, "v": "uno", "hits": 1}
    assert m.get("mx_up:2") == {"id": 2, "v": "two", "hits": 0}
    assert m.get("mx_up:3") == {"id": 3, "v": "three", "hits": 1}
    # MERGE (PostgreSQL 15)
    m.conn.execute("""MERGE INTO mx_up t USING (VALUES (1, 'merged'), (9, 'new'), (2, NULL)) s(id, v) ON t.id = s.id
                      WHEN MATCHED AND s.v IS NULL THEN DELETE
                      WHEN MATCHED THEN UPDATE SET v = s.v
                      WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)""")
    m.equal("mx_up")
    assert not m.rc.exists("mx_up:2")


def test_truncate_removes_exactly_the_mirrors_keys(m):
    m.table("mx_tr", "id int PRIMARY KEY, v text", "SELECT g, 'x' FROM generate_series(1, 3000) g")
    m.table("mx_tr2", "id int PRIMARY KEY, v text", "SELECT g, 'y' FROM generate_series(1, 10) g")
    m.conn.execute("SELECT redis_mirror('mx_tr')")
    m.conn.execute("SELECT redis_mirror('mx_tr2')")
    m.rc.set("unrelated:1", "stays")
    m.equal("mx_tr")
    m.equal("mx_tr2")

    # a rolled-back TRUNCATE changes nothing
    with m.connect(autocommit=False) as c:
        c.execute("TRUNCATE mx_tr")
        c.rollback()
    m.conn.execute("INSERT INTO mx_tr2 VALUES (100, 'marker')")
    wait_until(lambda: m.rc.exists("mx_tr2:100"), 5, what="marker")
    assert len(scan_keys(m.rc, "mx_tr:*")) == 3000

    # TRUNCATE then new rows in the same transaction: only the new rows remain
    with m.connect(autocommit=False) as c:
        c.execute("TRUNCATE mx_tr")
        c.execute("INSERT INTO mx_tr VALUES (5, 'after truncate'), (6000, 'new')")
        c.commit()
    m.equal("mx_tr")
    assert m.get("mx_tr:5") == {"id": 5, "v": "after truncate"}
    m.equal("mx_tr2")
    assert m.rc.get("unrelated:1") == "stays"

    m.conn.execute("TRUNCATE mx_tr")
    m.equal("mx_tr")
    assert scan_keys(m.rc, "mx_tr:*") == []
    # and capture goes on after a TRUNCATE
    m.conn.execute("INSERT INTO mx_tr VALUES (1, 'back')")
    m.equal("mx_tr")


def test_concurrent_writers_keep_per_key_order(m):
    m.table("mx_conc", "id int PRIMARY KEY, n int, who text", "SELECT g, 0, '' FROM generate_series(1, 20) g")
    m.conn.execute("SELECT redis_mirror('mx_conc')")
    m.equal("mx_conc")
    errors = []

    def writer(w):
        try:
            with m.connect() as c:
                rnd = random.Random(w)
                for _ in range(150):
                    ids = rnd.sample(range(1, 21), 3)
                    with c.transaction():
                        for i in sorted(ids):
                            c.execute("UPDATE mx_conc SET n = n + 1, who = %s WHERE id = %s", (f"w{w}", i))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    m.equal("mx_conc")
    assert sum(m.get(f"mx_conc:{i}")["n"] for i in range(1, 21)) == 4 * 150 * 3


def test_drain_and_worker_together_keep_per_key_order(m):
    m.table("mx_dw", "id int PRIMARY KEY, n int", "SELECT g, 0 FROM generate_series(1, 10) g")
    m.conn.execute("SELECT redis_mirror('mx_dw')")
    m.equal("mx_dw")
    stop = threading.Event()
    errors = []
    drained = [0]

    def drainer():
        try:
            with m.connect() as c:
                while not stop.is_set():
                    drained[0] += one(c, "SELECT redis_drain(50)")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=drainer)
    th.start()
    try:
        with m.connect() as c:
            for i in range(1500):
                c.execute("UPDATE mx_dw SET n = %s WHERE id = %s", (i, i % 10 + 1))
    finally:
        stop.set()
        th.join()
    assert not errors, errors
    m.equal("mx_dw")


def test_redis_mirror_is_quiet(m):
    """No stray NOTICEs (e.g. from dropping triggers that do not exist) in a preloaded server."""
    m.table("mx_quiet", "id int PRIMARY KEY")
    got = notices_of(m.conn)
    m.conn.execute("SELECT redis_mirror('mx_quiet')")
    m.conn.execute("SELECT redis_mirror('mx_quiet', ttl_seconds => 10)")
    assert [d.message_primary for d in got] == []


# ----------------------------------------------------------------------------------------
# Values


TYPES_DDL = """id int PRIMARY KEY, i int, big bigint, num numeric, f8 float8, f4 real, b bool, t text,
               j jsonb, js json, tz timestamptz, ts timestamp, d date, by bytea, ia int[], ta text[],
               tza timestamptz[], u uuid, nothing text"""
TYPES_ROW = """(1, -42, 9007199254740993, 12345678901234567890.123456789, 1.0/3, 1.0/3, true,
                 E'quote " backslash \\\\ newline \\n tab \\t unicode \u00e9\u4e2d \U0001F600',
                 '{"a": [1, 2.5, null, {"b": "c"}], "z": true}', '{"keep":  "spacing"}',
                 '2024-01-01 08:00:00+00', '2024-01-31 23:59:59.123456', '2024-01-31', '\\x00ff10',
                 '{1,NULL,3}', '{"a b",NULL,"c,d"}', '{"2024-06-01 12:00:00+00",NULL}',
                 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', NULL)"""


def test_json_typing_independent_of_session_settings(m):
    m.table("mx_types", TYPES_DDL)
    m.conn.execute("SELECT redis_mirror('mx_types')")
    with m.connect() as c:
        c.execute(ODD_SETTINGS)
        c.execute(f"INSERT INTO mx_types VALUES {TYPES_ROW}")
        c.execute("INSERT INTO mx_types (id, f8, f4, num, tz, d) VALUES "
                  "(2, 'NaN', 'Infinity', 'NaN', '-infinity', 'infinity'), (3, 1e300, -0.1, 0, '1999-12-31 19:00:00-05', '0044-03-15 BC')")
        c.execute("INSERT INTO mx_types (id) VALUES (4)")  # all NULLs
    wait_until(lambda: m.rc.exists("mx_types:4"), 5, what="mx_types rows")
    got = m.get("mx_types:1")
    assert got == {
        "id": 1, "i": -42, "big": 9007199254740993, "num": Decimal("12345678901234567890.123456789"),
        "f8": Decimal("0.3333333333333333"), "f4": Decimal("0.33333334"), "b": True,
        "t": "quote \" backslash \\ newline \n tab \t unicode \u00e9\u4e2d \U0001F600",
        "j": {"a": [1, Decimal("2.5"), None, {"b": "c"}], "z": True}, "js": {"keep": "spacing"},
        "tz": "2024-01-01T08:00:00+00:00", "ts": "2024-01-31T23:59:59.123456", "d": "2024-01-31",
        "by": "\\x00ff10", "ia": [1, None, 3], "ta": ["a b", None, "c,d"],
        "tza": ["2024-06-01T12:00:00+00:00", None], "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "nothing": None,
    }, "JSON of a row written with TimeZone=America/New_York, DateStyle='SQL, DMY', bytea_output=escape, extra_float_digits=0"
    # the raw text too: integers stay integers (no 9.007199254740992e15), floats shortest-exact
    raw = m.rc.get("mx_types:1")
    assert '"big":9007199254740993' in raw.replace(" ", ""), raw
    assert '"f8":0.3333333333333333' in raw.replace(" ", ""), raw
    # everything equal to row_to_json under UTC/ISO/hex/extra_float_digits=1
    m.equal("mx_types")
    assert m.get("mx_types:3")["tz"] == "2000-01-01T00:00:00+00:00"
    assert m.get("mx_types:4") == {k: (4 if k == "id" else None) for k in got}


def test_interval_and_time_renderings_independent_of_session_settings(m):
    """IntervalStyle is a session setting too; timetz carries its own offset."""
    m.table("mx_types2", "id int PRIMARY KEY, iv interval, tm time, ttz timetz, mo money")
    m.conn.execute("SELECT redis_mirror('mx_types2')")
    with m.connect() as c:
        c.execute(ODD_SETTINGS + "; SET IntervalStyle = 'sql_standard'")
        c.execute("INSERT INTO mx_types2 VALUES (1, '1 day 02:03:04.5', '13:14:15', '13:14:15+02', 12.5)")
    m.equal("mx_types2")


def test_rendering_of_date_time_keys_and_values_independent_of_session_settings(m):
    """Capture sets only the rendering settings a mirror's columns depend on (a timestamptz key
    needs DateStyle and TimeZone, an interval IntervalStyle, a real extra_float_digits, ...): a
    writer with every one of them different still produces the documented keys and JSON."""
    m.table("mx_types4", "at timestamptz PRIMARY KEY, d date, ts timestamp, iv interval, tm time, "
                         "f4 real, by bytea, n numeric")
    m.conn.execute("SELECT redis_mirror('mx_types4')")
    with m.connect() as c:
        c.execute(ODD_SETTINGS + "; SET IntervalStyle = 'sql_standard'")
        c.execute("INSERT INTO mx_types4 VALUES ('2024-01-01 08:00:00+00', '2024-01-31', "
                  "'2024-01-31 23:59:59.5', '1 day 02:03:04.5', '13:14:15', 1.0/3, '\\x00ff', 1.5)")
        c.execute("UPDATE mx_types4 SET iv = iv * 2, f4 = 2.0/3")
    wait_until(lambda: m.rc.exists("mx_types4:2024-01-01 08:00:00+00"), 5,
               what=f"the key rendered as documented (have {sorted(m.rc.keys('mx_types4:*'))})")
    m.equal("mx_types4", key_sql="'mx_types4:' || at::text")


def test_updates_render_with_the_documented_settings_too(m):
    m.table("mx_types3", "id int PRIMARY KEY, tz timestamptz, f8 float8, by bytea",
            "VALUES (1, '2024-01-01 00:00:00+00', 0, '\\x00')")
    m.conn.execute("SELECT redis_mirror('mx_types3')")
    m.equal("mx_types3")
    with m.connect() as c:
        c.execute(ODD_SETTINGS)
        c.execute("UPDATE mx_types3 SET tz = '2024-07-04 12:00:00', f8 = 2.0/3, by = '\\xdeadbeef'")
    want = {"id": 1, "tz": "2024-07-04T16:00:00+00:00", "f8": Decimal("0.6666666666666666"), "by": "\\xdeadbeef"}
    try:
        wait_until(lambda: m.get("mx_types3:1") == want, 5, what="updated row in UTC/full precision/hex")
    except AssertionError:
        raise AssertionError(f"after an UPDATE under odd settings Redis has {m.rc.get('mx_types3:1')!r}, want {want}") from None


def test_json_text_is_row_to_json_byte_for_byte(m):
    """Capture renders rows itself (the per-column lookups once per statement, not per row as
    row_to_json does): its text must be row_to_json's exactly, for every JSON category (numbers
    with NaN and infinities, booleans, dates, json kept as written, escaped strings and column
    names), NULLs and a dropped column, for INSERT (one row and several, packed), COPY and UPDATE,
    whatever the writer's settings."""
    m.table("mx_bytes", 'id int PRIMARY KEY, s2 smallint, i8 bigint, f4 real, f8 float8, num numeric, '
                        'b boolean, gone text, d date, ts timestamp, tz timestamptz, j json, jb jsonb, '
                        't text, vc varchar(9), ch char(4), "we""ird ñame" text, u uuid, by bytea, '
                        'iv interval, tm time, ttz timetz, mo money, ip inet, c "char", nm name, o oid')
    m.conn.execute("ALTER TABLE mx_bytes DROP COLUMN gone")
    m.conn.execute("SELECT redis_mirror('mx_bytes')")
    with m.connect() as c:
        c.execute(ODD_SETTINGS + "; SET IntervalStyle = 'sql_standard'")
        row1 = ("-32768, 9007199254740993, 1.0/3, 2.0/3, 1.50, true, "
                "'2024-02-29', '2024-01-31 23:59:59.123456', '2024-01-01 08:00:00+00', "
                "'{ \"a\" : [1, 2.50] }', '{\"b\": {\"c\": null}}', "
                "E'q \" b \\\\ n \\n t \\t cr \\r ff \\f bs \\b ctl \\x01\\x1f del \\x7f é 中', 'v', 'ch', "
                "'name', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff', '1 day 02:03:04.5', "
                "'13:14:15', '13:14:15+02', 12.5, '10.0.0.1/8', 'x', 'nm', 42")
        c.execute(f"INSERT INTO mx_bytes VALUES (1, {row1})")
        # The same values in one statement: its changes share a packed queue row, whose JSON
        # array must carry each row's text (json kept as written, escapes) unchanged.
        c.execute(f"INSERT INTO mx_bytes VALUES (7, {row1}), (8, {row1})")
        c.execute("INSERT INTO mx_bytes (id, f4, f8, num, b, d, ts, tz) VALUES "
                  "(2, 'NaN', '-Infinity', 'NaN', false, 'infinity', '0044-03-15 BC', '-infinity'), "
                  "(3, 'Infinity', 1e300, 'Infinity', NULL, '-infinity', 'infinity', '1999-12-31 19:00:00-05'), "
                  "(4, -0.0, 5e-324, '-Infinity', NULL, NULL, NULL, NULL)")
        c.execute("INSERT INTO mx_bytes (id) VALUES (5)")
        with c.cursor().copy("COPY mx_bytes (id, t, j, f8) FROM STDIN") as cp:
            cp.write_row((6, 'copied "text"\t\\', '[1,  2]', 0.1))
        c.execute("UPDATE mx_bytes SET t = t || ' updated', f8 = f8 / 3, tz = tz + interval '1 hour' WHERE id IN (1, 3)")
    with m.connect() as c:
        c.execute(REFERENCE_SETTINGS)
        want = dict(c.execute("SELECT 'mx_bytes:' || id, row_to_json(r)::text FROM mx_bytes r").fetchall())
    try:
        wait_until(lambda: all(m.rc.get(k) == v for k, v in want.items()), 5, what="mx_bytes rows")
    except AssertionError:
        pass  # the comparison below says which row differs
    got = {k: m.rc.get(k) for k in want}
    for k in sorted(want):
        assert got[k] == want[k], f"{k}: capture wrote\n  {got[k]!r}\nrow_to_json gives\n  {want[k]!r}"


def test_large_rows_render_whole_between_small_ones(m):
    """Each row's JSON is built in the statement's buffer, emptied (and given back after a large
    row) between rows: a row of megabytes (its escapes making the JSON longer than the text) between small rows of the same
    statement must reach Redis whole, and the small ones after it unchanged."""
    m.table("mx_big", "id int PRIMARY KEY, t text")
    m.conn.execute("SELECT redis_mirror('mx_big')")
    m.conn.execute("INSERT INTO mx_big SELECT i, CASE WHEN i % 2 = 0 THEN repeat(E'ab\"\\\n', 600000) || i "
                   "ELSE 'small ' || i END FROM generate_series(1, 5) i")
    want = dict(m.conn.execute("SELECT 'mx_big:' || id, row_to_json(r)::text FROM mx_big r").fetchall())
    assert len(want["mx_big:2"]) > 3_000_000
    wait_until(lambda: all(m.rc.get(k) == v for k, v in want.items()), 20, what="mx_big rows, large and small")


def test_schema_changes_between_statements_of_one_session(m):
    """Capture keeps its statements and renderers per session: a column added, dropped, retyped or renamed
    between two writes of the same session must show in the next change's JSON."""
    m.table("mx_alter", "id int PRIMARY KEY, v text, n int")
    one(m.conn, "SELECT redis_mirror('mx_alter')")
    for i in range(3):  # the same statements, several times: the session keeps their plans
        m.conn.execute("INSERT INTO mx_alter VALUES (%s, 'a', 1)", (i,))
        m.conn.execute("UPDATE mx_alter SET n = n + 1 WHERE id = %s", (i,))
    m.equal("mx_alter")
    m.conn.execute("ALTER TABLE mx_alter ADD COLUMN extra text DEFAULT 'x'")
    m.conn.execute("INSERT INTO mx_alter VALUES (10, 'b', 2, 'y')")
    m.conn.execute("UPDATE mx_alter SET n = n + 1 WHERE id = 0")
    wait_until(lambda: m.get("mx_alter:10") == {"id": 10, "v": "b", "n": 2, "extra": "y"}, 5,
               what="the added column in the next INSERT's JSON")
    m.conn.execute("ALTER TABLE mx_alter DROP COLUMN v")
    m.conn.execute("ALTER TABLE mx_alter ALTER COLUMN n TYPE numeric(10,2)")
    m.conn.execute("INSERT INTO mx_alter VALUES (11, 3.5, 'z')")
    m.conn.execute("UPDATE mx_alter SET n = n + 1 WHERE id = 1")
    wait_until(lambda: m.get("mx_alter:11") == {"id": 11, "n": 3.5, "extra": "z"}, 5,
               what="the dropped and retyped columns in the next INSERT's JSON")
    wait_until(lambda: m.get("mx_alter:1") == {"id": 1, "n": 3, "extra": "x"}, 5,
               what="the dropped and retyped columns in the next UPDATE's JSON")
    # a rename keeps every column's type: the next change still carries the new name
    m.conn.execute("ALTER TABLE mx_alter RENAME COLUMN extra TO renamed")
    m.conn.execute("INSERT INTO mx_alter VALUES (12, 4.5, 'w')")
    wait_until(lambda: m.get("mx_alter:12") == {"id": 12, "n": 4.5, "renamed": "w"}, 5,
               what="the renamed column in the next INSERT's JSON")
    m.conn.execute("DELETE FROM mx_alter WHERE id = 2")
    # keys of rows not written since keep their old shape until their row changes (docs)
    m.conn.execute("UPDATE mx_alter SET n = n")
    m.equal("mx_alter")


def test_worker_deletes_reach_autovacuum_statistics(m):
    """The worker's deletes from the queue must be counted in pg_stat_all_tables, or autovacuum
    never vacuums the queue for its dead tuples (found by the 30-minute outage run: n_tup_del
    stayed 0 after 460k deliveries)."""
    m.table("mx_stat", "id int PRIMARY KEY, v text")
    one(m.conn, "SELECT redis_mirror('mx_stat')")
    m.conn.execute("SELECT pg_stat_force_next_flush()")
    before = one(m.conn, "SELECT n_tup_del FROM pg_stat_all_tables WHERE relid = 'redis_internal.queue'::regclass")
    # one statement per row: a multi-row statement's changes share queue rows (packed)
    m.conn.execute("DO $$ BEGIN FOR i IN 1..300 LOOP INSERT INTO mx_stat VALUES (i, 'x'); END LOOP; END $$")
    wait_idle(m.conn, "mx_stat")

    def counted():
        m.conn.execute("SELECT pg_stat_clear_snapshot()")
        n = one(m.conn, "SELECT n_tup_del FROM pg_stat_all_tables WHERE relid = 'redis_internal.queue'::regclass")
        return n - before >= 300
    wait_until(counted, 10, 0.2, "the worker's queue deletes in pg_stat_all_tables")


def test_worker_vacuums_the_queue_itself(m):
    """Each delivered queue row leaves a dead row and index entry at the head of the queue; the
    worker vacuums the queue itself after 10,000 of them (autovacuum comes once a minute at best,
    and is off here so that only the worker can have done it). One row per statement: each change
    gets a queue row of its own (the changes of a multi-row statement share them)."""
    m.conn.execute("ALTER TABLE redis_internal.queue SET (autovacuum_enabled = off)")
    try:
        m.table("mx_vac", "id int PRIMARY KEY, v text")
        one(m.conn, "SELECT redis_mirror('mx_vac')")
        wait_idle(m.conn, "mx_vac")

        def vacuums():
            m.conn.execute("SELECT pg_stat_clear_snapshot()")
            return one(m.conn, "SELECT vacuum_count FROM pg_stat_all_tables "
                               "WHERE relid = 'redis_internal.queue'::regclass")
        before = vacuums()
        for lo in range(1, 12_001, 4_000):
            m.conn.execute(f"DO $$ BEGIN FOR i IN {lo}..{lo + 3_999} LOOP INSERT INTO mx_vac VALUES (i, 'x'); "
                           "END LOOP; END $$")
        wait_idle(m.conn, "mx_vac", timeout=60)
        # one more change after the last batch: the worker looks at its count after each loop
        m.conn.execute("UPDATE mx_vac SET v = 'y' WHERE id = 1")
        wait_until(lambda: vacuums() > before, 10, 0.2, "a VACUUM of the queue by the worker")
        wait_idle(m.conn, "mx_vac")
    finally:
        m.conn.execute("ALTER TABLE redis_internal.queue RESET (autovacuum_enabled)")


def test_hash_format(m):
    m.table("mx_h", TYPES_DDL)
    m.conn.execute("SELECT redis_mirror('mx_h', format => 'hash')")
    with m.connect() as c:
        c.execute(ODD_SETTINGS)
        c.execute(f"INSERT INTO mx_h VALUES {TYPES_ROW}")
    wait_until(lambda: m.rc.exists("mx_h:1"), 5, what="mx_h:1")
    h = m.rc.hgetall("mx_h:1")
    assert h["num"] == "12345678901234567890.123456789", f"numeric in a hash field lost precision: {h['num']!r}"
    assert h["big"] == "9007199254740993" and h["b"] == "true" and h["f4"] == "0.33333334", h
    m.equal("mx_h", fmt="hash")
    assert "nothing" not in h, f"a NULL column must be left out of the hash: {h}"
    assert h["tz"] == "2024-01-01T08:00:00+00:00" and h["by"] == "\\x00ff10" and h["f8"] == "0.3333333333333333"
    assert h["id"] == "1" and h["t"].startswith('quote " backslash \\ newline \n')
    assert json.loads(h["j"]) == {"a": [1, 2.5, None, {"b": "c"}], "z": True}

    m.conn.execute("UPDATE mx_h SET t = NULL, i = 7 WHERE id = 1")
    wait_until(lambda: "t" not in m.rc.hgetall("mx_h:1"), 5, what="field t removed after t = NULL")
    assert m.rc.hget("mx_h:1", "i") == "7"
    m.equal("mx_h", fmt="hash")
    m.conn.execute("DELETE FROM mx_h WHERE id = 1")
    wait_until(lambda: not m.rc.exists("mx_h:1"), 5, what="hash deleted")


def test_columns_subset(m):
    m.table("mx_cols", "id int PRIMARY KEY, name text, secret text, n int",
            "VALUES (1, 'a', 'pw1', 1), (2, 'b', 'pw2', 2)")
    m.conn.execute("SELECT redis_mirror('mx_cols', columns => ARRAY['id', 'name', 'n'])")
    m.equal("mx_cols", columns=["id", "name", "n"])
    assert "secret" not in m.rc.get("mx_cols:1")
    m.conn.execute("UPDATE mx_cols SET secret = 'pw9', name = 'c' WHERE id = 2")
    m.equal("mx_cols", columns=["id", "name", "n"])


def test_filter_rows_entering_and_leaving(m):
    m.table("mx_f", "id int PRIMARY KEY, status text, v int",
            "VALUES (1, 'active', 1), (2, 'inactive', 2), (3, 'active', 3), (4, NULL, 4)")
    assert one(m.conn, "SELECT redis_mirror('mx_f', filter => 'status = ''active''')") >= 0
    flt = "status = 'active'"
    m.equal("mx_f", where=flt)
    assert scan_keys(m.rc, "mx_f:*") == ["mx_f:1", "mx_f:3"]
    m.conn.execute("UPDATE mx_f SET status = 'active' WHERE id = 2")          # enters
    m.conn.execute("UPDATE mx_f SET status = 'gone' WHERE id = 1")            # leaves
    m.conn.execute("UPDATE mx_f SET status = NULL WHERE id = 3")              # leaves (NULL is not true)
    m.conn.execute("INSERT INTO mx_f VALUES (5, 'active', 5), (6, 'inactive', 6)")
    m.conn.execute("UPDATE mx_f SET id = 50 WHERE id = 5")                    # key change inside the filter
    m.conn.execute("UPDATE mx_f SET id = 60, status = 'active' WHERE id = 6") # key change while entering
    m.conn.execute("UPDATE mx_f SET id = 20, status = 'x' WHERE id = 2")      # key change while leaving
    m.conn.execute("DELETE FROM mx_f WHERE id = 4")
    m.equal("mx_f", where=flt)
    assert scan_keys(m.rc, "mx_f:*") == ["mx_f:50", "mx_f:60"]


def _owner_setup(m, owner, fn, body, grant_owner):
    m.conn.execute(f'GRANT CREATE ON SCHEMA public TO "{owner}"')
    m.extra_sql.append(f'REVOKE CREATE ON SCHEMA public FROM "{owner}"')
    m.conn.execute(f"CREATE FUNCTION public.{fn}(int) RETURNS boolean LANGUAGE sql IMMUTABLE AS '{body}'")
    m.extra_sql.append(f"DROP FUNCTION IF EXISTS public.{fn}(int)")
    m.conn.execute(f"REVOKE ALL ON FUNCTION public.{fn}(int) FROM PUBLIC")
    if grant_owner:
        m.conn.execute(f'GRANT EXECUTE ON FUNCTION public.{fn}(int) TO "{owner}"')


def test_filter_runs_as_table_owner_not_writer(m):
    owner = m.role("mx_owner")
    writer = m.role("mx_writer")
    _owner_setup(m, owner, "mx_owner_only", "SELECT $1 % 2 = 1", grant_owner=True)
    m.conn.execute(f'GRANT EXECUTE ON FUNCTION redis_mirror(regclass,text,text,text[],integer,text,text,text,text,boolean) TO "{owner}"')
    m.tables.append("mx_owned")
    with m.connect(user=owner) as oc:
        oc.execute("CREATE TABLE mx_owned (id int PRIMARY KEY, v text)")
        oc.execute(f'GRANT INSERT ON mx_owned TO "{writer}"')
        # schema-qualified: the filter runs under a fixed search_path
        oc.execute("SELECT redis_mirror('mx_owned', filter => 'public.mx_owner_only(id)')")
    with m.connect(user=writer) as wc:
        wc.execute("INSERT INTO mx_owned SELECT g, 'w' FROM generate_series(1, 6) g")
    m.equal("mx_owned", where="id % 2 = 1")


def test_user_defined_cast_to_json_runs_as_table_owner(m):
    """row_to_json calls a user-defined cast to json for a column of a user-defined type: a table
    owner's cast must run with the owner's rights when another role writes, never with the
    extension owner's (capture renders in one statement as the extension owner only when every
    column has a built-in type)."""
    owner = m.role("mx_castowner")
    writer = m.role("mx_castwriter")
    m.conn.execute(f'GRANT CREATE ON SCHEMA public TO "{owner}"')
    m.extra_sql.append(f'REVOKE CREATE ON SCHEMA public FROM "{owner}"')
    m.conn.execute(f'GRANT EXECUTE ON FUNCTION redis_mirror(regclass,text,text,text[],integer,text,text,text,text,boolean) TO "{owner}"')
    m.tables.append("mx_cast")
    m.extra_sql += ["DROP TABLE IF EXISTS public.mx_cast_seen", "DROP TYPE IF EXISTS public.mx_mood CASCADE"]
    with m.connect(user=owner) as oc:
        oc.execute("CREATE TABLE public.mx_cast_seen (who text)")
        oc.execute(f'GRANT INSERT ON public.mx_cast_seen TO "{writer}"')
        oc.execute("CREATE TYPE public.mx_mood AS ENUM ('sad', 'happy')")
        oc.execute("""CREATE FUNCTION public.mx_mood_json(public.mx_mood) RETURNS json LANGUAGE plpgsql AS $$
                      BEGIN INSERT INTO public.mx_cast_seen VALUES (current_user);
                            RETURN pg_catalog.to_json(upper($1::text)); END $$""")
        oc.execute("CREATE CAST (public.mx_mood AS json) WITH FUNCTION public.mx_mood_json(public.mx_mood)")
        oc.execute("CREATE TABLE mx_cast (id int PRIMARY KEY, mood public.mx_mood)")
        oc.execute(f'GRANT INSERT, UPDATE ON mx_cast TO "{writer}"')
        oc.execute("SELECT redis_mirror('mx_cast')")
    with m.connect(user=writer) as wc:
        wc.execute("INSERT INTO mx_cast VALUES (1, 'happy')")
        wc.execute("UPDATE mx_cast SET mood = 'sad'")
    wait_until(lambda: m.get("mx_cast:1") == {"id": 1, "mood": "SAD"}, 5, what="the row rendered through the cast")
    seen = {r[0] for r in m.conn.execute("SELECT who FROM public.mx_cast_seen").fetchall()}
    assert seen == {owner}, f"the cast to json ran as {seen}, not only as the table owner {owner}"


@pytest.mark.parametrize("filter_sql", ["public.mx_su_only(id)", "mx_su_only(id)", "mx_pub(id)",
                                        "count(*) > 0", "row_number() OVER () > 1"])
def test_filter_is_refused_at_mirror_time_or_never_breaks_writes(m, filter_sql):
    """SPEC §3: a bad filter is refused at redis_mirror time, not at the first write. A filter the
    owner may not run (mx_su_only), a function found only through the caller's search_path
    (mx_pub: the filter runs under a fixed search_path), aggregates, window functions: either
    refused by redis_mirror, or the owner's writes keep working and the mirror is right."""
    owner = m.role("mx_owner2")
    _owner_setup(m, owner, "mx_su_only", "SELECT true", grant_owner=False)
    m.conn.execute("CREATE FUNCTION public.mx_pub(int) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true'")
    m.extra_sql.append("DROP FUNCTION IF EXISTS public.mx_pub(int)")
    m.tables.append("mx_owned2")
    with m.connect(user=owner) as oc:
        oc.execute("CREATE TABLE mx_owned2 (id int PRIMARY KEY, v text)")
    try:
        m.conn.execute("SELECT redis_mirror('mx_owned2', filter => %s)", (filter_sql,))
    except psycopg.Error as e:
        assert e.sqlstate in (PRIVILEGE, BAD_ARG), f"{e.sqlstate}: {e.diag.message_primary}"
        assert e.diag.message_primary.startswith("pg_redis:"), e.diag.message_primary
        return
    with m.connect(user=owner) as oc:
        try:
            oc.execute("INSERT INTO mx_owned2 VALUES (1, 'x')")
        except psycopg.Error as e:
            raise AssertionError(
                f"redis_mirror accepted filter {filter_sql!r}, then the owner's INSERT failed: {e.sqlstate} "
                f"{e.diag.message_primary!r} (detail starts {str(e.diag.message_detail)[:80]!r})") from None


def test_invalidate_only_deletes(m):
    m.table("mx_inv", "id int PRIMARY KEY, v text", "VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    for k in ("mx_inv:1", "mx_inv:2", "mx_inv:3", "mx_inv:5", "mx_inv:7"):
        m.rc.set(k, "cached")
    m.conn.execute("SELECT redis_mirror('mx_inv', action => 'invalidate')")
    time.sleep(0.3)
    m.conn.execute("UPDATE mx_inv SET v = 'a2' WHERE id = 1")
    m.conn.execute("DELETE FROM mx_inv WHERE id = 2")
    m.conn.execute("INSERT INTO mx_inv VALUES (5, 'e'), (6, 'f')")
    m.conn.execute("UPDATE mx_inv SET id = 7 WHERE id = 3")
    m.conn.execute("INSERT INTO mx_inv VALUES (100, 'marker')")
    wait_until(lambda: scan_keys(m.rc, "mx_inv:*") == [], 5, what="every touched key deleted, none written")
    assert one(m.conn, "SELECT action FROM redis_mirrors WHERE mirror = 'mx_inv'::regclass") == "invalidate"


def test_ttl(m):
    m.table("mx_ttl", "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
    m.table("mx_ttlh", "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
    m.conn.execute("SELECT redis_mirror('mx_ttl', ttl_seconds => 100)")
    m.conn.execute("SELECT redis_mirror('mx_ttlh', format => 'hash', ttl_seconds => 100)")
    m.equal("mx_ttl")
    m.equal("mx_ttlh", fmt="hash")
    assert 90 <= m.rc.ttl("mx_ttl:1") <= 100, "backfilled key carries the TTL"
    assert 90 <= m.rc.ttl("mx_ttlh:1") <= 100
    m.rc.persist("mx_ttl:1")
    m.rc.persist("mx_ttlh:1")
    m.conn.execute("UPDATE mx_ttl SET v = 'b'")
    m.conn.execute("UPDATE mx_ttlh SET v = 'b'")
    m.conn.execute("INSERT INTO mx_ttl VALUES (2, 'new')")
    m.equal("mx_ttl")
    m.equal("mx_ttlh", fmt="hash")
    assert 90 <= m.rc.ttl("mx_ttl:1") <= 100, "an update sets the TTL again"
    assert 90 <= m.rc.ttl("mx_ttlh:1") <= 100
    assert 90 <= m.rc.ttl("mx_ttl:2") <= 100
    # and it really expires
    m.table("mx_ttl1", "id int PRIMARY KEY")
    m.conn.execute("SELECT redis_mirror('mx_ttl1', ttl_seconds => 1)")
    m.conn.execute("INSERT INTO mx_ttl1 VALUES (1)")
    wait_until(lambda: m.rc.exists("mx_ttl1:1"), 5, what="mx_ttl1:1")
    wait_until(lambda: not m.rc.exists("mx_ttl1:1"), 5, what="mx_ttl1:1 to expire")


# ----------------------------------------------------------------------------------------
# Key layouts


def test_default_and_custom_key_templates(m):
    m.conn.execute("CREATE SCHEMA IF NOT EXISTS mx_app")
    m.extra_sql.append("DROP SCHEMA IF EXISTS mx_app CASCADE")
    m.table("mx_app.users", "id int PRIMARY KEY, v text", "VALUES (42, 'x')")
    m.table("mx_comp", "a int, b text, v text, PRIMARY KEY (a, b)", "VALUES (1, 'p', 'x'), (2, 'q', 'y')")
    m.table("mx_uniq", "code text NOT NULL UNIQUE, v text", "VALUES ('k1', 'x')")
    m.table("mx_braces", "id int PRIMARY KEY, v text", "VALUES (7, 'x')")
    m.conn.execute("SELECT redis_mirror('mx_app.users')")
    m.conn.execute("SELECT redis_mirror('mx_comp')")
    m.conn.execute("SELECT redis_mirror('mx_uniq', 'mx_uniq:{code}')")
    m.conn.execute("SELECT redis_mirror('mx_braces', '{{mx_br}}:{id}:x{{y}}')")
    wait_until(lambda: m.rc.exists("mx_app.users:42"), 5, what="default key of a table outside public")
    m.equal("mx_app.users", key_sql="'mx_app.users:' || id", pattern="mx_app.users:*")
    m.equal("mx_comp", key_sql="'mx_comp:' || a || ':' || b")
    m.equal("mx_uniq", key_sql="'mx_uniq:' || code")
    m.equal("mx_braces", key_sql="'{mx_br}:' || id || ':x{y}'", pattern="{mx_br}:*")
    tpl = dict(m.conn.execute("SELECT mirror::text, key_template FROM redis_mirrors").fetchall())
    assert tpl["mx_comp"] == "mx_comp:{a}:{b}" and tpl["mx_app.users"] == "mx_app.users:{id}", tpl


def test_key_prefix_recorded_at_creation(m):
    m.table("mx_kp", "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
    m.conn.execute("SET pg_redis.key_prefix = 'tenantA:'")
    m.conn.execute("SELECT redis_mirror('mx_kp')")
    m.conn.execute("RESET pg_redis.key_prefix")
    assert one(m.conn, "SELECT key_prefix FROM redis_mirrors WHERE mirror = 'mx_kp'::regclass") == "tenantA:"
    with m.connect() as c:  # a writer without any prefix
        c.execute("INSERT INTO mx_kp VALUES (2, 'b')")
    m.equal("mx_kp", key_sql="'tenantA:mx_kp:' || id", pattern="tenantA:mx_kp:*")
    assert scan_keys(m.rc, "mx_kp:*") == []
    # the same template under another prefix does not overlap
    m.table("mx_kp2", "id int PRIMARY KEY")
    m.conn.execute("SET pg_redis.key_prefix = 'tenantB:'")
    m.conn.execute("SELECT redis_mirror('mx_kp2', 'mx_kp:{id}')")
    m.conn.execute("RESET pg_redis.key_prefix")
    m.conn.execute("INSERT INTO mx_kp2 VALUES (9)")
    m.equal("mx_kp2", key_sql="'tenantB:mx_kp:' || id", pattern="tenantB:mx_kp:*")
    # TRUNCATE purges under the recorded prefix only
    m.conn.execute("TRUNCATE mx_kp")
    wait_until(lambda: scan_keys(m.rc, "tenantA:*") == [], 5, what="tenantA keys purged")
    assert scan_keys(m.rc, "tenantB:*") == ["tenantB:mx_kp:9"]


def test_remirror_with_new_layout_rekeys(m):
    m.table("mx_re", "id int PRIMARY KEY, v text, n int", "SELECT g, 'v' || g, g FROM generate_series(1, 500) g")
    m.conn.execute("SELECT redis_mirror('mx_re')")
    m.equal("mx_re")
    m.conn.execute("SELECT redis_mirror('mx_re', 'mx_re2:{id}')")
    m.equal("mx_re", key_sql="'mx_re2:' || id", pattern="mx_re2:*")
    wait_until(lambda: scan_keys(m.rc, "mx_re:*") == [], 5, what="old layout purged")
    m.conn.execute("SELECT redis_mirror('mx_re', 'mx_re2:{id}', format => 'hash')")
    wait_idle(m.conn, "mx_re")
    m.equal("mx_re", key_sql="'mx_re2:' || id", pattern="mx_re2:*", fmt="hash")
    m.conn.execute("SELECT redis_mirror('mx_re', 'mx_re2:{id}', format => 'hash', columns => ARRAY['id', 'n'])")
    wait_idle(m.conn, "mx_re")
    m.equal("mx_re", key_sql="'mx_re2:' || id", pattern="mx_re2:*", fmt="hash", columns=["id", "n"])
    # arguments left out take their defaults again
    m.conn.execute("SELECT redis_mirror('mx_re')")
    wait_idle(m.conn, "mx_re")
    m.equal("mx_re")
    assert scan_keys(m.rc, "mx_re2:*") == []
    assert one(m.conn, "SELECT format || ' ' || key_template FROM redis_mirrors WHERE mirror = 'mx_re'::regclass") == "json mx_re:{id}"


def test_unmirror_and_resync(m):
    m.table("mx_un", "id int PRIMARY KEY, v text", "SELECT g, 'x' FROM generate_series(1, 100) g")
    m.table("mx_un2", "id int PRIMARY KEY, v text", "SELECT g, 'y' FROM generate_series(1, 100) g")
    m.conn.execute("SELECT redis_mirror('mx_un')")
    m.conn.execute("SELECT redis_mirror('mx_un2')")
    m.equal("mx_un")
    m.equal("mx_un2")

    m.rc.flushall()  # Redis lost its data
    assert one(m.conn, "SELECT redis_resync('mx_un')") == 100
    m.equal("mx_un")

    m.conn.execute("SELECT redis_unmirror('mx_un')")
    trig = one(m.conn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'mx_un'::regclass AND tgname LIKE 'pg_redis%'")
    assert trig == 0, "redis_unmirror leaves capture triggers behind"
    assert one(m.conn, "SELECT count(*) FROM redis_mirrors WHERE mirror = 'mx_un'::regclass") == 0
    m.conn.execute("UPDATE mx_un SET v = 'after unmirror'")
    m.conn.execute("INSERT INTO mx_un2 VALUES (1000, 'marker')")
    wait_until(lambda: m.rc.exists("mx_un2:1000"), 5, what="marker")
    assert len(scan_keys(m.rc, "mx_un:*")) == 100, "purge => false keeps the keys"
    assert m.get("mx_un:1")["v"] == "x", "an unmirrored table still reaches Redis"

    m.conn.execute("SELECT redis_unmirror('mx_un2', purge => true)")
    wait_until(lambda: scan_keys(m.rc, "mx_un2:*") == [], 5, what="purge")
    assert len(scan_keys(m.rc, "mx_un:*")) == 100
    expect_error(m.conn, "SELECT redis_resync('mx_un')", sqlstate=BAD_ARG)


def test_drop_table_removes_mirror_and_keys(m):
    m.table("mx_drop", "id int PRIMARY KEY, v text", "SELECT g, 'x' FROM generate_series(1, 300) g")
    m.table("mx_keep", "id int PRIMARY KEY, v text", "VALUES (1, 'x')")
    m.conn.execute("SELECT redis_mirror('mx_drop')")
    m.conn.execute("SELECT redis_mirror('mx_keep')")
    m.equal("mx_drop")
    m.equal("mx_keep")
    with m.connect(autocommit=False) as c:
        c.execute("DROP TABLE mx_drop")
        c.rollback()
    time.sleep(0.5)
    assert len(scan_keys(m.rc, "mx_drop:*")) == 300, "a rolled-back DROP TABLE removed keys"
    assert one(m.conn, "SELECT count(*) FROM redis_mirrors WHERE mirror::text = 'mx_drop'") == 1

    t0 = time.monotonic()
    m.conn.execute("DROP TABLE mx_drop")
    wait_until(lambda: scan_keys(m.rc, "mx_drop:*") == [], 5, what="keys of the dropped table removed")
    assert time.monotonic() - t0 < 2
    assert one(m.conn, "SELECT count(*) FROM redis_mirrors WHERE mirror::text = 'mx_drop'") == 0
    m.equal("mx_keep")
    # the layout is free again
    m.table("mx_drop", "id int PRIMARY KEY, v text", "VALUES (5, 'again')")
    m.conn.execute("SELECT redis_mirror('mx_drop')")
    m.equal("mx_drop")


def test_writer_role_without_privileges_on_internals(m):
    w = m.role("mx_w")
    ins = m.role("mx_ins")
    m.table("mx_priv", "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
    m.conn.execute("SELECT redis_mirror('mx_priv')")
    m.conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON mx_priv TO "{w}"')
    m.conn.execute(f'GRANT INSERT ON mx_priv TO "{ins}"')
    with m.connect(user=ins) as c:
        c.execute("INSERT INTO mx_priv VALUES (2, 'insert only')")
    with m.connect(user=w) as c:
        c.execute("INSERT INTO mx_priv VALUES (3, 'w'), (4, 'w')")
        c.execute("UPDATE mx_priv SET v = 'w2' WHERE id = 1")
        c.execute("UPDATE mx_priv SET id = 30 WHERE id = 3")
        c.execute("DELETE FROM mx_priv WHERE id = 4")
        c.execute("INSERT INTO mx_priv VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET v = 'upserted'")
        for q in ["SELECT * FROM redis_internal.queue",
                  "INSERT INTO redis_internal.queue (mirror_id, op, key) VALUES (1, 't', '*')",
                  "DELETE FROM redis_internal.queue",
                  "UPDATE redis_internal.mirrors SET key_template = 'x'",
                  "SELECT * FROM redis_internal.mirrors"]:
            try:
                c.execute(q)
            except psycopg.errors.InsufficientPrivilege:
                continue
            raise AssertionError(f"a writer role could run {q!r}")
    m.equal("mx_priv")
    assert m.get("mx_priv:1")["v"] == "upserted"
    with m.connect(user=w) as c:
        c.execute("TRUNCATE mx_priv")
    m.equal("mx_priv")


# ----------------------------------------------------------------------------------------
# Bad arguments


@pytest.fixture
def bad(m):
    m.table("mx_ba", "id int PRIMARY KEY, v text, n int, s text")
    m.table("mx_ba_nokey", "a int, b text")
    m.table("mx_ba_nullu", "a int UNIQUE, b text")
    m.table("mx_ba_unn", "a int NOT NULL UNIQUE, b text")
    m.table("mx_ba_rls", "id int PRIMARY KEY")
    m.conn.execute("ALTER TABLE mx_ba_rls ENABLE ROW LEVEL SECURITY")
    m.table("mx_ba_part", "id int PRIMARY KEY) PARTITION BY RANGE (id")
    m.conn.execute("CREATE VIEW mx_ba_view AS SELECT * FROM mx_ba")
    m.conn.execute("CREATE MATERIALIZED VIEW mx_ba_mv AS SELECT * FROM mx_ba")
    m.conn.execute("CREATE UNIQUE INDEX ON mx_ba_mv (id)")
    m.conn.execute("CREATE FOREIGN DATA WRAPPER mx_ba_fdw")
    m.conn.execute("CREATE SERVER mx_ba_srv FOREIGN DATA WRAPPER mx_ba_fdw")
    m.conn.execute("CREATE FOREIGN TABLE mx_ba_ft (id int NOT NULL) SERVER mx_ba_srv")
    m.extra_sql += ["DROP VIEW IF EXISTS mx_ba_view", "DROP MATERIALIZED VIEW IF EXISTS mx_ba_mv",
                    "DROP FOREIGN DATA WRAPPER IF EXISTS mx_ba_fdw CASCADE"]
    return m


BAD_CALLS = [
    # (call, sqlstate)
    ("redis_mirror(NULL)", BAD_ARG),
    ("redis_mirror('mx_ba', format => 'xml')", BAD_ARG),
    ("redis_mirror('mx_ba', mode => 'bogus')", BAD_ARG),
    ("redis_mirror('mx_ba', action => 'refresh')", BAD_ARG),
    ("redis_mirror('mx_ba', ttl_seconds => -1)", BAD_ARG),
    ("redis_mirror('mx_ba', ttl_seconds => 0)", BAD_ARG),
    # templates
    ("redis_mirror('mx_ba', 'mx_ba:{nope}')", BAD_ARG),
    ("redis_mirror('mx_ba', '{id}')", BAD_ARG),
    ("redis_mirror('mx_ba', '{id}:mx_ba')", BAD_ARG),
    ("redis_mirror('mx_ba', 'mx_ba:{id')", BAD_ARG),
    ("redis_mirror('mx_ba', 'mx_ba:id}')", BAD_ARG),
    ("redis_mirror('mx_ba', 'mx_ba:{id}}')", BAD_ARG),
    ("redis_mirror('mx_ba', 'mx_ba:{}')", BAD_ARG),
    ("redis_mirror('mx_ba', 'mx_ba:{{id}}')", BAD_ARG),          # literal braces: no placeholder at all
    ("redis_mirror('mx_ba', '')", BAD_ARG),
    ("redis_mirror('mx_ba', 'mx_ba:{v}')", BAD_ARG),              # does not cover the key
    ("redis_mirror('mx_ba', 'mx_ba:{n}:{v}')", BAD_ARG),
    ("redis_mirror('mx_ba_nokey')", BAD_ARG),                     # no usable key
    ("redis_mirror('mx_ba_nokey', 'mx_ba_nokey:{a}')", BAD_ARG),
    ("redis_mirror('mx_ba_nullu')", BAD_ARG),                     # unique but nullable
    ("redis_mirror('mx_ba_nullu', 'mx_ba_nullu:{a}')", BAD_ARG),
    # columns
    ("redis_mirror('mx_ba', columns => ARRAY['id', 'nope'])", BAD_ARG),
    ("redis_mirror('mx_ba', columns => ARRAY[]::text[])", BAD_ARG),
    ("redis_mirror('mx_ba', columns => ARRAY[NULL]::text[])", BAD_ARG),
    # filters
    ("redis_mirror('mx_ba', filter => 'true) FROM pg_authid WHERE (true')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => '1; DROP TABLE mx_ba')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'true; DROP TABLE mx_ba')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'id > 0) OR (SELECT true FROM pg_authid LIMIT 1) OR (true')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'id + 1')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 's')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'nope = 1')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'id = ')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'count(*) > 0')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'row_number() OVER () > 1')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'id > 0 UNION SELECT true')", BAD_ARG),
    ("redis_mirror('mx_ba', filter => 'id > 0 -- comment')", None),  # accepted or refused; never breaks
    # objects of the wrong kind
    ("redis_mirror('mx_ba_view', 'mx_ba_view:{id}')", WRONG_OBJECT),
    ("redis_mirror('mx_ba_mv', 'mx_ba_mv:{id}')", WRONG_OBJECT),
    ("redis_mirror('mx_ba_ft', 'mx_ba_ft:{id}')", WRONG_OBJECT),
    ("redis_mirror('mx_ba_part')", WRONG_OBJECT),
    ("redis_mirror('mx_ba_rls')", PRIVILEGE),
]


def test_bad_arguments_refused(bad):
    m = bad
    failures = []
    for call, state in BAD_CALLS:
        try:
            if state is None:
                try:
                    m.conn.execute(f"SELECT {call}")
                except psycopg.Error as e:
                    assert e.sqlstate == BAD_ARG, f"{call}: {e.sqlstate} {e}"
            else:
                e = expect_error(m.conn, f"SELECT {call}", sqlstate=state)
                assert len(e.diag.message_primary) > 25, f"{call}: unhelpful message {e.diag.message_primary!r}"
        except AssertionError as e:
            failures.append(str(e).splitlines()[0][:300])
        # a call that wrongly succeeded must not turn the next ones into re-mirror calls
        for (t,) in m.conn.execute("SELECT mirror::text FROM redis_mirrors WHERE mirror::text LIKE 'mx_ba%'").fetchall():
            m.conn.execute(f"SELECT redis_unmirror({_lit(t)}::regclass)")
    assert not failures, f"{len(failures)} bad calls not refused as they should be:\n" + "\n".join(failures)
    # nothing was left mirrored, and the table is intact
    assert one(m.conn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pg_redis%' AND tgrelid::regclass::text LIKE 'mx_ba%'") == 0
    assert one(m.conn, "SELECT to_regclass('mx_ba') IS NOT NULL")
    # positive controls: the same table is accepted with good arguments
    assert one(m.conn, "SELECT redis_mirror('mx_ba_unn', 'mx_ba_unn:{a}')") == 0
    assert one(m.conn, "SELECT redis_mirror('mx_ba', 'mx_ba:{{x}}:{id}', filter => 'n > 0 AND s IS NOT NULL', ttl_seconds => 5)") == 0


def test_temporary_table_refused(m):
    with m.connect() as c:
        c.execute("CREATE TEMP TABLE mx_tmp (id int PRIMARY KEY)")
        expect_error(c, "SELECT redis_mirror('mx_tmp')", sqlstate=WRONG_OBJECT)


def test_non_owner_refused(m):
    other = m.role("mx_notowner")
    m.table("mx_no", "id int PRIMARY KEY")
    m.conn.execute(f'GRANT ALL ON mx_no TO "{other}"')
    for f in ("redis_mirror(regclass,text,text,text[],integer,text,text,text,text,boolean)",
              "redis_unmirror(regclass,boolean)", "redis_resync(regclass)"):
        m.conn.execute(f'GRANT EXECUTE ON FUNCTION {f} TO "{other}"')
    with m.connect(user=other) as c:
        expect_error(c, "SELECT redis_mirror('mx_no')", sqlstate=PRIVILEGE)
    m.conn.execute("SELECT redis_mirror('mx_no')")
    with m.connect(user=other) as c:
        expect_error(c, "SELECT redis_resync('mx_no')", sqlstate=PRIVILEGE)
        expect_error(c, "SELECT redis_unmirror('mx_no', true)", sqlstate=PRIVILEGE)


def test_overlapping_layouts_refused(m):
    for t in ("mx_ov_a", "mx_ov_b", "mx_ov_c", "mx_ov_d", "mx_ov_e"):
        m.table(t, "id int PRIMARY KEY")
    m.conn.execute("SELECT redis_mirror('mx_ov_a', 'mxuser:{id}')")
    for call in ["redis_mirror('mx_ov_b', 'mxuser:{id}:p')",   # same literal prefix
                 "redis_mirror('mx_ov_b', 'mxuser:{id}')",     # the same layout
                 "redis_mirror('mx_ov_b', 'mxuse{id}')",       # a prefix of the other's prefix
                 "redis_mirror('mx_ov_b', 'mxuser:x{id}')",    # the other's prefix is a prefix of ours
                 "redis_mirror('mx_ov_b', 'mx{id}')"]:
        e = expect_error(m.conn, f"SELECT {call}", sqlstate=BAD_ARG)
        assert "mx_ov_a" in e.diag.message_primary, f"the message should name the other mirror: {e.diag.message_primary}"
    # distinct prefixes are fine; re-mirroring a table with its own layout is fine
    m.conn.execute("SELECT redis_mirror('mx_ov_c', 'mxorder:{id}')")
    m.conn.execute("SELECT redis_mirror('mx_ov_a', 'mxuser:{id}', format => 'hash')")
    # a table's own layout may grow or shrink (the old keys are purged), except onto another's
    m.conn.execute("SELECT redis_mirror('mx_ov_a', 'mxuser:v2:{id}')")
    expect_error(m.conn, "SELECT redis_mirror('mx_ov_d', 'mxorder:{id}:x')", sqlstate=BAD_ARG)


# ----------------------------------------------------------------------------------------
# Views


REDIS_STATS_COLUMNS = {
    "mirror": "regclass", "captured": "bigint", "delivered": "bigint", "failed": "bigint",
    "queue_depth": "bigint", "oldest_queued_age": "interval", "last_lag": "interval",
    "last_error": "text", "last_error_at": "timestamp with time zone", "hits": "bigint",
    "misses": "bigint", "hit_ratio": "double precision", "worker_pid": "integer",
    "worker_state": "text", "state": "text", "dead_letters": "bigint", "backfill_done": "bigint",
    "backfill_total": "bigint",
}
REDIS_MIRRORS_COLUMNS = ["mirror", "key_template", "key_prefix", "format", "columns", "ttl_seconds", "mode",
                         "action", "filter", "stream", "state"]
REDIS_DEAD_LETTERS_COLUMNS = ["mirror", "key", "op", "error", "attempts", "first_failure", "last_failure"]


def view_columns(conn, view):
    return dict(conn.execute(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (view,)).fetchall())


def test_views_have_the_spec_columns_and_count(m):
    cols = view_columns(m.conn, "redis_stats")
    wrong = {c: (t, cols.get(c)) for c, t in REDIS_STATS_COLUMNS.items() if cols.get(c) != t}
    assert not wrong, f"redis_stats columns (wanted, have): {wrong}"
    assert {"redis_rows", "table_rows"} <= set(cols), f"rows in Redis vs the table: {sorted(cols)}"
    mcols = view_columns(m.conn, "redis_mirrors")
    assert set(REDIS_MIRRORS_COLUMNS) <= set(mcols), sorted(mcols)
    assert mcols["mirror"] == "regclass"
    dcols = view_columns(m.conn, "redis_dead_letters")
    assert set(REDIS_DEAD_LETTERS_COLUMNS) <= set(dcols), sorted(dcols)

    m.table("mx_st", "id int PRIMARY KEY, v text", "SELECT g, 'x' FROM generate_series(1, 1000) g")
    assert one(m.conn, "SELECT redis_mirror('mx_st')") == 1000
    s = wait_idle(m.conn, "mx_st")
    m.equal("mx_st")
    backfilled = stats(m.conn, "mx_st")
    m.conn.execute("UPDATE mx_st SET v = 'y' WHERE id <= 100")
    m.conn.execute("DELETE FROM mx_st WHERE id > 900")
    m.equal("mx_st")
    s = wait_until(lambda: (lambda s: s if s["delivered"] >= 200 and s["queue_depth"] == 0 else None)(stats(m.conn, "mx_st")),
                   5, what="delivered counter")
    assert s["captured"] >= s["delivered"] >= 200, s
    assert s["failed"] == 0 and s["dead_letters"] == 0 and s["last_error"] is None, s
    assert s["state"] == "active", s
    assert s["last_lag"] is not None and s["last_lag"].total_seconds() < 5, s
    assert s["worker_pid"] is not None, s
    assert s["worker_state"], s
    bt = one(m.conn, "SELECT backend_type FROM pg_stat_activity WHERE pid = %s", (s["worker_pid"],))
    assert bt is not None and "pg_redis" in bt, f"worker_pid {s['worker_pid']} is a {bt!r}"
    row = m.conn.execute("SELECT mirror::text, key_template, key_prefix, format, columns, ttl_seconds, mode, action, "
                         "filter, stream, state FROM redis_mirrors WHERE mirror = 'mx_st'::regclass").fetchone()
    assert row == ("mx_st", "mx_st:{id}", "", "json", None, None, "queue", "write", None, None, "active"), row
    # progress of the finished backfill
    assert backfilled["backfill_done"] == backfilled["backfill_total"] == 1000, \
        {k: backfilled[k] for k in ("state", "backfill_done", "backfill_total", "redis_rows", "table_rows")}


def test_monitoring_role_reads_views(m):
    mon = m.role("mx_mon")
    m.conn.execute(f'GRANT pg_monitor TO "{mon}"')
    m.table("mx_mon_t", "id int PRIMARY KEY")
    m.conn.execute("SELECT redis_mirror('mx_mon_t')")
    with m.connect(user=mon) as c:
        assert one(c, "SELECT count(*) FROM redis_stats WHERE mirror = 'mx_mon_t'::regclass") == 1
        c.execute("SELECT * FROM redis_mirrors")
        c.execute("SELECT * FROM redis_dead_letters")


# ----------------------------------------------------------------------------------------
# Backfill


def test_backfill_finishes_once_a_lock_on_its_mirror_is_released(m):
    """The last step of a backfill marks the mirror active; while another transaction holds the
    mirror's catalog row it cannot, and must try again later rather than leave the mirror
    'backfilling' for good."""
    m.table("mx_bflock", "id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 100) g")
    m.conn.execute("SELECT redis_mirror('mx_bflock')")
    wait_idle(m.conn, "mx_bflock")
    m.rc.flushall()
    with m.connect() as locker:
        locker.execute("BEGIN")
        locker.execute("SELECT 1 FROM redis_internal.mirrors WHERE tbl = 'mx_bflock'::regclass FOR KEY SHARE")
        m.conn.execute("SELECT redis_resync('mx_bflock')")
        wait_until(lambda: len(scan_keys(m.rc, "mx_bflock:*")) == 100, 10, 0.05, "the resync's rows in Redis")
        time.sleep(1.5)
        assert stats(m.conn, "mx_bflock")["state"] == "backfilling"
        locker.execute("COMMIT")
    wait_idle(m.conn, "mx_bflock", timeout=10)
    m.equal("mx_bflock")


def test_backfill_of_200k_rows_while_another_session_writes(m):
    n = 200_000
    m.table("mx_bf", "id int PRIMARY KEY, v text, n int, ts timestamptz",
            f"SELECT g, md5(g::text), g, '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, {n}) g")
    m.conn.execute("ANALYZE mx_bf")
    stop = threading.Event()
    lat = []
    errors = []
    writes = [0]

    def writer():
        rnd = random.Random(7)
        nxt = n + 1
        try:
            with m.connect() as c:
                c.execute(ODD_SETTINGS)
                while not stop.is_set():
                    t0 = time.monotonic()
                    k = rnd.random()
                    if k < 0.5:
                        c.execute("UPDATE mx_bf SET n = n + 1, v = 'w' WHERE id = ANY(%s)",
                                  ([rnd.randint(1, n) for _ in range(5)],))
                    elif k < 0.7:
                        c.execute("DELETE FROM mx_bf WHERE id = %s", (rnd.randint(1, n),))
                    elif k < 0.9:
                        c.execute("INSERT INTO mx_bf VALUES (%s, 'new', 0, now())", (nxt,))
                        nxt += 1
                    else:
                        i = rnd.randint(1, n)
                        c.execute("UPDATE mx_bf SET id = %s WHERE id = %s", (nxt, i))
                        nxt += 1
                    lat.append(time.monotonic() - t0)
                    writes[0] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=writer)
    th.start()
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        scheduled = one(m.conn, "SELECT redis_mirror('mx_bf')")
        mirror_call = time.monotonic() - t0
        seen_backfilling = False
        progress_ok = True
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            s = stats(m.conn, "mx_bf")
            if s["state"] == "backfilling":
                seen_backfilling = True
                if s["backfill_done"] is not None and s["backfill_total"] is not None and s["backfill_done"] > s["backfill_total"] * 1.1:
                    progress_ok = False
            elif s["state"] == "active":
                break
            time.sleep(0.1)
        time.sleep(0.5)  # a little more concurrent writing after the backfill
    finally:
        stop.set()
        th.join()
    assert not errors, errors
    assert mirror_call < 5, f"redis_mirror took {mirror_call:.1f}s on {n} rows: it must only schedule the backfill"
    assert abs(scheduled - n) <= n * 0.1, f"redis_mirror returned {scheduled} rows scheduled for {n}"
    assert seen_backfilling, "state never showed 'backfilling'"
    assert progress_ok
    assert writes[0] > 100, f"the writer only managed {writes[0]} statements"
    assert max(lat) < 2, f"a write was blocked for {max(lat):.2f}s during the backfill"
    try:
        s = wait_idle(m.conn, "mx_bf", timeout=60)
    except AssertionError as e:
        q = m.conn.execute("SELECT op, key, attempts, last_error FROM redis_internal.queue ORDER BY id LIMIT 5").fetchall()
        log = [ln for ln in m.pg.read_log().splitlines() if "pg_redis" in ln or "ERROR" in ln][-30:]
        raise AssertionError(f"{e}\nqueue head: {q}\nserver log:\n" + "\n".join(log)) from None
    assert_redis_equals_table(m.pg, m.rc, "mx_bf", timeout=30)
    assert s["backfill_done"] is not None and s["backfill_done"] == s["backfill_total"], \
        {k: s[k] for k in ("state", "backfill_done", "backfill_total", "redis_rows", "table_rows")}


def test_drop_or_unmirror_right_after_mirror_never_fails(m):
    """DROP TABLE / redis_unmirror / redis_mirror again while the worker is backfilling: the user's
    statement must not fail (e.g. with a deadlock against the worker), and no keys are left over."""
    errors = []
    for i in range(30):
        name = f"mx_race{i}"
        m.table(name, "id int PRIMARY KEY, v text", "SELECT g, 'x' FROM generate_series(1, %d) g" % (0 if i % 2 else 2000))
        steps = [f"SELECT redis_mirror('{name}')", f"SELECT redis_mirror('{name}', ttl_seconds => 100)", None]
        if i % 3 == 0:
            steps += [f"DROP TABLE {name}"]
        elif i % 3 == 1:
            steps += [f"SELECT redis_unmirror('{name}', true)"]
        else:
            steps += [f"SELECT redis_mirror('{name}', '{name}:v2:{{id}}')", f"DROP TABLE {name}"]
        for q in steps:
            if q is None:
                time.sleep(0.002 * (i % 7))
                continue
            try:
                m.conn.execute(q)
            except psycopg.Error as e:
                errors.append(f"{q}: {e.sqlstate} {e.diag.message_primary} | {(e.diag.message_detail or '').split(chr(10) + '   0:')[0] if e.sqlstate == '40P01' else ''} | {e.diag.context}")
                break
    assert not errors, f"{len(errors)} of 30 failed:\n" + "\n".join(errors[:3])
    try:
        wait_until(lambda: scan_keys(m.rc, "mx_race*") == [], 30, what="every key purged")
    except AssertionError:
        left = scan_keys(m.rc, "mx_race*")
        mirrors = m.conn.execute("SELECT mirror::text, state FROM redis_mirrors WHERE mirror::text LIKE 'mx_race%'").fetchall()
        raise AssertionError(f"{len(left)} keys left after DROP TABLE / redis_unmirror(purge): e.g. {left[:5]}; "
                             f"tables by prefix: {sorted({k.split(':')[0] for k in left})}; mirrors left: {mirrors}") from None


# ----------------------------------------------------------------------------------------
# Last: the module cluster's log


def test_zz_no_worker_errors_or_crashes_in_the_server_log(pg):
    """Nothing above injected a fault: the worker (log lines without user@db) logged no WARNING,
    ERROR or worse, and no process crashed. (Errors before CREATE EXTENSION are
    test_mirror_faults.py::test_worker_waits_quietly_for_the_extension's business.)"""
    lines = [x for x in pg.read_log().splitlines() if 'relation "redis_internal.mirrors" does not exist' not in x]
    bad = []
    for i, line in enumerate(lines):
        worker_line = "@" not in line.split("]", 1)[-1][:60]
        if ("terminated by signal" in line or "PANIC" in line or ("server process" in line and "exited" in line)
                or (worker_line and any(w in line for w in ("WARNING:", "ERROR:", "FATAL:")))):
            more = [x.strip()[:200] for x in lines[i + 1:i + 4] if ("DETAIL:" in x or "CONTEXT:" in x) and "pgrx" not in x]
            bad.append(" | ".join([line[:300], *more]))
    assert not bad, f"{len(bad)} worrying server log lines, e.g.:\n" + "\n".join(bad[:10])


def test_an_index_a_dba_adds_to_the_queue_is_maintained(m):
    """Capture writes queue rows directly only while the queue's indexes are plain ones it can
    maintain; with an expression or partial index added it queues through SQL (no crash, the
    index kept right)."""
    m.table("mx_qidx", "id int PRIMARY KEY, v text")
    m.conn.execute("SELECT redis_mirror('mx_qidx')")
    m.extra_sql.append("DROP INDEX IF EXISTS redis_internal.queue_lower_key")
    m.extra_sql.append("DROP INDEX IF EXISTS redis_internal.queue_failed")
    m.conn.execute("CREATE INDEX queue_lower_key ON redis_internal.queue (lower(key))")
    m.conn.execute("CREATE INDEX queue_failed ON redis_internal.queue (id) WHERE attempts > 0")
    m.conn.execute("INSERT INTO mx_qidx SELECT g, 'v' || g FROM generate_series(1, 50) g")
    m.conn.execute("UPDATE mx_qidx SET v = 'w' WHERE id <= 10")
    wait_idle(m.conn, "mx_qidx")
    m.equal("mx_qidx")
    # the expression index holds what it should: the queue is empty again, and a query using it works
    assert one(m.conn, "SELECT count(*) FROM redis_internal.queue WHERE lower(key) = 'mx_qidx:1'") == 0
    m.conn.execute("DROP INDEX redis_internal.queue_lower_key, redis_internal.queue_failed")
    m.conn.execute("INSERT INTO mx_qidx VALUES (51, 'after')")
    wait_idle(m.conn, "mx_qidx")
    m.equal("mx_qidx")

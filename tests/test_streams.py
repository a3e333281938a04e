"""Change-event streams (SPEC §5; issue 5, item 6).

A mirror with stream => 'name' XADDs one entry per committed change with fields op (insert,
update, delete, truncate), table, key (not for truncate), data (the row as JSON; insert and update
only), old_key (an update that changed the key), xid (xid8) and change_id (unique, "xid:queue id").
Rows outside the filter still produce events; rolled-back changes, backfill, resync and verify
repairs produce none; sync- and commit-mode mirrors emit events at COMMIT; the stream is capped
with pg_redis.stream_maxlen (MAXLEN ~, re-read by the worker on SIGHUP).

Module cluster (postgresql.conf points at `module_redis`, where the worker delivers); tables and
stream keys of their own per test; Redis flushed before each test.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from helpers import REFERENCE_SETTINGS, MirrorCtx, one, queue_len, wait_for_worker, wait_until  # noqa: F401


class Ctx(MirrorCtx):
    def events(self, stream):
        return [(eid, fields) for eid, fields in self.rc.xrange(stream)]

    def wait_events(self, stream, n, timeout=10.0):
        wait_until(lambda: self.rc.xlen(stream) >= n, timeout, 0.01, f"{n} entries in {stream}")
        self.idle()
        ev = self.events(stream)
        assert len(ev) == n, f"expected {n} entries in {stream}, got {len(ev)}: {ev}"
        return [f for _, f in ev]

    def xid(self, sql, params=None):
        """Run one statement in autocommit with `RETURNING pg_current_xact_id()`; its xid."""
        return str(one(self.conn, sql + " RETURNING pg_current_xact_id()::text", params))




@pytest.fixture
def s(ext, module_redis):
    module_redis.client().flushall()
    ctx = Ctx(ext, module_redis)
    yield ctx
    ctx.close()


def table_ok(value, name):
    return value in (name, f"public.{name}")


# ----------------------------------------------------------------------------------------


def test_event_per_change_with_its_fields(s):
    t = s.table("st_a", "id int PRIMARY KEY, v text, n numeric")
    stream = "st:events"
    assert s.mirror(t, stream=stream) == 0
    x_ins = s.xid(f"INSERT INTO {t} VALUES (1, 'a', 1.50)")
    x_upd = s.xid(f"UPDATE {t} SET v = 'b' WHERE id = 1")
    x_rekey = s.xid(f"UPDATE {t} SET id = 10 WHERE id = 1")
    x_del = s.xid(f"DELETE FROM {t} WHERE id = 10")
    with s.conn.transaction():
        x_multi = str(one(s.conn, "SELECT pg_current_xact_id()::text"))
        s.conn.execute(f"INSERT INTO {t} SELECT g, 'm' || g, NULL FROM generate_series(20, 22) g")
    s.conn.execute("BEGIN")
    s.conn.execute(f"INSERT INTO {t} VALUES (99, 'rolled back', 0)")
    s.conn.execute(f"UPDATE {t} SET v = 'rolled back' WHERE id = 20")
    s.conn.execute("ROLLBACK")
    with s.conn.transaction():
        x_trunc = str(one(s.conn, "SELECT pg_current_xact_id()::text"))
        s.conn.execute(f"TRUNCATE {t}")

    ev = s.wait_events(stream, 8)
    for e in ev:
        assert table_ok(e.get("table"), t), e
        assert e["change_id"].startswith(e["xid"] + ":"), e
    assert len({e["change_id"] for e in ev}) == 8, "change_id must be unique per change"

    def fields(e):
        return sorted(e)

    e = ev[0]
    assert (e["op"], e["key"], e["xid"]) == ("insert", f"{t}:1", x_ins)
    assert json.loads(e["data"]) == {"id": 1, "v": "a", "n": 1.50}
    assert '"n":1.50' in e["data"].replace(" ", ""), e["data"]  # numeric rendered exactly
    assert fields(e) == ["change_id", "data", "key", "op", "table", "xid"]
    e = ev[1]
    assert (e["op"], e["key"], e["xid"], json.loads(e["data"])) == ("update", f"{t}:1", x_upd,
                                                                    {"id": 1, "v": "b", "n": 1.5})
    assert "old_key" not in e
    e = ev[2]
    assert (e["op"], e["key"], e.get("old_key"), e["xid"]) == ("update", f"{t}:10", f"{t}:1", x_rekey)
    assert json.loads(e["data"]) == {"id": 10, "v": "b", "n": 1.5}
    assert fields(e) == ["change_id", "data", "key", "old_key", "op", "table", "xid"]
    e = ev[3]
    assert (e["op"], e["key"], e["xid"]) == ("delete", f"{t}:10", x_del)
    assert fields(e) == ["change_id", "key", "op", "table", "xid"]
    multi = ev[4:7]
    assert [(e["op"], e["key"], e["xid"]) for e in multi] == [("insert", f"{t}:{i}", x_multi) for i in (20, 21, 22)]
    assert [json.loads(e["data"]) for e in multi] == [{"id": i, "v": f"m{i}", "n": None} for i in (20, 21, 22)]
    e = ev[7]
    assert (e["op"], e["xid"]) == ("truncate", x_trunc)
    assert fields(e) == ["change_id", "op", "table", "xid"]
    assert not any("rolled back" in (e.get("data") or "") for e in ev)

    # a consumer group reads them all and can drop duplicates by change_id
    s.rc.xgroup_create(stream, "g1", id="0")
    got = s.rc.xreadgroup("g1", "c1", {stream: ">"}, count=100)
    assert len(got[0][1]) == 8


def test_upsert_and_filter(s):
    t = s.table("st_f", "id int PRIMARY KEY, status text")
    stream = "st:filtered"
    s.mirror(t, stream=stream, filter="status = 'keep'")
    s.conn.execute(f"INSERT INTO {t} VALUES (1, 'drop')")                       # outside the filter
    s.conn.execute(f"INSERT INTO {t} VALUES (2, 'keep')")
    s.conn.execute(f"INSERT INTO {t} VALUES (2, 'drop') ON CONFLICT (id) DO UPDATE SET status = excluded.status")
    s.conn.execute(f"INSERT INTO {t} VALUES (3, 'keep') ON CONFLICT (id) DO UPDATE SET status = excluded.status")
    s.conn.execute(f"DELETE FROM {t} WHERE id = 1")
    ev = s.wait_events(stream, 5)
    assert [(e["op"], e["key"]) for e in ev] == [("insert", f"{t}:1"), ("insert", f"{t}:2"), ("update", f"{t}:2"),
                                                 ("insert", f"{t}:3"), ("delete", f"{t}:1")]
    assert json.loads(ev[0]["data"]) == {"id": 1, "status": "drop"}
    assert json.loads(ev[2]["data"]) == {"id": 2, "status": "drop"}
    # the keyspace follows the filter meanwhile
    assert sorted(s.rc.scan_iter(match=f"{t}:*")) == [f"{t}:3"]


def test_hash_and_invalidate_mirrors_carry_the_row_in_data(s):
    h = s.table("st_h", "id int PRIMARY KEY, v text, n int")
    i = s.table("st_i", "id int PRIMARY KEY, v text, n int")
    s.mirror(h, format="hash", stream="st:hash")
    s.mirror(i, action="invalidate", stream="st:inv")
    for tb in (h, i):
        s.conn.execute(f"INSERT INTO {tb} VALUES (1, 'x', NULL)")
        s.conn.execute(f"UPDATE {tb} SET n = 5 WHERE id = 1")
    for stream in ("st:hash", "st:inv"):
        ev = s.wait_events(stream, 2)
        assert [e["op"] for e in ev] == ["insert", "update"], (stream, ev)
        assert [json.loads(e.get("data", "null")) for e in ev] == [{"id": 1, "v": "x", "n": None},
                                                                  {"id": 1, "v": "x", "n": 5}], (stream, ev)
    assert s.rc.hgetall(f"{h}:1") == {"id": "1", "v": "x", "n": "5"}
    assert not s.rc.exists(f"{i}:1")


def test_no_events_for_backfill_resync_and_repair(s):
    t = s.table("st_bf", "id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 50) g")
    stream = "st:bf"
    s.mirror(t, stream=stream)
    s.idle()
    n = len(list(s.rc.scan_iter(match=f"{t}:*")))
    assert n == 50, (f"backfill reported done (queue empty, state active) but {n} of 50 keys are in Redis; "
                     f"redis_stats: {s.conn.execute('SELECT * FROM redis_stats').fetchall()}")
    assert s.rc.xlen(stream) == 0, "the backfill produced change events"
    s.rc.delete(f"{t}:1")
    s.conn.execute("SELECT * FROM redis_verify(%s, true)", (t,))
    s.conn.execute("SELECT redis_resync(%s)", (t,))
    s.idle()
    wait_until(lambda: s.rc.exists(f"{t}:1"), 5, what="the repair")
    s.conn.execute(f"UPDATE {t} SET v = 'changed' WHERE id = 2")
    ev = s.wait_events(stream, 1)
    assert (ev[0]["op"], ev[0]["key"]) == ("update", f"{t}:2")


def test_commit_and_sync_modes_emit_at_commit_only(s):
    c_tbl = s.table("st_cm", "id int PRIMARY KEY, v text")
    s_tbl = s.table("st_sm", "id int PRIMARY KEY, v text")
    s.mirror(c_tbl, mode="commit", stream="st:commit")
    s.mirror(s_tbl, mode="sync", stream="st:sync")
    # commit mode: the event is there when COMMIT returns
    s.conn.execute(f"INSERT INTO {c_tbl} VALUES (1, 'a')")
    assert s.rc.xlen("st:commit") == 1, "commit mode: the event was not in the stream when COMMIT returned"
    # sync mode: the value is pushed inside the statement, the event only once committed
    s.conn.execute("BEGIN")
    s.conn.execute(f"INSERT INTO {s_tbl} VALUES (1, 'uncommitted')")
    assert s.rc.exists(f"{s_tbl}:1")
    assert s.rc.xlen("st:sync") == 0, "sync mode: an event for an uncommitted change"
    s.conn.execute("ROLLBACK")
    wait_until(lambda: not s.rc.exists(f"{s_tbl}:1"), 5, what="the sync rollback repair")
    s.idle()
    assert s.rc.xlen("st:sync") == 0, f"events for a rolled-back transaction: {s.events('st:sync')}"
    s.conn.execute(f"INSERT INTO {s_tbl} VALUES (2, 'b')")
    ev = s.wait_events("st:sync", 1)
    assert (ev[0]["op"], ev[0]["key"], json.loads(ev[0]["data"])) == ("insert", f"{s_tbl}:2", {"id": 2, "v": "b"})


def test_stream_capped_by_stream_maxlen(s):
    t = s.table("st_cap", "id int PRIMARY KEY, v text")
    stream = "st:cap"
    s.conn.execute("ALTER SYSTEM SET pg_redis.stream_maxlen = 100")
    s.conn.execute("SELECT pg_reload_conf()")
    try:
        time.sleep(0.5)  # the worker re-reads its configuration on SIGHUP
        s.mirror(t, stream=stream)
        for b in range(20):
            s.conn.execute(f"INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(%s::int, %s::int) g",
                           (b * 100 + 1, b * 100 + 100))
        s.idle()
        wait_until(lambda: s.rc.exists(f"{t}:2000"), 5, what="the last row")
        n = s.rc.xlen(stream)
        assert 100 <= n <= 300, f"XLEN {n} with pg_redis.stream_maxlen = 100 after 2,000 events"
        last = s.rc.xrevrange(stream, count=1)[0][1]
        assert (last["op"], last["key"]) == ("insert", f"{t}:2000")
    finally:
        s.conn.execute("ALTER SYSTEM RESET pg_redis.stream_maxlen")
        s.conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.3)
    # back to the default (100,000): nothing trimmed any more
    n0 = s.rc.xlen(stream)
    s.conn.execute(f"INSERT INTO {t} SELECT g, 'w' FROM generate_series(3001, 3500) g")
    s.idle()
    wait_until(lambda: s.rc.xlen(stream) == n0 + 500, 5, what="500 more events, untrimmed")

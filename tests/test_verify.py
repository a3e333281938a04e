"""redis_verify(tbl, repair) and redis_resync(tbl) (SPEC §3; issue 5, item 5).

verify finds exactly the injected missing / stale / extra keys (json and hash formats, the filter,
a column subset), reports progress as NOTICEs, changes nothing without repair; repair queues the
fixes and the worker delivers them (verify again -> zeros), leaving keys outside the mirror's
layout alone; a repair racing a concurrent update never leaves the older value behind; resync
after FLUSHALL; privileges.

Module cluster (postgresql.conf points at `module_redis`, where the worker delivers); tables of
their own per test; Redis flushed before each test.
"""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from harness import expect_error
from helpers import REFERENCE_SETTINGS, MirrorCtx, one, queue_len, wait_for_worker, wait_until  # noqa: F401


class Ctx(MirrorCtx):
    def __init__(self, pg, redis_srv):
        super().__init__(pg, redis_srv)
        self.notices = []
        self.conn.add_notice_handler(lambda d: self.notices.append(d.message_primary))

    def verify(self, table, repair=False, conn=None):
        c = conn or self.conn
        cur = c.execute("SELECT checked, missing, stale, extra, repaired FROM redis_verify(%s, %s)", (table, repair))
        rows = cur.fetchall()
        assert len(rows) == 1, rows
        return tuple(rows[0])




@pytest.fixture
def v(ext, module_redis):
    module_redis.client().flushall()
    ctx = Ctx(ext, module_redis)
    yield ctx
    ctx.close()


def expected_json(v, table, where="true"):
    with v.pg.connect() as c:
        c.execute("SET TimeZone = 'UTC'")
        return {f"{table}:{i}": json.loads(j) for i, j in
                c.execute(f"SELECT id, row_to_json(t)::text FROM {table} t WHERE {where}").fetchall()}


def redis_json(v, pattern):
    keys = v.keys(pattern)
    return {k: json.loads(x) for k, x in zip(keys, v.rc.mget(keys))} if keys else {}


# ----------------------------------------------------------------------------------------


def test_verify_finds_exactly_what_was_injected_and_repair_fixes_it(v):
    t = v.table("vt_json", "id int PRIMARY KEY, v text, n int",
                "SELECT g, 'v' || g, g * 2 FROM generate_series(1, 1000) g")
    v.mirror(t)
    v.idle()
    assert redis_json(v, f"{t}:*") == expected_json(v, t)
    v.notices.clear()
    assert v.verify(t) == (1000, 0, 0, 0, 0)
    assert any(n.startswith("pg_redis: redis_verify") for n in v.notices), v.notices

    # inject: 3 missing, 2 stale (wrong value, not JSON), 2 extra, 2 keys outside the layout
    v.rc.delete(f"{t}:1", f"{t}:2", f"{t}:3")
    v.rc.set(f"{t}:4", json.dumps({"id": 4, "v": "stale", "n": 8}))
    v.rc.set(f"{t}:5", "not json")
    v.rc.set(f"{t}:5000", json.dumps({"id": 5000}))
    v.rc.set(f"{t}:-1", json.dumps({"id": -1}))
    v.rc.set("vt_jsonx:1", "outside the layout")
    v.rc.set("other:1", "outside the layout")
    before = {k: v.rc.dump(k) for k in v.keys("*")}
    assert v.verify(t) == (1000, 3, 2, 2, 0)
    assert {k: v.rc.dump(k) for k in v.keys("*")} == before, "verify without repair changed Redis"
    # a key of the wrong type (a hash where a JSON string belongs): one more difference
    v.rc.delete(f"{t}:7")
    v.rc.hset(f"{t}:7", mapping={"id": "7", "v": "v7", "n": "14"})
    _, missing, stale, extra, _ = v.verify(t)
    assert (missing + stale, extra) == (6, 2), (missing, stale, extra)
    if missing == 4:
        print("note: a key of the wrong type is counted as missing, not stale")

    checked, missing, stale, extra, repaired = v.verify(t, repair=True)
    assert (checked, missing + stale, extra) == (1000, 6, 2)
    assert repaired == 8
    v.idle()
    wait_until(lambda: v.verify(t) == (1000, 0, 0, 0, 0), 10, 0.2, "verify to come back clean after repair")
    assert redis_json(v, f"{t}:*") == expected_json(v, t)
    assert v.rc.get("vt_jsonx:1") == "outside the layout" and v.rc.get("other:1") == "outside the layout"
    # redis_stats has the figures of the last verify
    s = v.conn.execute("SELECT * FROM redis_stats WHERE mirror = %s::regclass", (t,))
    assert s.fetchone() is not None


def test_same_json_in_another_key_order_is_not_stale(v):
    t = v.table("vt_order", "id int PRIMARY KEY, v text, n int", "VALUES (1, 'a', 2)")
    v.mirror(t)
    v.idle()
    v.rc.set(f"{t}:1", '{"n": 2, "v": "a", "id": 1}')
    assert v.verify(t) == (1, 0, 0, 0, 0)


def test_verify_hash_format(v):
    t = v.table("vt_hash", "id int PRIMARY KEY, v text, n int, b bool",
                "SELECT g, 'v' || g, CASE WHEN g % 5 = 0 THEN NULL ELSE g END, g % 2 = 0 FROM generate_series(1, 200) g")
    v.mirror(t, format="hash")
    v.idle()
    assert v.verify(t) == (200, 0, 0, 0, 0)  # NULL columns (n of every fifth row) left out: not stale
    v.rc.hset(f"{t}:1", "v", "wrong")            # a field changed
    v.rc.hset(f"{t}:2", "extra", "1")            # a field too many
    v.rc.hdel(f"{t}:3", "n")                     # a field missing
    v.rc.hset(f"{t}:5", "n", "5")                # a field where the column is NULL
    v.rc.delete(f"{t}:7")                        # missing
    v.rc.hset(f"{t}:999", mapping={"id": "999"})  # extra
    assert v.verify(t) == (200, 1, 4, 1, 0)
    assert v.verify(t, repair=True)[4] == 6
    v.idle()
    wait_until(lambda: v.verify(t) == (200, 0, 0, 0, 0), 10, 0.2, "verify clean after repair")
    assert v.rc.hgetall(f"{t}:3") == {"id": "3", "v": "v3", "n": "3", "b": "false"}
    assert v.rc.hgetall(f"{t}:5") == {"id": "5", "v": "v5", "b": "false"}


def test_verify_hash_mirror_with_a_key_of_the_wrong_type(v):
    """One key of the wrong type (a string where a hash belongs) is a difference to report and
    repair, not a reason for redis_verify to fail on the whole table."""
    t = v.table("vt_wrongtype", "id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 10) g")
    v.mirror(t, format="hash")
    v.idle()
    v.rc.delete(f"{t}:6")
    v.rc.set(f"{t}:6", "a string")
    try:
        got = v.verify(t)
    except psycopg.Error as ex:
        raise AssertionError(f"redis_verify failed on a key of the wrong type: {ex.sqlstate}: "
                             f"{ex.diag.message_primary}") from None
    assert got[0] == 10 and got[1] + got[2] == 1 and got[3] == 0, got
    assert v.verify(t, repair=True)[4] == 1
    v.idle()
    wait_until(lambda: v.verify(t) == (10, 0, 0, 0, 0), 10, 0.2, "verify clean after repair")
    assert v.rc.hgetall(f"{t}:6") == {"id": "6", "v": "v6"}


def test_verify_filter_and_columns(v):
    t = v.table("vt_filt", "id int PRIMARY KEY, v text, secret text",
                "SELECT g, 'v' || g, 's' || g FROM generate_series(1, 100) g")
    v.mirror(t, filter="id % 2 = 0", columns=["id", "v"])
    v.idle()
    assert len(v.keys(f"{t}:*")) == 50
    c0, m0, s0, e0, r0 = v.verify(t)
    assert (m0, s0, e0, r0) == (0, 0, 0, 0), "a clean filtered, column-subset mirror is reported as different"
    assert c0 in (50, 100)
    v.rc.set(f"{t}:1", json.dumps({"id": 1, "v": "v1"}))            # a row outside the filter: extra
    v.rc.set(f"{t}:2", json.dumps({"id": 2, "v": "v2", "secret": "s2"}))  # a column too many: stale
    v.rc.delete(f"{t}:4")                                            # missing
    _, m, s, e, _ = v.verify(t)
    assert (m, s, e) == (1, 1, 1)
    v.verify(t, repair=True)
    v.idle()
    wait_until(lambda: v.verify(t)[1:] == (0, 0, 0, 0), 10, 0.2, "verify clean after repair")
    assert not v.rc.exists(f"{t}:1")
    assert json.loads(v.rc.get(f"{t}:2")) == {"id": 2, "v": "v2"}
    assert json.loads(v.rc.get(f"{t}:4")) == {"id": 4, "v": "v4"}


def test_resync_after_flushall(v):
    t = v.table("vt_resync", "id int PRIMARY KEY, v text",
                "SELECT g, 'v' || g FROM generate_series(1, 3000) g")
    v.mirror(t)
    v.idle()
    v.rc.flushall()
    assert v.verify(t) == (3000, 3000, 0, 0, 0)
    n = one(v.conn, "SELECT redis_resync(%s)", (t,))
    assert n > 0
    v.idle()
    wait_until(lambda: len(v.keys(f"{t}:*")) == 3000, 10, 0.05, "the resync to re-push every row")
    assert redis_json(v, f"{t}:*") == expected_json(v, t)
    assert v.verify(t) == (3000, 0, 0, 0, 0)


def test_repair_racing_a_concurrent_update(v):
    """A repair must never put back an older state than a change committed meanwhile: the row is
    read FOR SHARE, so an uncommitted update is waited for."""
    t = v.table("vt_race", "id int PRIMARY KEY, v text", "VALUES (1, 'old'), (2, 'two')")
    v.mirror(t)
    v.idle()
    v.rc.set(f"{t}:1", json.dumps({"id": 1, "v": "garbage"}))
    b = v.pg.connect()
    a = v.pg.connect()
    out = {}
    try:
        b.execute("BEGIN")
        b.execute(f"UPDATE {t} SET v = 'new' WHERE id = 1")

        def repair():
            try:
                out["r"] = v.verify(t, repair=True, conn=a)
            except Exception as ex:  # noqa: BLE001
                out["error"] = ex

        th = threading.Thread(target=repair)
        th.start()
        apid = a.info.backend_pid
        # either the repair waits for B's row lock, or it finishes without touching row 1
        def waiting_or_done():
            a_state = v.conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                         (apid,)).fetchone()
            return (not th.is_alive()) or (a_state and a_state[0] == "Lock") or None
        wait_until(waiting_or_done, 10, 0.01, "the repair to wait for B or finish")
        time.sleep(0.2)
        print("repair waited for B's row lock" if th.is_alive() else f"repair finished first: {out}")
        b.execute("COMMIT")
        th.join(15)
        assert not th.is_alive(), "the repair still blocked after B committed"
        assert "error" not in out, out
        v.idle()
        wait_until(lambda: json.loads(v.rc.get(f"{t}:1")) == {"id": 1, "v": "new"}, 5,
                   what="Redis to end with B's committed value")
        time.sleep(0.3)
        assert json.loads(v.rc.get(f"{t}:1")) == {"id": 1, "v": "new"}
        assert v.verify(t) == (2, 0, 0, 0, 0)
    finally:
        a.close()
        b.close()


def test_verify_progress_notices_on_a_larger_table(v):
    t = v.table("vt_big", "id int PRIMARY KEY, v text",
                "SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
    v.mirror(t)
    v.idle(60)
    v.notices.clear()
    assert v.verify(t) == (20000, 0, 0, 0, 0)
    progress = [n for n in v.notices if n.startswith("pg_redis: redis_verify")]
    assert len(progress) >= 2, v.notices
    assert any("20000" in n for n in progress), progress


def test_privileges_and_refusals(v):
    t = v.table("vt_priv", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    v.mirror(t)
    v.idle()
    role = v.role("vt_checker")
    v.conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    v.conn.execute(f"GRANT EXECUTE ON FUNCTION redis_verify(regclass, boolean) TO {role}")
    v.conn.execute(f"GRANT EXECUTE ON FUNCTION redis_resync(regclass) TO {role}")
    with v.pg.connect(user=role) as c:
        expect_error(c, "SELECT * FROM redis_verify('vt_priv')", sqlstate="42501")
    v.conn.execute(f"GRANT SELECT ON {t} TO {role}")
    v.rc.delete(f"{t}:1")
    with v.pg.connect(user=role) as c:
        assert one(c, "SELECT missing FROM redis_verify('vt_priv')") == 1
        expect_error(c, "SELECT * FROM redis_verify('vt_priv', true)", sqlstate="42501")
        expect_error(c, "SELECT redis_resync('vt_priv')", sqlstate="42501")
    assert not v.rc.exists(f"{t}:1"), "a refused repair changed Redis"
    v.table("vt_plain", "id int PRIMARY KEY")
    expect_error(v.conn, "SELECT * FROM redis_verify('vt_plain')", sqlstate="22023")

"""Upgrades (issue 9 items 4 and 7): the previous version's objects, mirrors with changes still
queued and the worker of the new library running, then `ALTER EXTENSION pg_redis UPDATE`:
nothing queued is lost, capture and delivery go on, and the upgraded extension has exactly the
objects (definitions, privileges, comments) of a fresh install of the new version.

The previous versions' install scripts are kept in sql/ (pg_redis--<version>.sql) and installed
with the library, so `CREATE EXTENSION pg_redis VERSION '<old>'` works; each released version has
an upgrade script sql/pg_redis--<old>--<new>.sql.
"""

from __future__ import annotations

import re
from pathlib import Path

from helpers import one, wait_until
from test_mirror import assert_redis_equals_table

ROOT = Path(__file__).resolve().parent.parent
CURRENT = re.search(r'^version = "(.+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
OLDER = sorted({p.name.split("--")[1].removesuffix(".sql") for p in (ROOT / "sql").glob("pg_redis--*.sql")
                if p.name.count("--") == 1})

# What an extension consists of, comparable across databases: every member object with its
# definition, privileges and comment.
OBJECTS_SQL = """
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS what,
       coalesce(CASE WHEN d.classid = 'pg_proc'::regclass
                     THEN pg_get_functiondef(d.objid) || coalesce(array_to_string(p.proacl, ','), '')
                END,
                CASE WHEN d.classid = 'pg_class'::regclass
                     THEN (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                             || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                                             || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), ''),
                                             ', ' ORDER BY a.attnum)
                             FROM pg_attribute a
                             LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                            WHERE a.attrelid = d.objid AND a.attnum > 0 AND NOT a.attisdropped)
                          || coalesce(array_to_string(c.relacl, ','), '')
                          || CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(d.objid) ELSE '' END
                END, '') AS definition,
       coalesce(obj_description(d.objid, (SELECT relname FROM pg_class WHERE oid = d.classid)), '') AS comment
  FROM pg_depend d
  LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
  LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
 WHERE d.refclassid = 'pg_extension'::regclass
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_redis')
   AND d.deptype = 'e'
UNION ALL
-- triggers and indexes on the extension's tables belong to them, not to the extension
SELECT 'trigger ' || t.tgname || ' on ' || t.tgrelid::regclass, pg_get_triggerdef(t.oid), ''
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'redis_internal' AND NOT t.tgisinternal
UNION ALL
SELECT 'index ' || i.indexrelid::regclass, pg_get_indexdef(i.indexrelid), ''
  FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'redis_internal'
ORDER BY 1, 2
"""


def test_there_is_a_previous_version_to_upgrade_from():
    assert OLDER and OLDER[-1] != CURRENT, f"sql/ holds no install script of a version before {CURRENT}"
    for v in OLDER:
        assert (ROOT / "sql" / f"pg_redis--{v}--{CURRENT}.sql").exists() or any(
            (ROOT / "sql").glob(f"pg_redis--{v}--*.sql")), f"no upgrade path from {v}"


def test_upgrade_keeps_queued_changes_and_equals_a_fresh_install(make_pg, make_redis):
    redis_srv = make_redis()
    pg = make_pg(conf_lines=[f"pg_redis.url = '{redis_srv.url}'", "pg_redis.command_timeout = 500"],
                 preload=True)   # the new library, running the previous version's objects
    rc = redis_srv.client(decode_responses=True)
    previous = OLDER[-1]
    with pg.connect() as c:
        c.execute(f"CREATE EXTENSION pg_redis VERSION '{previous}'")
        assert one(c, "SELECT extversion FROM pg_extension WHERE extname = 'pg_redis'") == previous
        c.execute("CREATE TABLE up_users (id int PRIMARY KEY, name text, active boolean)")
        c.execute("CREATE TABLE up_orders (id int PRIMARY KEY, total numeric(10,2), status text)")
        c.execute("INSERT INTO up_users SELECT g, 'user ' || g, g % 3 <> 0 FROM generate_series(1, 50) g")
        c.execute("INSERT INTO up_orders SELECT g, g * 1.5, 'open' FROM generate_series(1, 30) g")
        c.execute("SELECT redis_mirror('up_users', key_template => 'u:{id}', format => 'hash', filter => 'active')")
        c.execute("SELECT redis_mirror('up_orders', mode => 'commit')")
        assert_redis_equals_table(pg, rc, "up_users", key_sql="'u:' || id", pattern="u:*", where="active",
                                  fmt="hash")
        assert_redis_equals_table(pg, rc, "up_orders")
        # Redis stalled (SIGSTOP): changes wait in the queue across the upgrade
        redis_srv.pause()
        c.execute("UPDATE up_users SET name = name || ' (renamed)' WHERE id <= 10")
        c.execute("DELETE FROM up_users WHERE id BETWEEN 40 AND 45")
        c.execute("UPDATE up_orders SET status = 'paid' WHERE id % 2 = 0")
        c.execute("INSERT INTO up_orders VALUES (100, 9.99, 'new')")
        queued = one(c, "SELECT count(*) FROM redis_internal.queue")
        assert queued > 0

        c.execute("ALTER EXTENSION pg_redis UPDATE")
        assert one(c, "SELECT extversion FROM pg_extension WHERE extname = 'pg_redis'") == CURRENT
        assert one(c, "SELECT count(*) FROM redis_internal.queue") == queued, "the upgrade touched the queue"
        # capture goes on through the upgraded objects, and the queued changes are delivered
        c.execute("UPDATE up_users SET active = NOT active WHERE id BETWEEN 20 AND 25")
        redis_srv.resume()
        wait_until(lambda: one(c, "SELECT count(*) FROM redis_internal.queue") == 0, 20, 0.1,
                   "the queued changes to be delivered after the upgrade")
        assert_redis_equals_table(pg, rc, "up_users", key_sql="'u:' || id", pattern="u:*", where="active",
                                  fmt="hash")
        assert_redis_equals_table(pg, rc, "up_orders")
        assert one(c, "SELECT sum(delivered) FROM redis_stats") > 0
        upgraded = c.execute(OBJECTS_SQL).fetchall()
        c.execute("CREATE DATABASE up_fresh")
    with pg.connect(dbname="up_fresh") as f:
        f.execute("CREATE EXTENSION pg_redis")
        fresh = f.execute(OBJECTS_SQL).fetchall()
    missing = sorted(set(fresh) - set(upgraded))
    extra = sorted(set(upgraded) - set(fresh))
    assert not missing and not extra, (
        "the upgraded extension differs from a fresh install:\n  only in a fresh install: "
        + "\n    ".join(f"{w}: {d[:200]!r}" for w, d, _ in missing)
        + "\n  only after the upgrade: " + "\n    ".join(f"{w}: {d[:200]!r}" for w, d, _ in extra))

"""Life-cycle of the extension around the mirrors: pg_dump/restore keeps them, DROP EXTENSION says
what it removes and leaves no trigger behind that calls a function that is gone."""

import subprocess

import psycopg
import pytest

from harness import PG_BINDIR
from helpers import one, wait_until


def _dump(pg, dbname):
    cmd = [str(PG_BINDIR / "pg_dump"), "-h", str(pg.sockdir), "-p", str(pg.port), "-U", "postgres", dbname]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_pg_dump_and_restore_keep_the_mirrors(make_pg, make_redis):
    redis_srv = make_redis()
    pg = make_pg(conf_lines=[f"pg_redis.url = '{redis_srv.url}'", "pg_redis.databases = 'postgres, restored'"],
                 preload=True)
    rc = redis_srv.client(decode_responses=True)
    with pg.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        c.execute("CREATE TABLE lc_users (id int PRIMARY KEY, name text, active boolean)")
        c.execute("INSERT INTO lc_users VALUES (1, 'Ada', true), (2, 'Bob', false)")
        c.execute("SELECT redis_mirror('lc_users', key_template => 'lc:{id}', format => 'hash', filter => 'active')")
        wait_until(lambda: rc.exists("lc:1"), 10, what="the backfill of lc:1")
        dump = _dump(pg, "postgres")
        c.execute("CREATE DATABASE restored")
    assert "redis_internal.mirrors" in dump and "pg_redis_capture_insert" in dump
    restore = subprocess.run(
        [str(PG_BINDIR / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-q", "-h", str(pg.sockdir), "-p", str(pg.port),
         "-U", "postgres", "-d", "restored"],
        input=dump, capture_output=True, text=True, timeout=60)
    assert restore.returncode == 0, restore.stderr
    rc.flushall()
    # the restored database's mirror works like the original: same settings, triggers, delivery
    pg.restart()  # the worker for 'restored' starts with the server
    with pg.connect(dbname="restored") as r:
        row = r.execute("SELECT mirror::text, key_template, format, filter FROM redis_mirrors").fetchone()
        assert tuple(row) == ("lc_users", "lc:{id}", "hash", "active")
        r.execute("INSERT INTO lc_users VALUES (3, 'Cy', true), (4, 'Di', false)")
        wait_until(lambda: rc.hgetall("lc:3") == {"id": "3", "name": "Cy", "active": "true"}, 10,
                   what="a row written after the restore")
        assert not rc.exists("lc:4")


def test_drop_extension_lists_and_removes_the_capture_triggers(make_pg, make_redis):
    redis_srv = make_redis()
    pg = make_pg(conf_lines=[f"pg_redis.url = '{redis_srv.url}'"], preload=True)
    with pg.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        c.execute("CREATE TABLE lc_t (id int PRIMARY KEY)")
        c.execute("SELECT redis_mirror('lc_t')")
        with pytest.raises(psycopg.Error) as e:
            c.execute("DROP EXTENSION pg_redis")
        assert e.value.sqlstate == "2BP01"  # dependent objects still exist
        assert "pg_redis_capture_insert" in (e.value.diag.message_detail or "")
        c.execute("DROP EXTENSION pg_redis CASCADE")
        assert one(c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'lc_t'::regclass") == 0
        c.execute("INSERT INTO lc_t VALUES (1)")  # writes go on without the extension
        assert one(c, "SELECT count(*) FROM pg_namespace WHERE nspname = 'redis_internal'") == 0


def test_a_database_that_is_not_utf8_is_refused_clearly(make_pg, make_redis):
    """docs/reference.md (Encodings): pg_redis passes UTF-8 text through unconverted, so it refuses
    a LATIN1 database at CREATE EXTENSION instead of storing mojibake later."""
    redis_srv = make_redis()
    pg = make_pg(conf_lines=[f"pg_redis.url = '{redis_srv.url}'"], preload=True)
    with pg.connect() as c:
        c.execute("CREATE DATABASE lc_latin1 ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    with pg.connect(dbname="lc_latin1") as c:
        with pytest.raises(psycopg.Error) as e:
            c.execute("CREATE EXTENSION pg_redis")
        assert e.value.sqlstate == "0A000", e.value
        msg = e.value.diag.message_primary
        assert msg.startswith("pg_redis:") and "LATIN1" in msg and "UTF8" in msg, msg
        assert "ENCODING" in (e.value.diag.message_hint or ""), e.value.diag.message_hint
        assert one(c, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_redis'") == 0


def test_every_function_and_view_has_a_comment(make_pg, make_redis):
    """Issue 9: \\df+ and \\dv+ describe everything the extension creates, internals included."""
    redis_srv = make_redis()
    pg = make_pg(conf_lines=[f"pg_redis.url = '{redis_srv.url}'"], preload=True)
    with pg.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        bare = c.execute("""
            SELECT pg_describe_object(d.classid, d.objid, 0)
              FROM pg_depend d
             WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
               AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_redis')
               AND ((d.classid = 'pg_proc'::regclass AND obj_description(d.objid, 'pg_proc') IS NULL)
                 OR (d.classid = 'pg_class'::regclass
                     AND (SELECT relkind FROM pg_class WHERE oid = d.objid) IN ('r', 'v')
                     AND obj_description(d.objid, 'pg_class') IS NULL))
             ORDER BY 1""").fetchall()
        assert not bare, f"without a COMMENT: {[b[0] for b in bare]}"
        assert one(c, "SELECT obj_description(oid, 'pg_extension') FROM pg_extension WHERE extname = 'pg_redis'")

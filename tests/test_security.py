"""Security of pg_redis (SPEC §1, §7; issue 6, item 5), against real PostgreSQL 15 and real
redis-server processes, with roles made by the tests: a non-superuser can neither read nor change
the superuser-only settings (pg_redis.url, pg_redis.password_file, pg_redis.key_prefix) by any
route (SHOW, current_setting, pg_settings, SET, set_config, RESET, ALTER ROLE/DATABASE SET, a
function's SET clause, startup options); cannot touch anything in the internal schema
redis_internal (tables, sequences, functions); cannot mirror a table it does not own, nor read
through redis_fetch what it may not SELECT; cannot make its own code run with more privileges
than its own through a filter, a cast or output function of a column type, or objects named like
the ones pg_redis' internal SQL uses placed earlier in a search_path (traps record current_user
and try `ALTER ROLE ... SUPERUSER`); cannot leave the key prefix a superuser set in
postgresql.conf through any function; and no password reaches any message, DETAIL, HINT,
CONTEXT, view (pg_settings, pg_stat_activity, redis_stats.last_error, redis_mirrors) or server log
line, including the worker's, when Redis is down, refuses the password or is unreachable. The
module cluster's Redis requires a password that only pg_redis.password_file holds, and
pg_redis.url carries a second, decoy password: neither may ever show.
"""

from __future__ import annotations

import os
import pwd
import socket
import time

import psycopg
import pytest

from harness import IS_ROOT, PG_OS_USER, PgCluster, RedisServer, expect_error
from helpers import MirrorCtx, one, wait_for_worker, wait_until
from test_mirror import assert_redis_equals_table

PRIVILEGE = "42501"
BAD_ARG = "22023"

FILE_SECRET = "filePw-Q7x2Zk9"        # Redis' requirepass; only in the password file
URL_SECRET = "urlPw-M3v8Tq1"          # in pg_redis.url (overridden by the file): must never show either
SECRETS = (FILE_SECRET, URL_SECRET)


def _chown_pg(path):
    if IS_ROOT:
        pw = pwd.getpwnam(PG_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o600)


@pytest.fixture(scope="module")
def module_redis():
    srv = RedisServer(extra_args=["--requirepass", FILE_SECRET])
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def pg(module_redis):
    cluster = PgCluster(start=False)
    pwfile = cluster.dir / "redis_password"
    pwfile.write_text(FILE_SECRET + "\n")
    _chown_pg(pwfile)
    cluster.password_file = str(pwfile)
    cluster.set_conf([f"pg_redis.url = 'redis://:{URL_SECRET}@127.0.0.1:{module_redis.port}/0'",
                      f"pg_redis.password_file = '{pwfile}'"])
    cluster.start()
    yield cluster
    cluster.cleanup()


class Ctx(MirrorCtx):
    """MirrorCtx (superuser session, module Redis) plus granting every pg_redis routine."""

    def grant_functions(self, role, include_command=False):
        """EXECUTE on every pg_redis routine in the public schema (what security.md grants apps and devs)."""
        fns = [r[0] for r in self.conn.execute(
            """SELECT p.oid::regprocedure::text FROM pg_proc p
                 JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
                 JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_redis'
                WHERE p.pronamespace = 'public'::regnamespace""").fetchall()]
        for f in fns:
            if include_command or not f.startswith("redis_command("):
                self.conn.execute(f'GRANT EXECUTE ON ROUTINE {f} TO "{role}"')
        return fns


@pytest.fixture
def m(ext, module_redis):
    module_redis.client().flushall()
    ctx = Ctx(ext, module_redis)
    yield ctx
    ctx.close()


def no_secret(e: psycopg.Error, where: str, secrets=SECRETS):
    for part in (e.diag.message_primary, e.diag.message_detail, e.diag.message_hint, e.diag.context, str(e)):
        for s in secrets:
            assert s not in (part or ""), f"{where}: a password in the error: {part!r}"


def leaking_lines(text, secrets=SECRETS):
    return [line for line in text.splitlines() if any(s in line for s in secrets)]


# ----------------------------------------------------------------------------------------
# Superuser-only settings


HIDDEN = ["pg_redis.url", "pg_redis.password_file"]


@pytest.mark.parametrize("name", HIDDEN)
def test_hidden_settings_cannot_be_read_by_other_roles(m, name):
    app = m.role("sec_reader")
    m.grant_functions(app)
    with m.pg.connect(user=app) as c:
        expect_error(c, f"SHOW {name}", sqlstate=PRIVILEGE, prefix=None)
        expect_error(c, "SELECT current_setting(%s)", (name,), sqlstate=PRIVILEGE, prefix=None)
        try:
            v = one(c, "SELECT current_setting(%s, true)", (name,))
        except psycopg.Error as e:
            assert e.sqlstate == PRIVILEGE, e
            v = None
        assert v is None, f"current_setting({name}, true) shows {v!r}"
        assert c.execute("SELECT * FROM pg_settings WHERE name = %s", (name,)).fetchall() == []
        assert c.execute("SELECT * FROM pg_show_all_settings() WHERE name = %s", (name,)).fetchall() == []
        expect_error(c, "SELECT * FROM pg_file_settings", sqlstate=PRIVILEGE, prefix=None)
        dump = " ".join(str(r) for r in c.execute("SELECT * FROM pg_settings").fetchall())
        for s in (*SECRETS, m.pg.password_file):
            assert s not in dump, f"pg_settings shows {s!r} to a non-superuser"


@pytest.mark.parametrize("name", HIDDEN + ["pg_redis.key_prefix"])
def test_superuser_only_settings_cannot_be_changed_by_other_roles(m, name):
    app = m.role("sec_changer")
    m.grant_functions(app)
    m.conn.execute(f'GRANT CREATE ON SCHEMA public TO "{app}"')
    m.cleanup_sql.append(f'REVOKE CREATE ON SCHEMA public FROM "{app}"')
    evil = "redis://127.0.0.1:1/0" if name == "pg_redis.url" else "/tmp/evil" if "file" in name else ""
    if name == "pg_redis.key_prefix":   # a prefix the superuser gave the role: the role cannot remove it
        m.conn.execute(f"ALTER ROLE \"{app}\" SET {name} = 'tenant:'")
    with m.pg.connect(user=app) as c:
        if name == "pg_redis.key_prefix":
            with c.transaction():
                expect_error(c, f"ALTER ROLE \"{app}\" RESET {name}", sqlstate=PRIVILEGE, prefix=None)
            c.execute(f"ALTER ROLE \"{app}\" RESET ALL")
        for q, params in [(f"SET {name} = '{evil}'", None), (f"SET LOCAL {name} = '{evil}'", None),
                          ("SELECT set_config(%s, %s, false)", (name, evil)),
                          ("SELECT set_config(%s, %s, true)", (name, evil)),
                          (f"RESET {name}", None),
                          (f"ALTER ROLE \"{app}\" SET {name} = '{evil}'", None),
                          (f"ALTER DATABASE postgres SET {name} = '{evil}'", None)]:
            with c.transaction():
                expect_error(c, q, params, sqlstate=PRIVILEGE, prefix=None)
        # a function's SET clause: refused when created, or when called
        try:
            c.execute(f"CREATE FUNCTION sec_f() RETURNS text LANGUAGE sql SET {name} = '{evil}' "
                      f"AS $$ SELECT 'x' $$")
        except psycopg.Error as e:
            assert e.sqlstate == PRIVILEGE, e
        else:
            expect_error(c, "SELECT sec_f()", sqlstate=PRIVILEGE, prefix=None)
        c.execute("RESET ALL")
        c.execute("DISCARD ALL")
    # startup options
    with pytest.raises(psycopg.OperationalError) as ei:
        m.pg.connect(user=app, options=f"-c {name}={evil or 'x'}").close()
    assert "permission denied" in str(ei.value), ei.value
    # nothing changed: the superuser sees the configured values, and delivery still works
    settings = m.conn.execute("SELECT setconfig::text FROM pg_db_role_setting WHERE setconfig::text LIKE '%%pg_redis%%'"
                              ).fetchall()
    assert settings == ([("{pg_redis.key_prefix=tenant:}",)] if name == "pg_redis.key_prefix" else []), settings
    with m.pg.connect() as c:
        if name == "pg_redis.url":
            assert URL_SECRET in one(c, "SHOW pg_redis.url")
        assert one(c, "SELECT redis_ping()") == "PONG"


def test_monitoring_role_as_documented_cannot_read_the_url(m):
    """docs/security.md: a monitoring role granted SELECT on the views reads them and cannot read
    pg_redis.url or pg_redis.password_file (SPEC §7: superusers only). (pg_monitor members can
    read every setting — pg_read_all_settings, PostgreSQL's rule — so the docs say to keep the
    password in password_file when such roles exist.)"""
    mon = m.role("sec_mon")
    m.conn.execute(f'GRANT SELECT ON redis_stats, redis_mirrors, redis_dead_letters TO "{mon}"')
    with m.pg.connect(user=mon) as c:
        c.execute("SELECT * FROM redis_stats")          # what the role is for
        for name in HIDDEN:
            try:
                v = one(c, "SELECT current_setting(%s, true)", (name,))
            except psycopg.Error as e:
                assert e.sqlstate == PRIVILEGE, e
                continue
            assert v is None, f"a monitoring role reads {name} = {v!r}"


# ----------------------------------------------------------------------------------------
# The internal schema


def test_internal_schema_is_closed_to_every_other_role(m):
    """Neither a writer of a mirrored table nor a role granted every pg_redis function can read,
    change, lock, copy or call anything in redis_internal, or read the monitoring views."""
    t = m.table("sec_int", "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
    m.mirror(t)
    m.idle()
    role = m.role("sec_prober")
    m.grant_functions(role, include_command=False)
    m.conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {t} TO "{role}"')
    rels = m.conn.execute("SELECT c.oid::regclass::text, c.relkind::text FROM pg_class c "
                          "WHERE c.relnamespace = 'redis_internal'::regnamespace AND c.relkind IN ('r', 'S', 'v', 'm')"
                          ).fetchall()
    funcs = [r[0] for r in m.conn.execute("SELECT p.oid::regprocedure::text FROM pg_proc p "
                                          "WHERE p.pronamespace = 'redis_internal'::regnamespace").fetchall()]
    assert {"redis_internal.queue", "redis_internal.mirrors", "redis_internal.dead_letters"} <= {r for r, _ in rels}
    allowed = []
    with m.pg.connect(user=role) as c:
        c.execute("INSERT INTO sec_int VALUES (2, 'b')")      # writing the table works without any of it

        def denied(q):
            try:
                with c.transaction():
                    c.execute(q)
            except psycopg.errors.InsufficientPrivilege:
                return
            except psycopg.Error as e:
                allowed.append(f"{q}: {e.sqlstate} {e.diag.message_primary} (not a privilege error)")
                return
            allowed.append(f"{q}: allowed")

        for rel, kind in rels:
            if kind == "S":
                for q in (f"SELECT nextval('{rel}')", f"SELECT setval('{rel}', 1)", f"SELECT * FROM {rel}"):
                    denied(q)
                continue
            col = one(m.conn, "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 1", (rel,))
            for q in (f"SELECT * FROM {rel}", f"INSERT INTO {rel} DEFAULT VALUES", f"UPDATE {rel} SET {col} = {col}",
                      f"DELETE FROM {rel}", f"TRUNCATE {rel}", f"LOCK TABLE {rel}", f"COPY {rel} TO STDOUT",
                      f"SELECT count(*) FROM {rel}", f"ALTER TABLE {rel} ADD COLUMN x int", f"DROP TABLE {rel}"):
                denied(q)
        for f in funcs:
            name, args = f.split("(", 1)
            nargs = len([a for a in args.rstrip(")").split(",") if a.strip()])
            denied(f"SELECT {name}({', '.join(['NULL'] * nargs)})")
            denied(f"ALTER FUNCTION {f} OWNER TO \"{role}\"")
        for ev in ("pg_redis_sql_drop", "pg_redis_ddl_end", "pg_redis_create_trigger"):
            denied(f"ALTER EVENT TRIGGER {ev} DISABLE")
        for v in ("redis_mirrors", "redis_stats", "redis_dead_letters"):
            denied(f"SELECT * FROM {v}")
        denied("CREATE TABLE redis_internal.mine (id int)")
        denied("SET ROLE postgres")
    assert not allowed, "a non-superuser could:\n" + "\n".join(allowed)
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t)


# ----------------------------------------------------------------------------------------
# Ownership and SELECT


def test_only_the_owner_mirrors_a_table_by_any_route(m):
    owner = m.role("sec_owner")
    dev = m.role("sec_dev")
    m.grant_functions(dev)
    m.conn.execute(f'GRANT EXECUTE ON FUNCTION redis_mirror_trigger() TO "{dev}"')
    t = m.table("sec_own", "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
    m.conn.execute(f'ALTER TABLE {t} OWNER TO "{owner}"')
    m.conn.execute(f'GRANT ALL ON {t} TO "{dev}"')       # every table privilege, TRIGGER included
    with m.pg.connect(user=dev) as c:
        expect_error(c, "SELECT redis_mirror('sec_own')", sqlstate=PRIVILEGE)
        expect_error(c, "CREATE TRIGGER sec_t AFTER INSERT ON sec_own REFERENCING NEW TABLE AS n FOR EACH STATEMENT "
                        "EXECUTE FUNCTION redis_mirror_trigger('key_template=sec_own_x:{id}')", sqlstate=PRIVILEGE)
    assert one(m.conn, "SELECT count(*) FROM redis_mirrors WHERE mirror = 'sec_own'::regclass") == 0
    m.conn.execute("SELECT redis_mirror('sec_own')")      # the superuser may (as the owner could)
    m.idle()
    with m.pg.connect(user=dev) as c:
        for q in ("SELECT redis_unmirror('sec_own', true)", "SELECT redis_resync('sec_own')",
                  "SELECT * FROM redis_verify('sec_own', true)", "SELECT * FROM redis_backfill_step('sec_own')",
                  "SELECT redis_retry('sec_own')", "SELECT redis_mirror('sec_own', ttl_seconds => 1)"):
            expect_error(c, q, sqlstate=PRIVILEGE)
        c.execute("SET statement_timeout = '5s'")
        expect_error(c, "CALL redis_backfill('sec_own')", sqlstate=PRIVILEGE)
    assert one(m.conn, "SELECT ttl_seconds FROM redis_mirrors WHERE mirror = 'sec_own'::regclass") is None
    assert m.rc.ttl("sec_own:1") == -1
    assert_redis_equals_table(m.pg, m.rc, t)


def test_redis_fetch_never_shows_what_the_caller_may_not_select(m):
    t = m.table("sec_rf", "id int PRIMARY KEY, owner_name text, secret text",
                "VALUES (1, 'alice', 'alice-secret'), (2, 'bob', 'bob-secret')")
    m.mirror(t)
    m.idle()
    reader = m.role("sec_rf_reader")
    m.conn.execute(f'GRANT EXECUTE ON FUNCTION redis_fetch(regclass, text[]) TO "{reader}"')
    m.conn.execute(f'GRANT SELECT (id, owner_name) ON {t} TO "{reader}"')     # not the secret column
    with m.pg.connect(user=reader) as c:
        assert c.execute("SELECT id, owner_name FROM sec_rf ORDER BY id").fetchall() == [(1, "alice"), (2, "bob")]
        for key in ("1", "3"):                          # a hit and a miss
            expect_error(c, "SELECT redis_fetch('sec_rf', %s)", (key,), sqlstate=PRIVILEGE)
    # row-level security: enabling it on a mirrored table is refused, or fetch must not bypass it
    m.conn.execute(f'GRANT SELECT ON {t} TO "{reader}"')
    try:
        m.conn.execute(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY")
        m.conn.execute(f"CREATE POLICY own ON {t} FOR SELECT USING (owner_name = 'alice')")
    except psycopg.Error as e:
        assert e.sqlstate == PRIVILEGE and "row-level security" in e.diag.message_primary, e
        assert one(m.conn, "SELECT relrowsecurity FROM pg_class WHERE oid = 'sec_rf'::regclass") is False
    else:
        with m.pg.connect(user=reader) as c:
            assert c.execute("SELECT id FROM sec_rf").fetchall() == [(1,)]
            for _ in range(2):  # a hit, then after a DEL a miss
                try:
                    got = one(c, "SELECT redis_fetch('sec_rf', '2')")
                except psycopg.Error as e:
                    assert e.sqlstate == PRIVILEGE, e
                    got = None
                assert got is None, f"redis_fetch bypassed row-level security: {got}"
                m.rc.delete("sec_rf:2")
    with m.pg.connect(user=reader) as c:
        assert one(c, "SELECT redis_fetch('sec_rf', '1')")["secret"] == "alice-secret"


# ----------------------------------------------------------------------------------------
# Code of a table owner never runs with more privileges


TRAP_FN = """
CREATE FUNCTION {s}.trap(tag text) RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE read_ok boolean := false; alter_ok boolean := false;
BEGIN
  BEGIN PERFORM 1 FROM public.sec_su_only LIMIT 1; read_ok := true; EXCEPTION WHEN others THEN NULL; END;
  BEGIN EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', '{role}'); alter_ok := true;
  EXCEPTION WHEN others THEN NULL; END;
  INSERT INTO {s}.trap_log VALUES (tag, current_user::text, session_user::text, read_ok, alter_ok);
  RETURN true;
END $f$"""


def _trap_setup(m, role, schema):
    m.table("sec_su_only", "id int PRIMARY KEY, v text", "VALUES (1, 'superuser only')")
    m.cleanup_sql.insert(0, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    m.conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    m.conn.execute(f'CREATE SCHEMA {schema} AUTHORIZATION "{role}"')
    with m.pg.connect(user=role) as c:
        c.execute(f"CREATE TABLE {schema}.trap_log (tag text, cur text, sess text, read_ok boolean, alter_ok boolean)")
        c.execute(f"GRANT INSERT ON {schema}.trap_log TO PUBLIC")
        c.execute(f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC")
        c.execute(TRAP_FN.format(s=schema, role=role))
        c.execute(f"GRANT EXECUTE ON FUNCTION {schema}.trap(text) TO PUBLIC")


def _escalations(m, role, schema):
    rows = m.conn.execute(f"SELECT tag, cur, sess, read_ok, alter_ok FROM {schema}.trap_log").fetchall()
    bad = sorted({r for r in rows if r[1] != role or r[3] or r[4]})
    su = one(m.conn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,))
    return rows, bad, su


def test_filter_casts_and_output_functions_run_as_the_table_owner(m):
    """A table owner's filter and its column type's casts (to json for the row, to text for the
    key) are its own code: wherever pg_redis runs them — the owner's and a superuser's writes,
    the worker's backfill, redis_verify / redis_fetch / redis_resync called by a superuser, a
    sync-mode rollback — they run as the owner, never as a superuser."""
    atk = m.role("sec_atk")
    m.grant_functions(atk)
    _trap_setup(m, atk, "sec_atk_s")
    s = "sec_atk_s"
    with m.pg.connect(user=atk) as c:
        c.execute(f"CREATE TYPE {s}.mood AS ENUM ('sad', 'ok', 'happy')")
        c.execute(f"""CREATE FUNCTION {s}.mood_text({s}.mood) RETURNS text LANGUAGE plpgsql AS $f$
                      BEGIN PERFORM {s}.trap('cast to text'); RETURN pg_catalog.enum_out($1)::text; END $f$""")
        c.execute(f"""CREATE FUNCTION {s}.mood_json({s}.mood) RETURNS json LANGUAGE plpgsql AS $f$
                      BEGIN PERFORM {s}.trap('cast to json');
                      RETURN pg_catalog.to_json(pg_catalog.enum_out($1)::text); END $f$""")
        c.execute(f"CREATE CAST ({s}.mood AS text) WITH FUNCTION {s}.mood_text({s}.mood)")
        c.execute(f"CREATE CAST ({s}.mood AS json) WITH FUNCTION {s}.mood_json({s}.mood)")
        for tname, mode in (("q", "queue"), ("y", "sync")):
            c.execute(f"CREATE TABLE {s}.{tname} (id int PRIMARY KEY, m {s}.mood NOT NULL UNIQUE, v text)")
            c.execute(f"INSERT INTO {s}.{tname} VALUES (1, 'sad', 'before the mirror')")
            c.execute(f"SELECT redis_mirror('{s}.{tname}', key_template => 'sec_{tname}:{{m}}', mode => %s, "
                      f"filter => '{s}.trap(''filter'') AND id > 0')", (mode,))
        c.execute(f"INSERT INTO {s}.q VALUES (2, 'ok', 'by the owner')")
    m.idle()
    assert m.rc.exists("sec_q:sad") and m.rc.exists("sec_q:ok") and m.rc.exists("sec_y:sad")
    # a superuser uses the table and pg_redis' functions on it
    c = m.conn
    c.execute(f"INSERT INTO {s}.q VALUES (3, 'happy', 'by a superuser')")
    c.execute(f"UPDATE {s}.q SET v = 'updated by a superuser' WHERE id = 1")
    with c.transaction():                          # sync mode: pushed, then restored from the table
        c.execute(f"UPDATE {s}.y SET v = 'will roll back' WHERE id = 1")
        raise psycopg.Rollback()
    m.rc.delete("sec_q:ok")
    c.execute(f"SELECT * FROM redis_verify('{s}.q')")
    c.execute(f"SELECT * FROM redis_verify('{s}.q', true)")
    m.rc.delete("sec_q:happy")
    assert one(c, f"SELECT redis_fetch('{s}.q', 'happy')")["v"] == "by a superuser"
    c.execute(f"SELECT redis_resync('{s}.q')")
    m.idle()
    c.execute(f"TRUNCATE {s}.q")
    m.idle()
    rows, bad, su = _escalations(m, atk, s)
    tags = {r[0] for r in rows}
    assert {"filter", "cast to text", "cast to json"} <= tags, f"the traps never ran: {tags}"
    assert not bad and not su, f"the owner's code ran with more privileges (superuser now: {su}): {bad}"


def test_search_path_traps_in_the_writers_session_never_run_elevated(m):
    atk = m.role("sec_sp")
    s = "sec_sp_s"
    _trap_setup(m, atk, s)
    for tname, mode in (("sec_spq", "queue"), ("sec_spc", "commit"), ("sec_sps", "sync")):
        m.table(tname, "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
        m.mirror(tname, mode=mode)
        m.conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {tname} TO "{atk}"')
    m.idle()
    m.grant_functions(atk)
    # (operators on oid/int4/text too would make every catalog scan call plpgsql per row: minutes)
    ops = [("regclass", "oid", "l::oid OPERATOR(pg_catalog.=) r"), ("oid", "regclass", "l OPERATOR(pg_catalog.=) r::oid"),
           ("int8", "int8", "l OPERATOR(pg_catalog.=) r")]
    with m.pg.connect(user=atk) as c:
        c.execute("SET statement_timeout = '30s'")
        for lt, rt, body in ops:
            c.execute(f"CREATE FUNCTION {s}.eq_{lt}_{rt}(l {lt}, r {rt}) RETURNS boolean LANGUAGE plpgsql AS "
                      f"$f$ BEGIN PERFORM {s}.trap('= ({lt}, {rt})'); RETURN {body}; END $f$")
            c.execute(f"CREATE OPERATOR {s}.= (LEFTARG = {lt}, RIGHTARG = {rt}, FUNCTION = {s}.eq_{lt}_{rt})")
        for fn, args, ret, body in [
                ("unnest", "a text[]", "SETOF text", "RETURN QUERY SELECT pg_catalog.unnest(a)"),
                ("unnest", "a bigint[]", "SETOF bigint", "RETURN QUERY SELECT pg_catalog.unnest(a)"),
                ("row_to_json", "r record", "json", "RETURN pg_catalog.row_to_json(r)"),
                ("now", "", "timestamptz", "RETURN pg_catalog.now()"),
                ("clock_timestamp", "", "timestamptz", "RETURN pg_catalog.clock_timestamp()"),
                ("current_setting", "n text", "text", "RETURN pg_catalog.current_setting(n)"),
                ("pg_total_relation_size", "r regclass", "bigint", "RETURN pg_catalog.pg_total_relation_size(r)"),
                ("pg_advisory_xact_lock", "k bigint", "void", "PERFORM pg_catalog.pg_advisory_xact_lock(k)"),
                ("pg_try_advisory_xact_lock", "k bigint", "boolean", "RETURN pg_catalog.pg_try_advisory_xact_lock(k)")]:
            c.execute(f"CREATE FUNCTION {s}.{fn}({args}) RETURNS {ret} LANGUAGE plpgsql AS "
                      f"$f$ BEGIN PERFORM {s}.trap('{fn}({args})'); {body}; END $f$")
        c.execute(f"SET search_path = {s}, pg_catalog, public")
        for tname in ("sec_spq", "sec_spc", "sec_sps"):
            c.execute(f"INSERT INTO public.{tname} VALUES (2, 'b')")
            c.execute(f"UPDATE public.{tname} SET v = 'c' WHERE id OPERATOR(pg_catalog.=) 1")
            c.execute(f"DELETE FROM public.{tname} WHERE id OPERATOR(pg_catalog.=) 2")
            c.execute(f"SELECT public.redis_fetch('public.{tname}', '1')")
        c.execute("SELECT public.redis_drain()")
        c.execute("TRUNCATE public.sec_spq")
    m.idle()
    rows, bad, su = _escalations(m, atk, s)
    assert not bad and not su, (f"the writer's objects ran with more privileges (superuser now: {su}): "
                                f"{sorted({(r[0], r[1]) for r in bad})}")


def test_search_path_traps_in_public_never_run_in_other_sessions(m):
    atk = m.role("sec_pub")
    s = "sec_pub_s"
    _trap_setup(m, atk, s)
    m.conn.execute(f'GRANT CREATE ON SCHEMA public TO "{atk}"')   # PostgreSQL's default before version 15
    m.cleanup_sql.insert(0, f'REVOKE CREATE ON SCHEMA public FROM "{atk}"')
    m.cleanup_sql.insert(0, "DROP OPERATOR IF EXISTS public.= (oid, regclass)")
    m.cleanup_sql.insert(0, "DROP OPERATOR IF EXISTS public.= (regclass, oid)")
    t = m.table("sec_pubt", "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
    m.mirror(t)
    other = m.role("sec_pub_writer")
    m.conn.execute(f'GRANT INSERT, UPDATE ON {t} TO "{other}"')
    m.idle()
    with m.pg.connect(user=atk) as c:
        for lt, rt, body in (("regclass", "oid", "l::oid OPERATOR(pg_catalog.=) r"),
                             ("oid", "regclass", "l OPERATOR(pg_catalog.=) r::oid")):
            c.execute(f"CREATE FUNCTION public.sec_eq_{lt}_{rt}(l {lt}, r {rt}) RETURNS boolean LANGUAGE plpgsql AS "
                      f"$f$ BEGIN PERFORM {s}.trap('public = ({lt}, {rt})'); RETURN {body}; END $f$")
            c.execute(f"CREATE OPERATOR public.= (LEFTARG = {lt}, RIGHTARG = {rt}, FUNCTION = public.sec_eq_{lt}_{rt})")
    try:
        with m.pg.connect(user=other) as c:
            c.execute("INSERT INTO sec_pubt VALUES (2, 'by another writer')")
        with m.pg.connect() as c:
            c.execute("UPDATE sec_pubt SET v = 'by a superuser' WHERE id = 1")
        m.idle()
        time.sleep(0.3)
        rows, bad, su = _escalations(m, atk, s)
    finally:
        m.conn.execute("DROP OPERATOR IF EXISTS public.= (oid, regclass)")
        m.conn.execute("DROP OPERATOR IF EXISTS public.= (regclass, oid)")
    assert not bad and not su, (f"objects a role put in public ran as other roles (superuser now: {su}): "
                                f"{sorted({(r[0], r[1], r[2]) for r in bad})}")


# ----------------------------------------------------------------------------------------
# A key prefix set in postgresql.conf


REFUSED_UNDER_PREFIX = [
    ["KEYS", "*"], ["SCAN", "0"], ["FLUSHALL"], ["FLUSHDB"], ["RANDOMKEY"], ["DBSIZE"], ["SWAPDB", "0", "1"],
    ["EVAL", "return redis.call('GET', 'other')", "0"], ["EVAL_RO", "return 1", "0"], ["EVALSHA", "0" * 40, "0"],
    ["FCALL", "f", "0"], ["MIGRATE", "127.0.0.1", "1", "other", "0", "100"], ["OBJECT", "HELP"],
    ["SORT", "l", "BY", "nosort", "GET", "*"], ["SORT_RO", "l", "GET", "other*"], ["CONFIG", "GET", "*"],
    ["DEBUG", "OBJECT", "other"], ["CLIENT", "LIST"], ["CLIENT", "KILL", "TYPE", "normal"], ["SCRIPT", "FLUSH"],
    ["FUNCTION", "FLUSH"], ["INFO"], ["PUBLISH", "ch", "m"], ["PUBSUB", "CHANNELS"], ["XREAD", "STREAMS", "s", "0"],
    ["GEORADIUS", "g", "0", "0", "1", "km", "STORE", "other"], ["ACL", "LIST"], ["WAIT", "0", "0"],
    ["SLOWLOG", "GET"], ["LATENCY", "RESET"], ["MEMORY", "DOCTOR"], ["SINTERCARD", "1", "other"],
    ["ZUNIONSTORE", "dst", "1", "other"], ["LMPOP", "1", "other", "LEFT"], ["SELECT", "1"],
]


def test_key_prefix_from_postgresql_conf_confines_every_function(make_pg, make_redis):
    prefix = "tenant7:"
    srv = make_redis()
    cluster = make_pg(conf_lines=[f"pg_redis.url = '{srv.url}'", f"pg_redis.key_prefix = '{prefix}'"])
    rc = srv.client(decode_responses=True)
    decoys = {"other": "decoy", "k": "decoy k", "n": "41", "b": "decoy b", "u:1": "decoy row"}
    rc.mset(decoys)
    rc.hset("h", "f", "decoy h")
    rc.rpush("l", "decoy l")
    with cluster.connect() as su:
        su.execute("CREATE EXTENSION pg_redis")
        wait_for_worker(su)
        su.execute("CREATE ROLE ten LOGIN")
        su.execute("GRANT CREATE ON SCHEMA public TO ten")
        for (f,) in su.execute("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid "
                               "AND d.deptype = 'e' JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_redis' "
                               "WHERE p.pronamespace = 'public'::regnamespace").fetchall():
            su.execute(f"GRANT EXECUTE ON ROUTINE {f} TO ten")
    ps = rc.pubsub()
    ps.subscribe("ch", prefix + "ch")
    time.sleep(0.2)
    while ps.get_message(timeout=0.2):
        pass
    with cluster.connect(user="ten") as c:
        assert one(c, "SHOW pg_redis.key_prefix") == prefix
        # every key-value function
        c.execute("SELECT redis_set('k', 'mine')")
        c.execute("SELECT redis_set_bytea('b', '\\x00ff')")
        assert one(c, "SELECT redis_get('other')") is None
        assert one(c, "SELECT redis_get_bytea('other')") is None
        assert one(c, "SELECT redis_exists('other')") is False
        assert one(c, "SELECT redis_ttl('other')") == -2
        assert one(c, "SELECT redis_expire('other', 5)") is False
        assert one(c, "SELECT redis_del('other', 'u:1')") == 0
        assert one(c, "SELECT redis_incrby('n', 1)") == 1
        assert one(c, "SELECT redis_mget(ARRAY['other', 'k'])") == [None, "mine"]
        assert one(c, """SELECT redis_hset('h', '{"f": "mine"}')""") == 1
        assert one(c, "SELECT redis_hget('h', 'f')") == "mine"
        assert one(c, "SELECT redis_hgetall('h')") == {"f": "mine"}
        assert one(c, "SELECT redis_publish('ch', 'hello')") == 1
        # redis_command: key arguments prefixed, keyspace-wide and movable-key commands refused
        assert one(c, "SELECT redis_command('GET', 'other')") is None
        assert one(c, "SELECT redis_command('SET', 'other', 'mine')") == "OK"
        assert one(c, "SELECT redis_command('MSET', 'a1', 'x', 'a2', 'y')") == "OK"
        assert one(c, "SELECT redis_command('RENAME', 'a1', 'other2')") == "OK"
        assert one(c, "SELECT redis_command('COPY', 'a2', 'other3')") == 1
        assert one(c, "SELECT redis_command('RPUSH', 'l', 'mine')") == 1
        assert one(c, "SELECT redis_command('LMOVE', 'l', 'other4', 'LEFT', 'LEFT')") == "mine"
        assert one(c, "SELECT redis_command('OBJECT', 'ENCODING', 'other')") == "embstr"
        assert one(c, "SELECT redis_command('EXISTS', 'other', 'u:1', 'k')") == 2
        assert one(c, "SELECT redis_command('PING')") == "PONG"
        for args in REFUSED_UNDER_PREFIX:
            ph = ", ".join(["%s"] * len(args))
            expect_error(c, f"SELECT redis_command({ph})", args, sqlstate=BAD_ARG)
        # no way out of the prefix
        for q in ("SET pg_redis.key_prefix = ''", "SELECT set_config('pg_redis.key_prefix', '', false)",
                  "RESET pg_redis.key_prefix", "ALTER ROLE ten SET pg_redis.key_prefix = ''"):
            with c.transaction():
                expect_error(c, q, sqlstate=PRIVILEGE, prefix=None)
        c.execute("RESET ALL")
        c.execute("DISCARD ALL")
        c.execute("SELECT redis_set('after_reset', '1')")
        # a mirror the role creates: its keys, stream, purge and read-through carry the prefix
        c.execute("CREATE TABLE tt (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO tt VALUES (1, 'one')")
        c.execute("SELECT redis_mirror('tt', key_template => 'u:{id}', stream => 'ev')")
        c.execute("INSERT INTO tt VALUES (2, 'two')")
    with pytest.raises(psycopg.OperationalError):
        cluster.connect(user="ten", options="-c pg_redis.key_prefix=").close()
    wait_until(lambda: rc.exists(prefix + "u:1") and rc.exists(prefix + "u:2"), 10, what="the tenant's mirror keys")
    with cluster.connect(user="ten") as c:
        rc.delete(prefix + "u:1")
        assert one(c, "SELECT redis_fetch('tt', '1')") == {"id": 1, "v": "one"}
        c.execute("TRUNCATE tt")
        c.execute("INSERT INTO tt VALUES (3, 'three')")
    wait_until(lambda: rc.exists(prefix + "u:3") and not rc.exists(prefix + "u:2"), 10, what="truncate + insert")
    with cluster.connect(user="ten") as c:
        c.execute("SELECT redis_unmirror('tt', true)")
    wait_until(lambda: not rc.exists(prefix + "u:3"), 10, what="purge")
    # the prefix held everywhere: every unprefixed key is a decoy, untouched
    assert rc.xlen(prefix + "ev") >= 3 and not rc.exists("ev")
    unprefixed = sorted(k for k in rc.keys("*") if not k.startswith(prefix))
    assert unprefixed == sorted([*decoys, "h", "l"]), f"keys outside the prefix: {unprefixed}"
    assert {k: rc.get(k) for k in decoys} == decoys and rc.hgetall("h") == {"f": "decoy h"}
    assert rc.lrange("l", 0, -1) == ["decoy l"] and all(rc.ttl(k) == -1 for k in decoys)
    got = []
    while (msg := ps.get_message(timeout=0.3)) is not None:
        got.append((msg["channel"], msg["data"]))
    assert got == [(prefix + "ch", "hello")], got
    assert rc.get(prefix + "other") == "mine" and rc.get(prefix + "after_reset") == "1"
    assert rc.exists(prefix + "other2", prefix + "other3", prefix + "other4") == 3
    ps.close()


# ----------------------------------------------------------------------------------------
# Passwords


def test_no_password_in_any_message_view_or_log_line(m, module_redis):
    """The module cluster reaches Redis with the password file; the URL carries a decoy password.
    With Redis up, down, refusing the password, and unreachable: no message, view or log line
    shows either password or the password file's path to a non-superuser."""
    pg = m.pg
    logpos = pg.log_position()
    t = m.table("sec_pw", "id int PRIMARY KEY, v text", "VALUES (1, 'a')")
    m.mirror(t)
    m.idle()
    app = m.role("sec_pw_app")
    m.grant_functions(app)
    m.conn.execute(f'GRANT SELECT ON redis_stats, redis_mirrors, redis_dead_letters TO "{app}"')
    m.conn.execute(f'GRANT SELECT, INSERT ON {t} TO "{app}"')
    rc = module_redis.client()
    errors = []

    def try_calls(conn, who):
        for q in ("SELECT redis_ping()", "SELECT redis_get('k')", "SELECT redis_set('k', 'v')",
                  "SELECT redis_fetch('sec_pw', '1')"):
            try:
                conn.execute(q)
            except psycopg.Error as e:
                errors.append((who, q, e.sqlstate))
                no_secret(e, f"{who}: {q}", (*SECRETS, pg.password_file))

    def views_clean(conn, who):
        views = ("redis_stats", "redis_mirrors", "redis_dead_letters", "pg_stat_activity")
        for v in views + (("pg_settings",) if who != "superuser" else ()):   # a superuser may read settings
            text = " ".join(map(str, conn.execute(f"SELECT * FROM {v}").fetchall()))
            for s in SECRETS:
                assert s not in text, f"{who} sees a password in {v}"
            if who != "superuser" and v != "pg_stat_activity":
                assert pg.password_file not in text, f"{who} sees the password file in {v}"

    try:
        with pg.connect(user=app) as ac:
            ac.add_notice_handler(lambda d: None)
            assert one(ac, "SELECT redis_ping()") == "PONG"
            views_clean(ac, "app")
            # 1. Redis down
            module_redis.kill()
            m.conn.execute("INSERT INTO sec_pw VALUES (2, 'while down')")
            ac.execute("INSERT INTO sec_pw VALUES (3, 'while down')")
            try_calls(ac, "app")
            try_calls(m.conn, "superuser")
            s = wait_until(lambda: one(m.conn, "SELECT last_error FROM redis_stats WHERE mirror = 'sec_pw'::regclass"),
                           15, what="redis_stats.last_error while Redis is down")
            views_clean(ac, "app")
            views_clean(m.conn, "superuser")
            # 2. Redis back, refusing the password
            module_redis.extra_args[module_redis.extra_args.index("--requirepass") + 1] = "another-one"
            module_redis.password = "another-one"
            module_redis.start()
            m.conn.execute("INSERT INTO sec_pw VALUES (4, 'wrong password')")
            def refused_password():
                err = one(m.conn, "SELECT last_error FROM redis_stats WHERE mirror = 'sec_pw'::regclass") or ""
                return ("WRONGPASS" in err or "NOAUTH" in err or "auth" in err.lower()) and err
            wait_until(refused_password, 20, what="the worker's authentication failure in redis_stats.last_error")
            try_calls(ac, "app")
            try_calls(m.conn, "superuser")
            views_clean(ac, "app")
            # 3. unreachable and unresolvable hosts, with the decoy password in the URL (superuser session)
            with pg.connect() as sc:
                sc.execute("SET pg_redis.connect_timeout = '300ms'")
                sc.execute("SET pg_redis.password_file = ''")
                for host in ("10.255.255.1:6379", "no-such-host.invalid:6379", f"127.0.0.1:{_closed_port()}"):
                    sc.execute("SELECT set_config('pg_redis.url', %s, false)", (f"redis://u:{URL_SECRET}@{host}/0",))
                    try_calls(sc, f"superuser, {host}")
    finally:
        if module_redis.running():
            module_redis.stop()
        module_redis.extra_args[module_redis.extra_args.index("--requirepass") + 1] = FILE_SECRET
        module_redis.password = FILE_SECRET
        module_redis.start()
    m.rc = module_redis.client(decode_responses=True)
    m.idle(timeout=30)                           # delivery resumed with the right password
    m.conn.execute("SELECT redis_resync('sec_pw')")       # Redis restarted empty
    m.idle(timeout=30)
    assert_redis_equals_table(m.pg, m.rc, t)
    assert len(errors) >= 12, errors
    time.sleep(0.5)
    assert "pg_redis:" in pg.read_log_since(logpos), "the failures above should be in the server log"
    bad = leaking_lines(pg.read_log(), SECRETS)        # the whole log, the worker's lines included
    assert not bad, "a password in the server log:\n" + "\n".join(bad[:5])


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("password", ["pa ss-Word7", "quo'te-Word7"])
def test_passwords_with_spaces_or_quotes_are_redacted_too(make_pg, make_redis, password):
    srv = make_redis(extra_args=["--requirepass", password])
    url = f"redis://:{password}@127.0.0.1:{srv.port}/0"
    cluster = make_pg(conf_lines=["pg_redis.url = '" + url.replace("'", "''") + "'"])
    with cluster.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        assert one(c, "SELECT redis_ping()") == "PONG", "the URL with this password works"
        c.execute("CREATE TABLE pw (id int PRIMARY KEY)")
        c.execute("SELECT redis_mirror('pw')")
        logpos = cluster.log_position()
        srv.kill()
        c.execute("INSERT INTO pw VALUES (1)")
        e = expect_error(c, "SELECT redis_ping()", sqlstate="08")
        last = wait_until(lambda: one(c, "SELECT last_error FROM redis_stats"), 15, what="last_error")
    time.sleep(0.5)
    leaks = [f"message: {e.diag.message_primary}"] if password in str(e) else []
    leaks += [f"redis_stats.last_error: {last}"] if password in last else []
    leaks += leaking_lines(cluster.read_log_since(logpos), (password,))[:3]
    assert not leaks, "\n".join(leaks)


def test_zz_no_backend_crashed(pg):
    log = pg.read_log()
    bad = [line for line in log.splitlines()
           if "terminated by signal" in line or "PANIC" in line or ("server process" in line and "exited" in line)]
    assert not bad, "\n".join(bad[:10])

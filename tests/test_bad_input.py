"""Bad, odd and hostile input across pg_redis' SQL surface (issue 6, item 4), against real
PostgreSQL 15 and real redis-server processes: NULL in every argument of the mirror and
read-through functions (a documented NULL result or a 22023 `pg_redis:` error, never a silent
no-op or a hang); empty strings; a 512 MB value and one past Redis' proto-max-bulk-len; replies
that are not valid UTF-8 or hold NUL bytes (22021); keys with spaces, CR/LF, RESP fragments, glob
characters and unicode (literal key bytes, nothing injected); filters and key templates crafted
to inject SQL (refused at redis_mirror time, or taken literally); exotic column types, very wide
rows, other schemas and quoted names compared field by field with `row_to_json`; relations that
cannot be mirrored (42809); and odd key values for redis_fetch. Every case must end in a clear
`pg_redis:` error or in correct data, never in a backend crash (the connection is checked after
each risky call and the server log at the end). Key-value tests use the `db` session and the
test's own Redis; mirror tests use the module cluster, whose worker delivers to `module_redis`.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from harness import backend_alive, expect_error
from helpers import REFERENCE_SETTINGS, MirrorCtx, one
from test_mirror import ODD_SETTINGS, assert_redis_equals_table

BAD_ARG = "22023"
PRIVILEGE = "42501"
WRONG_OBJECT = "42809"
BAD_TEXT = "22021"
TOO_LARGE = "54000"


class Ctx(MirrorCtx):
    """MirrorCtx plus handing a table to another role."""

    def owned_by(self, role, table):
        self.conn.execute(f'ALTER TABLE {table} OWNER TO "{role}"')
        self.conn.execute('GRANT EXECUTE ON FUNCTION redis_mirror(regclass,text,text,text[],integer,text,text,text,'
                          f'text,boolean), redis_unmirror(regclass,boolean) TO "{role}"')


@pytest.fixture
def m(ext, module_redis):
    module_redis.client().flushall()
    ctx = Ctx(ext, module_redis)
    yield ctx
    ctx.close()


def outcome(conn, query, params=None):
    """('ok', rows) or ('error', exc); an error must be a 22023 pg_redis: error."""
    try:
        cur = conn.execute(query, params)
        rows = cur.fetchall() if cur.description else []
        res = ("ok", rows)
    except psycopg.Error as e:
        assert e.sqlstate == BAD_ARG, f"{query!r}: expected a result or {BAD_ARG}, got {e.sqlstate}: {e.diag.message_primary}"
        assert (e.diag.message_primary or "").startswith("pg_redis:"), f"{query!r}: {e.diag.message_primary!r}"
        res = ("error", e)
    assert backend_alive(conn), f"backend died after {query!r}"
    return res


def refused(conn, query, params=None, states=(BAD_ARG,)):
    e = expect_error(conn, query, params, sqlstate=list(states))
    assert backend_alive(conn)
    return e


# ----------------------------------------------------------------------------------------
# NULL arguments


def test_null_arguments_of_mirror_and_read_through_functions(m):
    """Every argument of redis_mirror, redis_unmirror, redis_resync, redis_verify, redis_fetch,
    redis_drain, redis_retry and redis_backfill_step, NULL in turn: a documented NULL / default or
    a 22023 `pg_redis:` error — never another error, a crash, or a silent change."""
    t = m.table("bi_nul", "id int PRIMARY KEY, v text", "VALUES (1, 'one'), (2, 'two')")
    m.mirror(t)
    m.idle()
    c = m.conn
    problems = []

    def check(query, want):
        try:
            kind, val = outcome(c, query)
            if kind == "ok" and want is not None:
                assert want(val), f"{query}: unexpected result {val!r}"
        except AssertionError as e:
            problems.append(str(e).splitlines()[0])

    check("SELECT redis_unmirror(NULL)", lambda v: False)            # must be refused
    check("SELECT redis_unmirror(NULL, true)", lambda v: False)
    check("SELECT redis_resync(NULL)", lambda v: v == [(None,)])     # STRICT
    check("SELECT * FROM redis_verify(NULL)", lambda v: v == [])
    check("SELECT * FROM redis_verify(NULL, true)", lambda v: v == [])
    check("SELECT * FROM redis_backfill_step(NULL)", lambda v: v == [])
    check("SELECT redis_drain(NULL)", lambda v: v[0][0] >= 0)       # documented: all
    check("SELECT redis_retry(NULL)", lambda v: v[0][0] >= 0)       # documented: all mirrors
    check("SELECT redis_fetch(NULL, '1')", lambda v: v == [(None,)])
    check("SELECT redis_fetch(NULL, VARIADIC NULL::text[])", lambda v: v == [(None,)])
    check("SELECT redis_fetch('bi_nul', NULL)", lambda v: False)    # a key value is needed
    check("SELECT redis_fetch('bi_nul', VARIADIC NULL::text[])", lambda v: False)
    check("SELECT redis_fetch('bi_nul', VARIADIC ARRAY[NULL]::text[])", lambda v: False)
    check("SELECT redis_fetch('bi_nul', '1', NULL)", lambda v: False)
    # repair => NULL: no repair (or refused); it must not repair anything
    m.rc.delete("bi_nul:1")
    check("SELECT missing, repaired FROM redis_verify('bi_nul', NULL)", lambda v: v == [(1, 0)])
    time.sleep(0.3)
    assert not m.rc.exists("bi_nul:1"), "redis_verify(t, NULL) repaired: NULL is not true"
    check("SELECT redis_resync('bi_nul')", None)
    m.idle()
    # purge => NULL: unmirrored without purging (or refused); the keys stay either way
    check("SELECT redis_unmirror('bi_nul', NULL)", None)
    time.sleep(0.3)
    assert m.rc.exists("bi_nul:1") and m.rc.exists("bi_nul:2"), "redis_unmirror(t, NULL) purged the keys"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("arg,default", [
    ("key_template", "bi_nuldef:{id}"), ("format", "json"), ("columns", None), ("ttl_seconds", None),
    ("mode", "queue"), ("action", "write"), ("filter", None), ("stream", None), ("backfill", None),
])
def test_null_optional_argument_of_redis_mirror_means_its_default(m, arg, default):
    """SPEC §3: arguments left out take their defaults. Passing NULL explicitly either means the
    same default, or is refused with 22023 — never a mirror with a NULL setting."""
    t = m.table("bi_nuldef", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    kind, _ = outcome(m.conn, f"SELECT redis_mirror('bi_nuldef', {arg} => NULL)")
    if kind == "error":
        assert one(m.conn, "SELECT count(*) FROM redis_mirrors WHERE mirror = 'bi_nuldef'::regclass") == 0
        return
    if arg != "backfill":
        got = one(m.conn, f"SELECT {arg}::text FROM redis_mirrors WHERE mirror = 'bi_nuldef'::regclass")
        assert got == default, f"redis_mirror({arg} => NULL) recorded {got!r}, not the default {default!r}"
    m.conn.execute("INSERT INTO bi_nuldef VALUES (2, 'two')")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t)  # backfill => NULL: the default (true) backfills row 1


def test_null_elements_in_key_value_arrays(db, r):
    """NULL elements (not covered by test_kv's NULL_CALLS): placeholders in MGET, nothing in DEL,
    an object of only nulls in HSET."""
    r.set("a", "1")
    assert one(db, "SELECT redis_mget(ARRAY[NULL, 'a', NULL]::text[])") == [None, "1", None]
    assert one(db, "SELECT redis_mget(ARRAY[NULL]::text[])") == [None]
    assert one(db, "SELECT redis_del(VARIADIC ARRAY[NULL, NULL]::text[])") == 0
    assert one(db, "SELECT redis_del(NULL::text, 'a')") == 1
    kind, _ = outcome(db, """SELECT redis_hset('h', '{"a": null, "b": null}')""")
    assert r.exists("h") == 0, "an object of only nulls must not create a hash"


def test_backfill_procedure_with_null_table_ends(m):
    with m.pg.connect() as c:
        c.add_notice_handler(lambda d: None)
        c.execute("SET statement_timeout = '2s'")
        t0 = time.monotonic()
        try:
            c.execute("CALL redis_backfill(NULL)")
        except psycopg.Error as e:
            assert e.sqlstate == BAD_ARG and e.diag.message_primary.startswith("pg_redis:"), \
                f"CALL redis_backfill(NULL) after {time.monotonic() - t0:.1f}s: {e.sqlstate} {e.diag.message_primary}"
        assert backend_alive(c)


# ----------------------------------------------------------------------------------------
# Empty strings


def test_empty_strings_in_key_value_functions(db, r):
    assert one(db, """SELECT redis_hset('eh', '{"": ""}')""") == 1
    assert r.hget("eh", "") == b"", "an empty field name and value are a field, not nothing"
    assert one(db, "SELECT redis_hget('eh', '')") == ""
    assert one(db, "SELECT redis_hgetall('eh')") == {"": ""}
    assert one(db, "SELECT redis_publish('', '')") == 0
    assert one(db, "SELECT redis_command('SET', 'ek', '')") == "OK"
    assert one(db, "SELECT redis_mget(ARRAY['ek', 'missing'])") == ["", None]
    e = expect_error(db, "SELECT redis_command('')", sqlstate=["38000", BAD_ARG])
    assert "unknown command" in e.diag.message_primary.lower() or "command" in e.diag.message_primary, e
    kind, _ = outcome(db, "SELECT redis_incrby('', 5)")
    if kind == "ok":
        assert r.get("") == b"5"
    assert backend_alive(db) and one(db, "SELECT redis_ping()") == "PONG"


def test_empty_strings_in_mirror_arguments_and_rows(m):
    t = m.table("bi_empty", "k text PRIMARY KEY, v text, n int")
    for arg in ("format", "mode", "action"):
        e = refused(m.conn, f"SELECT redis_mirror('bi_empty', {arg} => '')")
        assert arg in e.diag.message_primary, e.diag.message_primary
    refused(m.conn, "SELECT redis_mirror('bi_empty', columns => ARRAY[''])")
    refused(m.conn, "SELECT redis_mirror('bi_empty', key_template => '  ')")
    # an empty or blank filter / stream: no filter / no stream, or refused
    for arg in ("filter", "stream"):
        kind, _ = outcome(m.conn, f"SELECT redis_mirror('bi_empty', {arg} => '  ')")
        if kind == "ok":
            assert one(m.conn, f"SELECT {arg} FROM redis_mirrors WHERE mirror = 'bi_empty'::regclass") is None
    # rows made of empty strings: an empty key value and empty fields are data, not NULL
    m.conn.execute("SELECT redis_mirror('bi_empty', format => 'hash')")
    m.conn.execute("INSERT INTO bi_empty VALUES ('', '', 0), ('x', '', NULL)")
    m.idle()
    assert m.rc.hgetall("bi_empty:") == {"k": "", "v": "", "n": "0"}
    assert m.rc.hgetall("bi_empty:x") == {"k": "x", "v": ""}, "an empty string field must stay, only NULL goes"
    assert one(m.conn, "SELECT redis_fetch('bi_empty', '')") == {"k": "", "v": "", "n": 0}
    m.conn.execute("SELECT redis_mirror('bi_empty')")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t, key_sql="'bi_empty:' || k")


# ----------------------------------------------------------------------------------------
# Huge values


def test_value_of_512mb_is_stored(db, make_redis):
    """Redis' largest string (proto-max-bulk-len, 512 MB): stored whole, and the session works on."""
    srv = make_redis(extra_args=["--maxmemory", "3gb"])
    db.execute("SELECT set_config('pg_redis.url', %s, false)", (srv.url,))
    db.execute("SET pg_redis.command_timeout = '120s'")
    size = 512 * 1024 * 1024
    rc = srv.client(socket_timeout=120)
    try:
        db.execute("SELECT redis_set('big512', repeat('x', %s) || 'END')", (size - 3,))
        assert rc.strlen("big512") == size
        assert rc.getrange("big512", size - 4, size) == b"xEND"
        assert one(db, "SELECT redis_ping()") == "PONG"
    finally:
        rc.delete("big512")
        rc.close()
    assert backend_alive(db)


def test_value_past_proto_max_bulk_len_is_a_clear_error(db, r):
    db.execute("SET pg_redis.command_timeout = '120s'")
    size = 512 * 1024 * 1024 + 1
    t0 = time.monotonic()
    e = expect_error(db, "SELECT redis_set('big513', repeat('x', %s))", (size,), sqlstate=None)
    took = time.monotonic() - t0
    assert backend_alive(db)
    assert r.exists("big513") == 0
    assert one(db, "SELECT redis_ping()") == "PONG", "the session must work right after"
    msg = e.diag.message_primary or ""
    assert not (e.sqlstate or "").startswith(("08", "XX")), \
        f"Redis is up and answered: a connection/internal error is misleading: {e.sqlstate} {msg!r} ({took:.1f}s)"
    assert e.sqlstate in (TOO_LARGE, "38000"), f"{e.sqlstate} {msg!r}"
    assert any(w in msg.lower() for w in ("large", "bulk", "size", "512")), f"the message should say why: {msg!r}"


# ----------------------------------------------------------------------------------------
# Replies that are not text


def test_replies_that_are_not_valid_utf8_are_22021(db, r):
    """docs/errors.md: a reply read as text that is not valid UTF-8 or holds NUL bytes is 22021,
    pointing to the bytea variant; the bytea variant returns the bytes."""
    r.set("bad", b"\xff\xfe")
    r.set("surrogate", b"a\xed\xa0\x80b")        # CESU-8 surrogate: not UTF-8
    r.set("overlong", b"\xc0\xaf")               # overlong '/'
    r.set("nul", b"a\x00b")
    r.hset("h", b"f", b"\xff")
    r.hset("hk", b"\xfe", b"v")                  # a field name that is not UTF-8
    r.rpush("l", b"ok", b"\xfe")
    r.set(b"key\xff", b"v")                      # a key name that is not UTF-8
    for key in ("bad", "surrogate", "overlong", "nul"):
        e = expect_error(db, "SELECT redis_get(%s)", (key,), sqlstate=BAD_TEXT)
        assert key in e.diag.message_primary and "redis_get_bytea" in e.diag.message_primary, e.diag.message_primary
    assert bytes(one(db, "SELECT redis_get_bytea('bad')")) == b"\xff\xfe"
    assert bytes(one(db, "SELECT redis_get_bytea('nul')")) == b"a\x00b"
    for q in ("SELECT redis_mget(ARRAY['h', 'bad'])", "SELECT redis_hget('h', 'f')", "SELECT redis_hgetall('h')",
              "SELECT redis_hgetall('hk')", "SELECT redis_command('GET', 'bad')",
              "SELECT redis_command('LRANGE', 'l', '0', '-1')", "SELECT redis_command('KEYS', 'key*')"):
        expect_error(db, q, sqlstate=BAD_TEXT)
        assert backend_alive(db)
    # valid 4-byte UTF-8 passes
    r.set("emoji", "🚀 ok".encode())
    assert one(db, "SELECT redis_get('emoji')") == "🚀 ok"
    assert one(db, "SELECT redis_ping()") == "PONG"


# ----------------------------------------------------------------------------------------
# Keys with odd bytes


ODD_KEYS = [
    "with space", "tab\there", "new\nline", "crlf\r\nSET injected 1\r\n",
    "*3\r\n$3\r\nSET\r\n$8\r\ninjected\r\n$1\r\n1\r\n", "{braces}", "{{double}}", "}{", "quote'\"",
    "back\\slash", "ünïcödé", "日本語キー", "emoji 🚀🔥", "rtl עברית", "combining e\u0301", "glob*?[a-z]",
    "%s%n%x", "\u00a0nbsp\u2028ls", "-", "$-1\r\n",
]


def test_keys_with_odd_bytes_are_literal(db, r):
    r.set("sentinel", "still here")
    for i, k in enumerate(ODD_KEYS):
        db.execute("SELECT redis_set(%s, %s)", (k, f"v{i}"))
        assert r.get(k.encode()) == f"v{i}".encode(), f"key {k!r} not stored as its bytes: {sorted(r.keys('*'))[:30]}"
        assert one(db, "SELECT redis_get(%s)", (k,)) == f"v{i}"
        assert one(db, "SELECT redis_exists(%s)", (k,)) is True
        assert one(db, "SELECT redis_command('GET', %s)", (k,)) == f"v{i}"
        assert one(db, "SELECT redis_hset(%s, jsonb_build_object(%s::text, %s::text))", (k + ":h", k, f"f{i}")) == 1
        assert r.hget((k + ":h").encode(), k.encode()) == f"f{i}".encode()
    assert one(db, "SELECT redis_mget(%s)", (ODD_KEYS,)) == [f"v{i}" for i in range(len(ODD_KEYS))]
    assert r.exists("injected") == 0, "a key made of RESP fragments ran a command"
    assert r.dbsize() == 1 + 2 * len(ODD_KEYS), sorted(r.keys("*"))
    assert one(db, "SELECT redis_del(VARIADIC %s)", (ODD_KEYS + [k + ":h" for k in ODD_KEYS],)) == 2 * len(ODD_KEYS)
    assert r.keys("*") == [b"sentinel"] and r.get("sentinel") == b"still here"
    # a key prefix made of odd bytes is prepended literally too
    db.execute("SELECT set_config('pg_redis.key_prefix', %s, false)", ("pre fix\r\n{x}:",))
    db.execute("SELECT redis_set('k', 'v')")
    db.execute("SELECT redis_command('SET', 'k2', 'v2')")
    assert r.get(b"pre fix\r\n{x}:k") == b"v" and r.get(b"pre fix\r\n{x}:k2") == b"v2", sorted(r.keys("*"))


def test_long_key_errors_stay_readable(db, r):
    key = "L" * 1_000_000
    r.hset(key, "f", "v")
    e = expect_error(db, "SELECT redis_get(%s)", (key,), sqlstate="38000")
    msg = e.diag.message_primary
    assert "WRONGTYPE" in msg and len(msg) < 2000, f"a 1 MB key in a {len(msg)}-character message"
    assert one(db, "SELECT redis_hget(%s, 'f')", (key,)) == "v"
    assert one(db, "SELECT redis_del(%s)", (key,)) == 1


# ----------------------------------------------------------------------------------------
# Filters crafted to inject SQL


INJECTED_FILTERS = [
    "true) OR (SELECT pg_sleep(1)) IS NULL OR (true",
    "1=1; DROP TABLE bi_victim",
    "true; DROP TABLE bi_victim",
    "id > 0); DROP TABLE bi_victim; SELECT (true",
    "true /*",
    "id > 1 */ OR true /*",
    "id > 1\n) OR (true",
    "$1 = 1",
    "EXISTS (SELECT 1 FROM pg_redis_new)",      # the capture's transition tables are not the filter's
    "true) UNION (SELECT false",
    "true)::boolean, (SELECT pg_sleep(1)) IS NULL OR (true",
]
# the owner may not read these: refused at redis_mirror time (42501 or 22023)
UNREADABLE_FILTERS = [
    "id IN (SELECT id FROM bi_secret)",
    "v = (SELECT v FROM bi_secret LIMIT 1)",
    "EXISTS (SELECT 1 FROM redis_internal.queue)",
    "(SELECT count(*) FROM redis_internal.mirrors) >= 0",
]


def test_filters_crafted_to_inject_sql_are_refused(m):
    owner = m.role("bi_fowner")
    m.table("bi_victim", "id int PRIMARY KEY", "VALUES (1)")
    m.table("bi_secret", "id int PRIMARY KEY, v text", "VALUES (1, 'secret')")
    t = m.table("bi_f", "id int PRIMARY KEY, v text", "VALUES (1, 'a'), (2, 'b')")
    m.owned_by(owner, t)
    m.owned_by(owner, "bi_victim")
    with m.pg.connect(user=owner) as c:
        for flt in INJECTED_FILTERS:
            t0 = time.monotonic()
            e = refused(c, "SELECT redis_mirror('bi_f', filter => %s)", (flt,))
            assert time.monotonic() - t0 < 0.95, f"filter {flt!r} ran (pg_sleep) before it was refused"
            assert "filter" in e.diag.message_primary, e.diag.message_primary
        for flt in UNREADABLE_FILTERS:
            refused(c, "SELECT redis_mirror('bi_f', filter => %s)", (flt,), states=(BAD_ARG, PRIVILEGE))
    assert one(m.conn, "SELECT to_regclass('bi_victim') IS NOT NULL"), "a filter dropped a table"
    assert one(m.conn, "SELECT count(*) FROM redis_mirrors WHERE mirror = 'bi_f'::regclass") == 0
    assert one(m.conn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'bi_f'::regclass") == 0
    assert m.rc.dbsize() == 0


COMMENT_FILTERS = [
    "id > 2 -- ) OR (true",
    "id > 2 --\n OR v = 'keep'",
    "id > 2 /* ) OR (true */",
    "v <> ';--/*'",
    "v <> ')'' OR true --'",
]


@pytest.mark.parametrize("flt", COMMENT_FILTERS)
def test_filters_with_comments_and_quotes_mean_what_postgres_says(m, flt):
    """Comment and quote tricks: refused, or accepted with exactly the meaning PostgreSQL gives the
    expression (rows for which `(filter)` is true, and only those, in Redis)."""
    t = m.table("bi_fc", "id int PRIMARY KEY, v text",
                "VALUES (1, 'keep'), (2, ';--/*'), (3, ')'' OR true --'), (4, 'x'), (5, NULL)")
    kind, _ = outcome(m.conn, "SELECT redis_mirror('bi_fc', filter => %s)", (flt,))
    if kind == "error":
        return
    where = f"({flt}\n)"
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t, where=where)
    m.conn.execute("INSERT INTO bi_fc VALUES (6, ';--/*'), (7, 'keep'), (0, 'keep')")
    m.conn.execute("UPDATE bi_fc SET v = 'x' WHERE id IN (2, 3)")
    m.conn.execute("UPDATE bi_fc SET v = ';--/*' WHERE id = 4")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t, where=where)


def test_remirror_with_a_narrower_filter_removes_rows_outside_it(m):
    t = m.table("bi_refilter", "id int PRIMARY KEY, v text", "SELECT g, 'v' FROM generate_series(1, 6) g")
    m.mirror(t, filter="id > 2")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t, where="id > 2")
    m.mirror(t, filter="id > 4")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t, where="id > 4", timeout=3)


# ----------------------------------------------------------------------------------------
# Key templates crafted to inject SQL or RESP


KEY_TEMPLATES = {
    "bi_kt1": ("it's:{id}", "it's:"),
    "bi_kt2": ("q'||pg_sleep(1)||':{id}", "q'||pg_sleep(1)||':"),
    "bi_kt3": ("crlf\r\n*1\r\n$8\r\nFLUSHALL\r\n:{id}", "crlf\r\n*1\r\n$8\r\nFLUSHALL\r\n:"),
    "bi_kt4": ("g*[a]?:{id}", "g*[a]?:"),
    "bi_kt5": ("{{tag}}:é🚀 sp:{id}", "{tag}:é🚀 sp:"),
    "bi_kt6": ("semi;--/*:{id}:x", "semi;--/*:"),
}
DECOYS = {"gXaY:1": "decoy of the glob template", "gZ[a]Q:2": "decoy 2", "crlfX:1": "decoy 3"}


def test_key_template_literals_are_literal_key_bytes(m):
    """Quotes, SQL, CR/LF with RESP fragments, glob characters and braces in a template's literal
    text end up as literal key bytes; TRUNCATE removes exactly the layout's keys (glob characters
    escaped: decoys that an unescaped pattern would match survive)."""
    for k, v in DECOYS.items():
        m.rc.set(k, v)
    for t, (tpl, _) in KEY_TEMPLATES.items():
        m.table(t, "id int PRIMARY KEY, v text")
        m.mirror(t, key_template=tpl)
    for t in KEY_TEMPLATES:
        t0 = time.monotonic()
        m.conn.execute(f"INSERT INTO {t} VALUES (1, 'one'), (2, 'two')")
        assert time.monotonic() - t0 < 1.9, f"{t}: the template's literal text ran as SQL (pg_sleep)"
    m.idle()
    for t, (tpl, lit) in KEY_TEMPLATES.items():
        suffix = ":x" if tpl.endswith(":x") else ""
        for i, v in ((1, "one"), (2, "two")):
            key = f"{lit}{i}{suffix}"
            got = m.rc.get(key)
            assert got is not None and json.loads(got) == {"id": i, "v": v}, \
                f"{t}: template {tpl!r}: key {key!r} holds {got!r}; keys: {sorted(m.rc.keys('*'))}"
        assert one(m.conn, "SELECT redis_fetch(%s::regclass, '2')", (t,)) == {"id": 2, "v": "two"}
    assert m.rc.dbsize() == 2 * len(KEY_TEMPLATES) + len(DECOYS), sorted(m.rc.keys("*"))
    for t in KEY_TEMPLATES:
        m.conn.execute(f"TRUNCATE {t}")
    m.idle()
    assert sorted(m.rc.keys("*")) == sorted(DECOYS), "TRUNCATE removed other keys, or left its own"
    for k, v in DECOYS.items():
        assert m.rc.get(k) == v


def test_backslashes_in_template_and_filter_do_not_depend_on_the_writers_settings(m):
    t = m.table("bi_bs", "id int PRIMARY KEY, v text")
    m.mirror(t, key_template="b\\s:{id}", filter="v <> 'x\\y'")
    with m.pg.connect() as c:
        c.add_notice_handler(lambda d: None)
        c.execute("SET standard_conforming_strings = off")
        c.execute("INSERT INTO bi_bs VALUES (%s, %s), (%s, %s)", (1, "x\\y", 2, "other"))
    m.idle()
    keys = sorted(m.rc.keys("*"))
    assert keys == ["b\\s:2"], f"keys in Redis: {keys}"


# ----------------------------------------------------------------------------------------
# Exotic column types


EXOTIC_DDL = """id int PRIMARY KEY, m bi_mood, ma bi_mood[], p bi_pair, pa bi_pair[], d bi_posint, de bi_email,
    n numeric, f8 float8, f4 real, tz timestamptz, ts timestamp, dt date, iv interval,
    ia int[], ia2 int[][], ta text[], ja jsonb[], rng int4range, trng tstzrange, nr numrange,
    j json, jb jsonb, by bytea, u uuid, ip inet, cidr_ cidr, mac macaddr, pt point, bx box, bits varbit,
    tsv tsvector, x xml, ch "char", nm name,
    g int GENERATED ALWAYS AS (id * 10) STORED,
    gt text GENERATED ALWAYS AS (upper(coalesce(de::text, 'none'))) STORED"""
EXOTIC_COLS = ("id, m, ma, p, pa, d, de, n, f8, f4, tz, ts, dt, iv, ia, ia2, ta, ja, rng, trng, nr, j, jb, by, u, ip, "
               "cidr_, mac, pt, bx, bits, tsv, x, ch, nm")
EXOTIC_ROWS = r"""
 (1, 'hap"py', '{sad,"with space",NULL}', ROW(1, 'x"y\z', 1.50), ARRAY[ROW(1, 'a', NULL)::bi_pair, NULL],
  7, 'a@b.c', 12345678901234567890.123456789, 0.1, 0.1, '2024-02-29 23:59:59.999999+14',
  '2024-01-01 00:00:00', '2024-01-31', '1 year 2 mons -3 days 04:05:06.789',
  '{1,NULL,3}', '{{1,2},{3,4}}', '{"a,b","c\"d",NULL,""}', ARRAY['{"k":1}'::jsonb, 'null'::jsonb],
  '[1,5)', '[2024-01-01 00:00:00+00,2024-02-01 12:00:00+02)', '(1.5,2.5]',
  '{"a":[1,2.50,{"b":null}],"é":"\u00e9 ✓"}', '{"z":1,"a":[true,false],"n":1.0e2}', '\x00ff7f',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '10.1.2.3/8', '10.0.0.0/8', '08:00:2b:01:02:03', '(1.5,-2)',
  '((0,0),(1,1))', B'1011', 'a fat cat sat', '<a href="x">y &amp; z</a>', 'q', 'a name'),
 (2, 'sad', '{}', ROW(NULL, NULL, 'NaN'), '{}', 1, NULL, 'NaN', 'NaN', '-Infinity', 'infinity', '-infinity',
  'infinity', '0', '{}', '{{NULL,1},{2,NULL}}', '{}', '{}', 'empty', '(,)', '(,)', 'null', '"str"', '\x',
  NULL, '::1', '::/0', '00:00:00:00:00:00', '(0,0)', '((0,0),(0,0))', B'', '', '<e/>', ' ', ''),
 (3, 'ok', NULL, NULL, NULL, 2147483647, NULL, 'Infinity', 'Infinity', 'Infinity', '-infinity', 'infinity',
  '-infinity', '-178000000 years', NULL, NULL, NULL, NULL, NULL, NULL, NULL, '[]', '[1, "two", [3]]', NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, '-Infinity', '1e308', '-0', '1999-12-31 19:00:00-05', '0044-03-15 BC 12:00',
  '4713-01-01 BC', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '12', '-0.000001', NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"""


@pytest.fixture
def exotic_types(m):
    m.cleanup_sql.append("DROP TYPE IF EXISTS bi_mood, bi_pair CASCADE")
    m.cleanup_sql.append("DROP DOMAIN IF EXISTS bi_posint, bi_email CASCADE")
    m.conn.execute("DROP TYPE IF EXISTS bi_mood, bi_pair CASCADE")
    m.conn.execute("DROP DOMAIN IF EXISTS bi_posint, bi_email CASCADE")
    m.conn.execute("""CREATE TYPE bi_mood AS ENUM ('sad', 'ok', 'hap"py', 'with space')""")
    m.conn.execute("CREATE TYPE bi_pair AS (a int, b text, c numeric)")
    m.conn.execute("CREATE DOMAIN bi_posint AS int CHECK (VALUE > 0)")
    m.conn.execute("CREATE DOMAIN bi_email AS text CHECK (VALUE LIKE '%@%')")
    return m


def _fetch_matches_reference(m, table, ids):
    """redis_fetch (hit, then miss after DEL) returns row_to_json(t)::jsonb (reference settings)."""
    bad = []
    with m.pg.connect() as c:
        c.execute(REFERENCE_SETTINGS)
        for i in ids:
            q = (f"SELECT redis_fetch('{table}', %s) = (SELECT row_to_json(t)::jsonb FROM {table} t WHERE id = %s), "
                 f"redis_fetch('{table}', %s)::text")
            hit, got = c.execute(q, (str(i), i, str(i))).fetchone()
            m.rc.delete(f"{table}:{i}")
            miss, got2 = c.execute(q, (str(i), i, str(i))).fetchone()
            if not (hit and miss):
                ref = one(c, f"SELECT row_to_json(t)::jsonb::text FROM {table} t WHERE id = %s", (i,))
                bad.append(f"{table}:{i}: hit ok={hit} miss ok={miss}\n   got  {got}\n   want {ref}")
    return bad


@pytest.mark.parametrize("fmt", ["json", "hash"])
def test_exotic_column_types_are_mirrored_and_fetched_exactly(exotic_types, fmt):
    m = exotic_types
    t = m.table("bi_types", EXOTIC_DDL)
    m.mirror(t, format=fmt)
    with m.pg.connect() as c:
        c.execute(ODD_SETTINGS)      # the writer's own renderings all differ from the documented ones
        c.execute(f"INSERT INTO bi_types ({EXOTIC_COLS}) VALUES {EXOTIC_ROWS}")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t, fmt=fmt)
    with m.pg.connect() as c:
        c.execute(ODD_SETTINGS)
        c.execute("UPDATE bi_types SET p.b = 'changed', pa[2] = ROW(9, 'nine', 9.9)::bi_pair, ia2[1][1] = 42, "
                  "trng = '[2000-01-01,)', m = 'with space', de = 'new@x' WHERE id IN (1, 2)")
        c.execute("UPDATE bi_types SET id = 40 WHERE id = 4")
        c.execute("DELETE FROM bi_types WHERE id = 3")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t, fmt=fmt)
    bad = _fetch_matches_reference(m, t, (1, 2, 40, 5))
    assert not bad, "redis_fetch differs from row_to_json:\n" + "\n".join(bad)
    assert backend_alive(m.conn)


def test_hash_fetch_types_fields_back_like_row_to_json(m):
    t = m.table("bi_hj", "id int PRIMARY KEY, jb jsonb, j json, o oid",
                """VALUES (1, '"123"', '"true"', 4294967295), (2, '"[1]"', '"null"', 0)""")
    m.mirror(t, format="hash")
    m.idle()
    bad = _fetch_matches_reference(m, t, (1, 2))
    assert not bad, "\n".join(bad)


def test_fetch_of_a_json_nul_escape_is_a_clear_error(m):
    t = m.table("bi_nulesc", "id int PRIMARY KEY, j json", """VALUES (1, '{"a": "x\\u0000y"}')""")
    m.mirror(t)
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t)   # the mirror itself carries the escape faithfully
    e = expect_error(m.conn, "SELECT redis_fetch('bi_nulesc', '1')", sqlstate=None)
    assert backend_alive(m.conn)
    assert e.diag.message_primary.startswith("pg_redis:") and "bi_nulesc" in e.diag.message_primary, \
        f"{e.sqlstate}: {e.diag.message_primary!r}"


def test_columns_named_like_internal_aliases(m):
    """Column names the capture SQL might use as aliases (n, k, p, f, e, ok, o, nw, c, u, i, part, op)."""
    t = m.table("bi_alias", "id int PRIMARY KEY, n int, k text, p text, f bool, e text, ok text, o int, nw int, "
                            "c int, u int, i int, part int, op text",
                "VALUES (1, 2, 'k', 'p', false, 'e', 'ok', 3, 4, 5, 6, 7, 8, 'op')")
    m.mirror(t)
    m.conn.execute("UPDATE bi_alias SET n = 20, k = 'k2'")
    m.conn.execute("INSERT INTO bi_alias (id, n) VALUES (2, 1)")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t)
    assert one(m.conn, "SELECT redis_fetch('bi_alias', '1')")["k"] == "k2"


def test_column_named_r(m):
    t = m.table("bi_colr", "id int PRIMARY KEY, r int4range, v text")
    try:
        m.conn.execute("SELECT redis_mirror('bi_colr')")
    except psycopg.Error as e:   # refusing it clearly at redis_mirror time would be fine too
        assert e.sqlstate == BAD_ARG and e.diag.message_primary.startswith("pg_redis:"), e
        return
    m.conn.execute("INSERT INTO bi_colr VALUES (1, '[1,2)', 'x')")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t)
    assert one(m.conn, "SELECT redis_fetch('bi_colr', '1')") == {"id": 1, "r": "[1,2)", "v": "x"}


# ----------------------------------------------------------------------------------------
# Very wide and very large rows


@pytest.mark.parametrize("fmt", ["json", "hash"])
def test_very_wide_and_large_rows(m, fmt):
    ncols = 1200
    cols = ", ".join(f"c{i} int" for i in range(ncols))
    t = m.table("bi_wide", f"id int PRIMARY KEY, {cols}, big text")
    vals = ", ".join(str(i) for i in range(ncols))
    m.mirror(t, format=fmt)
    m.conn.execute(f"INSERT INTO bi_wide VALUES (1, {vals}, 'small'), (2, {vals}, repeat('é', 1000000))")
    m.conn.execute("UPDATE bi_wide SET c7 = NULL, c1199 = -1, big = big || 'tail' WHERE id = 2")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t, fmt=fmt)
    row = one(m.conn, "SELECT redis_fetch('bi_wide', '2')")
    assert len(row) == ncols + 2 and row["c1199"] == -1 and row["c7"] is None and len(row["big"]) == 1000004


# ----------------------------------------------------------------------------------------
# Schemas and quoted names


def test_other_schemas_and_quoted_names(m):
    sch = '"bi Sch.ema"'
    m.cleanup_sql.append(f"DROP SCHEMA IF EXISTS {sch} CASCADE")
    m.conn.execute(f"DROP SCHEMA IF EXISTS {sch} CASCADE")
    m.conn.execute(f"CREATE SCHEMA {sch}")
    t1 = f'{sch}."My ""Table"".x"'
    m.conn.execute(f'CREATE TABLE {t1} ("My Col" text NOT NULL, "a.b" int NOT NULL, "we""ird" text, "x{{y}}" int, '
                   f'id int, UNIQUE ("My Col", "a.b"))')
    m.conn.execute(f"""INSERT INTO {t1} VALUES ('one', 1, 'q"1', 10, 1), ('t w:o', 2, NULL, 20, 2), ('skip', 3, 'z', 30, 3)""")
    t2 = f'{sch}."Plain ""Dotted"".tbl"'
    m.conn.execute(f"CREATE TABLE {t2} (id int PRIMARY KEY, v text)")
    m.conn.execute(f"INSERT INTO {t2} VALUES (1, 'a'), (2, 'b')")
    # a template naming quoted columns, a filter and a column list with quoted names
    m.conn.execute("SELECT redis_mirror(%s, key_template => 'qt:{My Col}:{a.b}', filter => %s, columns => %s)",
                   (t1, "\"My Col\" <> 'skip' AND \"a.b\" > 0", ["My Col", "a.b", 'we"ird', "x{y}"]))
    # the default template of a table outside public
    m.conn.execute("SELECT redis_mirror(%s)", (t2,))
    tpl2 = one(m.conn, "SELECT key_template FROM redis_mirrors WHERE mirror = %s::regclass", (t2,))
    assert tpl2.endswith(":{id}") and "bi Sch.ema" in tpl2, tpl2
    lit2 = tpl2[: -len("{id}")].replace("{{", "{").replace("}}", "}")
    m.conn.execute(f"""INSERT INTO {t1} VALUES ('fo"ur', 4, 'w', 40, 4)""")
    m.conn.execute(f"UPDATE {t1} SET \"we\"\"ird\" = 'changed' WHERE \"a.b\" = 2")
    m.conn.execute(f"INSERT INTO {t2} VALUES (3, 'c')")
    m.idle()
    cols = ["My Col", "a.b", 'we"ird', "x{y}"]
    assert_redis_equals_table(m.pg, m.rc, t1, key_sql="'qt:' || \"My Col\" || ':' || \"a.b\"", pattern="qt:*",
                              where="\"My Col\" <> 'skip'", columns=cols)
    assert_redis_equals_table(m.pg, m.rc, t2, key_sql=f"{_lit(lit2)} || id", pattern=_glob(lit2) + "*")
    assert one(m.conn, "SELECT redis_fetch(%s::regclass, 't w:o', '2')", (t1,)) == \
        {"My Col": "t w:o", "a.b": 2, 'we"ird': "changed", "x{y}": 20}
    assert one(m.conn, "SELECT redis_fetch(%s::regclass, '3')", (t2,)) == {"id": 3, "v": "c"}
    # renaming the table keeps the mirror working (docs/mirroring.md)
    m.conn.execute(f'ALTER TABLE {t2} RENAME TO "renamed ""again"""')
    t2b = f'{sch}."renamed ""again"""'
    m.conn.execute(f"INSERT INTO {t2b} VALUES (4, 'd')")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, t2b, key_sql=f"{_lit(lit2)} || id", pattern=_glob(lit2) + "*")
    m.conn.execute(f"TRUNCATE {t1}, {t2b}")
    m.idle()
    assert m.rc.dbsize() == 0, sorted(m.rc.keys("*"))


def _lit(s):
    return "'" + s.replace("'", "''") + "'"


def _glob(s):
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


# ----------------------------------------------------------------------------------------
# Relations that cannot be mirrored


def test_relations_that_cannot_be_mirrored_are_refused(m):
    sch = '"bi part"'
    m.cleanup_sql.append(f"DROP SCHEMA IF EXISTS {sch} CASCADE")
    m.conn.execute(f"DROP SCHEMA IF EXISTS {sch} CASCADE")
    m.conn.execute(f"CREATE SCHEMA {sch}")
    m.conn.execute(f'CREATE TABLE {sch}."Parted ""t"""(id int PRIMARY KEY, v text) PARTITION BY RANGE (id)')
    m.conn.execute(f'CREATE TABLE {sch}.p1 PARTITION OF {sch}."Parted ""t""" FOR VALUES FROM (0) TO (100)')
    m.conn.execute(f"CREATE SEQUENCE {sch}.seq")
    m.conn.execute(f"CREATE TYPE {sch}.comp AS (a int)")
    m.conn.execute(f"CREATE TABLE {sch}.plain (id int PRIMARY KEY)")
    parted = f'{sch}."Parted ""t"""'
    e = refused(m.conn, "SELECT redis_mirror(%s::regclass)", (parted,), states=(WRONG_OBJECT,))
    assert "partitioned" in e.diag.message_primary, e.diag.message_primary
    for rel in (f"{sch}.seq", f"{sch}.comp", f"{sch}.plain_pkey"):
        refused(m.conn, "SELECT redis_mirror(%s::regclass, 'bi_rk:{id}')", (rel,), states=(WRONG_OBJECT,))
    # a hand-written capture trigger on a partitioned table is refused too, and leaves no mirror
    e = expect_error(m.conn, f"CREATE TRIGGER t_ins AFTER INSERT ON {parted} REFERENCING NEW TABLE AS n "
                             "FOR EACH STATEMENT EXECUTE FUNCTION redis_mirror_trigger('key_template=bi_pt:{id}')",
                     sqlstate=[WRONG_OBJECT, BAD_ARG])
    assert one(m.conn, "SELECT count(*) FROM redis_mirrors WHERE mirror::text LIKE '%%Parted%%'") == 0
    # temporary tables, by call and by hand-written trigger
    with m.pg.connect() as c:
        c.execute("CREATE TEMP TABLE bi_tmp (id int PRIMARY KEY)")
        refused(c, "SELECT redis_mirror('bi_tmp')", states=(WRONG_OBJECT,))
        expect_error(c, "CREATE TRIGGER t_ins AFTER INSERT ON bi_tmp REFERENCING NEW TABLE AS n FOR EACH STATEMENT "
                        "EXECUTE FUNCTION redis_mirror_trigger('key_template=bi_tmp:{id}')", sqlstate=[WRONG_OBJECT, BAD_ARG])
        assert one(c, "SELECT count(*) FROM redis_mirrors WHERE mirror::text LIKE '%%bi_tmp'") == 0
    # the other functions on relations that are not mirrored: a clear pg_redis: error
    m.conn.execute(f"CREATE VIEW {sch}.v AS SELECT 1 AS id")
    for q in ("SELECT redis_fetch(%s::regclass, '1')", "SELECT * FROM redis_verify(%s::regclass)",
              "SELECT redis_resync(%s::regclass)", "SELECT redis_unmirror(%s::regclass)"):
        for rel in (f"{sch}.v", parted, f"{sch}.plain"):
            refused(m.conn, q, (rel,), states=(BAD_ARG, WRONG_OBJECT))
    assert backend_alive(m.conn)


def test_mirrored_partition_sees_writes_through_its_parent(m):
    m.cleanup_sql.append("DROP TABLE IF EXISTS bi_parent CASCADE")
    m.conn.execute("DROP TABLE IF EXISTS bi_parent CASCADE")
    m.conn.execute("CREATE TABLE bi_parent (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    m.conn.execute("CREATE TABLE bi_part1 PARTITION OF bi_parent FOR VALUES FROM (0) TO (100)")
    try:
        m.conn.execute("SELECT redis_mirror('bi_part1')")
    except psycopg.Error as e:   # refusing partitions clearly would be consistent too
        assert e.sqlstate == WRONG_OBJECT, e
        return
    m.conn.execute("INSERT INTO bi_part1 VALUES (1, 'direct')")
    m.conn.execute("INSERT INTO bi_parent VALUES (2, 'through the parent')")
    m.conn.execute("UPDATE bi_parent SET v = 'updated through the parent' WHERE id = 1")
    m.idle()
    assert_redis_equals_table(m.pg, m.rc, "bi_part1", timeout=3)


# ----------------------------------------------------------------------------------------
# Key values given to redis_fetch


def test_fetch_key_values_that_do_not_fit_the_key(m):
    t = m.table("bi_fkv", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    m.mirror(t)
    m.idle()
    for vals in (["abc"], [""], ["1", "2"], ["99999999999999999999"], ["1\r\nFLUSHALL"]):
        ph = ", ".join(["%s"] * len(vals))
        refused(m.conn, f"SELECT redis_fetch('bi_fkv', {ph})", vals)
    assert one(m.conn, "SELECT redis_fetch('bi_fkv', '2')") is None
    assert m.rc.keys("*") == ["bi_fkv:1"], "a refused or empty fetch wrote something"
    # a text key: odd key values are literal key bytes
    t2 = m.table("bi_fkt", "k text PRIMARY KEY, v text")
    m.mirror(t2)
    odd = ["a b", "c\r\nSET injected 1\r\n", "{x}", "é🚀", "*"]
    for i, k in enumerate(odd):
        m.conn.execute("INSERT INTO bi_fkt VALUES (%s, %s)", (k, f"v{i}"))
    m.idle()
    for i, k in enumerate(odd):
        m.rc.delete(f"bi_fkt:{k}")
        assert one(m.conn, "SELECT redis_fetch('bi_fkt', %s)", (k,)) == {"k": k, "v": f"v{i}"}      # miss
        assert json.loads(m.rc.get(f"bi_fkt:{k}")) == {"k": k, "v": f"v{i}"}
        assert one(m.conn, "SELECT redis_fetch('bi_fkt', %s)", (k,)) == {"k": k, "v": f"v{i}"}      # hit
    assert m.rc.exists("injected") == 0


def test_fetch_with_a_non_canonical_key_value_never_serves_stale_rows(m):
    t = m.table("bi_fcanon", "id int PRIMARY KEY, v text", "VALUES (1, 'one')")
    m.mirror(t)
    m.idle()
    for spelled in ("01", " 1", "+1"):   # the row, or a clear 22023 refusal
        kind, rows = outcome(m.conn, "SELECT redis_fetch('bi_fcanon', %s)", (spelled,))
        assert kind == "error" or rows == [({"id": 1, "v": "one"},)], rows
    m.conn.execute("UPDATE bi_fcanon SET v = 'two' WHERE id = 1")
    m.idle()
    for spelled in ("01", " 1", "+1"):
        kind, rows = outcome(m.conn, "SELECT redis_fetch('bi_fcanon', %s)", (spelled,))
        assert kind == "error" or rows == [({"id": 1, "v": "two"},)], \
            f"redis_fetch('bi_fcanon', {spelled!r}) after the update returned {rows}"
    assert m.keys("bi_fcanon:*") == ["bi_fcanon:1"], f"keys outside the table's rendering: {m.keys('bi_fcanon:*')}"


# ----------------------------------------------------------------------------------------
# Last: nothing crashed


def test_zz_no_backend_crashed(pg):
    log = pg.read_log()
    bad = [line for line in log.splitlines()
           if "terminated by signal" in line or "PANIC" in line or ("server process" in line and "exited" in line)]
    assert not bad, "\n".join(bad[:10])

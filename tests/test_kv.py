"""Integration tests of the key-value functions (SPEC §2), settings (§1), errors (§6) and
security (§7) against real PostgreSQL 15 and real redis-server processes.

Most tests use the `db` fixture: a superuser session of the module's cluster, pointed (with
SET pg_redis.url) at a fresh redis-server of its own, `redis`, whose client is `r`.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import socket
import threading
import time
import uuid

import psycopg
import pytest

from harness import IS_ROOT, PG_OS_USER, backend_alive, expect_error

CONN_CLASS = "08"          # connection failures
BAD_ARG = "22023"          # invalid_parameter_value
PRIVILEGE = "42501"        # insufficient_privilege
CANCELED = "57014"         # query_canceled (timeouts and cancels)

KV_FUNCTIONS = [
    "redis_get(text)", "redis_set(text,text,integer)", "redis_del(text[])", "redis_exists(text)",
    "redis_expire(text,integer)", "redis_ttl(text)", "redis_incrby(text,bigint)",
    "redis_mget(text[])", "redis_hset(text,jsonb)", "redis_hget(text,text)", "redis_hgetall(text)",
    "redis_publish(text,text)", "redis_ping()", "redis_command(text[])",
    "redis_get_bytea(text)", "redis_set_bytea(text,bytea,integer)",
]


def one(conn, query, params=None):
    """The single value of a one-row, one-column query."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, f"{query!r} returned no row"
    return row[0]


def uniq(prefix="k"):
    return f"{prefix}:{uuid.uuid4().hex[:8]}"


def null_or_bad_arg(conn, query, params=None):
    """A NULL argument may give a NULL result (STRICT) or a 22023 error, never a crash.
    Returns ('null', None) or ('error', exc)."""
    try:
        v = one(conn, query, params)
        outcome = ("value", v)
    except psycopg.Error as e:
        assert e.sqlstate == BAD_ARG, f"{query!r}: NULL argument: expected NULL or {BAD_ARG}, got {e.sqlstate}: {e}"
        assert str(e.diag.message_primary).startswith("pg_redis:"), str(e)
        outcome = ("error", e)
    assert backend_alive(conn), f"backend died after {query!r}"
    return outcome


# ----------------------------------------------------------------------------------------
# Installation, signatures, settings


def test_functions_exist_with_spec_signatures(db):
    rows = db.execute(
        """SELECT p.oid::regprocedure::text, pg_get_function_result(p.oid),
                  pg_get_function_arguments(p.oid)
             FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
             JOIN pg_extension e ON e.oid = d.refobjid
            WHERE e.extname = 'pg_redis'""").fetchall()
    sigs = {r[0].replace(" ", ""): (r[1], r[2]) for r in rows}
    missing = [f for f in KV_FUNCTIONS if f not in sigs]
    assert not missing, f"missing functions {missing}; have {sorted(sigs)}"
    expect = {
        "redis_get(text)": ("text", "key text"),
        "redis_set(text,text,integer)": ("void", "key text, value text, ttl_seconds integer DEFAULT NULL::integer"),
        "redis_del(text[])": ("bigint", "VARIADIC keys text[]"),
        "redis_exists(text)": ("boolean", "key text"),
        "redis_expire(text,integer)": ("boolean", "key text, ttl_seconds integer"),
        "redis_ttl(text)": ("bigint", "key text"),
        "redis_incrby(text,bigint)": ("bigint", "key text, delta bigint DEFAULT 1"),
        "redis_mget(text[])": ("text[]", "keys text[]"),
        "redis_hset(text,jsonb)": ("bigint", "key text, fields jsonb"),
        "redis_hget(text,text)": ("text", "key text, field text"),
        "redis_hgetall(text)": ("jsonb", "key text"),
        "redis_publish(text,text)": ("bigint", "channel text, message text"),
        "redis_ping()": ("text", ""),
        "redis_command(text[])": ("jsonb", "VARIADIC args text[]"),
        "redis_get_bytea(text)": ("bytea", "key text"),
        "redis_set_bytea(text,bytea,integer)": ("void", "key text, value bytea, ttl_seconds integer DEFAULT NULL::integer"),
    }
    wrong = {f: (sigs[f], want) for f, want in expect.items() if sigs[f] != want}
    assert not wrong, "result/argument lists differ from SPEC §2 (have, want): " + repr(wrong)


def test_functions_land_in_public_schema(db):
    schemas = {r[0] for r in db.execute(
        "SELECT DISTINCT n.nspname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE p.proname IN ('redis_get','redis_set','redis_command')")}
    assert schemas == {"public"}, schemas


def test_settings_defaults_and_units(db):
    assert one(db, "SHOW pg_redis.connect_timeout") == "2s"
    assert one(db, "SHOW pg_redis.command_timeout") == "5s"
    assert one(db, "SHOW pg_redis.key_prefix") == ""
    db.execute("SET pg_redis.command_timeout = '500ms'")
    assert one(db, "SHOW pg_redis.command_timeout") == "500ms"
    db.execute("SET pg_redis.connect_timeout = '1s'")
    assert one(db, "SHOW pg_redis.connect_timeout") == "1s"


def test_url_visible_to_superuser(db, redis):
    assert one(db, "SHOW pg_redis.url") == redis.url


def test_url_change_takes_effect_at_next_call(db, r, make_redis):
    other = make_redis()
    db.execute("SELECT redis_set('where', 'first')")
    db.execute("SELECT set_config('pg_redis.url', %s, false)", (other.url,))
    db.execute("SELECT redis_set('where', 'second')")
    assert r.get("where") == b"first"
    assert other.client().get("where") == b"second"


# ----------------------------------------------------------------------------------------
# Every function


def test_ping(db):
    assert one(db, "SELECT redis_ping()") == "PONG"


def test_set_get_roundtrip(db, r):
    db.execute("SELECT redis_set('greeting', 'hello')")
    assert r.get("greeting") == b"hello"
    assert one(db, "SELECT redis_get('greeting')") == "hello"
    # unicode survives
    db.execute("SELECT redis_set('uni', 'Grüße, 世界 🚀')")
    assert r.get("uni") == "Grüße, 世界 🚀".encode()
    assert one(db, "SELECT redis_get('uni')") == "Grüße, 世界 🚀"


def test_get_missing_is_null(db):
    assert one(db, "SELECT redis_get('nope')") is None
    assert one(db, "SELECT redis_get('nope') IS NULL") is True


def test_empty_value_is_not_null(db, r):
    db.execute("SELECT redis_set('empty', '')")
    assert r.get("empty") == b""
    assert one(db, "SELECT redis_get('empty')") == "", "an empty string value must come back as '', not NULL"


def test_empty_key(db, r):
    # Redis allows the empty key; pg_redis may either allow it or refuse it with 22023.
    try:
        db.execute("SELECT redis_set('', 'v')")
    except psycopg.Error as e:
        assert e.sqlstate == BAD_ARG and e.diag.message_primary.startswith("pg_redis:"), e
        return
    assert r.get("") == b"v"
    assert one(db, "SELECT redis_get('')") == "v"
    assert one(db, "SELECT redis_exists('')") is True
    assert one(db, "SELECT redis_del('')") == 1


def test_set_with_ttl(db, r):
    db.execute("SELECT redis_set('t', 'v', 100)")
    assert 95 <= r.ttl("t") <= 100
    assert 95 <= one(db, "SELECT redis_ttl('t')") <= 100
    db.execute("SELECT redis_set('t', 'v2')")  # plain SET clears the TTL
    assert r.ttl("t") == -1
    db.execute("SELECT redis_set('t', 'v3', NULL)")
    assert r.get("t") == b"v3" and r.ttl("t") == -1


@pytest.mark.parametrize("ttl", [0, -5])
def test_set_with_bad_ttl(db, r, ttl):
    expect_error(db, "SELECT redis_set('badttl', 'v', %s)", (ttl,), sqlstate=BAD_ARG)
    assert r.exists("badttl") == 0
    assert backend_alive(db)


def test_large_value_10mb(db, r):
    size = 10 * 1024 * 1024
    db.execute("SELECT redis_set('big', repeat('x', %s))", (size,))
    assert r.strlen("big") == size
    assert one(db, "SELECT length(redis_get('big'))") == size
    val = "".join(chr(ord("a") + i % 26) for i in range(1000)) * (size // 1000)
    db.execute("SELECT redis_set('big2', %s)", (val,))
    assert r.get("big2") == val.encode()
    got = one(db, "SELECT md5(redis_get('big2'))")
    assert got == hashlib.md5(val.encode()).hexdigest()


def test_bytea_nul_bytes_roundtrip(db, r):
    data = bytes(range(256)) * 4 + b"\x00\x00end\x00"
    db.execute("SELECT redis_set_bytea('bin', %s)", (data,))
    assert r.get("bin") == data
    assert bytes(one(db, "SELECT redis_get_bytea('bin')")) == data
    # and what another client wrote
    r.set("bin2", b"\x00a\x00\xff\xfe")
    assert bytes(one(db, "SELECT redis_get_bytea('bin2')")) == b"\x00a\x00\xff\xfe"


def test_bytea_empty_missing_ttl_large(db, r):
    assert one(db, "SELECT redis_get_bytea('missing')") is None
    db.execute("SELECT redis_set_bytea('e', ''::bytea)")
    assert r.get("e") == b""
    assert bytes(one(db, "SELECT redis_get_bytea('e')")) == b""
    db.execute("SELECT redis_set_bytea('bt', '\\x00'::bytea, 50)")
    assert 45 <= r.ttl("bt") <= 50
    big = os.urandom(10 * 1024 * 1024)
    db.execute("SELECT redis_set_bytea('bigbin', %s)", (big,))
    assert r.get("bigbin") == big
    assert bytes(one(db, "SELECT redis_get_bytea('bigbin')")) == big


def test_get_text_of_binary_value_is_clear_error(db, r):
    # A value that is not valid text (NUL byte, invalid UTF-8) must be a clear error, not garbage.
    r.set("nul", b"a\x00b")
    e = expect_error(db, "SELECT redis_get('nul')", sqlstate=None)
    assert not (e.sqlstate or "").startswith("XX"), f"internal error for a NUL byte: {e.sqlstate} {e}"
    r.set("badutf8", b"\xff\xfe\xfd")
    e = expect_error(db, "SELECT redis_get('badutf8')", sqlstate=None)
    assert not (e.sqlstate or "").startswith("XX"), f"internal error for invalid UTF-8: {e.sqlstate} {e}"
    assert backend_alive(db)


def test_get_wrong_type_is_error(db, r):
    r.hset("h", "f", "v")
    e = expect_error(db, "SELECT redis_get('h')", sqlstate=None)
    assert "WRONGTYPE" in str(e), f"Redis' answer should be in the message: {e}"
    assert "'h'" in str(e) or " h" in str(e) or "h:" in str(e) or "\"h\"" in str(e), \
        f"the key should be named in the message: {e}"


def test_del(db, r):
    r.mset({"a": 1, "b": 2, "c": 3})
    assert one(db, "SELECT redis_del('a')") == 1
    assert one(db, "SELECT redis_del('b', 'c', 'missing')") == 2
    assert one(db, "SELECT redis_del(VARIADIC ARRAY['a','b'])") == 0
    assert r.dbsize() == 0
    # an empty list of keys: 0, or a 22023 error
    try:
        assert one(db, "SELECT redis_del(VARIADIC ARRAY[]::text[])") == 0
    except psycopg.Error as e:
        assert e.sqlstate == BAD_ARG, e
    assert backend_alive(db)


def test_exists(db, r):
    r.set("x", "1")
    assert one(db, "SELECT redis_exists('x')") is True
    assert one(db, "SELECT redis_exists('y')") is False


def test_expire_and_ttl(db, r):
    r.set("x", "1")
    assert one(db, "SELECT redis_ttl('x')") == -1, "no expiry must be -1"
    assert one(db, "SELECT redis_ttl('missing')") == -2, "missing key must be -2"
    assert one(db, "SELECT redis_expire('x', 60)") is True
    assert 55 <= r.ttl("x") <= 60
    assert 55 <= one(db, "SELECT redis_ttl('x')") <= 60
    assert one(db, "SELECT redis_expire('missing', 60)") is False


def test_incrby(db, r):
    assert one(db, "SELECT redis_incrby('n')") == 1
    assert one(db, "SELECT redis_incrby('n')") == 2
    assert one(db, "SELECT redis_incrby('n', 40)") == 42
    assert one(db, "SELECT redis_incrby('n', -50)") == -8
    assert one(db, "SELECT redis_incrby('big', 9223372036854775807)") == 9223372036854775807
    assert r.get("n") == b"-8"
    expect_error(db, "SELECT redis_incrby('big', 1)", sqlstate=None)  # overflow: Redis refuses
    r.set("s", "abc")
    e = expect_error(db, "SELECT redis_incrby('s', 1)", sqlstate=None)
    assert "not an integer" in str(e), e


def test_mget(db, r):
    r.mset({"a": "1", "b": "2"})
    assert one(db, "SELECT redis_mget(ARRAY['a','missing','b'])") == ["1", None, "2"]
    assert one(db, "SELECT redis_mget(ARRAY['b','a','b'])") == ["2", "1", "2"]
    assert one(db, "SELECT array_length(redis_mget(ARRAY['x','y','z']), 1)") == 3
    assert one(db, "SELECT redis_mget(ARRAY['x','y'])") == [None, None]
    r.hset("h", "f", "v")
    assert one(db, "SELECT redis_mget(ARRAY['a','h'])") == ["1", None], "MGET gives nil for a non-string key"
    # empty array: empty array or 22023
    try:
        v = one(db, "SELECT redis_mget(ARRAY[]::text[])")
        assert v in ([], None), v
    except psycopg.Error as e:
        assert e.sqlstate == BAD_ARG, e
    assert backend_alive(db)


def test_hset_hget_hgetall(db, r):
    assert one(db, """SELECT redis_hset('user:1', '{"name":"Ada","born":1815}')""") == 2
    assert r.hgetall("user:1") == {b"name": b"Ada", b"born": b"1815"}, \
        "JSON strings are stored without quotes, numbers as their text"
    assert one(db, """SELECT redis_hset('user:1', '{"name":"Ada L.","lang":"en"}')""") == 1, "fields added"
    assert one(db, "SELECT redis_hget('user:1', 'name')") == "Ada L."
    assert one(db, "SELECT redis_hget('user:1', 'born')") == "1815"
    assert one(db, "SELECT redis_hget('user:1', 'nope')") is None
    assert one(db, "SELECT redis_hget('nokey', 'name')") is None
    assert one(db, "SELECT redis_hgetall('user:1')") == {"name": "Ada L.", "born": "1815", "lang": "en"}
    assert one(db, "SELECT redis_hgetall('nokey')") is None, "hgetall of a missing key is NULL, not {}"
    assert one(db, "SELECT redis_hgetall('nokey') IS NULL") is True


def test_hset_booleans_and_nested(db, r):
    db.execute("""SELECT redis_hset('h2', '{"t":true,"x":{"a":1}}')""")
    assert r.hget("h2", "t") == b"true"
    # nested JSON is stored as its JSON text
    import json
    assert json.loads(r.hget("h2", "x")) == {"a": 1}


@pytest.mark.parametrize("arg", ['[1,2]', '"str"', '42', 'null'])
def test_hset_non_object_is_bad_arg(db, r, arg):
    expect_error(db, "SELECT redis_hset('hx', %s::jsonb)", (arg,), sqlstate=BAD_ARG)
    assert r.exists("hx") == 0


def test_hset_empty_object(db, r):
    try:
        assert one(db, "SELECT redis_hset('he', '{}')") == 0
    except psycopg.Error as e:
        assert e.sqlstate == BAD_ARG, e
    assert r.exists("he") == 0


def test_publish(db, r):
    assert one(db, "SELECT redis_publish('chan', 'nobody')") == 0
    ps = r.pubsub()
    ps.subscribe("chan")
    assert ps.get_message(timeout=2)["type"] == "subscribe"
    assert one(db, "SELECT redis_publish('chan', 'hello')") == 1
    msg = ps.get_message(timeout=2)
    assert msg and msg["data"] == b"hello", msg
    ps.close()


# ----------------------------------------------------------------------------------------
# NULL arguments: NULL result or 22023, never a crash

NULL_CALLS = [
    "SELECT redis_get(NULL)",
    "SELECT redis_set(NULL, 'v')",
    "SELECT redis_set('nk', NULL)",
    "SELECT redis_del(NULL::text)",
    "SELECT redis_del(VARIADIC NULL::text[])",
    "SELECT redis_del('a', NULL)",
    "SELECT redis_exists(NULL)",
    "SELECT redis_expire(NULL, 10)",
    "SELECT redis_expire('nk', NULL)",
    "SELECT redis_ttl(NULL)",
    "SELECT redis_incrby(NULL)",
    "SELECT redis_incrby('nk', NULL)",
    "SELECT redis_mget(NULL)",
    "SELECT redis_mget(ARRAY['a', NULL])",
    "SELECT redis_hset(NULL, '{\"a\":1}')",
    "SELECT redis_hset('nk', NULL)",
    "SELECT redis_hget(NULL, 'f')",
    "SELECT redis_hget('nk', NULL)",
    "SELECT redis_hgetall(NULL)",
    "SELECT redis_publish(NULL, 'm')",
    "SELECT redis_publish('c', NULL)",
    "SELECT redis_command(NULL)",
    "SELECT redis_command(VARIADIC NULL::text[])",
    "SELECT redis_command('GET', NULL)",
    "SELECT redis_get_bytea(NULL)",
    "SELECT redis_set_bytea(NULL, '\\x00')",
    "SELECT redis_set_bytea('nk', NULL)",
]


@pytest.mark.parametrize("query", NULL_CALLS)
def test_null_arguments(db, r, query):
    null_or_bad_arg(db, query)
    assert r.exists("nk") == 0, f"{query}: a NULL argument must not write anything"


# ----------------------------------------------------------------------------------------
# redis_command


def test_command_reply_types(db, r):
    assert one(db, "SELECT redis_command('PING')") == "PONG"
    assert one(db, "SELECT redis_command('SET', 'k', 'v')") == "OK"
    assert one(db, "SELECT redis_command('GET', 'k')") == "v"
    v = one(db, "SELECT redis_command('GET', 'missing')")
    assert v is None
    assert one(db, "SELECT redis_command('GET', 'missing') = 'null'::jsonb") is True, \
        "nil must be JSON null (jsonb 'null'), not SQL NULL"
    assert one(db, "SELECT redis_command('INCRBY', 'n', '5')") == 5
    assert one(db, "SELECT jsonb_typeof(redis_command('INCRBY', 'n', '5'))") == "number"
    assert one(db, "SELECT redis_command('RPUSH', 'l', 'a', 'b', 'c')") == 3
    assert one(db, "SELECT redis_command('LRANGE', 'l', '0', '-1')") == ["a", "b", "c"]
    assert one(db, "SELECT redis_command('LRANGE', 'nol', '0', '-1')") == []
    r.hset("h", mapping={"f1": "v1", "f2": "v2"})
    h = one(db, "SELECT redis_command('HGETALL', 'h')")
    assert h in ({"f1": "v1", "f2": "v2"}, ["f1", "v1", "f2", "v2"]) or sorted(h) == ["f1", "f2", "v1", "v2"], h
    # nested arrays
    r.zadd("z", {"m1": 1, "m2": 2})
    assert one(db, "SELECT redis_command('ZRANGE', 'z', '0', '-1', 'WITHSCORES')") in (
        ["m1", "1", "m2", "2"], [["m1", 1], ["m2", 2]], [["m1", 1.0], ["m2", 2.0]])
    scan = one(db, "SELECT redis_command('SCAN', '0', 'COUNT', '100')")
    assert isinstance(scan, list) and len(scan) == 2 and isinstance(scan[1], list), scan
    # the reply type is case-insensitive in the command name
    assert one(db, "SELECT redis_command('ping')") == "PONG"


def test_command_error_reply_is_error(db, r):
    r.set("s", "x")
    e = expect_error(db, "SELECT redis_command('LPUSH', 's', 'y')", sqlstate=None)
    assert "WRONGTYPE" in str(e), e
    e = expect_error(db, "SELECT redis_command('NOSUCHCOMMAND', 'a')", sqlstate=None)
    assert "unknown command" in str(e).lower() or "ERR" in str(e), e
    assert backend_alive(db)
    assert one(db, "SELECT redis_ping()") == "PONG"


def test_command_no_args(db):
    expect_error(db, "SELECT redis_command(VARIADIC ARRAY[]::text[])", sqlstate=BAD_ARG)


@pytest.mark.parametrize("args", [
    ["SELECT", "1"], ["select", "2"], ["MULTI"], ["EXEC"], ["SUBSCRIBE", "ch"], ["PSUBSCRIBE", "c*"],
    ["HELLO", "3"], ["MONITOR"], ["QUIT"], ["RESET"], ["CLIENT", "REPLY", "OFF"],
])
def test_command_refused(db, args):
    placeholders = ", ".join(["%s"] * len(args))
    expect_error(db, f"SELECT redis_command({placeholders})", args, sqlstate=BAD_ARG)
    assert one(db, "SELECT redis_ping()") == "PONG", "the session's connection must still work"


def test_command_refused_keeps_db(db, r):
    # after a refused SELECT, commands still go to db 0
    with pytest.raises(psycopg.Error):
        db.execute("SELECT redis_command('SELECT', '5')")
    db.execute("SELECT redis_set('still0', 'yes')")
    assert r.get("still0") == b"yes"


# ----------------------------------------------------------------------------------------
# Key prefix


def test_key_prefix(db, r):
    db.execute("SET pg_redis.key_prefix = 'app1:'")
    db.execute("SELECT redis_set('k', 'v')")
    assert r.get("app1:k") == b"v", f"keys in Redis: {r.keys('*')}"
    assert r.exists("k") == 0
    assert one(db, "SELECT redis_get('k')") == "v"
    db.execute("SELECT redis_set_bytea('b', '\\x01')")
    assert r.get("app1:b") == b"\x01"
    assert one(db, "SELECT redis_incrby('n', 3)") == 3 and r.get("app1:n") == b"3"
    assert one(db, """SELECT redis_hset('h', '{"f":"v"}')""") == 1 and r.hget("app1:h", "f") == b"v"
    assert one(db, "SELECT redis_hgetall('h')") == {"f": "v"}
    assert one(db, "SELECT redis_hget('h', 'f')") == "v"
    assert one(db, "SELECT redis_mget(ARRAY['k','n','zz'])") == ["v", "3", None]
    assert one(db, "SELECT redis_exists('k')") is True
    assert one(db, "SELECT redis_expire('k', 100)") is True and 95 <= r.ttl("app1:k") <= 100
    assert 95 <= one(db, "SELECT redis_ttl('k')") <= 100
    r.set("k2", "unprefixed")
    assert one(db, "SELECT redis_get('k2')") is None, "a prefixed session must not see unprefixed keys"
    assert one(db, "SELECT redis_del('k', 'n', 'k2')") == 2
    assert r.get("k2") == b"unprefixed"


def test_key_prefix_command(db, r):
    db.execute("SET pg_redis.key_prefix = 'app1:'")
    # commands whose keys can be prefixed are prefixed
    assert one(db, "SELECT redis_command('SET', 'ck', 'cv')") == "OK"
    assert r.get("app1:ck") == b"cv", f"redis_command SET under a prefix; keys: {r.keys('*')}"
    assert one(db, "SELECT redis_command('GET', 'ck')") == "cv"
    # commands whose keys cannot be prefixed are refused
    for args in (["KEYS", "*"], ["SCAN", "0"], ["FLUSHDB"], ["FLUSHALL"], ["RANDOMKEY"]):
        placeholders = ", ".join(["%s"] * len(args))
        expect_error(db, f"SELECT redis_command({placeholders})", args, sqlstate=BAD_ARG)
    assert r.get("app1:ck") == b"cv", "FLUSHDB must not have run"


def test_key_prefix_superuser_only(pg, db):
    user = pg.create_role(f"np_{uuid.uuid4().hex[:6]}")
    with pg.connect(user=user) as c:
        expect_error(c, "SET pg_redis.key_prefix = 'x:'", sqlstate=PRIVILEGE, prefix=None)


# ----------------------------------------------------------------------------------------
# Redis down, restarted, slow, blocked


def test_redis_down_class_08_no_password(pg, db, make_redis):
    secret = "secret123"
    srv = make_redis(extra_args=["--requirepass", secret])
    assert secret in srv.url
    db.execute("SELECT set_config('pg_redis.url', %s, false)", (srv.url,))
    assert one(db, "SELECT redis_ping()") == "PONG"
    db.execute("SELECT redis_set('k', 'v')")
    logpos = pg.log_position()
    srv.kill()
    for q in ("SELECT redis_ping()", "SELECT redis_get('k')", "SELECT redis_set('k', 'v2')",
              "SELECT redis_command('GET', 'k')"):
        e = expect_error(db, q, sqlstate=CONN_CLASS)
        for part in (e.diag.message_primary, e.diag.message_detail, e.diag.message_hint, e.diag.context):
            assert secret not in (part or ""), f"password leaked in {q}: {part!r}"
    assert backend_alive(db)
    time.sleep(0.3)
    log = pg.read_log_since(logpos)
    assert "pg_redis:" in log, "errors should be in the server log"
    assert secret not in log, "password in the server log:\n" + \
        "\n".join(line for line in log.splitlines() if secret in line)


def test_wrong_password_no_leak(pg, db, make_redis):
    srv = make_redis(extra_args=["--requirepass", "rightpw"])
    logpos = pg.log_position()
    db.execute("SELECT set_config('pg_redis.url', %s, false)", (f"redis://:wrongpw987@127.0.0.1:{srv.port}/0",))
    e = expect_error(db, "SELECT redis_ping()", sqlstate=[CONN_CLASS, "28", PRIVILEGE])
    assert "wrongpw987" not in str(e) and "wrongpw987" not in (e.diag.message_detail or "")
    time.sleep(0.3)
    assert "wrongpw987" not in pg.read_log_since(logpos)


def test_nothing_listening_class_08(db):
    port = _closed_port()
    db.execute("SELECT set_config('pg_redis.url', %s, false)", (f"redis://127.0.0.1:{port}/0",))
    t = time.monotonic()
    e = expect_error(db, "SELECT redis_ping()", sqlstate=CONN_CLASS)
    assert time.monotonic() - t < 3
    assert str(port) in str(e), f"the address should be in the message: {e}"


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_silent_server_connect_bounded(db):
    """A server that accepts TCP connections but never answers: bounded by the timeouts."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    try:
        db.execute("SET pg_redis.connect_timeout = '500ms'")
        db.execute("SET pg_redis.command_timeout = '500ms'")
        db.execute("SELECT set_config('pg_redis.url', %s, false)", (f"redis://127.0.0.1:{port}/0",))
        t = time.monotonic()
        expect_error(db, "SELECT redis_ping()", sqlstate=[CONN_CLASS, CANCELED])
        assert time.monotonic() - t < 3, "connect/command timeouts not enforced"
        assert backend_alive(db)
    finally:
        lsock.close()


def test_redis_restarted_mid_session(db, redis, r):
    db.execute("SELECT redis_set('before', '1')")
    assert one(db, "SELECT redis_ping()") == "PONG"
    pid = db.info.backend_pid
    redis.restart()
    assert one(db, "SELECT redis_ping()") == "PONG", "first call after a Redis restart should reconnect"
    db.execute("SELECT redis_set('after', '2')")
    assert redis.client().get("after") == b"2"
    assert db.info.backend_pid == pid


def test_redis_restarted_each_function_recovers(db, redis):
    """After a restart, at most one failed call (08) per session; the next one works."""
    one(db, "SELECT redis_ping()")
    redis.restart()
    try:
        db.execute("SELECT redis_set('x', '1')")
    except psycopg.Error as e:
        assert (e.sqlstate or "").startswith(CONN_CLASS), e
    db.execute("SELECT redis_set('x', '1')")
    assert one(db, "SELECT redis_get('x')") == "1"


def test_redis_down_then_up(db, redis):
    one(db, "SELECT redis_ping()")
    redis.stop()
    expect_error(db, "SELECT redis_ping()", sqlstate=CONN_CLASS)
    expect_error(db, "SELECT redis_ping()", sqlstate=CONN_CLASS)
    redis.start()
    assert one(db, "SELECT redis_ping()") == "PONG"


def test_command_timeout_debug_sleep(db, redis):
    assert one(db, "SELECT redis_ping()") == "PONG"  # connection open before Redis stalls
    db.execute("SET pg_redis.command_timeout = '500ms'")
    sleeper = threading.Thread(target=lambda: redis.client().execute_command("DEBUG", "SLEEP", "3"))
    sleeper.start()
    time.sleep(0.2)
    try:
        t = time.monotonic()
        e = expect_error(db, "SELECT redis_get('k')", sqlstate=CANCELED)
        took = time.monotonic() - t
        assert took < 2.0, f"command_timeout 500ms, call took {took:.2f}s"
        assert took >= 0.3, f"call failed after {took:.2f}s, before the timeout"
        assert "500" in str(e) or "timeout" in str(e).lower(), e
    finally:
        sleeper.join()
    assert one(db, "SELECT redis_ping()") == "PONG", "the session works again after the stall"


def test_client_pause(db, redis):
    one(db, "SELECT redis_ping()")
    db.execute("SET pg_redis.command_timeout = '300ms'")
    redis.client_pause(1500)
    t = time.monotonic()
    expect_error(db, "SELECT redis_set('p', '1')", sqlstate=CANCELED)
    assert time.monotonic() - t < 1.2
    time.sleep(1.5)
    assert one(db, "SELECT redis_ping()") == "PONG"


def test_sigstop_server_times_out(db, redis):
    one(db, "SELECT redis_ping()")
    db.execute("SET pg_redis.command_timeout = '500ms'")
    redis.pause()
    try:
        t = time.monotonic()
        expect_error(db, "SELECT redis_ping()", sqlstate=[CANCELED, CONN_CLASS])
        assert time.monotonic() - t < 2.5
    finally:
        redis.resume()
    assert one(db, "SELECT redis_ping()") == "PONG"


def test_blocking_command_timeout_added(db, r):
    """BLPOP's own timeout is added to command_timeout: BLPOP k 1 with 500ms returns nil after ~1s."""
    one(db, "SELECT redis_ping()")
    db.execute("SET pg_redis.command_timeout = '500ms'")
    t = time.monotonic()
    v = one(db, "SELECT redis_command('BLPOP', 'empty', '1')")
    took = time.monotonic() - t
    assert v is None, v
    assert 0.8 <= took < 2.0, took
    r.rpush("full", "x")
    assert one(db, "SELECT redis_command('BLPOP', 'full', '1')") == ["full", "x"]


def test_cancel_blpop(db, r):
    one(db, "SELECT redis_ping()")
    canceled_at = []

    def cancel():
        time.sleep(0.5)
        canceled_at.append(time.monotonic())
        db.cancel()

    th = threading.Thread(target=cancel)
    th.start()
    try:
        e = expect_error(db, "SELECT redis_command('BLPOP', 'k', '0')", sqlstate=CANCELED, prefix=None)
        took = time.monotonic() - canceled_at[0]
        assert took < 1.0, f"cancel took {took:.2f}s to end the BLPOP"
    finally:
        th.join()
    assert one(db, "SELECT redis_ping()") == "PONG"
    # the abandoned BLPOP must not steal a later element
    r.rpush("k", "item")
    time.sleep(0.3)
    assert r.lrange("k", 0, -1) == [b"item"], "an abandoned BLPOP consumed the element"
    assert one(db, "SELECT redis_command('LPOP', 'k')") == "item"


def test_statement_timeout_blpop(db, r):
    one(db, "SELECT redis_ping()")
    db.execute("SET statement_timeout = '300ms'")
    t = time.monotonic()
    expect_error(db, "SELECT redis_command('BLPOP', 'k', '0')", sqlstate=CANCELED, prefix=None)
    took = time.monotonic() - t
    db.execute("RESET statement_timeout")
    assert took < 1.3, f"statement_timeout 300ms, BLPOP ended after {took:.2f}s"
    assert one(db, "SELECT redis_ping()") == "PONG"
    r.rpush("k", "item")
    time.sleep(0.3)
    assert r.llen("k") == 1, "an abandoned BLPOP consumed the element"


# ----------------------------------------------------------------------------------------
# URL forms, password file


def test_unix_socket_url(db, make_redis, tmp_path):
    sockdir = f"/tmp/pg_redis_sock_{uuid.uuid4().hex[:8]}"
    os.makedirs(sockdir)
    os.chmod(sockdir, 0o777)
    try:
        sock = f"{sockdir}/redis.sock"
        srv = make_redis(extra_args=["--unixsocket", sock, "--unixsocketperm", "777"])
        db.execute("SELECT set_config('pg_redis.url', %s, false)", (f"unix://{sock}",))
        assert one(db, "SELECT redis_ping()") == "PONG"
        db.execute("SELECT redis_set('via', 'unix')")
        assert srv.client().get("via") == b"unix"
    finally:
        import shutil
        shutil.rmtree(sockdir, ignore_errors=True)


def test_password_file(pg, db, make_redis):
    secret = "filepw456"
    srv = make_redis(extra_args=["--requirepass", secret])
    pwfile = pg.dir / f"redis_pw_{uuid.uuid4().hex[:6]}"
    pwfile.write_text(secret + "\n")
    if IS_ROOT:
        pw = pwd.getpwnam(PG_OS_USER)
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    os.chmod(pwfile, 0o600)
    logpos = pg.log_position()
    db.execute("SELECT set_config('pg_redis.url', %s, false)", (f"redis://127.0.0.1:{srv.port}/0",))
    db.execute("SELECT set_config('pg_redis.password_file', %s, false)", (str(pwfile),))
    assert one(db, "SELECT redis_ping()") == "PONG"
    srv.kill()
    e = expect_error(db, "SELECT redis_ping()", sqlstate=CONN_CLASS)
    assert secret not in str(e)
    time.sleep(0.3)
    assert secret not in pg.read_log_since(logpos)


def test_url_db_number(db, redis):
    db.execute("SELECT set_config('pg_redis.url', %s, false)", (f"redis://127.0.0.1:{redis.port}/3",))
    db.execute("SELECT redis_set('indb3', 'x')")
    assert redis.client(db=3).get("indb3") == b"x"
    assert redis.client(db=0).exists("indb3") == 0


# ----------------------------------------------------------------------------------------
# Privileges (non-superusers)


@pytest.fixture
def app_role(pg, db):
    name = pg.create_role(f"app_{uuid.uuid4().hex[:8]}")
    yield name
    with pg.connect() as c:
        c.execute(f'DROP OWNED BY "{name}"')
        c.execute(f'DROP ROLE "{name}"')


def _grant_all_but_command(db, role):
    fns = [row[0] for row in db.execute(
        """SELECT p.oid::regprocedure::text
             FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
             JOIN pg_extension e ON e.oid = d.refobjid
            WHERE e.extname = 'pg_redis' AND p.proname LIKE 'redis\\_%%'
              AND p.proname <> 'redis_command'""")]
    for fn in fns:
        db.execute(f'GRANT EXECUTE ON ROUTINE {fn} TO "{role}"')  # procedures too
    return fns


def test_not_executable_by_public(db, app_role):
    for fn in KV_FUNCTIONS:
        has = one(db, "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (app_role, fn))
        assert has is False, f"{fn} is executable by a role without any GRANT (PUBLIC?)"


def test_non_superuser_cannot_see_or_set_url(pg, db, app_role):
    with pg.connect(user=app_role) as c:
        expect_error(c, "SHOW pg_redis.url", sqlstate=PRIVILEGE, prefix=None)
        rows = c.execute("SELECT setting FROM pg_settings WHERE name = 'pg_redis.url'").fetchall()
        assert rows == [], f"pg_settings shows pg_redis.url to a non-superuser: {rows!r}"
        try:  # PostgreSQL refuses (42501) even with missing_ok; NULL would be fine too
            v = one(c, "SELECT current_setting('pg_redis.url', true)")
        except psycopg.Error as e:
            assert e.sqlstate == PRIVILEGE, e
            v = None
        assert v is None, f"current_setting(.., missing_ok) shows the URL to a non-superuser: {v!r}"
        expect_error(c, "SET pg_redis.url = 'redis://evil:1/0'", sqlstate=PRIVILEGE, prefix=None)
        expect_error(c, "SELECT set_config('pg_redis.url', 'redis://evil:1/0', false)",
                     sqlstate=PRIVILEGE, prefix=None)
        expect_error(c, "SET pg_redis.command_timeout = '1ms'", sqlstate=PRIVILEGE, prefix=None)


def test_non_superuser_needs_grant(pg, db, app_role):
    with pg.connect(user=app_role) as c:
        e = expect_error(c, "SELECT redis_get('k')", sqlstate=PRIVILEGE, prefix=None)
        assert "redis_get" in str(e)


def test_non_superuser_with_grants_but_no_command(pg, db, module_redis, app_role):
    granted = _grant_all_but_command(db, app_role)
    assert any(g.startswith("redis_get(") for g in granted), granted
    key = uniq("granted")
    with pg.connect(user=app_role) as c:
        # the app role uses the server's pg_redis.url (module_redis)
        c.execute("SELECT redis_set(%s, 'ok')", (key,))
        assert one(c, "SELECT redis_get(%s)", (key,)) == "ok"
        assert module_redis.client().get(key) == b"ok"
        expect_error(c, "SELECT redis_command('GET', %s)", (key,), sqlstate=PRIVILEGE, prefix=None)
        expect_error(c, "SELECT redis_command('FLUSHALL')", sqlstate=PRIVILEGE, prefix=None)
    assert module_redis.client().get(key) == b"ok"


def test_role_key_prefix_confines(pg, db, module_redis, app_role):
    _grant_all_but_command(db, app_role)
    db.execute(f"ALTER ROLE \"{app_role}\" SET pg_redis.key_prefix = 'tenant1:'")
    key = uniq("k")
    with pg.connect(user=app_role) as c:
        assert one(c, "SHOW pg_redis.key_prefix") == "tenant1:"
        c.execute("SELECT redis_set(%s, 'mine')", (key,))
        expect_error(c, "SET pg_redis.key_prefix = ''", sqlstate=PRIVILEGE, prefix=None)
    mr = module_redis.client()
    assert mr.get("tenant1:" + key) == b"mine"
    assert mr.exists(key) == 0


# ----------------------------------------------------------------------------------------
# Without preloading


def test_works_without_preload(make_pg, redis):
    cluster = make_pg(preload=False, conf_lines=[f"pg_redis.url = '{redis.url}'"])
    with cluster.connect() as c:
        assert one(c, "SHOW shared_preload_libraries") == ""
        c.execute("CREATE EXTENSION pg_redis")
        assert one(c, "SELECT redis_ping()") == "PONG"
        c.execute("SELECT redis_set('np', 'yes')")
        assert one(c, "SELECT redis_get('np')") == "yes"
        assert redis.client().get("np") == b"yes"
        assert backend_alive(c)
    # a fresh session (library loaded on first use) works too
    with cluster.connect() as c:
        assert one(c, "SELECT redis_get('np')") == "yes"


def test_error_messages_prefixed(db, r):
    r.set("s", "x")
    for q in ("SELECT redis_incrby('s')", "SELECT redis_hgetall('s')",
              "SELECT redis_command(VARIADIC ARRAY[]::text[])", "SELECT redis_command('MULTI')"):
        expect_error(db, q, sqlstate=None)

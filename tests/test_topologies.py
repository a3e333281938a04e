"""Beyond one plain Redis (SPEC §1, §8; issue 8): TLS with server verification and client
certificates, ACL users, unix sockets, Sentinel failover during a mirror's load, and a Redis Cluster
resharded during a mirror's load. Real servers started by tests/topology_harness.py.

Each group has its own PostgreSQL cluster (the worker reads pg_redis.url and pg_redis.topology
from postgresql.conf), so the groups do not share the module fixtures of conftest.py.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid

import psycopg
import pytest

from harness import PgCluster, RedisServer, expect_error
from helpers import one, wait_for_worker, wait_until
from test_mirror import assert_redis_equals_table, redis_table_diff
from topology_harness import ClusterView, RedisClusterSet, SentinelSet, TlsRedisServer, make_certs

BAD_ARG = "22023"
PRIVILEGE = "42501"
CANNOT_CONNECT = "08001"
NOT_SUPPORTED = "0A000"


def tls_conf(srv: TlsRedisServer, client_cert: bool = True) -> list[str]:
    c = srv.certs
    lines = [f"pg_redis.url = '{srv.url}'", f"pg_redis.tls_ca_file = '{c.ca}'"]
    if client_cert:
        lines += [f"pg_redis.tls_cert_file = '{c.client_crt}'", f"pg_redis.tls_key_file = '{c.client_key}'"]
    return lines


def setting(conn, name, value):
    conn.execute("SELECT set_config(%s, %s, false)", (name, value))


class Load:
    """Writers changing `table` (id, v) from a thread until stop(): inserts, updates, deletes, in
    small transactions, as fast as they go. Rows 1..keep are never touched."""

    def __init__(self, pg, table: str, keep: int, span: int = 400):
        self.pg, self.table, self.keep, self.span = pg, table, keep, span
        self.done = threading.Event()
        self.error = None
        self.commits = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        rnd = random.Random(8)
        try:
            with self.pg.connect() as c:
                while not self.done.is_set():
                    with c.transaction():
                        for _ in range(5):
                            i = self.keep + 1 + rnd.randrange(self.span)
                            op = rnd.random()
                            if op < 0.6:
                                c.execute(f"INSERT INTO {self.table} VALUES (%s, %s) "
                                          "ON CONFLICT (id) DO UPDATE SET v = excluded.v", (i, uuid.uuid4().hex))
                            else:
                                c.execute(f"DELETE FROM {self.table} WHERE id = %s", (i,))
                    self.commits += 1
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self):
        self.done.set()
        self.thread.join(30)
        assert self.error is None, f"the load failed: {self.error!r}"
        assert self.commits > 0


def wait_queue_empty(conn, timeout=60.0):
    wait_until(lambda: one(conn, "SELECT NOT EXISTS (SELECT 1 FROM redis_internal.queue) "
                                 "AND (SELECT coalesce(bool_and(state = 'active'), true) FROM redis_stats)"),
               timeout, 0.05, "the queue to empty")


# ----------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certs():
    from harness import _make_tmpdir, _rmtree
    d = _make_tmpdir("pg_redis_certs_")
    try:
        yield make_certs(d)
    finally:
        _rmtree(d)


@pytest.fixture(scope="module")
def tls_redis(certs):
    srv = TlsRedisServer(certs)
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def tls_pg(tls_redis):
    pg = PgCluster(conf_lines=tls_conf(tls_redis))
    yield pg
    pg.cleanup()


def test_tls_key_value_and_mirror(tls_pg, tls_redis):
    r = tls_redis.client(decode_responses=True)
    with tls_pg.connect() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")
        wait_for_worker(c)
        assert one(c, "SELECT redis_ping()") == "PONG"
        c.execute("SELECT redis_set('tls:k', 'over tls')")
        assert r.get("tls:k") == "over tls"
        assert one(c, "SELECT redis_get('tls:k')") == "over tls"
        # The worker delivers over TLS too (it reads the same settings from postgresql.conf).
        c.execute("CREATE TABLE tls_t (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO tls_t SELECT g, 'v' || g FROM generate_series(1, 50) g")
        c.execute("SELECT redis_mirror('tls_t')")
        c.execute("UPDATE tls_t SET v = 'changed' WHERE id = 7")
        assert_redis_equals_table(tls_pg, r, "tls_t", timeout=20)
        # The connection really is TLS (the server has no plain port at all).
        assert tls_redis.client().config_get("port")["port"] == b"0" or \
            tls_redis.client().config_get("port")["port"] == "0"


def test_tls_wrong_ca_is_a_clear_connection_error(tls_pg, certs):
    with tls_pg.connect() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")
        setting(c, "pg_redis.tls_ca_file", str(certs.other_ca))
        e = expect_error(c, "SELECT redis_get('k')", sqlstate=CANNOT_CONNECT)
        msg = e.diag.message_primary
        assert "rediss://127.0.0.1" in msg and "certificate" in msg.lower(), msg
        # Back to the right CA: the next call reconnects (the setting is part of the connection).
        c.execute("RESET pg_redis.tls_ca_file")
        assert one(c, "SELECT redis_ping()") == "PONG"


def test_tls_client_certificate_required_and_settings_checked(tls_pg, certs):
    with tls_pg.connect() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")
        # The server demands a client certificate: without one the handshake fails.
        c.execute("SET pg_redis.tls_cert_file = ''")
        c.execute("SET pg_redis.tls_key_file = ''")
        expect_error(c, "SELECT redis_ping()", sqlstate=CANNOT_CONNECT)
        # Half a pair is a configuration error.
        c.execute(f"SET pg_redis.tls_cert_file = '{certs.client_crt}'")
        e = expect_error(c, "SELECT redis_ping()", sqlstate=BAD_ARG)
        assert "tls_key_file" in e.diag.message_primary
        # A key readable by others is refused (as libpq does).
        loose = certs.dir / "loose.key"
        loose.write_bytes(certs.client_key.read_bytes())
        loose.chmod(0o644)
        c.execute(f"SET pg_redis.tls_key_file = '{loose}'")
        e = expect_error(c, "SELECT redis_ping()", sqlstate=BAD_ARG)
        assert "must not be readable" in e.diag.message_primary
        c.execute("RESET ALL")
        assert one(c, "SELECT redis_ping()") == "PONG"
        # TLS files with a redis:// URL: refused rather than silently unencrypted.
        setting(c, "pg_redis.url", "redis://127.0.0.1:1/0")
        e = expect_error(c, "SELECT redis_ping()", sqlstate=BAD_ARG)
        assert "rediss://" in e.diag.message_primary


def test_tls_settings_are_superuser_only(tls_pg):
    with tls_pg.connect() as c:
        c.execute("DROP ROLE IF EXISTS tls_plain")
        c.execute("CREATE ROLE tls_plain LOGIN")
    try:
        with tls_pg.connect(user="tls_plain") as u:
            for name in ("pg_redis.tls_key_file", "pg_redis.tls_cert_file", "pg_redis.tls_ca_file"):
                with pytest.raises(psycopg.Error) as e:
                    u.execute(f"SHOW {name}")
                assert e.value.sqlstate == PRIVILEGE, (name, e.value)
                with pytest.raises(psycopg.Error) as e:
                    u.execute(f"SET {name} = '/tmp/x'")
                assert e.value.sqlstate == PRIVILEGE, (name, e.value)
    finally:
        with tls_pg.connect() as c:
            c.execute("DROP ROLE tls_plain")


# ----------------------------------------------------------------------------------------
# ACL users and unix sockets (the module-less `db` fixture of conftest points a session at a Redis)


ACL_PASSWORD = "Acl-Pw-7c1e"


@pytest.fixture
def acl_redis(make_redis):
    sockdir = f"/tmp/pg_redis_sock_{uuid.uuid4().hex[:8]}"
    import os
    import shutil
    os.makedirs(sockdir)
    os.chmod(sockdir, 0o777)
    srv = make_redis(extra_args=["--unixsocket", f"{sockdir}/redis.sock", "--unixsocketperm", "777"])
    srv.client().execute_command("ACL", "SETUSER", "app", "on", f">{ACL_PASSWORD}", "~app:*", "+@all")
    yield srv
    shutil.rmtree(sockdir, ignore_errors=True)


def test_acl_user_limited_to_a_key_pattern(pg, db, acl_redis):
    log_pos = pg.log_position()
    setting(db, "pg_redis.url", f"redis://app:{ACL_PASSWORD}@127.0.0.1:{acl_redis.port}/0")
    db.execute("SELECT redis_set('app:1', 'mine')")
    assert one(db, "SELECT redis_get('app:1')") == "mine"
    names = [c["user"] for c in acl_redis.client().client_list() if c.get("name", "").startswith("pg_redis:")]
    assert names == ["app"], names
    e = expect_error(db, "SELECT redis_set('other:1', 'not mine')", sqlstate=PRIVILEGE)
    msg = e.diag.message_primary
    assert "NOPERM" in msg and '"other:1"' in msg, msg
    assert ACL_PASSWORD not in str(e)
    e = expect_error(db, "SELECT redis_mget(ARRAY['app:1', 'other:2'])", sqlstate=PRIVILEGE)
    assert ACL_PASSWORD not in str(e)
    # The session still works after a refusal.
    assert one(db, "SELECT redis_get('app:1')") == "mine"
    # A wrong password: a connection error that does not show the password it tried.
    setting(db, "pg_redis.url", f"redis://app:wrong-{ACL_PASSWORD}@127.0.0.1:{acl_redis.port}/0")
    e = expect_error(db, "SELECT redis_get('app:1')", sqlstate=CANNOT_CONNECT)
    assert "authentication failed" in e.diag.message_primary.lower() and ACL_PASSWORD not in str(e), str(e)
    assert ACL_PASSWORD not in pg.read_log_since(log_pos)


def test_unix_socket_with_acl_user_and_redacted_errors(pg, db, acl_redis):
    sock = acl_redis.unixsocket
    setting(db, "pg_redis.url", f"unix://{sock}?user=app&pass={ACL_PASSWORD}")
    db.execute("SELECT redis_set('app:u', 'via unix')")
    assert acl_redis.client().get("app:u") == b"via unix"
    expect_error(db, "SELECT redis_get('nope:1')", sqlstate=PRIVILEGE)
    # A socket that is not there: the message names it, without the password.
    setting(db, "pg_redis.url", f"unix://{sock}.missing?user=app&pass={ACL_PASSWORD}")
    e = expect_error(db, "SELECT redis_get('app:u')", sqlstate=CANNOT_CONNECT)
    assert ".missing" in e.diag.message_primary and ACL_PASSWORD not in str(e), str(e)


def test_mirror_over_unix_socket(make_pg, acl_redis):
    """The worker delivers over a unix socket too (as an ACL user, its keys inside its pattern)."""
    url = f"unix://{acl_redis.unixsocket}?user=app&pass={ACL_PASSWORD}"
    pg = make_pg(conf_lines=[f"pg_redis.url = '{url}'"])
    r = acl_redis.client(decode_responses=True)
    with pg.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        wait_for_worker(c)
        c.execute("CREATE TABLE unix_t (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO unix_t SELECT g, 'v' || g FROM generate_series(1, 30) g")
        c.execute("SELECT redis_mirror('unix_t', key_template => 'app:{id}')")
        c.execute("DELETE FROM unix_t WHERE id = 3")
        assert_redis_equals_table(pg, r, "unix_t", key_sql="'app:' || id", pattern="app:*", timeout=20)


# ----------------------------------------------------------------------------------------
# Sentinel


@pytest.fixture
def sentinels():
    # A writable replica lets the test make it differ from its master, as lost writes would.
    s = SentinelSet(n=3, quorum=2, replica_args=["--replica-read-only", "no"])
    yield s
    s.cleanup()


def sentinel_conf(s: SentinelSet) -> list[str]:
    return ["pg_redis.topology = 'sentinel'", f"pg_redis.url = '{s.url}'",
            f"pg_redis.sentinel_master = '{s.name}'"]


def test_sentinel_settings_checked(pg, db, sentinels):
    db.execute("SET pg_redis.topology = 'sentinel'")
    setting(db, "pg_redis.url", sentinels.url)
    e = expect_error(db, "SELECT redis_ping()", sqlstate=BAD_ARG)
    assert "pg_redis.sentinel_master" in e.diag.message_primary
    db.execute("SET pg_redis.sentinel_master = 'nosuchmaster'")
    e = expect_error(db, "SELECT redis_ping()", sqlstate=CANNOT_CONNECT)
    assert "not found in sentinel" in e.diag.message_primary, e.diag.message_primary
    db.execute(f"SET pg_redis.sentinel_master = '{sentinels.name}'")
    db.execute("SELECT redis_set('s:1', 'via sentinel')")
    assert sentinels.master.client().get("s:1") == b"via sentinel"
    db.execute("RESET pg_redis.topology")
    e = expect_error(db, "SELECT redis_ping()", sqlstate=BAD_ARG)
    assert "lists 3 addresses" in e.diag.message_primary


def test_sentinel_failover_during_load(make_pg, sentinels):
    """SENTINEL FAILOVER while a mirror is written: the functions and the worker follow the new
    master, nothing queued is lost, and what the new master lacked is repaired."""
    pg = make_pg(conf_lines=sentinel_conf(sentinels))
    with pg.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        wait_for_worker(c)
        assert one(c, "SELECT redis_ping()") == "PONG"
        c.execute("CREATE TABLE fo (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO fo SELECT g, 'keep' || g FROM generate_series(1, 200) g")
        c.execute("SELECT redis_mirror('fo')")
        wait_queue_empty(c)
        old = sentinels.master
        assert_redis_equals_table(pg, old.client(decode_responses=True), "fo", timeout=20)
        wait_until(lambda: sentinels.replica.client().dbsize() == old.client().dbsize(), 20, 0.05,
                   "the replica to catch up")
        # Writes the master acknowledged but the replica never got, as after an asynchronous
        # replication lag: made on the (writable) replica directly, on rows the load leaves alone.
        rep = sentinels.replica.client()
        rep.delete(*[f"fo:{i}" for i in range(1, 21)])          # lost writes of rows
        rep.set("fo:99999", '{"id": 99999, "v": "ghost"}')       # a lost delete
        log_pos = pg.log_position()
        load = Load(pg, "fo", keep=200)
        time.sleep(1.0)
        new = sentinels.failover()
        assert new.port == sentinels.replica.port
        # Sentinel demotes the old master some seconds after the promotion; until then it still
        # takes writes (lost when it resyncs: for mirrors, the repair brings them back).
        wait_until(lambda: old.client().info("replication")["role"] == "slave", 30, 0.1,
                   "the old master to be demoted")
        # A session that used the old master follows the failover at its next call.
        c.execute("SELECT redis_set('after', 'failover')")
        assert new.client().get("after") == b"failover"
        time.sleep(1.0)
        load.stop()
        wait_queue_empty(c)
        assert_redis_equals_table(pg, new.client(decode_responses=True), "fo", timeout=60)
        assert one(c, "SELECT redis_get('fo:1')") is not None
        s = c.execute("SELECT dead_letters, state FROM redis_stats WHERE mirror = 'fo'::regclass").fetchone()
        assert s == (0, "active"), s
        log = pg.read_log_since(log_pos)
        assert "the Redis master changed from 127.0.0.1:%d to 127.0.0.1:%d" % (old.port, new.port) in log, log[-3000:]
        assert "mirrors are being repaired" in log, log[-3000:]


# ----------------------------------------------------------------------------------------
# Redis Cluster


@pytest.fixture(scope="module")
def rcluster():
    c = RedisClusterSet(3)
    yield c
    c.cleanup()


@pytest.fixture(scope="module")
def cluster_pg(rcluster):
    pg = PgCluster(conf_lines=["pg_redis.topology = 'cluster'", f"pg_redis.url = '{rcluster.url}'"])
    with pg.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        wait_for_worker(c)
    yield pg
    pg.cleanup()


def test_cluster_key_value_functions(cluster_pg, rcluster):
    rc = rcluster.client()
    keys = [f"kv:{i}" for i in range(60)]
    # The keys are spread over every master, so multi-key calls cross nodes.
    assert len({rc.get_node_from_key(k).port for k in keys}) == 3
    with cluster_pg.connect() as c:
        assert one(c, "SELECT redis_ping()") == "PONG"
        for k in keys:
            c.execute("SELECT redis_set(%s, %s)", (k, "v-" + k))
        assert all(rc.get(k) == "v-" + k for k in keys)
        got = one(c, "SELECT redis_mget(%s)", (keys[:30] + ["kv:missing", None] + keys[30:],))
        assert got == ["v-" + k for k in keys[:30]] + [None, None] + ["v-" + k for k in keys[30:]]
        rc.hset("kv:hash", "f", "1")  # MGET gives nil for a key of another type
        assert one(c, "SELECT redis_mget(ARRAY['kv:1', 'kv:hash', 'kv:2'])") == ["v-kv:1", None, "v-kv:2"]
        assert one(c, "SELECT redis_del(VARIADIC %s)", (keys[:10] + ["kv:missing"],)) == 10
        assert not any(rc.exists(k) for k in keys[:10])
        assert one(c, "SELECT redis_exists('kv:10')") is True
        assert one(c, "SELECT redis_incrby('{user}:n', 5)") == 5
        assert one(c, "SELECT redis_incrby('{user}:n', 5)") == 10
        assert one(c, """SELECT redis_hset('{user}:h', '{"a": 1, "b": "x"}')""") == 2
        assert one(c, "SELECT redis_hgetall('{user}:h')") == {"a": "1", "b": "x"}
        assert rc.keyslot("{user}:h") == rc.keyslot("{user}:n")
        assert one(c, "SELECT redis_expire('kv:11', 100)") is True
        assert 0 < one(c, "SELECT redis_ttl('kv:11')") <= 100
        c.execute("SELECT redis_set_bytea('kv:b', '\\x00ff'::bytea)")
        assert one(c, "SELECT redis_get_bytea('kv:b')") == b"\x00\xff"
        # redis_command routes by key; multi-node commands are answered by every master.
        assert one(c, "SELECT redis_command('SET', 'cmd:x', '1')") == "OK"
        assert one(c, "SELECT redis_command('GET', 'cmd:x')") == "1"
        assert one(c, "SELECT redis_command('MGET', 'kv:20', 'kv:21', 'nope')") == ["v-kv:20", "v-kv:21", None]
        assert one(c, "SELECT redis_command('DEL', 'kv:20', 'kv:21')") == 2
        assert one(c, "SELECT redis_command('DBSIZE')") == sum(s.client().dbsize() for s in rcluster.nodes)
        assert one(c, "SELECT redis_publish('chan', 'm')") == 0
        e = expect_error(c, "SELECT redis_command('SCAN', '0')", sqlstate=BAD_ARG)
        assert "SCAN" in e.diag.message_primary
        # A call blocked on a node ends at statement_timeout; the abandoned client is killed on
        # its node before the next call, so it cannot take an element pushed later.
        c.execute("SET statement_timeout = '300ms'")
        t = time.monotonic()
        expect_error(c, "SELECT redis_command('BLPOP', 'kv:q', '0')", sqlstate="57014", prefix=None)
        assert time.monotonic() - t < 1.5
        c.execute("RESET statement_timeout")
        assert one(c, "SELECT redis_ping()") == "PONG"
        rc.rpush("kv:q", "item")
        time.sleep(0.3)
        assert rc.llen("kv:q") == 1, "an abandoned BLPOP consumed the element"


def test_cluster_mirror_under_resharding(cluster_pg, rcluster):
    view = ClusterView(rcluster)
    n0, n1, n2 = rcluster.nodes
    try:
        with cluster_pg.connect() as c:
            for t, fmt in (("cj", "json"), ("chh", "hash")):
                c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
                c.execute(f"INSERT INTO {t} SELECT g, 'first' || g FROM generate_series(1, 1500) g")
                c.execute(f"SELECT redis_mirror('{t}', format => '{fmt}')")
            wait_queue_empty(c)
            loads = [Load(cluster_pg, "cj", keep=1000, span=800), Load(cluster_pg, "chh", keep=1000, span=800)]
            time.sleep(0.5)
            rcluster.reshard(n0, n1, 1200)
            rcluster.reshard(n2, n0, 600)
            time.sleep(0.5)
            for load in loads:
                load.stop()
            assert sum(load.commits for load in loads) > 50
            rcluster.wait_ok()
            wait_queue_empty(c)
            assert_redis_equals_table(cluster_pg, view, "cj", timeout=30)
            assert_redis_equals_table(cluster_pg, view, "chh", fmt="hash", timeout=30)
            for t in ("cj", "chh"):
                s = c.execute("SELECT dead_letters, failed FROM redis_stats WHERE mirror = %s::regclass",
                              (t,)).fetchone()
                assert s == (0, 0), (t, s)
            # redis_verify scans every master.
            checked, missing, stale, extra, repaired = c.execute("SELECT * FROM redis_verify('cj')").fetchone()
            assert (missing, stale, extra) == (0, 0, 0) and checked == one(c, "SELECT count(*) FROM cj")
            view.rc.set("cj:77777", "{}")
            assert c.execute("SELECT extra FROM redis_verify('cj', true)").fetchone() == (1,)
            wait_queue_empty(c)
            assert view.rc.get("cj:77777") is None
            # TRUNCATE purges the mirror's keys on every master.
            c.execute("TRUNCATE cj")
            wait_queue_empty(c)
            assert list(view.scan_iter(match="cj:*")) == []
            assert redis_table_diff(cluster_pg, view, "chh", fmt="hash") is None
    finally:
        view.close()


def jget(rc, key):
    v = rc.get(key)
    return None if v is None else json.loads(v)


def by_node(rcluster, match):
    """{port: keys matching `match` held by that master}."""
    out = {}
    for s in rcluster.nodes:
        c = s.client(decode_responses=True)
        try:
            out[s.port] = set(c.scan_iter(match=match, count=1000))
        finally:
            c.close()
    return out


def companions(rcluster, prefix=""):
    """{data key: (its version companion, the master holding the companion)} of sync mirrors."""
    out = {}
    for port, keys in by_node(rcluster, f"{prefix}pg_redis:ver:*").items():
        for comp in keys:
            m = re.fullmatch(re.escape(prefix) + r"pg_redis:ver:\d+:\{\d+\}(.*)", comp)
            assert m, f"not a version companion: {comp!r}"
            out[m.group(1)] = (comp, port)
    return out


def sync_registry(view):
    return list(view.scan_iter(match="*pg_redis:sync:*", count=1000))


class SyncWriter:
    """A session updating rows 1..rows of `table` (id, v) in small transactions from a thread:
    two rows per transaction (in id order: no deadlocks), one transaction in five rolled back."""

    def __init__(self, pg, table: str, rows: int, seed: int, txns: int = 150):
        self.pg, self.table, self.rows, self.seed, self.txns = pg, table, rows, seed, txns
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        rnd = random.Random(self.seed)
        try:
            with self.pg.connect() as c:
                for n in range(self.txns):
                    c.execute("BEGIN")
                    for i in sorted(rnd.sample(range(1, self.rows + 1), 2)):
                        c.execute(f"UPDATE {self.table} SET v = %s WHERE id = %s", (f"s{self.seed}-{n}", i))
                    c.execute("ROLLBACK" if rnd.random() < 0.2 else "COMMIT")
        except Exception as e:  # noqa: BLE001 - reported by join()
            self.error = e

    def join(self):
        self.thread.join(120)
        assert not self.thread.is_alive(), "the sync writer did not finish"
        assert self.error is None, f"the sync writer failed: {self.error!r}"


def test_cluster_sync_mode(cluster_pg, rcluster):
    """Sync mode on a 3-master cluster: each key's version lives in a companion hash in the key's
    slot, so the versioned script runs on the key's node."""
    view = ClusterView(rcluster)
    rc = view.rc
    try:
        with cluster_pg.connect() as c, cluster_pg.connect() as other:
            c.execute("CREATE TABLE cs (id int PRIMARY KEY, v text)")
            c.execute("INSERT INTO cs SELECT g, 'v' || g FROM generate_series(1, 60) g")
            c.execute("SELECT redis_mirror('cs', mode => 'sync')")
            wait_queue_empty(c)
            assert_redis_equals_table(cluster_pg, view, "cs", timeout=30)

            # Inside a transaction: in Redis before COMMIT, on every master.
            c.execute("BEGIN")
            c.execute("UPDATE cs SET v = 'dirty' WHERE id <= 30")
            c.execute("INSERT INTO cs VALUES (100, 'new')")
            c.execute("DELETE FROM cs WHERE id = 31")
            dirty = [f"cs:{i}" for i in range(1, 31)]
            assert all(jget(rc, k)["v"] == "dirty" for k in dirty)
            assert jget(rc, "cs:100") == {"id": 100, "v": "new"} and not rc.exists("cs:31")
            assert one(other, "SELECT v FROM cs WHERE id = 1") == "v1"
            held = by_node(rcluster, "cs:*")
            assert all(held.values()), f"the keys are not spread over every master: {held}"
            assert len({rc.get_node_from_key(k).port for k in dirty}) == 3
            assert sync_registry(view), "no sync registry while a sync transaction is open"
            # Every pushed key has its companion, in its slot and on its master.
            comp = companions(rcluster)
            for k in dirty + ["cs:100", "cs:31"]:
                assert k in comp, f"no version companion for {k}"
                name, port = comp[k]
                assert rc.keyslot(name) == rc.keyslot(k), (name, k)
                assert port == rc.get_node_from_key(k).port, f"{name} is not on the master of {k}"
                assert k in held[port] or k == "cs:31"
                assert rc.hkeys(name) == [k] and int(rc.hget(name, k)) > 0
            # ROLLBACK: the worker repairs every pushed key from the table.
            c.execute("ROLLBACK")
            t0 = time.monotonic()
            assert_redis_equals_table(cluster_pg, view, "cs", timeout=5)
            print(f"cluster sync rollback repaired in {(time.monotonic() - t0) * 1000:.0f} ms")
            wait_until(lambda: not sync_registry(view), 5, 0.05, "the sync registry to be cleaned")

            # COMMIT keeps what was pushed; the queue's redelivery changes nothing.
            c.execute("BEGIN")
            c.execute("UPDATE cs SET v = 'kept' WHERE id IN (1, 2, 3)")
            c.execute("DELETE FROM cs WHERE id = 4")
            assert jget(rc, "cs:2") == {"id": 2, "v": "kept"} and not rc.exists("cs:4")
            c.execute("COMMIT")
            wait_queue_empty(c)
            assert [jget(rc, f"cs:{i}") for i in (1, 2, 3)] == [{"id": i, "v": "kept"} for i in (1, 2, 3)]
            assert not rc.exists("cs:4")

            # Two sessions updating the same rows, some transactions rolled back.
            writers = [SyncWriter(cluster_pg, "cs", 20, seed) for seed in (1, 2)]
            for w in writers:
                w.join()
            wait_queue_empty(c)
            wait_until(lambda: not sync_registry(view), 10, 0.05, "the sync registry to be cleaned")
            assert_redis_equals_table(cluster_pg, view, "cs", timeout=10)
            checked, missing, stale, extra, _ = c.execute("SELECT * FROM redis_verify('cs')").fetchone()
            assert (missing, stale, extra) == (0, 0, 0) and checked == one(c, "SELECT count(*) FROM cs")
            s = c.execute("SELECT dead_letters, failed FROM redis_stats WHERE mirror = 'cs'::regclass").fetchone()
            assert s == (0, 0), s

            # Unmirror with purge removes the keys and every companion, on every master.
            mid = one(c, "SELECT id FROM redis_internal.mirrors WHERE tbl = 'cs'::regclass")
            assert len(companions(rcluster)) >= 60
            c.execute("SELECT redis_unmirror('cs', purge => true)")
            wait_queue_empty(c)
            assert list(view.scan_iter(match="cs:*")) == []
            assert list(view.scan_iter(match=f"pg_redis:ver:{mid}:*")) == []
            assert list(view.scan_iter(match="*pg_redis:ver:*")) == []

            # DROP TABLE of a sync-mirrored table does too.
            c.execute("CREATE TABLE cs2 (id int PRIMARY KEY, v text)")
            c.execute("SELECT redis_mirror('cs2', mode => 'sync')")
            c.execute("INSERT INTO cs2 SELECT g, 'x' FROM generate_series(1, 30) g")
            assert jget(rc, "cs2:7") == {"id": 7, "v": "x"}
            assert len(companions(rcluster)) == 30
            c.execute("DROP TABLE cs2")
            wait_queue_empty(c)
            assert list(view.scan_iter(match="cs2:*")) == []
            assert list(view.scan_iter(match="*pg_redis:ver:*")) == []
    finally:
        view.close()


def test_cluster_sync_key_prefix(cluster_pg, rcluster):
    """A key prefix with a '{' that opens no complete hash tag would put the companions in other
    slots than their keys: refused (0A000). A prefix with a whole tag puts everything in one slot."""
    view = ClusterView(rcluster)
    rc = view.rc
    try:
        with cluster_pg.connect() as c:
            c.execute("CREATE TABLE csp (id int PRIMARY KEY, v text)")
            for bad in ("a{b:", "x{}y:"):
                setting(c, "pg_redis.key_prefix", bad)
                e = expect_error(c, "SELECT redis_mirror('csp', mode => 'sync')", sqlstate=NOT_SUPPORTED)
                msg = e.diag.message_primary
                assert f'"{bad}"' in msg and "key_prefix" in msg and "cluster" in msg.lower(), msg
                assert one(c, "SELECT count(*) FROM redis_internal.mirrors WHERE tbl = 'csp'::regclass") == 0
            # Other modes do not care.
            c.execute("SELECT redis_mirror('csp', mode => 'commit')")
            c.execute("SELECT redis_unmirror('csp')")
            setting(c, "pg_redis.key_prefix", "{tn}:")
            c.execute("SELECT redis_mirror('csp', mode => 'sync')")
            c.execute("BEGIN")
            c.execute("INSERT INTO csp SELECT g, 'p' FROM generate_series(1, 20) g")
            assert jget(rc, "{tn}:csp:5") == {"id": 5, "v": "p"}
            c.execute("ROLLBACK")
            wait_until(lambda: not list(view.scan_iter(match="{tn}:csp:*")), 5, 0.05,
                       "the rolled-back keys to be removed")
            c.execute("INSERT INTO csp VALUES (1, 'one')")
            assert jget(rc, "{tn}:csp:1") == {"id": 1, "v": "one"}
            comp = companions(rcluster, "{tn}:")
            assert comp and all(rc.keyslot(name) == rc.keyslot("tn") for name, _ in comp.values())
            c.execute("SELECT redis_unmirror('csp', purge => true)")
            wait_queue_empty(c)
            assert list(view.scan_iter(match="*pg_redis:ver:*")) == []
            assert list(view.scan_iter(match="{tn}:csp:*")) == []
            c.execute("RESET pg_redis.key_prefix")
    finally:
        view.close()

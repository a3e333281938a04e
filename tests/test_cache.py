"""The shared read cache (pg_redis.cache_size; docs/cache.md).

redis_get, redis_get_bytea and redis_fetch hits served from shared memory while the tracker
follows Redis' invalidation messages: hits survive a paused Redis (proof they are served locally),
writes by other clients reach readers within moments, writes through pg_redis are read at once by
every session, TTLs and FLUSHALL are honoured, a lost subscription or a restarted Redis never
leaves a stale value, racing readers and writers leave no stale entry behind, and sessions on
other connection settings (or with pg_redis.cache = off) bypass it.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from harness import PgCluster, expect_error
from helpers import one, wait_until

CANCELED, CONN_CLASS = "57014", "08"


@pytest.fixture(scope="module")
def cache_redis(module_redis):
    """The module's Redis (conftest), which the cache cluster's settings name."""
    return module_redis


@pytest.fixture(scope="module")
def cache_pg(cache_redis):
    cluster = PgCluster(conf_lines=[f"pg_redis.url = '{cache_redis.url}'", "pg_redis.cache_size = '8MB'"])
    with cluster.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
    yield cluster
    cluster.cleanup()


def info(conn):
    cur = conn.execute("SELECT * FROM redis_cache_info()")
    return dict(zip([d.name for d in cur.description], cur.fetchone()))


@pytest.fixture
def c(cache_pg, cache_redis):
    cache_redis.client().flushall()
    conn = cache_pg.connect()
    wait_until(lambda: info(conn)["in_use"], 15, 0.05, "the cache tracker to follow Redis")
    yield conn
    conn.close()


@pytest.fixture
def rc(cache_redis):
    client = cache_redis.client(decode_responses=True)
    yield client
    client.close()


def get(conn, key):
    return one(conn, "SELECT redis_get(%s)", (key,))


def test_hits_are_served_from_shared_memory(c, rc, cache_redis, cache_pg):
    rc.set("h:1", "one")
    before = info(c)
    assert get(c, "h:1") == "one"  # a miss fills the cache
    with cache_pg.connect() as other:
        assert get(other, "h:1") == "one"  # another backend hits
        after = info(c)
        assert after["hits"] == before["hits"] + 1
        assert after["fills"] == before["fills"] + 1
        assert after["entries"] >= 1
        c.execute("SET pg_redis.command_timeout = '300ms'")
        cache_redis.pause()
        try:
            # Redis cannot answer: the hit comes from the cache, in any session.
            assert get(other, "h:1") == "one"
            assert one(other, "SELECT redis_get_bytea('h:1')") == b"one"
            # ... and a session that turned the cache off asks Redis.
            c.execute("SET pg_redis.cache = off")
            expect_error(c, "SELECT redis_get('h:1')", sqlstate=[CANCELED, CONN_CLASS])
        finally:
            cache_redis.resume()
    c.execute("RESET pg_redis.cache")
    assert get(c, "h:1") == "one"


def test_writes_of_other_clients_reach_readers(c, rc):
    rc.set("w:1", "v0")
    assert get(c, "w:1") == "v0"
    assert get(c, "w:1") == "v0"
    for i in range(1, 30):
        rc.set("w:1", f"v{i}")
        t = time.monotonic()
        wait_until(lambda: get(c, "w:1") == f"v{i}", 2, 0.001, f"v{i} read through the cache")
        assert time.monotonic() - t < 0.5
    rc.delete("w:1")
    wait_until(lambda: get(c, "w:1") is None, 2, 0.001, "the deleted key read as NULL")


def test_writes_through_pg_redis_are_read_at_once(c, cache_pg):
    with cache_pg.connect() as other:
        for i in range(50):
            c.execute("SELECT redis_set('o:1', %s)", (f"v{i}",))
            assert get(c, "o:1") == f"v{i}"
            assert get(other, "o:1") == f"v{i}"
        one(c, "SELECT redis_command('SET', 'o:1', 'by-command')")
        assert get(other, "o:1") == "by-command"
        one(c, "SELECT redis_command('MSET', 'o:2', 'x', 'o:1', 'by-mset')")
        assert get(other, "o:1") == "by-mset"
        assert one(c, "SELECT redis_del('o:1')") == 1
        assert get(other, "o:1") is None
        c.execute("SELECT redis_set('o:1', '5')")
        assert get(other, "o:1") == "5"
        assert one(c, "SELECT redis_incrby('o:1', 2)") == 7
        assert get(other, "o:1") == "7"


def test_ttl_and_flushall(c, rc):
    rc.set("t:1", "short", px=400)
    rc.set("t:2", "long")
    assert get(c, "t:1") == "short"
    assert get(c, "t:1") == "short"
    time.sleep(0.5)
    assert get(c, "t:1") is None
    assert get(c, "t:2") == "long"
    rc.flushall()
    wait_until(lambda: get(c, "t:2") is None, 2, 0.001, "FLUSHALL seen")


def test_big_values_are_read_right(c, rc):
    big = "x" * 5000
    rc.set("b:1", big)
    assert get(c, "b:1") == big
    rc.set("b:1", big + "y")
    assert get(c, "b:1") == big + "y"  # never cached: Redis answers at once


def test_lost_subscription_and_restart_leave_nothing_stale(c, rc, cache_redis):
    rc.set("l:1", "old")
    assert get(c, "l:1") == "old"
    assert get(c, "l:1") == "old"
    # The tracker's subscription is cut: Redis no longer reports changes to it.
    assert rc.client_kill_filter(_type="pubsub") >= 1
    time.sleep(0.1)
    rc.set("l:1", "new")
    assert get(c, "l:1") == "new"
    wait_until(lambda: info(c)["in_use"], 10, 0.05, "the tracker back")
    assert get(c, "l:1") == "new"
    assert get(c, "l:1") == "new"
    hits = info(c)["hits"]
    assert get(c, "l:1") == "new"
    assert info(c)["hits"] == hits + 1  # the cache serves again
    # A restarted Redis (without its data) is followed afresh; nothing of before is served.
    cache_redis.restart()
    assert get(c, "l:1") is None
    wait_until(lambda: info(c)["in_use"], 10, 0.05, "the tracker back after the restart")
    assert get(c, "l:1") is None


def test_racing_writers_leave_no_stale_entry(c, rc, cache_pg, cache_redis):
    keys = [f"race:{i}" for i in range(8)]
    stop = threading.Event()
    final = {}

    def writer():
        w = cache_redis.client(decode_responses=True)
        n = 0
        while not stop.is_set():
            for k in keys:
                w.set(k, str(n))
                final[k] = str(n)
            n += 1
        w.close()

    def reader(conn):
        while not stop.is_set():
            for k in keys:
                get(conn, k)

    readers = [cache_pg.connect() for _ in range(2)]
    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(r,)) for r in readers]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    assert info(c)["hits"] > 0
    time.sleep(0.2)  # the last invalidations arrive
    for conn in readers + [c]:
        for k in keys:
            assert get(conn, k) == final[k], k
        conn is c or conn.close()


def test_other_settings_bypass_the_cache(c, rc, make_redis):
    rc.set("s:1", "main")
    assert get(c, "s:1") == "main"
    other = make_redis()
    other.client().set("s:1", "other")
    c.execute("SELECT set_config('pg_redis.url', %s, false)", (other.url,))
    hits = info(c)["hits"]
    assert get(c, "s:1") == "other"
    assert get(c, "s:1") == "other"
    assert info(c)["hits"] == hits
    c.execute("RESET pg_redis.url")
    assert get(c, "s:1") == "main"


def test_fetch_hits_and_commit_mode_reads_its_writes(c, cache_pg, cache_redis):
    c.execute("CREATE TABLE cf (id int PRIMARY KEY, v text)")
    c.execute("INSERT INTO cf SELECT g, 'v' || g FROM generate_series(1, 10) g")
    c.execute("SELECT redis_mirror('cf', 'cf:{id}', mode => 'commit')")
    c.execute("CALL redis_backfill('cf')")
    assert one(c, "SELECT redis_fetch('cf', '3')") == {"id": 3, "v": "v3"}
    hits = info(c)["hits"]
    with cache_pg.connect() as other:
        assert one(other, "SELECT redis_fetch('cf', '3')") == {"id": 3, "v": "v3"}
        assert info(c)["hits"] == hits + 1
        for i in range(30):
            c.execute("UPDATE cf SET v = %s WHERE id = 3", (f"u{i}",))
            assert one(c, "SELECT redis_fetch('cf', '3')") == {"id": 3, "v": f"u{i}"}
            assert one(other, "SELECT redis_fetch('cf', '3')") == {"id": 3, "v": f"u{i}"}
    c.execute("DROP TABLE cf")


def test_prefixes_narrow_the_cache(make_pg, make_redis):
    srv = make_redis()
    cluster = make_pg(conf_lines=[f"pg_redis.url = '{srv.url}'", "pg_redis.cache_size = '1MB'",
                                  "pg_redis.cache_prefixes = 'hot:, warm:'"])
    rc = srv.client(decode_responses=True)
    with cluster.connect() as c:
        c.execute("CREATE EXTENSION pg_redis")
        wait_until(lambda: info(c)["in_use"], 15, 0.05, "the tracker")
        rc.set("hot:1", "a")
        rc.set("cold:1", "b")
        for _ in range(3):
            assert get(c, "hot:1") == "a"
            assert get(c, "cold:1") == "b"
        assert info(c)["hits"] == 2
        rc.set("hot:1", "a2")
        wait_until(lambda: get(c, "hot:1") == "a2", 2, 0.001, "hot:1 invalidated")


def test_no_cache_without_cache_size(c, make_pg):
    cluster = make_pg()
    with cluster.connect() as other:
        other.execute("CREATE EXTENSION pg_redis")
        i = info(other)
        assert i["in_use"] is False and i["capacity"] == 0 and i["tracker_pid"] is None
    pid = info(c)["tracker_pid"]
    assert pid and os.path.exists(f"/proc/{pid}")

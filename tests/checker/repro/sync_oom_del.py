"""Repro: sync mode, Redis at maxmemory (noeviction). A DELETE's push pipeline is
SADD registry / SADD entries / DEL key: Redis refuses both SADDs (OOM) but runs the DEL (DEL is
allowed under OOM). The statement fails and rolls back, but the key is already gone and there is
no registry entry, so the worker never repairs it: the row exists, its key does not, and
redis_verify reports it missing."""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import psycopg
from harness import PgCluster, RedisServer

r = RedisServer()
pg = PgCluster(conf_lines=[f"pg_redis.url = '{r.url}'"])
rc = r.client()
try:
    c = pg.connect()
    c.execute("CREATE EXTENSION pg_redis")
    c.execute("CREATE TABLE s (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('s', mode => 'sync')")
    c.execute("INSERT INTO s VALUES (1, 'one')")
    time.sleep(1)
    print("before:", rc.get("s:1"))
    used = int(rc.info("memory")["used_memory"])
    rc.config_set("maxmemory-policy", "noeviction")
    rc.config_set("maxmemory", str(used // 2))
    try:
        c.execute("DELETE FROM s WHERE id = 1")
        print("DELETE succeeded?!")
    except psycopg.Error as e:
        print("DELETE failed as expected:", e.sqlstate, str(e).splitlines()[0][:120])
    rc.config_set("maxmemory", "0")
    time.sleep(3)
    print("row:", c.execute("SELECT * FROM s").fetchall(), "| key s:1 in Redis:", rc.get("s:1"),
          "| registry:", list(rc.scan_iter(match="pg_redis:sync:*")))
    print("redis_verify:", c.execute("SELECT * FROM redis_verify('s')").fetchone())
finally:
    pg.cleanup(); r.cleanup()

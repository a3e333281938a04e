"""Repro: a TRUNCATE whose delivery ends in the dead letters (here: refused with -LOADING while
Redis restarts under write load) is queued again by redis_retry() as a TRUNCATE: its delivery
UNLINKs every key of the layout, also those of rows written after the TRUNCATE (delivered long
ago, with no dead letter of their own): those rows are then missing from Redis."""
import os, sys, threading, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from harness import PgCluster, RedisServer

r = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
pg = PgCluster(conf_lines=[f"pg_redis.url = '{r.url}'"])
try:
    rc = r.client()
    rc.execute_command("DEBUG", "POPULATE", "2000000", "filler", "20")
    rc.bgrewriteaof()
    while int(rc.info("persistence")["aof_rewrite_in_progress"]):
        time.sleep(0.2)
    c = pg.connect()
    c.execute("CREATE EXTENSION pg_redis")
    c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    c.execute("CREATE TABLE noise (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('t')")
    c.execute("SELECT redis_mirror('noise')")
    c.execute("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 100) g")
    time.sleep(1)
    stop = threading.Event()

    def load(k):   # commits wake the worker, which retries the refused batch at once
        conn = pg.connect()
        i = 0
        while not stop.is_set():
            i += 1
            conn.execute("INSERT INTO noise VALUES (%s, 'x') ON CONFLICT (id) DO UPDATE SET v = 'y'", (k * 1000000 + i,))
            time.sleep(0.002)
    ths = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
    for th in ths:
        th.start()
    r.kill()
    c.execute("TRUNCATE t")
    r.start(timeout=60)
    stop.set()
    time.sleep(2)
    print("dead letters of t:", c.execute("SELECT op, error, attempts FROM redis_dead_letters WHERE mirror = 't'::regclass").fetchall())
    c.execute("INSERT INTO t SELECT g, 'new' FROM generate_series(1, 50) g")   # written after the TRUNCATE
    time.sleep(1)
    print("before retry: rows", c.execute("SELECT count(*) FROM t").fetchone()[0], "keys", len(list(rc.scan_iter(match="t:*"))))
    print("redis_retry():", c.execute("SELECT redis_retry('t')").fetchone()[0])
    time.sleep(2)
    print("after retry: rows", c.execute("SELECT count(*) FROM t").fetchone()[0], "keys", len(list(rc.scan_iter(match="t:*"))),
          "| redis_verify:", c.execute("SELECT * FROM redis_verify('t')").fetchone())
finally:
    pg.cleanup(); r.cleanup()

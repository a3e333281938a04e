"""Repro: a Redis restart with persistence replies -LOADING while it loads its dataset (here 2M
keys, ~1-2 s). pg_redis counts each refused delivery as an attempt, and under write load the
worker retries every few milliseconds (each COMMIT sets its latch, cutting the backoff short), so
changes reach pg_redis.max_attempts (10) within the loading window and become dead letters,
although Redis was only starting. With --oom: the same with Redis refusing writes (OOM) for 3 s."""
import os, sys, threading, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import psycopg
from harness import PgCluster, RedisServer

r = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
pg = PgCluster(conf_lines=[f"pg_redis.url = '{r.url}'"])
try:
    rc = r.client()
    if "--oom" not in sys.argv:
        rc.execute_command("DEBUG", "POPULATE", "2000000", "filler", "20")
    rc.bgrewriteaof()
    while int(rc.info("persistence")["aof_rewrite_in_progress"]):
        time.sleep(0.2)
    c = pg.connect()
    c.execute("CREATE EXTENSION pg_redis")
    c.execute("CREATE TABLE q (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('q')")
    stop = threading.Event()

    def load(k):
        conn = pg.connect()
        i = 0
        while not stop.is_set():
            i += 1
            conn.execute("INSERT INTO q VALUES (%s, 'x') ON CONFLICT (id) DO UPDATE SET v = 'y'", (k * 1000000 + i,))
            time.sleep(0.002)
    ths = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
    for t in ths:
        t.start()
    time.sleep(1)
    if "--oom" in sys.argv:   # the same with a 3 s OOM instead of a restart
        used = int(rc.info("memory")["used_memory"])
        rc.config_set("maxmemory-policy", "noeviction")
        rc.config_set("maxmemory", str(used // 2))
        time.sleep(3)
        rc.config_set("maxmemory", "0")
        print("Redis refused writes (OOM) for 3 s")
    else:
        r.kill()
        t0 = time.monotonic()
        r.start(timeout=60)    # waits until PING answers (i.e. loading finished)
        print(f"Redis restarted; loading took ~{time.monotonic() - t0:.1f}s")
    time.sleep(2)
    stop.set()
    time.sleep(3)
    print("dead letters:", c.execute("SELECT count(*), min(error), max(attempts) FROM redis_dead_letters").fetchone())
    print("redis_stats:", c.execute("SELECT queue_depth, dead_letters, last_error FROM redis_stats").fetchone())
finally:
    pg.cleanup(); r.cleanup()

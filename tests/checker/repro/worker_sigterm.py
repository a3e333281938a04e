"""Repro: pg_terminate_backend() of the pg_redis worker stops delivery until the server restarts
(the worker exits with code 0 on SIGTERM, so the postmaster does not restart it)."""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from harness import PgCluster, RedisServer

r = RedisServer()
pg = PgCluster(conf_lines=[f"pg_redis.url = '{r.url}'"])
try:
    c = pg.connect()
    c.execute("CREATE EXTENSION pg_redis")
    c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    c.execute("SELECT redis_mirror('t')")
    time.sleep(1.5)
    pid = c.execute("SELECT worker_pid FROM redis_stats").fetchone()[0]
    print("worker pid", pid, "terminated:", c.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0])
    time.sleep(5)
    c.execute("INSERT INTO t VALUES (1, 'x')")
    time.sleep(2)
    print("5+2 s later: redis_stats worker_pid/state/queue_depth:",
          c.execute("SELECT worker_pid, worker_state, queue_depth FROM redis_stats").fetchone())
    print("pg_stat_activity pg_redis workers:",
          c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_redis worker'").fetchone()[0])
    print("key in Redis:", r.client().get("t:1"))
    print([l for l in pg.read_log().splitlines() if "worker" in l][-4:])
finally:
    pg.cleanup(); r.cleanup()

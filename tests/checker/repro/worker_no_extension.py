"""Repro: with pg_redis preloaded but CREATE EXTENSION not (yet) run in a database the worker
serves, the worker fails every second with an ERROR and a Rust backtrace in the server log
(sync_mode::repair_pending reads redis_internal.mirrors before step() checks the extension)."""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from harness import PgCluster, RedisServer

r = RedisServer()
pg = PgCluster(conf_lines=[f"pg_redis.url = '{r.url}'"])
try:
    time.sleep(6)
    log = pg.read_log()
    print("worker exits in 6 s without the extension:", log.count('"pg_redis worker"'), "|",
          log.count('relation "redis_internal.mirrors" does not exist'), "ERRORs,",
          len(log.splitlines()), "log lines")
    print([l for l in log.splitlines() if "exited with" in l][:2])
finally:
    pg.cleanup(); r.cleanup()

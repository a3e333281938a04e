"""The seed's application: users live in PostgreSQL, the app reads them from Redis.

Writes go to PostgreSQL only; pg_redis mirrors them to Redis (key user:{id}, JSON) by itself.
Reads ask Redis first and fall back to SELECT redis_fetch(...) on a miss, which reads the row from
the table and refills Redis in one call.

    python3 app.py --pg "host=/tmp/pg_redis_demo port=5433 user=postgres" --redis redis://127.0.0.1:6380/0
"""

import argparse
import json
import time

import psycopg
import redis


def setup(db):
    db.execute(
        """CREATE TABLE IF NOT EXISTS users (
               id int PRIMARY KEY, name text NOT NULL, email text, plan text DEFAULT 'free')"""
    )
    db.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")
    db.execute("SELECT redis_mirror('users', key_template => 'user:{id}', ttl_seconds => 3600)")


def get_user(db, r, user_id):
    """Redis first; on a miss, the row through the cache (read-through)."""
    raw = r.get(f"user:{user_id}")
    if raw is not None:
        return json.loads(raw), "redis"
    row = db.execute("SELECT redis_fetch('users', %s)", (str(user_id),)).fetchone()[0]
    return row, "postgres (refilled Redis)"


def wait_for(r, key, predicate, timeout=5.0):
    """Writes reach Redis asynchronously (about a millisecond after COMMIT): wait for it."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        raw = r.get(key)
        if predicate(None if raw is None else json.loads(raw)):
            return
        time.sleep(0.002)
    raise SystemExit(f"{key} did not reach Redis within {timeout} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg", required=True, help="libpq connection string")
    ap.add_argument("--redis", required=True, help="redis:// URL")
    args = ap.parse_args()
    db = psycopg.connect(args.pg, autocommit=True)
    r = redis.Redis.from_url(args.redis)
    setup(db)

    db.execute("INSERT INTO users (id, name, email) VALUES (1, 'Ada', 'ada@example.com') "
               "ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email, plan = 'free'")
    wait_for(r, "user:1", lambda u: u is not None and u["plan"] == "free")
    print("read user 1:", *get_user(db, r, 1))

    db.execute("UPDATE users SET plan = 'pro' WHERE id = 1")
    wait_for(r, "user:1", lambda u: u is not None and u["plan"] == "pro")
    print("after upgrade:", *get_user(db, r, 1))

    r.delete("user:1")  # e.g. evicted or expired
    print("after eviction:", *get_user(db, r, 1))
    print("and again:", *get_user(db, r, 1))

    db.execute("DELETE FROM users WHERE id = 1")
    wait_for(r, "user:1", lambda u: u is None)
    print("after delete:", *get_user(db, r, 1))
    hits, misses = db.execute(
        "SELECT hits, misses FROM redis_stats WHERE mirror = 'users'::regclass").fetchone()
    print(f"redis_fetch hits={hits} misses={misses}")
    db.execute("SELECT redis_unmirror('users', purge => true)")


if __name__ == "__main__":
    main()

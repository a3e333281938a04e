"""Helpers shared by the integration tests: waiting, one-value queries, and a mirror test
context (a superuser session of a cluster whose worker delivers to one Redis, with the tables
and roles a test made dropped again at teardown)."""

from __future__ import annotations

import time

import psycopg

# The renderings pg_redis documents for mirrored values (docs/mirroring.md).
REFERENCE_SETTINGS = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
                      "SET bytea_output = 'hex'; SET extra_float_digits = 1")


def wait_until(pred, timeout=10.0, interval=0.01, what="condition"):
    """Poll `pred` until it returns something true (returned) or `timeout` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # noqa: BLE001
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def one(conn, query, params=None):
    """The first column of the first row."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, f"{query!r} returned no row"
    return row[0]


def queue_len(conn):
    """Changes waiting in the queue (a packed row holds several, see sql/catalog.sql)."""
    return one(conn, "SELECT coalesce(sum(CASE WHEN op IN ('S', 'D') THEN json_array_length(key::json) "
                     "ELSE 1 END), 0)::int8 FROM redis_internal.queue")


def wait_for_worker(conn, timeout=10.0):
    wait_until(lambda: one(conn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_redis worker'"),
               timeout, 0.05, "the worker")


class MirrorCtx:
    """A superuser session of `pg` and a client of `redis_srv`; what a test creates goes at close()."""

    def __init__(self, pg, redis_srv):
        self.pg = pg
        self.redis = redis_srv
        self.conn = pg.connect()
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")
        self.rc = redis_srv.client(decode_responses=True)
        self.tables = []
        self.roles = []
        # statements run at close, after the tables go (schemas, types, grants a test made)
        self.cleanup_sql: list[str] = []

    def table(self, name, ddl, rows_sql=None):
        self.tables.append(name)
        self.conn.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
        self.conn.execute(f"CREATE TABLE {name} ({ddl})")
        if rows_sql:
            self.conn.execute(f"INSERT INTO {name} {rows_sql}")
        return name

    def role(self, name):
        self.roles.append(name)
        self.conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        self.conn.execute(f'CREATE ROLE "{name}" LOGIN')
        return name

    def mirror(self, table, **kw):
        args = "".join(f", {k} => %s" for k in kw)
        return one(self.conn, f"SELECT redis_mirror(%s{args})", (table, *kw.values()))

    def idle(self, timeout=20.0):
        """Every mirror backfilled (state active) and the queue empty."""
        def done():
            # One statement, one snapshot: a backfill's last batch is queued in the same
            # transaction that marks the mirror active.
            return one(self.conn, "SELECT NOT EXISTS (SELECT 1 FROM redis_internal.queue) "
                                  "AND (SELECT coalesce(bool_and(state = 'active'), true) FROM redis_stats)")
        wait_until(done, timeout, 0.02, "backfills done and the queue empty")

    def keys(self, pattern):
        return sorted(self.rc.scan_iter(match=pattern, count=5000))

    def close(self):
        c = self.conn
        try:
            if c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                c.rollback()
            for s in [f"DROP TABLE IF EXISTS {t} CASCADE" for t in reversed(self.tables)] + self.cleanup_sql:
                try:
                    c.execute(s)
                except psycopg.Error:
                    pass
            for r in self.roles:
                c.execute(f'DROP OWNED BY "{r}" CASCADE')
                c.execute(f'DROP ROLE IF EXISTS "{r}"')
            wait_until(lambda: queue_len(c) == 0, 10, 0.05, "the queue to empty at teardown")
            c.execute("RESET ALL")
        except Exception:  # noqa: BLE001 - best effort, the next test flushes
            pass
        finally:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
            try:
                if self.redis.running():
                    self.rc.flushall()
                self.rc.close()
            except Exception:  # noqa: BLE001
                pass

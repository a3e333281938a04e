"""pytest fixtures for the pg_redis integration tier. See tests/README.md.

Fixtures:
  module_redis  one RedisServer per test module; the module cluster's postgresql.conf points
                pg_redis.url at it.
  pg            one PgCluster per test module (preloaded, pg_redis.url = module_redis.url).
  redis         a fresh RedisServer for each test.
  db            a superuser psycopg connection (autocommit) to `pg`, with the extension created
                and `SET pg_redis.url` pointing this session at the test's own `redis`; the
                test's own Redis starts empty, so tests do not see each other's keys.
  r             redis.client() of the test's redis (bytes replies).
  make_redis    factory: make_redis(extra_args=[...]) -> RedisServer, cleaned up after the test.
  make_pg       factory: make_pg(conf_lines=[...], preload=...) -> PgCluster, cleaned up after the test.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import PgCluster, RedisServer  # noqa: E402


@pytest.fixture(scope="module")
def module_redis():
    srv = RedisServer()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def pg(module_redis):
    cluster = PgCluster(conf_lines=[f"pg_redis.url = '{module_redis.url}'"], preload=True)
    yield cluster
    cluster.cleanup()


@pytest.fixture
def redis():
    srv = RedisServer()
    yield srv
    srv.cleanup()


@pytest.fixture
def r(redis):
    c = redis.client()
    yield c
    c.close()


@pytest.fixture
def db(pg, redis):
    conn = pg.connect()
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")
    conn.execute("SELECT set_config('pg_redis.url', %s, false)", (redis.url,))
    yield conn
    conn.close()


@pytest.fixture
def make_redis():
    made = []

    def factory(**kw) -> RedisServer:
        srv = RedisServer(**kw)
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        srv.cleanup()


@pytest.fixture
def make_pg():
    made = []

    def factory(**kw) -> PgCluster:
        cluster = PgCluster(**kw)
        made.append(cluster)
        return cluster

    yield factory
    for cluster in made:
        cluster.cleanup()


@pytest.fixture(scope="module")
def ext(pg):
    """The module's cluster with the extension created and its worker running."""
    from helpers import wait_for_worker
    with pg.connect() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_redis")
        wait_for_worker(c)
    return pg

"""The example application (examples/users-app) runs against real servers and prints what the
README says: writes in PostgreSQL show up in Redis, a miss is refilled by redis_fetch."""

import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "..", "examples", "users-app", "app.py")


def test_example_app(make_redis, make_pg):
    redis_srv = make_redis()
    pg = make_pg(conf_lines=[f"pg_redis.url = '{redis_srv.url}'"], preload=True)
    dsn = pg.conninfo()
    out = subprocess.run(
        ["/usr/bin/python3", APP, "--pg", dsn, "--redis", redis_srv.url],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("read user 1:") and lines[0].endswith("redis"), out.stdout
    assert "'plan': 'pro'" in lines[1] and lines[1].endswith("redis"), out.stdout
    assert lines[2].endswith("postgres (refilled Redis)"), out.stdout
    assert lines[3].endswith("redis"), out.stdout
    assert lines[4] == "after delete: None postgres (refilled Redis)", out.stdout

"""The history checker (tests/checker, issue 6 item 1) in CI: a short run of the `ci` schedule —
one fault of each kind (Redis paused past command_timeout, CLIENT KILL, PostgreSQL crashed,
Redis killed and restarted, the worker terminated, Redis at maxmemory) while 4 clients run random
transactions on 18 mirrored tables (queue/commit/sync x json/hash x 3 key layouts) — then Redis
must equal every table, redis_verify must agree, and nothing unexpected may have happened.

About 45 s. PG_REDIS_CHECKER_SEED / PG_REDIS_CHECKER_SCHEDULE / PG_REDIS_CHECKER_DURATION change
the run; a failure prints the seed, the faults, every difference with the Redis history of the
first keys (MONITOR), and keeps the logs under /tmp/pg_redis_checker/.
Long runs: /usr/bin/python3 -m tests.checker --help (tests/checker/README.md).
"""

from __future__ import annotations

import os


from checker import Options, run


def test_history_checker_ci_schedule():
    seed = int(os.environ.get("PG_REDIS_CHECKER_SEED", "20240601"))
    schedule = os.environ.get("PG_REDIS_CHECKER_SCHEDULE", "ci")
    duration = float(os.environ.get("PG_REDIS_CHECKER_DURATION", "25"))
    res = run(Options(seed=seed, duration=duration, schedule=schedule, clients=4, settle=45, tail=2,
                      rows=100, quiet=True))
    assert res.ok, f"history checker failed (seed {seed}, schedule {schedule}):\n" + "\n".join(
        f"  {f}" for f in res.failures)
    assert res.numbers["faults"] >= 5, res.numbers
    assert res.numbers["committed"] > 200, res.numbers


def test_history_checker_async_failover_with_standby_names():
    """Issue 6 item 2: the primary crashes under load while its asynchronous standby lags
    (walreceiver held 1.5 s); with pg_redis.standby_names = '*' the old primary's worker has sent
    Redis only what the standby had, and the promoted standby's worker delivers the rest: Redis
    equals the promoted database (without the setting this schedule finds hundreds of
    differences — docs/guarantees.md)."""
    res = run(Options(seed=3, duration=20, schedule="failover-async-wait", clients=4, settle=45, tail=2,
                      rows=100, quiet=True))
    assert res.ok, "history checker failed (schedule failover-async-wait):\n" + "\n".join(
        f"  {f}" for f in res.failures)
    assert res.numbers["faults"] >= 2, res.numbers


def test_history_checker_finds_injected_differences():
    """Negative control: after a short fault-free run, five keys are corrupted on purpose (one
    deleted, one value changed, one numeric literal re-rendered 12.30 -> 12.3, one stray key, one
    hash field removed); the comparison must report exactly those five."""
    res = run(Options(seed=7, duration=6, schedule="none", clients=3, tail=1, rows=60, quiet=True,
                      inject=True, trace=False))
    assert res.control_ok, (f"injected {res.injected}, found "
                            f"{[(d.table, d.key, d.kind) for d in res.differences]}")
    assert len(res.injected) == 5, res.injected

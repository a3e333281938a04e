"""pg_redis history checker (issue 6, item 1): random concurrent transactions on mirrored tables
in every delivery mode and format, under a fault schedule (Redis killed / paused / full / its
clients killed, the worker terminated, PostgreSQL crashed), then a final comparison of Redis with
the tables (PostgreSQL is the model). See README.md in this directory.

    /usr/bin/python3 -m tests.checker --seed 42 --duration 60 --schedule mixed

Programmatic use (tests/test_checker.py):

    from checker import run, Options
    result = run(Options(seed=1, duration=30, schedule="ci"))
    assert result.ok, result.summary()
"""

from __future__ import annotations

import os
import sys

# tests/harness.py is a plain module next to this package (tests/ is not a package).
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from .runner import Options, Result, run  # noqa: E402
from .schedules import SCHEDULES  # noqa: E402

__all__ = ["Options", "Result", "run", "SCHEDULES"]

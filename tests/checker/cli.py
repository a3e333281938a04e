"""Command line: /usr/bin/python3 -m tests.checker --seed 42 --duration 60 [--schedule NAME] ..."""

from __future__ import annotations

import argparse

from .runner import Options, run
from .schedules import SCHEDULES
from .tables import FORMATS, MODES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.checker",
                                 description="pg_redis history checker: random concurrent transactions on "
                                             "mirrored tables under faults, then Redis compared with the tables.")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--duration", type=float, default=60, help="seconds of load with faults (default 60)")
    ap.add_argument("--schedule", default="mixed", choices=sorted(SCHEDULES),
                    help="; ".join(f"{s.name}: {s.description}" for s in SCHEDULES.values()))
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of queue,commit,sync")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of json,hash")
    ap.add_argument("--clients", type=int, default=6, help="concurrent client threads (default 6)")
    ap.add_argument("--settle", type=float, default=60, help="bound on the wait for delivery to catch up (s)")
    ap.add_argument("--rows", type=int, default=150, help="rows per table before mirroring (backfilled)")
    ap.add_argument("--lenient", action="store_true", help="unexpected client errors are reported, not failures")
    ap.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    ap.add_argument("--keep", action="store_true", help="keep the servers until Enter is pressed (debugging)")
    ap.add_argument("--faults", help="comma-separated fault kinds replacing the schedule's (drawn at random), "
                                     "e.g. redis_kill,redis_pause,client_kill,worker_kill,pg_crash,redis_oom,"
                                     "redis_oom_long,redis_wipe")
    ap.add_argument("--no-fetch", action="store_true", help="no redis_fetch calls in the workload")
    ap.add_argument("--inject", action="store_true",
                    help="negative control: corrupt a few keys after settling; exit 0 only if exactly those are found")
    ap.add_argument("--no-trace", action="store_true", help="do not record Redis MONITOR")
    ap.add_argument("--artifacts", help="directory for logs and the MONITOR trace (kept on failure)")
    ap.add_argument("--list", action="store_true", help="list the schedules and exit")
    a = ap.parse_args(argv)
    if a.list:
        for s in SCHEDULES.values():
            print(f"{s.name:16s} {s.description}")
        return 0
    modes = tuple(m for m in a.modes.split(",") if m)
    formats = tuple(f for f in a.formats.split(",") if f)
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")
    for f in formats:
        if f not in FORMATS:
            ap.error(f"unknown format {f!r}")
    kinds = None
    if a.faults is not None:
        from .schedules import fault_length
        kinds = tuple(k for k in a.faults.split(",") if k)
        for k in kinds:
            try:
                fault_length(k, __import__("random").Random(0))
            except KeyError:
                ap.error(f"unknown fault kind {k!r}")
    res = run(Options(faults=kinds, inject=a.inject, fetch_weight=0 if a.no_fetch else 8, seed=a.seed, duration=a.duration, schedule=a.schedule, modes=modes, formats=formats,
                      clients=a.clients, settle=a.settle, rows=a.rows, strict_errors=not a.lenient,
                      quiet=a.quiet, keep=a.keep, trace=not a.no_trace,
                      artifacts=a.artifacts))
    if a.inject:
        return 0 if res.control_ok and not res.invalid else 1
    return 0 if res.ok else (2 if res.invalid else 1)

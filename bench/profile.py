#!/usr/bin/python3
"""Profile one pg_redis hot path with perf, in the same throwaway set-up as bench/run.py.

    /usr/bin/python3 bench/profile.py insert        # P1: single-row INSERT into a queue mirror
    /usr/bin/python3 bench/profile.py plain         # P1's baseline: the same INSERTs into an unmirrored table
    /usr/bin/python3 bench/profile.py update        # P1u: single-row UPDATE by primary key
    /usr/bin/python3 bench/profile.py redis_get     # P5
    /usr/bin/python3 bench/profile.py redis_fetch   # P6 (hits)
    /usr/bin/python3 bench/profile.py redis_fetch_cached   # P6 cached (shared read cache hits)
    /usr/bin/python3 bench/profile.py drain         # P3: the worker draining a backlog
    /usr/bin/python3 bench/profile.py backfill      # P7
    /usr/bin/python3 bench/profile.py commit        # P8: single-row INSERTs (-c 1) into a commit-mode mirror
    /usr/bin/python3 bench/profile.py steps         # P1 load: the worker's steps/s and CPU per change (no perf)
    /usr/bin/python3 bench/profile.py bulk          # P2: INSERT ... SELECT of 1M rows into a queue mirror
    /usr/bin/python3 bench/profile.py copy          # P2: COPY of 1M rows (csv) into a queue mirror
    options: --seconds N (default 8), --children (inclusive costs), --keep DIR (keep perf.data)

Needs perf (and root, or perf_event_paranoid <= 1). Records the server processes of the cluster
only (backends and the pg_redis worker, by pid), with call graphs, and prints the top symbols.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py)


def server_pids(b: run.Bench) -> list[int]:
    pm = b.pg.postmaster_pid()
    out = subprocess.run(["pgrep", "-P", str(pm)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def record(pids, seconds, data: Path):
    subprocess.run(["perf", "record", "-q", "-g", "-F", "999", "-o", str(data), "-p", ",".join(map(str, pids)),
                    "--", "sleep", str(seconds)], check=True, capture_output=True)


def report(data: Path, children: bool, comm: str | None = None) -> str:
    cmd = ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso,symbol", "-g", "none",
           "--percent-limit", "0.7", "--children" if children else "--no-children"]
    if comm:
        cmd += ["--comms", comm]
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def steps(seconds: int):
    """The worker under the P1 load: its steps per second (WAL flushes, from pg_stat_wal), the
    changes per step and its CPU per change (/proc), no perf."""
    work = Path(tempfile.mkdtemp(prefix="pg_redis_prof_"))
    b = run.Bench(quick=True, pairs=1, duration=seconds + 4, workdir=work)
    try:
        b.make_table("t", mirror="queue")
        w = b.worker_pid()
        # Each step that found changes flushes the WAL once (the WAL writer adds a few a second).
        q = "SELECT wal_sync FROM pg_stat_wal"
        th = threading.Thread(target=lambda: b.pgbench("prof", run.INSERT_SCRIPT.format(t="t")), daemon=True)
        th.start()
        time.sleep(2)
        x0, c0, n0, t0 = b.one(q), cpu_seconds(w), b.one("SELECT count(*) FROM t"), time.monotonic()
        time.sleep(seconds)
        x1, c1, n1, t1 = b.one(q), cpu_seconds(w), b.one("SELECT count(*) FROM t"), time.monotonic()
        th.join()
        dt = t1 - t0
        rows, flushes, cpu = (n1 - n0) / dt, (x1 - x0) / dt, (c1 - c0) / dt
        worker = max(flushes, 1)
        print(f"{rows:,.0f} changes/s; worker: ~{worker:,.0f} WAL flushes (steps)/s, ~{rows / worker:.1f} changes per step, "
              f"{cpu:.2f} cores, {cpu / rows * 1e6:.1f} µs of CPU per change")
    finally:
        b.pg.cleanup()
        b.redis.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["insert", "plain", "update", "redis_get", "redis_fetch", "redis_fetch_cached", "drain", "backfill", "bulk", "copy", "commit", "steps"])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--children", action="store_true")
    ap.add_argument("--keep", help="directory to keep perf.data in")
    args = ap.parse_args()
    if args.workload == "steps":
        return steps(args.seconds)
    work = Path(tempfile.mkdtemp(prefix="pg_redis_prof_"))
    b = run.Bench(quick=True, pairs=1, duration=args.seconds + 4, workdir=work)
    data = (Path(args.keep) if args.keep else work) / f"perf-{args.workload}.data"
    data.parent.mkdir(parents=True, exist_ok=True)
    try:
        script = None
        clients = 2
        if args.workload in ("insert", "plain"):
            b.make_table("t", mirror="queue" if args.workload == "insert" else None)
            script = run.INSERT_SCRIPT.format(t="t")
        elif args.workload == "update":
            b.make_table("t", mirror="queue", rows=100_000)
            b.wait_idle()
            script = "\\set id random(1, 100000)\nUPDATE t SET n = n + 1 WHERE id = :id;\n"
        elif args.workload == "commit":
            b.make_table("t", mirror="commit")
            script = run.INSERT_SCRIPT.format(t="t")
            clients = 1
        elif args.workload == "redis_get":
            b.r.set("key:1", "x" * 96)
            script = "SELECT redis_get('key:1');\n"
        elif args.workload == "redis_fetch":
            b.make_table("t", mirror="queue", rows=10_000)
            b.wait_idle()
            script = "\\set id random(1, 10000)\nSELECT redis_fetch('t', :id);\n"
        elif args.workload == "redis_fetch_cached":
            b.make_table("p6", mirror="queue", rows=10_000)
            b.wait_idle()
            run.warm_cache(b, "SELECT count(redis_fetch('p6', g::text)) FROM generate_series(1, 10000) g")
            script = "\\set id random(1, 10000)\nSELECT redis_fetch('p6', :id);\n"
        if script:
            th = threading.Thread(target=lambda: b.pgbench("prof", script, clients=clients), daemon=True)
            th.start()
            time.sleep(1.5)
            record(server_pids(b), args.seconds, data)
            th.join()
        elif args.workload == "drain":
            b.make_table("t", mirror="queue")
            b.redis.stop()
            b.ex(f"INSERT INTO t (id, name, email, n) {run.ROW_SELECT.format(lo=1, hi=1_000_000)}")
            b.ex("SELECT setval(pg_get_serial_sequence('t', 'id'), 1000000)")
            b.ex("CHECKPOINT")
            b.redis.start()
            b.ex("INSERT INTO t (name, n) VALUES ('kick', 0)")
            record([b.worker_pid()], args.seconds, data)
        elif args.workload in ("bulk", "copy"):
            stmt = f"INSERT INTO t (id, name, email, n) {run.ROW_SELECT.format(lo=1, hi=1_000_000)}"
            if args.workload == "copy":
                csv = b.pg.dir / "p2.csv"
                b.ex(f"COPY ({run.ROW_SELECT.format(lo=1, hi=1_000_000)}) TO '{csv}' (FORMAT csv)")
                stmt = f"COPY t (id, name, email, n) FROM '{csv}' (FORMAT csv)"
            b.make_table("t", mirror="queue")
            pid = b.conn.info.backend_pid
            th = threading.Thread(target=lambda: b.ex(stmt), daemon=True)
            th.start()
            record([pid], args.seconds, data)
            th.join()
        elif args.workload == "backfill":
            b.make_table("t", rows=1_000_000)
            b.ex("CHECKPOINT")
            b.ex("SELECT redis_mirror('t')")
            record(server_pids(b), args.seconds, data)
        print(report(data, args.children))
        print(f"perf data: {data}" if args.keep else "")
    finally:
        b.pg.cleanup()
        b.redis.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

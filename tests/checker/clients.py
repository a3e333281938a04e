"""Client threads: random transactions on the mirrored tables, reconnecting after faults.

Each client runs, until told to stop, transactions of 1-5 statements on random tables (mixing
modes and formats), some wrapped in savepoints that are released or rolled back, 10 % of whole
transactions rolled back, 15 % single statements in autocommit. A committed transaction also
inserts (client, seq) into the unmirrored table chk_log, so that acknowledged commits can be
checked after a crash (lost ones count; with synchronous_commit = off some may be lost, but none
whose COMMIT waited for commit-mode delivery).

Errors are recorded with the time, the statement's table mode and the SQLSTATE; the runner
classifies them at the end against the fault windows (see runner.classify_errors).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg

from .tables import Stmt, Table


@dataclass
class ErrorEvent:
    t: float              # seconds since the run's start
    client: int
    where: str            # 'stmt', 'commit', 'connect', 'rollback', 'savepoint'
    table: str | None
    mode: str | None
    sqlstate: str | None
    message: str
    broken: bool          # the connection was lost


@dataclass
class ClientStats:
    ops: Counter = field(default_factory=Counter)          # kind -> statements that succeeded
    rows: Counter = field(default_factory=Counter)         # kind -> rows affected
    txns: Counter = field(default_factory=Counter)         # committed, rolled_back, failed, in_doubt, autocommit
    savepoints: Counter = field(default_factory=Counter)   # released, rolled_back, rolled_back_on_error
    acked: list = field(default_factory=list)              # (seq, commit_delivered)
    in_doubt: list = field(default_factory=list)           # seqs whose COMMIT outcome is unknown
    rolled_back: list = field(default_factory=list)        # seqs rolled back (must not be in chk_log)
    errors: list = field(default_factory=list)             # ErrorEvent
    commit_warnings: int = 0
    reconnects: int = 0


class Client(threading.Thread):
    def __init__(self, idx: int, pg, tables: list[Table], seed: int, stop: threading.Event, t0: float,
                 truncate_weight: float = 0.15, think: float = 0.004, fetch_weight: float = 8):
        super().__init__(name=f"client-{idx}", daemon=True)
        self.idx = idx
        self.pg = pg
        self.tables = tables
        self.rnd = random.Random(seed)
        self.stop_ev = stop
        self.t0 = t0
        self.truncate_weight = truncate_weight
        self.fetch_weight = fetch_weight
        self.think = think
        self.stats = ClientStats()
        self.conn: psycopg.Connection | None = None
        self.warnings: list[str] = []
        self.seq = 0

    # -- connection
    def _notice(self, diag):
        if diag.severity in ("WARNING",):
            self.warnings.append(diag.message_primary or "")

    def _connect(self) -> bool:
        try:
            c = self.pg.connect(application_name=f"checker-client-{self.idx}")
            c.execute("SET statement_timeout = '30s'")
            c.add_notice_handler(self._notice)
            self.conn = c
            return True
        except Exception as e:  # noqa: BLE001 - PostgreSQL is down or starting: retry
            self._err("connect", None, e, broken=True)
            return False

    def _drop_conn(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass
        self.conn = None

    def _broken(self) -> bool:
        return self.conn is None or self.conn.closed or self.conn.broken

    def _err(self, where, table: Table | None, e: Exception, broken=None):
        sqlstate = getattr(e, "sqlstate", None)
        diag = getattr(e, "diag", None)
        msg = (diag.message_primary if diag is not None and diag.message_primary else str(e)).strip()
        if broken is None:
            broken = self._broken()
        self.stats.errors.append(ErrorEvent(time.monotonic() - self.t0, self.idx, where,
                                            table.name if table else None, table.mode if table else None,
                                            sqlstate, msg.splitlines()[0][:300] if msg else "", broken))

    # -- main loop
    def run(self):
        while not self.stop_ev.is_set():
            if self._broken():
                self._drop_conn()
                if not self._connect():
                    self.stop_ev.wait(0.2)
                    continue
                self.stats.reconnects += 1
            try:
                self._txn()
            except psycopg.Error as e:
                # Anything not handled inside: the connection is gone, or ROLLBACK itself failed.
                self._err("txn", None, e)
                self.stats.txns["failed"] += 1
                if not self._broken():
                    try:
                        self.conn.execute("ROLLBACK")
                    except psycopg.Error:
                        self._drop_conn()
            if self.think:
                time.sleep(self.rnd.uniform(0, self.think))
        self._drop_conn()

    def _exec(self, st: Stmt) -> int:
        cur = self.conn.cursor()
        if st.copy_rows is not None:
            with cur.copy(st.sql) as cp:
                for row in st.copy_rows:
                    cp.write_row(row)
            return cur.rowcount
        cur.execute(st.sql, st.params or None)
        return cur.rowcount

    def _op(self, effects: list):
        table = self.rnd.choice(self.tables)
        st = table.random_stmt(self.rnd, self.truncate_weight, self.fetch_weight)
        try:
            n = self._exec(st)
        except psycopg.Error as e:
            self._err("fetch" if st.kind == "fetch" else "stmt", table, e)
            raise
        if st.kind == "fetch":
            n = 0
        self.stats.ops[st.kind] += 1
        self.stats.rows[st.kind] += max(n, 0)
        effects.append((table, st.kind, n))

    def _txn(self):
        rnd = self.rnd
        c = self.conn
        if rnd.random() < 0.15:
            try:
                self._op([])
                self.stats.txns["autocommit"] += 1
            except psycopg.Error:
                self.stats.txns["failed"] += 1
            return
        self.seq += 1
        seq = self.seq
        c.execute("BEGIN")
        effects: list = []
        for i in range(rnd.randint(1, 5)):
            if rnd.random() < 0.25:
                sp = f"sp{i}"
                c.execute(f"SAVEPOINT {sp}")
                mark = len(effects)
                failed = False
                for _ in range(rnd.randint(1, 2)):
                    try:
                        self._op(effects)
                    except psycopg.Error:
                        if self._broken():
                            raise
                        failed = True
                        break
                if failed or rnd.random() < 0.35:
                    c.execute(f"ROLLBACK TO SAVEPOINT {sp}")
                    del effects[mark:]
                    self.stats.savepoints["rolled_back_on_error" if failed else "rolled_back"] += 1
                else:
                    c.execute(f"RELEASE SAVEPOINT {sp}")
                    self.stats.savepoints["released"] += 1
            else:
                try:
                    self._op(effects)
                except psycopg.Error:
                    if self._broken():
                        raise
                    c.execute("ROLLBACK")
                    self.stats.txns["failed"] += 1
                    self.stats.rolled_back.append(seq)
                    return
        c.execute("INSERT INTO chk_log (client, seq) VALUES (%s, %s)", (self.idx, seq))
        if rnd.random() < 0.10:
            c.execute("ROLLBACK")
            self.stats.txns["rolled_back"] += 1
            self.stats.rolled_back.append(seq)
            return
        # A COMMIT that must wait for commit-mode delivery: rows changed in a commit-mode acct
        # table (no filter, so every change is queued). Without a WARNING it was delivered, and
        # so its commit record was flushed: it can never be lost in a crash.
        waits = any(t.mode == "commit" and t.layout == "acct" and (n > 0 or kind == "truncate")
                    for t, kind, n in effects)
        self.warnings.clear()
        try:
            c.execute("COMMIT")
        except psycopg.Error as e:
            self._err("commit", None, e)
            self.stats.txns["in_doubt"] += 1
            self.stats.in_doubt.append(seq)
            if not self._broken():
                # COMMIT failed with the connection alive: the transaction rolled back.
                self.stats.in_doubt.pop()
                self.stats.txns["in_doubt"] -= 1
                self.stats.txns["failed"] += 1
                self.stats.rolled_back.append(seq)
            return
        warned = any("pg_redis" in w for w in self.warnings)
        if warned:
            self.stats.commit_warnings += 1
        self.stats.txns["committed"] += 1
        self.stats.acked.append((seq, waits and not warned))

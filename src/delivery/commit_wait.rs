//! The `commit` mode's wait: a COMMIT that queued changes of a commit-mode mirror returns to the
//! client only once the worker reports them in Redis, or after `pg_redis.commit_wait_timeout`,
//! the way synchronous replication waits for a standby.
//!
//! The backend registers (database, pid, xid, id range) in shared memory from its COMMIT
//! callback — its rows are committed and visible by then — wakes the worker and sleeps on its
//! latch. After each batch the worker looks up each waiter's rows: none left means delivered;
//! left with a failed attempt means failed (the queue will retry). The commit never fails and
//! never hangs: interrupts are held at COMMIT, so a pending cancel or termination is checked by
//! hand and ends the wait at once, as does Redis being known down. Everything here runs where an
//! ERROR would become a PANIC: only latches, shared memory and WARNINGs.

use super::worker_pid_for;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock};
use std::cell::Cell;
use std::time::{Duration, Instant};

pub const WAITERS: usize = 256;
const FREE: u8 = 0;
const WAITING: u8 = 1;
const DELIVERED: u8 = 2;
const FAILED: u8 = 3;

#[derive(Copy, Clone)]
pub struct Waiters {
    pub db: [u32; WAITERS],
    pub pid: [i32; WAITERS],
    pub xid: [u64; WAITERS],
    pub min_id: [i64; WAITERS],
    pub max_id: [i64; WAITERS],
    pub state: [u8; WAITERS],
}

impl Default for Waiters {
    fn default() -> Self {
        Waiters {
            db: [0; WAITERS],
            pid: [0; WAITERS],
            xid: [0; WAITERS],
            min_id: [0; WAITERS],
            max_id: [0; WAITERS],
            state: [FREE; WAITERS],
        }
    }
}
unsafe impl PGRXSharedMemory for Waiters {}

pub static WAITING_COMMITS: PgLwLock<Waiters> =
    unsafe { PgLwLock::new(c"pg_redis_commit_waiters") };

pub fn init_preloaded() {
    pgrx::pg_shmem_init!(WAITING_COMMITS);
}

thread_local! {
    /// (xid, lowest and highest queue id) of this transaction's commit-mode changes.
    static PENDING: Cell<Option<(u64, i64, i64)>> = const { Cell::new(None) };
    /// Did this transaction queue changes of a commit- or sync-mode mirror (PREPARE refused)?
    static NEEDS_WORKER: Cell<bool> = const { Cell::new(false) };
    /// Did this transaction push sync-mode changes (the worker repairs them on rollback)?
    static SYNC_PUSHED: Cell<bool> = const { Cell::new(false) };
}

/// Remember the queue ids of a commit-mode mirror's changes queued by this transaction.
pub fn note_commit_mode(xid: u64, min_id: i64, max_id: i64) {
    let merged = match PENDING.with(|p| p.get()) {
        Some((x, lo, hi)) if x == xid => (x, lo.min(min_id), hi.max(max_id)),
        _ => (xid, min_id, max_id),
    };
    PENDING.with(|p| p.set(Some(merged)));
    NEEDS_WORKER.with(|n| n.set(true));
}

pub fn note_sync_mode() {
    NEEDS_WORKER.with(|n| n.set(true));
    SYNC_PUSHED.with(|n| n.set(true));
}

pub fn sync_pushed() -> bool {
    SYNC_PUSHED.with(|n| n.get())
}

pub fn forget() {
    PENDING.with(|p| p.set(None));
    NEEDS_WORKER.with(|n| n.set(false));
    SYNC_PUSHED.with(|n| n.set(false));
}

pub fn touched_commit_or_sync() -> bool {
    NEEDS_WORKER.with(|n| n.get())
}

/// Called from the COMMIT callback.
pub fn wait_at_commit() {
    let Some((xid, min_id, max_id)) = PENDING.with(|p| p.take()) else {
        return;
    };
    if crate::in_worker() {
        return; // the worker never waits for itself (backfills, repairs)
    }
    NEEDS_WORKER.with(|n| n.set(false));
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let Some((worker, down)) = worker_pid_for(db) else {
        warning!("pg_redis: no worker serves this database: the committed changes wait in the queue (redis_drain())");
        return;
    };
    if down {
        // Redis is known down: the commit does not wait, the queue delivers later.
        warning!("pg_redis: Redis is unreachable: the committed changes wait in the queue (see redis_stats.last_error)");
        return;
    }
    let me = unsafe { pg_sys::MyProcPid };
    let slot = {
        let mut w = WAITING_COMMITS.exclusive();
        let Some(i) = (0..WAITERS).find(|&i| w.state[i] == FREE) else {
            return;
        };
        w.db[i] = db;
        w.pid[i] = me;
        w.xid[i] = xid;
        w.min_id[i] = min_id;
        w.max_id[i] = max_id;
        w.state[i] = WAITING;
        i
    };
    set_latch_of(worker);
    let timeout = crate::settings::commit_wait_timeout();
    let start = Instant::now();
    let outcome = loop {
        let state = WAITING_COMMITS.share().state[slot];
        if state != WAITING {
            break state;
        }
        if unsafe { pg_sys::ProcDiePending != 0 || pg_sys::QueryCancelPending != 0 } {
            warning!("pg_redis: stopped waiting for the committed changes to reach Redis (the transaction has committed; the queue delivers them)");
            break WAITING;
        }
        if worker_pid_for(db).is_none_or(|(_, down)| down) {
            warning!("pg_redis: Redis became unreachable: the committed changes wait in the queue (see redis_stats.last_error)");
            break WAITING;
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            warning!(
                "pg_redis: the committed changes did not reach Redis within pg_redis.commit_wait_timeout ({} ms); the queue delivers them",
                timeout.as_millis()
            );
            break WAITING;
        }
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_POSTMASTER_DEATH) as i32,
                left.min(Duration::from_millis(100)).as_millis() as i64,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    };
    {
        let mut w = WAITING_COMMITS.exclusive();
        w.state[slot] = FREE;
        w.pid[slot] = 0;
    }
    if outcome == FAILED {
        warning!("pg_redis: Redis refused some of the committed changes; the queue retries them (see redis_stats.last_error)");
    }
}

pub fn set_latch_of(pid: i32) {
    unsafe {
        let p = pg_sys::BackendPidGetProc(pid);
        if !p.is_null() {
            pg_sys::SetLatch(&mut (*p).procLatch);
        }
    }
}

/// Worker side: settle the waiters of this database whose rows are gone or have failed.
/// Does a commit-mode COMMIT of this database wait for the worker?
pub fn anyone_waiting() -> bool {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let w = WAITING_COMMITS.share();
    (0..WAITERS).any(|i| w.state[i] == WAITING && w.db[i] == db)
}

pub fn serve_waiters() {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let waiting: Vec<(usize, i32, u64, i64, i64)> = {
        let w = WAITING_COMMITS.share();
        (0..WAITERS)
            .filter(|&i| w.state[i] == WAITING && w.db[i] == db)
            .map(|i| (i, w.pid[i], w.xid[i], w.min_id[i], w.max_id[i]))
            .collect()
    };
    for (slot, pid, xid, lo, hi) in waiting {
        // A writable SPI call takes a fresh snapshot, which sees the waiter's committed rows;
        // a kept plan, as a commit-mode COMMIT waits for this after every batch.
        let r = Spi::connect_mut(|c| {
            let t = crate::plans::update(
                c,
                "SELECT count(*), coalesce(max(attempts), 0) FROM redis_internal.queue \
                  WHERE id BETWEEN $1 AND $2 AND xid = $3::text::xid8",
                Some(1),
                &[lo.into(), hi.into(), xid.to_string().into()],
            )?;
            let row = t.first();
            Ok::<_, pgrx::spi::SpiError>((
                row.get::<i64>(1)?.unwrap_or(0),
                row.get::<i32>(2)?.unwrap_or(0),
            ))
        });
        let state = match r {
            Ok((0, _)) => DELIVERED,
            Ok((_, attempts)) if attempts > 0 => FAILED,
            Ok(_) => continue,
            Err(_) => FAILED,
        };
        {
            let mut w = WAITING_COMMITS.exclusive();
            if w.state[slot] == WAITING && w.pid[slot] == pid && w.xid[slot] == xid {
                w.state[slot] = state;
            }
        }
        set_latch_of(pid);
    }
}

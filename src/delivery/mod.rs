//! Delivery: queued changes → Redis. One deliverer at a time per database (an advisory lock), so
//! the worker and `redis_drain()` together keep per-key commit order. Backends wake the worker
//! at COMMIT through its latch, found in shared memory.

pub mod after_failover;
pub mod commit_wait;
pub mod deliver;
mod queue_delete;
mod queue_read;
pub mod sync_mode;
pub mod versioned;
pub mod worker;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock};
use std::cell::Cell;

pub const MAX_WORKERS: usize = 16;

#[derive(Copy, Clone, Default)]
pub struct WorkerSlots {
    pub db: [u32; MAX_WORKERS],
    pub pid: [i32; MAX_WORKERS],
    /// The worker's last attempt to reach Redis failed (commit-mode waits end at once).
    pub down: [bool; MAX_WORKERS],
    /// The worker is backing off (Redis down or refusing): a commit's wake-up would only make it
    /// wait again, at the price of a signal and a task switch on the writer's COMMIT.
    pub pausing: [bool; MAX_WORKERS],
    /// This life of the shared memory: stamped on first use, lost with it at a crash restart.
    pub life: i64,
}
unsafe impl PGRXSharedMemory for WorkerSlots {}

pub static SLOTS: PgLwLock<WorkerSlots> = unsafe { PgLwLock::new(c"pg_redis_workers") };

static mut PRELOADED: bool = false;

pub fn preloaded() -> bool {
    unsafe { PRELOADED }
}

/// Called from `_PG_init` while preloading: shared memory and the workers.
pub fn init_preloaded() {
    unsafe { PRELOADED = true };
    pgrx::pg_shmem_init!(SLOTS);
    crate::stats::init_preloaded();
    commit_wait::init_preloaded();
    worker::register_workers();
}

/// The pid of the worker serving this database, if one runs.
pub fn worker_pid() -> Option<i32> {
    worker_pid_for(unsafe { pg_sys::MyDatabaseId }.to_u32()).map(|(pid, _)| pid)
}

/// The worker of this database, unless it is pausing.
fn worker_to_wake() -> Option<i32> {
    if !preloaded() {
        return None;
    }
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let slots = SLOTS.share();
    (0..MAX_WORKERS)
        .find(|&i| slots.db[i] == db && slots.pid[i] != 0)
        .filter(|&i| !slots.pausing[i])
        .map(|i| slots.pid[i])
}

/// (pid, Redis known down) of the worker serving a database.
pub fn worker_pid_for(db: u32) -> Option<(i32, bool)> {
    if !preloaded() {
        return None;
    }
    let slots = SLOTS.share();
    (0..MAX_WORKERS)
        .find(|&i| slots.db[i] == db && slots.pid[i] != 0)
        .map(|i| (slots.pid[i], slots.down[i]))
}

/// Is this database one the workers serve (pg_redis.databases)?
pub fn database_served() -> bool {
    if !preloaded() {
        return false;
    }
    let name = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId)) }
        .to_string_lossy()
        .into_owned();
    crate::settings::databases().contains(&name)
}

thread_local! {
    static WAKE_PENDING: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Ask for the worker to be woken when this transaction commits.
pub fn wake_at_commit() {
    if !preloaded() {
        return;
    }
    WAKE_PENDING.with(|w| w.set(true));
    if !CALLBACK_REGISTERED.with(|c| c.replace(true)) {
        unsafe {
            pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
        }
    }
}

/// At COMMIT interrupts are held and an ERROR would become a PANIC: only latches and waits here.
#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE if commit_wait::touched_commit_or_sync() => {
            commit_wait::forget();
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "pg_redis: PREPARE TRANSACTION is not supported for a transaction that changed a table mirrored in commit or sync mode"
            );
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            if WAKE_PENDING.with(|w| w.replace(false)) {
                // A pausing worker looks at the queue when its pause ends, whoever woke it.
                if let Some(pid) = worker_to_wake() {
                    commit_wait::set_latch_of(pid);
                }
            }
            commit_wait::wait_at_commit();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            WAKE_PENDING.with(|w| w.set(false));
            // Keys pushed in sync mode must be repaired promptly: wake the worker.
            if commit_wait::sync_pushed() {
                if let Some(pid) = worker_pid() {
                    commit_wait::set_latch_of(pid);
                }
            }
            commit_wait::forget();
        }
        _ => {}
    }
}

/// A savepoint rolled back after a sync-mode push: the worker repairs its keys right away.
#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB && commit_wait::sync_pushed() {
        if let Some(pid) = worker_pid() {
            commit_wait::set_latch_of(pid);
        }
    }
}

/// A stamp of this life of the server: it changes at every start *and at every crash restart*
/// (shared memory is made anew then; the postmaster's start time is not), so that anything
/// tagged before a crash — xids whose WAL was lost are handed out again — is recognised.
pub fn server_life() -> i64 {
    if !preloaded() {
        return unsafe { pg_sys::PgStartTime };
    }
    let mut s = SLOTS.exclusive();
    if s.life == 0 {
        s.life = unsafe { pg_sys::GetCurrentTimestamp() };
    }
    s.life
}

/// Whether this database has the extension (a worker serves databases before and after it).
/// Asked on every step of the worker: a catalog index lookup, not a query (a query's executor
/// start and run on every step, bench/profile.py insert). Inside a transaction.
pub fn extension_installed() -> bool {
    unsafe { pg_sys::get_extension_oid(c"pg_redis".as_ptr(), true) != pg_sys::InvalidOid }
}

//! Delivery: queued changes → Redis. One deliverer at a time per database (an advisory lock), so
//! the worker and `redis_drain()` together keep per-key commit order. Backends wake the worker
//! at COMMIT through its latch, found in shared memory.

pub mod deliver;
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
    worker::register_workers();
}

/// The pid of the worker serving this database, if one runs.
pub fn worker_pid() -> Option<i32> {
    if !preloaded() {
        return None;
    }
    let me = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let slots = SLOTS.share();
    (0..MAX_WORKERS)
        .find(|&i| slots.db[i] == me && slots.pid[i] != 0)
        .map(|i| slots.pid[i])
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
        unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
    }
}

/// At COMMIT interrupts are held and an ERROR would become a PANIC: only set a latch here.
#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            if WAKE_PENDING.with(|w| w.replace(false)) =>
        {
            if let Some(pid) = worker_pid() {
                let proc_ = unsafe { pg_sys::BackendPidGetProc(pid) };
                if !proc_.is_null() {
                    unsafe { pg_sys::SetLatch(&mut (*proc_).procLatch) };
                }
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            WAKE_PENDING.with(|w| w.set(false));
        }
        _ => {}
    }
}

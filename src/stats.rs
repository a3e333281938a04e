//! Read-through counters (hits, misses) in shared memory: bumped on every `redis_fetch`, so they
//! must not write a table. A fixed number of slots keyed by (database, mirror id); without
//! preloading there is no shared memory and the counters stay at zero (documented).

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock};

pub const SLOTS: usize = 512;

#[derive(Copy, Clone)]
pub struct Counters {
    pub db: [u32; SLOTS],
    pub mirror: [i32; SLOTS],
    pub hits: [u64; SLOTS],
    pub misses: [u64; SLOTS],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            db: [0; SLOTS],
            mirror: [0; SLOTS],
            hits: [0; SLOTS],
            misses: [0; SLOTS],
        }
    }
}
unsafe impl PGRXSharedMemory for Counters {}

pub static COUNTERS: PgLwLock<Counters> = unsafe { PgLwLock::new(c"pg_redis_counters") };

pub fn init_preloaded() {
    pgrx::pg_shmem_init!(COUNTERS);
}

fn me() -> u32 {
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

pub fn count(mirror: i32, hit: bool) {
    if !crate::delivery::preloaded() {
        return;
    }
    let db = me();
    let mut c = COUNTERS.exclusive();
    let slot = (0..SLOTS)
        .find(|&i| c.db[i] == db && c.mirror[i] == mirror)
        .or_else(|| (0..SLOTS).find(|&i| c.db[i] == 0));
    if let Some(i) = slot {
        c.db[i] = db;
        c.mirror[i] = mirror;
        if hit {
            c.hits[i] += 1;
        } else {
            c.misses[i] += 1;
        }
    }
}

/// (hits, misses) of a mirror of this database.
pub fn get(mirror: i32) -> (i64, i64) {
    if !crate::delivery::preloaded() {
        return (0, 0);
    }
    let db = me();
    let c = COUNTERS.share();
    (0..SLOTS)
        .find(|&i| c.db[i] == db && c.mirror[i] == mirror)
        .map(|i| (c.hits[i] as i64, c.misses[i] as i64))
        .unwrap_or((0, 0))
}

/// Forget a mirror's counters (it was dropped or re-created).
pub fn forget(mirror: i32) {
    if !crate::delivery::preloaded() {
        return;
    }
    let db = me();
    let mut c = COUNTERS.exclusive();
    if let Some(i) = (0..SLOTS).find(|&i| c.db[i] == db && c.mirror[i] == mirror) {
        c.db[i] = 0;
        c.mirror[i] = 0;
        c.hits[i] = 0;
        c.misses[i] = 0;
    }
}

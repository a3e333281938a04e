//! Noticing a Sentinel failover. Redis replicates asynchronously, so the new master may lack writes
//! the old one acknowledged; the worker then verifies and repairs every mirror
//! (`delivery::after_failover`, docs/topologies.md).
//!
//! Every process that connects through the sentinels reports the master it was given. When that
//! differs from the last master any process of this server saw, the failover epoch goes up. Each
//! database's worker records the epoch it repaired after. Both live in shared memory, so a worker
//! restarted in the middle of a repair repairs again; a server restart forgets them (a failover
//! while PostgreSQL is down is not noticed: docs/topologies.md). Without preload there is no
//! worker: the session that notices the change says so with a WARNING.

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock};
use std::cell::RefCell;

const ADDR_MAX: usize = 256;
const DATABASES: usize = crate::delivery::MAX_WORKERS;

#[derive(Copy, Clone)]
pub struct Seen {
    master: [u8; ADDR_MAX],
    len: usize,
    epoch: u64,
    /// (database oid, epoch its worker repaired after)
    repaired: [(u32, u64); DATABASES],
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            master: [0; ADDR_MAX],
            len: 0,
            epoch: 0,
            repaired: [(0, 0); DATABASES],
        }
    }
}

unsafe impl PGRXSharedMemory for Seen {}

static SEEN: PgLwLock<Seen> = unsafe { PgLwLock::new(c"pg_redis_failover") };

thread_local! {
    /// Without preload: the master this process last saw.
    static LOCAL: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// While preloading (`_PG_init`).
pub fn init_preloaded() {
    pgrx::pg_shmem_init!(SEEN);
}

/// A connection through the sentinels reached `master` (`host:port`). Main thread only.
pub fn observe(master: &str) {
    let changed_from = if crate::delivery::preloaded() {
        let mut s = SEEN.exclusive();
        let bytes = master.as_bytes();
        let len = bytes.len().min(ADDR_MAX);
        let before = String::from_utf8_lossy(&s.master[..s.len]).into_owned();
        if s.len == len && s.master[..len] == bytes[..len] {
            None
        } else {
            s.master[..len].copy_from_slice(&bytes[..len]);
            s.len = len;
            if before.is_empty() {
                None
            } else {
                s.epoch += 1;
                Some(before)
            }
        }
    } else {
        LOCAL.with(|l| {
            let before = l.borrow_mut().replace(master.to_string());
            before.filter(|b| b != master)
        })
    };
    let Some(before) = changed_from else { return };
    if crate::delivery::preloaded() {
        warning!(
            "pg_redis: the Redis master changed from {before} to {master} (Sentinel failover); the worker verifies and repairs every mirror"
        );
    } else {
        warning!(
            "pg_redis: the Redis master changed from {before} to {master} (Sentinel failover); writes the old master acknowledged may be lost: run redis_verify(tbl, true) for each mirror"
        );
    }
}

/// The failover epoch this database's worker has not repaired after yet, if any.
pub fn repair_due(db: u32) -> Option<u64> {
    if !crate::delivery::preloaded() {
        return None;
    }
    let s = SEEN.share();
    let done = s
        .repaired
        .iter()
        .find(|(d, _)| *d == db)
        .map_or(0, |(_, e)| *e);
    (s.epoch > done).then_some(s.epoch)
}

pub fn mark_repaired(db: u32, epoch: u64) {
    if !crate::delivery::preloaded() {
        return;
    }
    let mut s = SEEN.exclusive();
    let i = s
        .repaired
        .iter()
        .position(|(d, _)| *d == db)
        .or_else(|| s.repaired.iter().position(|(d, _)| *d == 0));
    if let Some(i) = i {
        s.repaired[i] = (db, epoch.max(s.repaired[i].1));
    }
}

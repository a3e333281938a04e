//! Noticing a Sentinel failover. Redis replicates asynchronously, so the new master may lack writes
//! the old one acknowledged; the worker then verifies and repairs every mirror
//! (`delivery::after_failover`, docs/topologies.md).
//!
//! Every process that connects through the sentinels reports the master it was given. When that
//! differs from the last master any process of this server saw for the same settings, the
//! failover epoch goes up. Each
//! database's worker records the epoch it repaired after. Both live in shared memory, so a worker
//! restarted in the middle of a repair repairs again; a server restart forgets them (a failover
//! while PostgreSQL is down is not noticed: docs/topologies.md). Without preload there is no
//! worker: the session that notices the change says so with a WARNING.

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock};
use std::cell::RefCell;

const ADDR_MAX: usize = 256;
const DATABASES: usize = crate::delivery::MAX_WORKERS;
/// Sentinel configurations remembered at once (sessions may point elsewhere than the worker).
const CONFIGS: usize = 8;

/// The last master seen for one sentinel configuration (a hash of its settings).
#[derive(Copy, Clone)]
struct Master {
    config: u64,
    addr: [u8; ADDR_MAX],
    len: usize,
    /// For replacing the least recently seen configuration.
    seen_at: u64,
}

#[derive(Copy, Clone)]
pub struct Seen {
    masters: [Master; CONFIGS],
    clock: u64,
    epoch: u64,
    /// (database oid, epoch its worker repaired after)
    repaired: [(u32, u64); DATABASES],
}

impl Default for Seen {
    fn default() -> Self {
        let none = Master {
            config: 0,
            addr: [0; ADDR_MAX],
            len: 0,
            seen_at: 0,
        };
        Seen {
            masters: [none; CONFIGS],
            clock: 0,
            epoch: 0,
            repaired: [(0, 0); DATABASES],
        }
    }
}

unsafe impl PGRXSharedMemory for Seen {}

static SEEN: PgLwLock<Seen> = unsafe { PgLwLock::new(c"pg_redis_failover") };

thread_local! {
    /// Without preload: the master this process last saw, and for which configuration.
    static LOCAL: RefCell<Option<(u64, String)>> = const { RefCell::new(None) };
}

/// While preloading (`_PG_init`).
pub fn init_preloaded() {
    pgrx::pg_shmem_init!(SEEN);
}

/// A connection through the sentinels of configuration `config` (the link's fingerprint) reached
/// `master` (`host:port`). Main thread only.
pub fn observe(config: &str, master: &str) {
    let config = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        config.hash(&mut h);
        h.finish()
    };
    let changed_from = if crate::delivery::preloaded() {
        let mut s = SEEN.exclusive();
        s.clock += 1;
        let now = s.clock;
        let i = match s
            .masters
            .iter()
            .position(|m| m.len > 0 && m.config == config)
        {
            Some(i) => i,
            None => {
                let oldest = (0..CONFIGS)
                    .min_by_key(|&i| s.masters[i].seen_at)
                    .unwrap_or(0);
                s.masters[oldest].config = config;
                s.masters[oldest].len = 0;
                oldest
            }
        };
        let bytes = master.as_bytes();
        let len = bytes.len().min(ADDR_MAX);
        let m = &mut s.masters[i];
        m.seen_at = now;
        let before = String::from_utf8_lossy(&m.addr[..m.len]).into_owned();
        if m.len == len && m.addr[..len] == bytes[..len] {
            None
        } else {
            m.addr[..len].copy_from_slice(&bytes[..len]);
            m.len = len;
            if before.is_empty() {
                None
            } else {
                s.epoch += 1;
                Some(before)
            }
        }
    } else {
        LOCAL.with(|l| {
            let before = l.borrow_mut().replace((config, master.to_string()));
            before
                .filter(|(c, b)| *c == config && b != master)
                .map(|(_, b)| b)
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

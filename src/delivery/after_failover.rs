//! After a Sentinel failover (`redis::failover` noticed the master change) the new master may lack
//! writes the old one acknowledged but had not replicated yet: Redis replication is asynchronous,
//! and the old master takes writes until Sentinel demotes it. Which writes is unknown (the queue
//! forgets delivered changes), so every mirror is brought back in step, in ways that hold no lock
//! for long and survive a worker restart:
//! - `write` mirrors: the keys without a row are deleted (redis_verify's SCAN pass: lost deletes,
//!   TRUNCATEs), then every row is pushed again by a scheduled backfill, as `redis_resync` does
//!   (lost writes), in batches between deliveries;
//! - `invalidate` mirrors: every key of the layout is deleted (a lost invalidation would leave a
//!   stale cached copy; readers refill them).
//!
//! docs/topologies.md states the window and the cost.

use crate::error::{Error, Result};
use crate::mirror::capture::{enqueue, Change};
use crate::mirror::catalog;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// In the worker, between batches: repair if a failover happened since the last repair.
pub fn repair_if_due() {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let Some(epoch) = crate::redis::failover::repair_due(db) else {
        return;
    };
    // Work against the master the sentinels name now, not one this process may still hold.
    crate::redis::reset();
    let mirrors = BackgroundWorker::transaction(|| {
        crate::mirror::validate::in_subtransaction(mirrors)
            .unwrap_or_else(|m| Err(Error::Internal(m)))
    });
    let mirrors = match mirrors {
        Ok(m) => m,
        Err(e) => {
            warning!(
                "pg_redis: repair after failover: {}",
                crate::error::redact(&e.to_string())
            );
            return;
        }
    };
    let mut deleted = 0i64;
    for (tbl, name) in &mirrors {
        let tbl = *tbl;
        let r = BackgroundWorker::transaction(move || {
            crate::mirror::validate::in_subtransaction(move || repair(tbl))
                .unwrap_or_else(|m| Err(Error::Internal(m)))
        });
        match r {
            Ok(n) => deleted += n,
            // Redis down again, a lock conflict with a DROP: the whole round again next loop.
            Err(e) => {
                warning!(
                    "pg_redis: repair after failover of {name}: {}",
                    crate::error::redact(&e.to_string())
                );
                return;
            }
        }
    }
    crate::redis::failover::mark_repaired(db, epoch);
    log!(
        "pg_redis: after the Redis failover, {} mirrors are being repaired: {deleted} keys without a row queued for deletion, every row queued again by a backfill",
        mirrors.len()
    );
}

fn repair(tbl: pg_sys::Oid) -> Result<i64> {
    let Some(m) = catalog::by_table(tbl)? else {
        return Ok(0); // dropped meanwhile
    };
    if m.state == "needs_resync" {
        return Ok(0); // not capturing: redis_resync, which it waits for, repairs it anyway
    }
    if m.action != "write" {
        enqueue(&m, vec![Change::new("t", m.key_pattern.clone(), None)])?;
        crate::delivery::wake_at_commit();
        return Ok(0);
    }
    let deleted = crate::verify::remove_extra(&m)?;
    crate::mirror::backfill::schedule(&m)?;
    crate::delivery::wake_at_commit();
    Ok(deleted)
}

/// Every mirror of this database, when the extension is there.
fn mirrors() -> Result<Vec<(pg_sys::Oid, String)>> {
    let installed = super::extension_installed();
    if !installed {
        return Ok(vec![]);
    }
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT tbl::oid, tbl::text FROM redis_internal.mirrors ORDER BY id",
            None,
            &[],
        )?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    r.get::<String>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<std::result::Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .map_err(|e| Error::Internal(format!("repair after failover: {e}")))
}

//! After a Sentinel failover (`redis::failover` noticed the master change) the new master may lack
//! writes the old one acknowledged but had not replicated yet: Redis replication is asynchronous.
//! Which writes is unknown (the queue forgets delivered changes), so the worker verifies and repairs
//! every mirror (`redis_verify(tbl, repair => true)`, one transaction per mirror): Redis ends equal
//! to the tables whatever the window was. docs/topologies.md states the window and the cost.

use crate::error::Result;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// In the worker, between batches: repair if a failover happened since the last repair.
pub fn repair_if_due() {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let Some(epoch) = crate::redis::failover::repair_due(db) else {
        return;
    };
    // Verify against the master the sentinels name now, not one this process may still hold.
    crate::redis::reset();
    let mirrors = BackgroundWorker::transaction(|| {
        crate::mirror::validate::in_subtransaction(mirrors)
            .unwrap_or_else(|msg| Err(crate::error::Error::Internal(msg)))
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
    let (mut checked, mut repaired) = (0i64, 0i64);
    for (tbl, name) in &mirrors {
        let tbl = *tbl;
        let r = BackgroundWorker::transaction(move || {
            crate::mirror::validate::in_subtransaction(move || crate::verify::verify(tbl, true))
        });
        match r {
            Ok(Ok(t)) => {
                checked += t.checked;
                repaired += t.repaired;
            }
            // Redis down again, a dropped table...: try the whole round again at the next loop.
            Ok(Err(e)) => {
                warning!(
                    "pg_redis: repair after failover of {name}: {}",
                    crate::error::redact(&e.to_string())
                );
                return;
            }
            Err(msg) => {
                warning!(
                    "pg_redis: repair after failover of {name}: {}",
                    crate::error::redact(&msg)
                );
                return;
            }
        }
    }
    crate::redis::failover::mark_repaired(db, epoch);
    log!(
        "pg_redis: after the Redis failover, {} mirrors verified ({checked} rows), {repaired} keys queued for repair",
        mirrors.len()
    );
}

/// Every mirror of this database, when the extension is there.
fn mirrors() -> Result<Vec<(pg_sys::Oid, String)>> {
    let installed = crate::spi_read::one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_redis')",
        &[],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
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
    .map_err(|e| crate::error::Error::Internal(format!("repair after failover: {e}")))
}

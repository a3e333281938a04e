//! Backfill: the rows that existed when a mirror was created (or resynced) are queued in batches
//! of heap blocks (TID range scans), each batch in its own transaction, taking FOR SHARE row
//! locks only on the batch so that a concurrent update of one of its rows is queued after it.
//! Rows changed after the mirror's triggers exist are captured by the triggers themselves; rows
//! that move to a later block may be queued twice, which is harmless. Memory stays flat.

use super::capture::{enqueue, Change};
use super::catalog::{self, Mirror};
use super::context::{as_role, ext_owner, with_render_settings};
use super::template::quote_ident;
use crate::error::{Error, Result};
use pgrx::pg_sys;
use pgrx::prelude::*;

const BLOCKS_PER_STEP: i64 = 32;
/// Blocks per step sent straight to Redis (direct_step): no row locks or queue rows, so a step
/// can be larger; its rows are held in memory for one pipeline (about 1 MB of table).
const DIRECT_BLOCKS_PER_STEP: i64 = 128;

fn spi_err(e: pgrx::spi::SpiError) -> Error {
    Error::Internal(format!("backfill: {e}"))
}

/// Schedule a backfill of the mirror's table: returns the estimated number of rows.
pub fn schedule(m: &Mirror) -> Result<i64> {
    let sql = format!(
        "SELECT (pg_catalog.pg_relation_size({oid}::oid) / current_setting('block_size')::int)::int8, \
                (SELECT count(*) FROM ONLY {tbl})",
        oid = m.tbl.to_u32(),
        tbl = qualified(m.tbl)?
    );
    let (blocks, rows) = Spi::get_two::<i64, i64>(&sql)
        .map(|(b, r)| (b.unwrap_or(0), r.unwrap_or(0)))
        .map_err(spi_err)?;
    as_role(ext_owner(), false, || {
        Spi::run_with_args(
            "INSERT INTO redis_internal.backfills (mirror_id, next_block, total_blocks, rows_total, rows_done) \
             VALUES ($1, 0, $2, $3, 0) ON CONFLICT (mirror_id) DO UPDATE \
             SET next_block = 0, total_blocks = $2, rows_total = $3, rows_done = 0",
            &[m.id.into(), blocks.into(), rows.into()],
        )
        .map_err(spi_err)?;
        Spi::run_with_args(
            "UPDATE redis_internal.mirrors SET state = 'backfilling' WHERE id = $1",
            &[m.id.into()],
        )
        .map_err(spi_err)
    })?;
    Ok(rows)
}

/// One step of some pending backfill; false when none is pending.
pub fn step_any() -> Result<bool> {
    // Checked read-only first, so that an idle worker does not take a transaction id each loop.
    let pending = as_role(ext_owner(), false, || {
        crate::spi_read::one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM redis_internal.backfills)",
            &[],
        )
    })
    .map_err(spi_err)?
    .unwrap_or(false);
    if !pending {
        return Ok(false);
    }
    let next = as_role(ext_owner(), false, || {
        match Spi::get_one::<i32>(
            "SELECT mirror_id FROM redis_internal.backfills ORDER BY mirror_id LIMIT 1 FOR UPDATE SKIP LOCKED",
        ) {
            Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
            other => other.map_err(spi_err),
        }
    })?;
    match next {
        None => Ok(false),
        // A step that waits for a lock: the worker looks again after its idle wait, not at once.
        Some(id) => step_inner(id).map(|(_, _, waiting)| !waiting),
    }
}

/// One step of one mirror's backfill: returns (rows queued, done?).
pub fn step(mirror_id: i32) -> Result<(i64, bool)> {
    step_inner(mirror_id).map(|(q, done, _)| (q, done))
}

/// step, and whether it could not go on for a lock another transaction holds.
fn step_inner(mirror_id: i32) -> Result<(i64, bool, bool)> {
    let Some(m) = catalog::by_id(mirror_id)? else {
        return Ok((0, true, false));
    };
    let (next, total) = as_role(ext_owner(), false, || {
        Spi::get_two_with_args::<i64, i64>(
            "SELECT next_block, total_blocks FROM redis_internal.backfills WHERE mirror_id = $1 FOR UPDATE",
            &[mirror_id.into()],
        )
        .or_else(|e| match e {
            pgrx::spi::SpiError::InvalidPosition => Ok((None, None)),
            e => Err(spi_err(e)),
        })
    })?;
    let (Some(next), Some(total)) = (next, total) else {
        return Ok((0, true, false));
    };
    let end = (next + BLOCKS_PER_STEP).min(total.max(next + 1));
    // Never wait for the table while holding the backfill's row: a DROP TABLE or a second
    // redis_mirror holding the table would wait for us in turn (a deadlock). Try again later.
    let table_sql = qualified(m.tbl)?;
    let locked = crate::mirror::validate::in_subtransaction(|| {
        Spi::run(&format!("LOCK TABLE {table_sql} IN ROW SHARE MODE NOWAIT"))
    });
    if !matches!(locked, Ok(Ok(()))) {
        return Ok((0, false, true));
    }
    let mut queued = 0i64;
    let builtin = next < total && m.action == "write" && only_builtin_rendering(&m)?;
    let direct = if builtin && m.mode != "sync" {
        let direct_end = (next + DIRECT_BLOCKS_PER_STEP).min(total.max(next + 1));
        direct_step(&m, &table_sql, next, direct_end)?.map(|sent| (sent, direct_end))
    } else {
        None
    };
    let mut end = end;
    if let Some((sent, direct_end)) = direct {
        (queued, end) = (sent, direct_end);
    } else if builtin {
        // Only PostgreSQL's own code renders these rows (no filter, built-in types, no row
        // security): one INSERT ... SELECT as the extension's owner, without copying the rows
        // through this process (as capture does for such mirrors).
        let sql = format!(
            "INSERT INTO redis_internal.queue (mirror_id, op, key, payload) \
             SELECT $1, 's', {}, {} FROM ONLY {} r \
              WHERE r.ctid >= '({next},0)'::tid AND r.ctid < '({end},0)'::tid FOR SHARE OF r",
            m.key_sql()?,
            m.payload_sql(),
            table_sql
        );
        let table = m.table_name();
        queued = as_role(ext_owner(), true, || {
            with_render_settings(|| {
                Spi::connect_mut(|c| c.update(&sql, None, &[m.id.into()]).map(|t| t.len() as i64))
            })
        })
        .map_err(|e| Error::Internal(format!("backfill of {table}: {e}")))?;
    } else if next < total && m.action == "write" {
        let sql = format!(
            "SELECT {}, {}, {} FROM ONLY {} r WHERE r.ctid >= '({next},0)'::tid AND r.ctid < '({end},0)'::tid FOR SHARE OF r",
            m.key_sql()?,
            m.payload_sql(),
            m.filter_sql(),
            qualified(m.tbl)?
        );
        let owner = catalog::table_owner(m.tbl)?;
        let table = m.table_name();
        let rows: Vec<(String, Option<String>, bool)> = as_role(owner, true, || {
            with_render_settings(|| {
                Spi::connect(|c| {
                    let rows = c
                        .select(&sql, None, &[])
                        .map_err(|e| Error::Internal(format!("backfill of {table}: {e}")))?;
                    rows.into_iter()
                        .map(|r| {
                            Ok((
                                r.get::<String>(1).map_err(spi_err)?.unwrap_or_default(),
                                r.get::<String>(2).map_err(spi_err)?,
                                r.get::<bool>(3).map_err(spi_err)?.unwrap_or(false),
                            ))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
        })?;
        let changes: Vec<Change> = rows
            .into_iter()
            .filter(|r| r.2)
            .map(|(k, p, _)| Change::new("s", k, p))
            .collect();
        queued = changes.len() as i64;
        enqueue(&m, changes)?;
    }
    let done = end >= total;
    let finished = as_role(ext_owner(), false, || -> Result<bool> {
        // The mirror's row is skipped when locked (a redis_mirror or resync of it in progress
        // would wait for this step's backfill row in turn): the backfill then stays, finished,
        // and the next step tries again, rather than leave the mirror 'backfilling' forever.
        let activated = done
            && match Spi::get_one_with_args::<i32>(
                "UPDATE redis_internal.mirrors SET state = 'active' \
                  WHERE id IN (SELECT id FROM redis_internal.mirrors WHERE id = $1 AND state = 'backfilling' \
                                  FOR UPDATE SKIP LOCKED) RETURNING id",
                &[mirror_id.into()],
            ) {
                Ok(v) => v.is_some(),
                Err(pgrx::spi::SpiError::InvalidPosition) => false,
                Err(e) => return Err(spi_err(e)),
            };
        let finished = activated
            || (done
                && !crate::spi_read::one::<bool>(
                    "SELECT EXISTS (SELECT 1 FROM redis_internal.mirrors WHERE id = $1 AND state = 'backfilling')",
                    &[mirror_id.into()],
                )
                .map_err(spi_err)?
                .unwrap_or(false));
        if finished {
            // Keep the final figures for redis_stats: a finished backfill covered every row it was
            // scheduled for (rows changed meanwhile went through the triggers); redis_rows counts
            // the rows it queued (inside the filter).
            Spi::run_with_args(
                "INSERT INTO redis_internal.mirror_stats AS s (mirror_id, backfill_done, backfill_total, redis_rows, table_rows) \
                 SELECT b.mirror_id, b.rows_total, b.rows_total, b.rows_done + $2, b.rows_total \
                   FROM redis_internal.backfills b WHERE b.mirror_id = $1 \
                 ON CONFLICT (mirror_id) DO UPDATE SET backfill_done = excluded.backfill_done, \
                   backfill_total = excluded.backfill_total, redis_rows = excluded.redis_rows, \
                   table_rows = excluded.table_rows",
                &[mirror_id.into(), queued.into()],
            )
            .map_err(spi_err)?;
            Spi::run_with_args(
                "DELETE FROM redis_internal.backfills WHERE mirror_id = $1",
                &[mirror_id.into()],
            )
            .map_err(spi_err)?;
        } else {
            Spi::run_with_args(
                "UPDATE redis_internal.backfills SET next_block = $2, rows_done = rows_done + $3 WHERE mirror_id = $1",
                &[mirror_id.into(), end.into(), queued.into()],
            )
            .map_err(spi_err)?;
        }
        Ok(finished)
    })?;
    crate::delivery::wake_at_commit();
    Ok((queued, finished, done && !finished))
}

/// A step of a filterless queue- or commit-mode mirror of built-in types, straight to Redis
/// (no queue rows, no row locks): the rows of blocks [next, end) are read in one statement and
/// snapshot, after taking the delivery lock, leaving out every key that has a change waiting in
/// the queue in that snapshot — that change, and every later one, is delivered after this step
/// in queue order, so Redis never goes back to an older value of a key. Changes committed after
/// the snapshot are queued after everything it saw. Some(rows sent), or None when the step must
/// go through the queue instead: another deliverer holds the lock, a keyspace-wide delete
/// (TRUNCATE, re-key) of the mirror waits in the queue, a standby lags, or Redis refused a row
/// (the queue counts attempts and keeps dead letters).
fn direct_step(m: &Mirror, table_sql: &str, next: i64, end: i64) -> Result<Option<i64>> {
    if !crate::delivery::deliver::try_delivery_lock()? {
        return Ok(None);
    }
    let sql = format!(
        "WITH waiting AS MATERIALIZED (SELECT k.key, q.op FROM redis_internal.queue q \
                                   CROSS JOIN LATERAL pg_catalog.json_array_elements_text(CASE WHEN q.op IN ('S', 'D') \
                                              THEN q.key::json ELSE pg_catalog.json_build_array(q.key) END) k(key) \
                                  WHERE q.mirror_id = $1) \
         SELECT r.k, r.p, EXISTS (SELECT 1 FROM waiting w WHERE w.op = 't') \
           FROM (SELECT {} AS k, {} AS p FROM ONLY {} r \
                  WHERE r.ctid >= '({next},0)'::tid AND r.ctid < '({end},0)'::tid) r \
          WHERE NOT EXISTS (SELECT 1 FROM waiting w WHERE w.key = r.k)",
        m.key_sql()?,
        m.payload_sql(),
        table_sql
    );
    let table = m.table_name();
    let (rows, purge_waiting) = as_role(ext_owner(), true, || {
        with_render_settings(|| {
            Spi::connect(|c| {
                let t = c.select(&sql, None, &[m.id.into()])?;
                let mut rows = Vec::with_capacity(t.len());
                let mut purge = false;
                for r in t {
                    rows.push((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?));
                    purge |= r.get::<bool>(3)?.unwrap_or(false);
                }
                Ok::<_, pgrx::spi::SpiError>((rows, purge))
            })
        })
    })
    .map_err(|e| Error::Internal(format!("backfill of {table}: {e}")))?;
    if purge_waiting {
        return Ok(None);
    }
    if rows.is_empty() {
        return Ok(Some(0));
    }
    let Some(verdicts) = crate::delivery::deliver::send_rows(m.id, &rows)? else {
        return Ok(None);
    };
    if verdicts.iter().any(|v| v.is_err()) {
        return Ok(None);
    }
    let n = rows.len() as i64;
    as_role(ext_owner(), false, || {
        crate::delivery::deliver::count_delivered(m.id, n)
    })?;
    Ok(Some(n))
}

/// No filter, built-in column types only and no row security: rendering runs no user code and
/// reads what the extension's owner reads.
fn only_builtin_rendering(m: &catalog::Mirror) -> Result<bool> {
    if m.filter.is_some() || !m.builtin_types {
        return Ok(false);
    }
    let rls = crate::spi_read::one::<bool>(
        "SELECT relrowsecurity FROM pg_catalog.pg_class WHERE oid = $1",
        &[m.tbl.into()],
    )
    .map_err(spi_err)?;
    Ok(rls == Some(false))
}

pub fn qualified(relid: pg_sys::Oid) -> Result<String> {
    let (nsp, rel) = crate::spi_read::two::<String, String>(
        "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[relid.into()],
    )
    .map_err(spi_err)?;
    Ok(format!(
        "{}.{}",
        quote_ident(&nsp.unwrap_or_default()),
        quote_ident(&rel.unwrap_or_default())
    ))
}

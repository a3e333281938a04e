//! `redis_verify(tbl, repair)`: compare every row of a mirrored table with Redis, then SCAN the
//! mirror's layout for keys that have no row. Works in batches of heap blocks and of SCAN pages,
//! so memory stays flat; reports progress as NOTICEs. Repairs go through the queue (the worker
//! stays the only writer of mirrored keys), with the rows read FOR SHARE so that no concurrent
//! change can be overtaken by a repair carrying an older state.

use crate::error::{invalid, Error, OrRaise, Result};
use crate::mirror::capture::{enqueue, Change};
use crate::mirror::catalog::{self, Mirror};
use crate::mirror::context::{as_role, ext_owner, with_render_settings};
use crate::mirror::template::{self, quote_ident};
use crate::redis::{call, call_pipeline, value, Call};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgRelation;
use redis::{cmd, Value};
use serde_json::Value as Json;
use std::collections::BTreeMap;

const BLOCKS_PER_BATCH: i64 = 64;

#[derive(Default)]
pub(crate) struct Tally {
    checked: i64,
    missing: i64,
    stale: i64,
    extra: i64,
    repaired: i64,
    redis_keys: i64,
}

fn spi_err(e: pgrx::spi::SpiError) -> Error {
    Error::Internal(format!("redis_verify: {e}"))
}

#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn redis_verify(
    tbl: Option<PgRelation>,
    repair: default!(Option<bool>, "false"),
) -> TableIterator<
    'static,
    (
        name!(checked, i64),
        name!(missing, i64),
        name!(stale, i64),
        name!(extra, i64),
        name!(repaired, i64),
    ),
> {
    let Some(tbl) = tbl else {
        invalid("redis_verify: tbl must not be NULL").raise()
    };
    let t = verify(tbl.oid(), repair.unwrap_or(false)).or_raise();
    TableIterator::once((t.checked, t.missing, t.stale, t.extra, t.repaired))
}

pub(crate) fn verify(relid: pg_sys::Oid, repair: bool) -> Result<Tally> {
    let name = catalog::relation_name(relid);
    let Some(m) = catalog::by_table(relid)? else {
        return Err(invalid(format!(
            "redis_verify: table {name} is not mirrored"
        )));
    };
    crate::mirror::validate::require_select(relid, "redis_verify", || name.clone())?;
    if repair {
        let owner = crate::spi_read::one::<bool>("SELECT pg_catalog.pg_has_role((SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1), 'USAGE')", &[relid.into()])
            .map_err(spi_err)?
            .unwrap_or(false);
        if !owner {
            return Err(Error::Privilege(format!(
                "redis_verify: repair requires ownership of table {name}"
            )));
        }
    }
    let queued = as_role(ext_owner(), false, || {
        crate::spi_read::one::<i64>(
            "SELECT coalesce(sum(CASE WHEN op IN ('S', 'D') THEN pg_catalog.json_array_length(key::json) ELSE 1 END), 0)::int8 \
               FROM redis_internal.queue WHERE mirror_id = $1",
            &[m.id.into()],
        )
    })
    .map_err(spi_err)?
    .unwrap_or(0);
    if queued > 0 {
        notice!("pg_redis: redis_verify: {queued} changes of {name} are still queued; they may show as differences");
    }
    let qualified = crate::mirror::backfill::qualified(relid)?;
    let blocks = crate::spi_read::one::<i64>(
        "SELECT (pg_catalog.pg_relation_size($1) / current_setting('block_size')::int)::int8",
        &[relid.into()],
    )
    .map_err(spi_err)?
    .unwrap_or(0);
    let mut tally = Tally::default();
    let owner = catalog::table_owner(relid)?;
    let mut start = 0i64;
    while start < blocks {
        let end = (start + BLOCKS_PER_BATCH).min(blocks);
        check_rows(&m, &qualified, owner, start, end, repair, &mut tally)?;
        start = end;
        if start % (BLOCKS_PER_BATCH * 16) == 0 || start >= blocks {
            notice!(
                "pg_redis: redis_verify of {name}: {start} of {blocks} blocks, {} rows checked",
                tally.checked
            );
        }
        pgrx::check_for_interrupts!();
    }
    check_extra(&m, &qualified, owner, repair, &mut tally)?;
    notice!(
        "pg_redis: redis_verify of {name}: {} rows checked, {} keys in Redis, {} missing, {} stale, {} extra",
        tally.checked, tally.redis_keys, tally.missing, tally.stale, tally.extra
    );
    let table_rows = tally.checked;
    let redis_keys = tally.redis_keys;
    as_role(ext_owner(), false, || {
        Spi::run_with_args(
            "INSERT INTO redis_internal.mirror_stats AS s (mirror_id, redis_rows, table_rows) VALUES ($1, $2, $3) \
             ON CONFLICT (mirror_id) DO UPDATE SET redis_rows = $2, table_rows = $3",
            &[m.id.into(), redis_keys.into(), table_rows.into()],
        )
    })
    .map_err(spi_err)?;
    if tally.repaired > 0 {
        crate::delivery::wake_at_commit();
    }
    Ok(tally)
}

/// The SCAN pass of `redis_verify` with repair, alone: queue a delete for every key of the
/// mirror's layout that has no row (inside the filter). Takes no row locks. After a failover it
/// removes what deletes the new master lost (`delivery::after_failover`). Returns the deletes.
pub(crate) fn remove_extra(m: &Mirror) -> Result<i64> {
    let qualified = crate::mirror::backfill::qualified(m.tbl)?;
    let owner = catalog::table_owner(m.tbl)?;
    let mut tally = Tally::default();
    check_extra(m, &qualified, owner, true, &mut tally)?;
    if tally.repaired > 0 {
        crate::delivery::wake_at_commit();
    }
    Ok(tally.repaired)
}

fn check_rows(
    m: &Mirror,
    qualified: &str,
    owner: pg_sys::Oid,
    start: i64,
    end: i64,
    repair: bool,
    tally: &mut Tally,
) -> Result<()> {
    let sql = format!(
        "SELECT {}, {}, {} FROM ONLY {qualified} r WHERE r.ctid >= '({start},0)'::tid AND r.ctid < '({end},0)'::tid{}",
        m.key_sql()?,
        if m.action == "invalidate" { "pg_catalog.row_to_json(r.*)::text".to_string() } else { m.payload_sql() },
        m.filter_sql(),
        if repair { " FOR SHARE OF r" } else { "" }
    );
    let rows: Vec<(String, String, bool)> = as_role(owner, true, || {
        with_render_settings(|| {
            Spi::connect_mut(|c| {
                let t = if repair {
                    c.update(sql.as_str(), None, &[])
                } else {
                    c.select(sql.as_str(), None, &[])
                }?;
                t.into_iter()
                    .map(|r| {
                        Ok((
                            r.get::<String>(1)?.unwrap_or_default(),
                            r.get::<String>(2)?.unwrap_or_default(),
                            r.get::<bool>(3)?.unwrap_or(false),
                        ))
                    })
                    .collect::<std::result::Result<Vec<_>, pgrx::spi::SpiError>>()
            })
        })
    })
    .map_err(spi_err)?;
    // Rows outside the filter are not expected in Redis; their keys are found by the SCAN pass.
    let rows: Vec<(String, String)> = rows
        .into_iter()
        .filter(|r| r.2)
        .map(|r| (r.0, r.1))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let in_redis = read_many(m, rows.iter().map(|r| r.0.as_str()))?;
    let mut fixes = vec![];
    for ((key, payload), found) in rows.into_iter().zip(in_redis) {
        tally.checked += 1;
        match found {
            None if m.action == "write" => {
                tally.missing += 1;
                fixes.push(Change::new("s", key, Some(payload)));
            }
            None => {}
            Some(found) if !same(m, &payload, &found) => {
                tally.stale += 1;
                fixes.push(if m.action == "write" {
                    Change::new("s", key, Some(payload))
                } else {
                    Change::new("d", key, None)
                });
            }
            Some(_) => {}
        }
    }
    if repair && !fixes.is_empty() {
        tally.repaired += fixes.len() as i64;
        enqueue(m, fixes)?;
    }
    Ok(())
}

/// What Redis holds for each key: the JSON text, or the hash's fields as a JSON object.
fn read_many<'a>(m: &Mirror, keys: impl Iterator<Item = &'a str>) -> Result<Vec<Option<Json>>> {
    let keys: Vec<&str> = keys.collect();
    let what = format!("redis_verify: reading {} keys", keys.len());
    if m.format == "hash" {
        let cmds: Vec<redis::Cmd> = keys
            .iter()
            .map(|k| {
                let mut c = cmd("HGETALL");
                c.arg(*k);
                c
            })
            .collect();
        call_pipeline(&Call::new(&what), &cmds)?
            .into_iter()
            .map(|v| match value::error_text(&v) {
                // A key of another type (WRONGTYPE): present but wrong, i.e. stale.
                Some(_) => Ok(Some(Json::Null)),
                None => crate::kv::hash_to_json(&what, v),
            })
            .collect()
    } else {
        let reply = value::check(&what, call(&Call::new(&what), cmd("MGET").arg(&keys))?)?;
        let Value::Array(items) = reply else {
            return Err(value::unexpected(&what, &reply));
        };
        items
            .into_iter()
            .map(|v| {
                Ok(value::bytes(&what, v)?.map(|b| {
                    serde_json::from_slice::<Json>(&b)
                        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&b).into_owned()))
                }))
            })
            .collect()
    }
}

fn same(m: &Mirror, payload: &str, found: &Json) -> bool {
    if m.format == "hash" {
        let want: BTreeMap<String, String> =
            crate::delivery::deliver::hash_fields(payload, &m.json_columns())
                .into_iter()
                .collect();
        let got: BTreeMap<String, String> = match found {
            Json::Object(o) => o
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect(),
            _ => return false,
        };
        want == got
    } else {
        serde_json::from_str::<Json>(payload).is_ok_and(|w| &w == found)
    }
}

/// SCAN the layout; every key whose row does not exist (or is outside the filter) is extra.
fn check_extra(
    m: &Mirror,
    qualified: &str,
    owner: pg_sys::Oid,
    repair: bool,
    tally: &mut Tally,
) -> Result<()> {
    let parts = m.parts()?;
    let cols = template::columns(&parts)
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>();
    let types: Vec<String> = cols
        .iter()
        .map(|c| {
            crate::spi_read::one::<String>(
                "SELECT pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attname = $2",
                &[m.tbl.into(), c.clone().into()],
            )
            .map_err(spi_err)?
            .ok_or_else(|| Error::Internal(format!("column {c} vanished")))
        })
        .collect::<Result<_>>()?;
    let conds: Vec<String> = cols
        .iter()
        .zip(&types)
        .enumerate()
        .map(|(i, (c, t))| format!("r.{} = ${}::{t}", quote_ident(c), i + 1))
        .collect();
    let probe = format!(
        "SELECT EXISTS (SELECT 1 FROM ONLY {qualified} r WHERE {} AND {})",
        conds.join(" AND "),
        m.filter_sql()
    );
    let unnest: Vec<String> = (1..=cols.len()).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (1..=cols.len()).map(|i| format!("v{i}")).collect();
    let batch_conds: Vec<String> = cols
        .iter()
        .zip(&types)
        .enumerate()
        .map(|(i, (c, t))| format!("r.{} = u.v{}::{t}", quote_ident(c), i + 1))
        .collect();
    let batch_probe = format!(
        "SELECT u.i FROM unnest({}) WITH ORDINALITY AS u({}, i) \
          WHERE EXISTS (SELECT 1 FROM ONLY {qualified} r WHERE {} AND {})",
        unnest.join(", "),
        names.join(", "),
        batch_conds.join(" AND "),
        m.filter_sql()
    );
    let what = format!("SCAN MATCH {:?}", m.key_pattern);
    crate::redis::scan::each_page(&what, &m.key_pattern, |page| {
        let keys: Vec<String> = page
            .into_iter()
            .filter_map(|k| String::from_utf8(k).ok())
            .collect();
        tally.redis_keys += keys.len() as i64;
        let present = rows_exist(m, &parts, cols.len(), &batch_probe, &probe, owner, &keys);
        let mut fixes = vec![];
        for (key, has_row) in keys.into_iter().zip(present) {
            if !has_row {
                tally.extra += 1;
                fixes.push(Change::new("d", key, None));
            }
        }
        if repair && !fixes.is_empty() {
            tally.repaired += fixes.len() as i64;
            enqueue(m, fixes)?;
        }
        pgrx::check_for_interrupts!();
        Ok(())
    })
}

/// For each key: does a row (inside the filter) exist for it? One query per SCAN page; if a key
/// value does not fit its column's type, the page falls back to one guarded query per key.
fn rows_exist(
    m: &Mirror,
    parts: &[template::Part],
    ncols: usize,
    batch_probe: &str,
    probe: &str,
    owner: pg_sys::Oid,
    keys: &[String],
) -> Vec<bool> {
    let parsed: Vec<Option<Vec<String>>> = keys
        .iter()
        .map(|k| template::invert(&m.key_prefix, parts, k))
        .collect();
    let mut columns: Vec<Vec<String>> = vec![vec![]; ncols];
    let mut index = vec![]; // ordinal in the query → position in keys
    for (pos, p) in parsed.iter().enumerate() {
        if let Some(values) = p {
            for (c, v) in values.iter().enumerate() {
                columns[c].push(v.clone());
            }
            index.push(pos);
        }
    }
    let mut present = vec![false; keys.len()];
    if index.is_empty() {
        return present;
    }
    let args: Vec<pgrx::datum::DatumWithOid> = columns.into_iter().map(|c| c.into()).collect();
    let batch = crate::mirror::validate::in_subtransaction(|| {
        as_role(owner, true, || {
            with_render_settings(|| {
                Spi::connect(|c| {
                    let t = c.select(batch_probe, None, &args)?;
                    t.into_iter()
                        .map(|r| r.get::<i64>(1).map(|v| v.unwrap_or(0)))
                        .collect::<std::result::Result<Vec<_>, pgrx::spi::SpiError>>()
                })
            })
        })
    });
    match batch {
        Ok(Ok(ordinals)) => {
            for o in ordinals {
                if let Some(&pos) = index.get((o - 1) as usize) {
                    present[pos] = true;
                }
            }
        }
        _ => {
            for (pos, p) in parsed.into_iter().enumerate() {
                let Some(values) = p else { continue };
                let args: Vec<pgrx::datum::DatumWithOid> =
                    values.into_iter().map(|v| v.into()).collect();
                present[pos] = crate::mirror::validate::in_subtransaction(|| {
                    as_role(owner, true, || {
                        with_render_settings(|| crate::spi_read::one::<bool>(probe, &args))
                    })
                })
                .ok()
                .and_then(|r| r.ok())
                .flatten()
                .unwrap_or(false);
            }
        }
    }
    present
}

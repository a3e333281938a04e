//! Read-through: `redis_fetch(tbl, VARIADIC key_values)` asks Redis first and, on a miss, reads
//! the row from the table (as the table's owner, after checking that the caller may SELECT it),
//! writes it to Redis with the mirror's format and TTL, and returns it.
//!
//! The fill cannot leave a stale row behind (the cache-aside race): the row is read with
//! FOR SHARE, so a writer still in progress is waited for and the newest committed version is
//! read, and no later change of the row can commit until this transaction ends — after the fill
//! has landed. Changes committed before the read are in the queue and end in the same or a newer
//! state. A transaction that has written anything itself, a read-only transaction or a standby
//! returns the row without filling (it could otherwise push a state that may roll back).

use crate::error::{invalid, Error, OrRaise, Result};
use crate::mirror::catalog::{self, Mirror};
use crate::mirror::context::{as_role, with_render_settings};
use crate::mirror::template::{quote_ident, Part};
use crate::redis::{call, call_pipeline, value, Call};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{JsonB, PgRelation, VariadicArray};
use redis::cmd;
use serde_json::Value as Json;

struct Column {
    name: String,
    /// How the column appears in row_to_json: "string" or "json" (numbers, booleans, arrays, ...).
    json_typed: bool,
    sql_type: String,
}

fn spi_err(e: pgrx::spi::SpiError) -> Error {
    Error::Internal(format!("redis_fetch: {e}"))
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_fetch(
    tbl: Option<PgRelation>,
    key_values: Option<VariadicArray<'_, &str>>,
) -> Option<JsonB> {
    // NULL table: NULL row, as a STRICT function would answer.
    let tbl = tbl?;
    let values: Vec<Option<String>> = match &key_values {
        None => vec![],
        Some(a) => a.iter().map(|v| v.map(str::to_string)).collect(),
    };
    fetch(tbl.oid(), values).or_raise().map(JsonB)
}

fn fetch(relid: pg_sys::Oid, values: Vec<Option<String>>) -> Result<Option<Json>> {
    let early = can_fill();
    // The hit path reads no catalog: the mirror is cached per backend, the name is for messages.
    let name = || catalog::relation_name(relid);
    let Some(m) = catalog::by_table(relid)? else {
        return Err(invalid(format!(
            "redis_fetch: table {} is not mirrored",
            name()
        )));
    };
    crate::mirror::validate::require_select(relid, "redis_fetch", name)?;
    let parts = m.parts()?;
    let placeholders: Vec<&str> = parts
        .iter()
        .filter_map(|p| {
            if let Part::Col(c) = p {
                Some(c.as_str())
            } else {
                None
            }
        })
        .collect();
    if values.len() != placeholders.len() {
        return Err(invalid(format!(
            "redis_fetch: the key template \"{}\" of {} takes {} key value(s) ({}), got {}",
            m.key_template,
            name(),
            placeholders.len(),
            placeholders.join(", "),
            values.len()
        )));
    }
    let values: Vec<String> = values
        .into_iter()
        .map(|v| {
            v.ok_or_else(|| {
                invalid(format!(
                    "redis_fetch: key values for {} must not be NULL",
                    name()
                ))
            })
        })
        .collect::<Result<_>>()?;
    // The key as capture renders it: each value through its column's type and back to text, so
    // that '01' and '1' name the same row (and key) of an integer column.
    let values = canonical(&m, &placeholders, values, &name)?;
    let mut key = m.key_prefix.clone();
    let mut vi = values.iter();
    for p in &parts {
        match p {
            Part::Lit(l) => key.push_str(l),
            Part::Col(_) => key.push_str(vi.next().map(String::as_str).unwrap_or("")),
        }
    }
    // Redis first.
    if let Some(hit) = read_redis(&m, &key)? {
        crate::stats::count(m.id, true);
        return Ok(Some(hit));
    }
    crate::stats::count(m.id, false);

    // The table on a miss.
    // Invalidate mirrors are filled too: that is what cache-aside readers do.
    let can_fill = early;
    let columns = columns(&m)?;
    let mut conds = vec![];
    for (i, c) in placeholders.iter().enumerate() {
        let ty = columns
            .iter()
            .find(|col| col.name == *c)
            .map(|col| col.sql_type.clone())
            .map(Ok)
            .unwrap_or_else(|| column_type(relid, c))?;
        conds.push(format!("r.{} = ${}::{}", quote_ident(c), i + 1, ty));
    }
    let sql = format!(
        "SELECT {}, {} FROM ONLY {} r WHERE {}{}",
        m.row_json_sql(),
        m.filter_sql(),
        crate::mirror::backfill::qualified(relid)?,
        conds.join(" AND "),
        if can_fill { " FOR SHARE OF r" } else { "" }
    );
    let owner = catalog::table_owner(relid)?;
    let args: Vec<pgrx::datum::DatumWithOid> = values.iter().map(|v| v.clone().into()).collect();
    // In a subtransaction, so that a key value that does not fit the column's type (an ERROR
    // from its input function) becomes a clear 22023 instead of aborting the caller.
    let row: Option<(String, bool)> = crate::mirror::validate::in_subtransaction(|| {
        as_role(owner, true, || {
            with_render_settings(|| {
                Spi::connect_mut(|c| {
                    // FOR SHARE needs a writable SPI call (and takes a transaction id).
                    let rows = if can_fill {
                        c.update(sql.as_str(), Some(1), &args)?
                    } else {
                        c.select(sql.as_str(), Some(1), &args)?
                    };
                    match rows.into_iter().next() {
                        None => Ok(None),
                        Some(r) => Ok(Some((
                            r.get::<String>(1)?.unwrap_or_default(),
                            r.get::<bool>(2)?.unwrap_or(false),
                        ))),
                    }
                })
            })
        })
    })
    .map_err(|msg| {
        invalid(format!(
            "redis_fetch: reading {} by key {key:?}: {msg}",
            name()
        ))
    })?
    .map_err(spi_err)?;
    let Some((payload, passes)) = row else {
        return Ok(None);
    };
    if can_fill && passes {
        fill(&m, &key, &payload)?;
    }
    no_nul_escape(&m, &key, &payload)?;
    serde_json::from_str(&payload)
        .map(Some)
        .map_err(|e| Error::Internal(format!("redis_fetch: row of {} is not JSON: {e}", name())))
}

/// Key values rendered as `(value::type)::text`, the way capture renders the key columns; a
/// value that does not fit its column's type is a 22023 error.
fn canonical(
    m: &Mirror,
    columns: &[&str],
    values: Vec<String>,
    name: &dyn Fn() -> String,
) -> Result<Vec<String>> {
    let types: Vec<&str> = columns
        .iter()
        .map(|c| {
            m.column_types
                .iter()
                .find(|(n, _)| n == c)
                .map(|(_, t)| t.as_str())
                .unwrap_or("text")
        })
        .collect();
    // Text and integer columns (the usual keys) are rendered here; other types by PostgreSQL.
    let fast: Option<Vec<String>> = types
        .iter()
        .zip(&values)
        .map(|(t, v)| {
            let int = |min: i64, max: i64| {
                v.trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (min..=max).contains(n))
                    .map(|n| n.to_string())
            };
            match *t {
                "text" => Some(v.clone()),
                "smallint" => int(i16::MIN as i64, i16::MAX as i64),
                "integer" => int(i32::MIN as i64, i32::MAX as i64),
                "bigint" => int(i64::MIN, i64::MAX),
                _ => None,
            }
        })
        .collect();
    if let Some(fast) = fast {
        return Ok(fast);
    }
    let sql = format!(
        "SELECT ARRAY[{}]",
        types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("(${}::{t})::text", i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let args: Vec<pgrx::datum::DatumWithOid> = values.iter().map(|v| v.clone().into()).collect();
    // As the table's owner, like capture: a cast on the owner's type runs with its rights.
    crate::mirror::validate::in_subtransaction(|| {
        as_role(m.owner, true, || {
            with_render_settings(|| crate::spi_read::one::<Vec<String>>(&sql, &args))
        })
    })
    .map_err(|msg| {
        invalid(format!(
            "redis_fetch: key values {values:?} do not fit the key columns of {}: {msg}",
            name()
        ))
    })?
    .map_err(spi_err)?
    .ok_or_else(|| Error::Internal("redis_fetch: no key rendered".into()))
}

/// jsonb cannot hold the \u0000 escape a json column may carry: say so, instead of PostgreSQL's
/// bare conversion error. (Text only: the escaped backslash `\\u0000` is fine.)
fn no_nul_escape(m: &Mirror, key: &str, json: &str) -> Result<()> {
    let bytes = json.as_bytes();
    let found = json.match_indices("\\u0000").any(|(i, _)| {
        // an odd run of backslashes before 'u' means a real escape
        bytes[..i].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 0
    });
    if found {
        return Err(Error::BadReply {
            what: format!("redis_fetch of {} by key {key:?}", m.table_name()),
            why: "the row holds \\u0000 in a JSON string, which jsonb cannot represent".into(),
            code: PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER,
        });
    }
    Ok(())
}

/// May a miss fill Redis? Not on a standby, in a read-only transaction, or in one that has
/// written anything (read before any SPI call: pgrx's SPI helpers may assign an xid).
fn can_fill() -> bool {
    unsafe {
        !pg_sys::RecoveryInProgress()
            && !pg_sys::XactReadOnly
            && pg_sys::GetTopTransactionIdIfAny() == pg_sys::InvalidTransactionId
    }
}

fn column_type(relid: pg_sys::Oid, col: &str) -> Result<String> {
    crate::spi_read::one::<String>(
        "SELECT pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attname = $2",
        &[relid.into(), col.to_string().into()],
    )
    .map_err(spi_err)?
    .ok_or_else(|| invalid(format!("redis_fetch: column \"{col}\" not found")))
}

/// The mirror's columns with how each appears in row_to_json: `json_typed` for what it renders
/// as JSON rather than a string (the numeric types it knows, bool, json/jsonb, arrays, records).
fn columns(m: &Mirror) -> Result<Vec<Column>> {
    let all: Vec<Column> = Spi::connect(|c| {
        let rows = crate::plans::select(
                c,
                "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                        (t.typcategory IN ('A', 'C') OR t.oid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'float4'::regtype, \
                         'float8'::regtype, 'numeric'::regtype, 'bool'::regtype, 'json'::regtype, 'jsonb'::regtype)) \
                   FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t0 ON t0.oid = a.atttypid \
                   JOIN pg_catalog.pg_type t ON t.oid = CASE WHEN t0.typtype = 'd' THEN t0.typbasetype ELSE t0.oid END \
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                None,
                &[m.tbl.into()],
            )
            .map_err(spi_err)?;
        rows.into_iter()
            .map(|r| {
                Ok(Column {
                    name: r.get::<String>(1).map_err(spi_err)?.unwrap_or_default(),
                    sql_type: r.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
                    json_typed: r.get::<bool>(3).map_err(spi_err)?.unwrap_or(false),
                })
            })
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(match &m.columns {
        None => all,
        Some(cols) => all.into_iter().filter(|c| cols.contains(&c.name)).collect(),
    })
}

/// The row from Redis, as the same JSON a miss returns; None on a miss (or an unreadable value,
/// which the fill then replaces).
fn read_redis(m: &Mirror, key: &str) -> Result<Option<Json>> {
    if m.format == "hash" {
        let columns = columns(m)?;
        let what = crate::kv::describe("HGETALL", key);
        let reply = value::check(&what, call(&Call::new(&what), cmd("HGETALL").arg(key))?)?;
        let Some(Json::Object(fields)) = crate::kv::hash_to_json(&what, reply)? else {
            return Ok(None);
        };
        let mut row = serde_json::Map::new();
        for c in &columns {
            let v = match fields.get(&c.name) {
                None => Json::Null,
                Some(Json::String(s)) if c.json_typed => {
                    serde_json::from_str(s).unwrap_or_else(|_| Json::String(s.clone()))
                }
                Some(v) => v.clone(),
            };
            row.insert(c.name.clone(), v);
        }
        Ok(Some(Json::Object(row)))
    } else {
        let what = crate::kv::describe("GET", key);
        let reply = crate::cache::get(&what, key)?;
        match value::text(&what, reply)? {
            None => Ok(None),
            Some(s) => {
                no_nul_escape(m, key, &s)?;
                Ok(serde_json::from_str(&s).ok())
            }
        }
    }
}

fn fill(m: &Mirror, key: &str, payload: &str) -> Result<()> {
    let what = crate::kv::describe("SET", key);
    let mut cmds = vec![];
    crate::delivery::deliver::key_commands(
        "s",
        Some(&m.format),
        key,
        Some(payload),
        m.ttl_seconds,
        &m.json_columns(),
        &mut cmds,
    );
    for r in call_pipeline(&Call::new(&what), &cmds)? {
        value::check(&what, r)?;
    }
    Ok(())
}

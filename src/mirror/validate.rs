//! Checks done at `redis_mirror` time, so that a bad mirror is refused before the first write:
//! the kind of relation, ownership, row-level security, columns, the key's uniqueness, the
//! filter (one boolean expression, nothing else), and overlap with other mirrors' layouts.

use super::template::{self, Part};
use crate::error::{invalid, Error, Result};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CString;

fn spi_err(e: pgrx::spi::SpiError) -> Error {
    Error::Internal(e.to_string())
}

pub struct TableInfo {
    pub name: String,
    pub is_public: bool,
    pub relname: String,
    pub columns: Vec<String>,
}

pub fn table(relid: pg_sys::Oid) -> Result<TableInfo> {
    let row = Spi::connect(|c| {
        let rows = c
            .select(
                "SELECT c.relkind::text, c.relpersistence::text, c.relrowsecurity, \
                        pg_catalog.pg_has_role(c.relowner, 'USAGE'), c.oid::regclass::text, \
                        n.nspname = 'public', c.relname::text, c.relispartition \
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                  WHERE c.oid = $1",
                Some(1),
                &[relid.into()],
            )
            .map_err(spi_err)?;
        let r = rows
            .into_iter()
            .next()
            .ok_or_else(|| invalid("the table does not exist"))?;
        Ok::<_, Error>((
            r.get::<String>(1).map_err(spi_err)?.unwrap_or_default(),
            r.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
            r.get::<bool>(3).map_err(spi_err)?.unwrap_or(false),
            r.get::<bool>(4).map_err(spi_err)?.unwrap_or(false),
            r.get::<String>(5).map_err(spi_err)?.unwrap_or_default(),
            r.get::<bool>(6).map_err(spi_err)?.unwrap_or(false),
            r.get::<String>(7).map_err(spi_err)?.unwrap_or_default(),
            r.get::<bool>(8).map_err(spi_err)?.unwrap_or(false),
        ))
    })?;
    let (kind, persistence, rls, owner, name, is_public, relname, partition) = row;
    let wrong = |what: &str| {
        Err(Error::WrongObject(format!(
            "redis_mirror: \"{name}\" is {what}; only ordinary, permanent tables can be mirrored"
        )))
    };
    match kind.as_str() {
        "r" => {}
        "p" => return wrong("a partitioned table (not supported yet)"),
        "v" => return wrong("a view"),
        "m" => return wrong("a materialized view"),
        "f" => return wrong("a foreign table"),
        _ => return wrong("not a table"),
    }
    if persistence == "t" {
        return wrong("a temporary table");
    }
    if partition {
        // Statement triggers on a partition do not fire for writes made through its parent.
        return wrong("a partition (writes through its partitioned table would not be captured; partitioned tables are not supported yet)");
    }
    if !owner {
        return Err(Error::Privilege(format!(
            "redis_mirror: must be owner of table {name}"
        )));
    }
    if rls {
        return Err(Error::Privilege(format!(
            "redis_mirror: table {name} has row-level security enabled; its rows would be readable through Redis by anyone"
        )));
    }
    let columns: Vec<String> = Spi::connect(|c| {
        let rows = c
            .select(
                "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                None,
                &[relid.into()],
            )
            .map_err(spi_err)?;
        rows.into_iter()
            .map(|r| Ok(r.get::<String>(1).map_err(spi_err)?.unwrap_or_default()))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(TableInfo {
        name,
        is_public,
        relname,
        columns,
    })
}

/// The unique keys usable for a template: the primary key and every unique, non-partial index
/// on plain NOT NULL columns. Each is a list of column names.
pub fn unique_keys(relid: pg_sys::Oid) -> Result<Vec<Vec<String>>> {
    Spi::connect(|c| {
        let rows = c
            .select(
                "SELECT array_agg(a.attname::text ORDER BY k.ord) \
                   FROM pg_catalog.pg_index i \
                   CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                  WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
                  GROUP BY i.indexrelid, i.indisprimary \
                 HAVING bool_and(a.attnotnull) \
                  ORDER BY i.indisprimary DESC, i.indexrelid",
                None,
                &[relid.into()],
            )
            .map_err(spi_err)?;
        rows.into_iter()
            .map(|r| {
                Ok(r.get::<Vec<String>>(1)
                    .map_err(spi_err)?
                    .unwrap_or_default())
            })
            .collect()
    })
}

pub fn template(t: &TableInfo, parts: &[Part], keys: &[Vec<String>], template: &str) -> Result<()> {
    if let Some(Part::Lit(l)) = parts.first() {
        if l.starts_with("pg_redis:") {
            return Err(invalid(format!(
                "redis_mirror: key template \"{template}\" starts with pg_redis:, which is reserved for pg_redis' own keys"
            )));
        }
    }
    let cols = template::columns(parts);
    for c in &cols {
        if !t.columns.iter().any(|x| x == c) {
            return Err(invalid(format!(
                "redis_mirror: key template \"{template}\" names column \"{c}\", which table {} does not have",
                t.name
            )));
        }
    }
    if !keys
        .iter()
        .any(|k| k.iter().all(|kc| cols.contains(&kc.as_str())))
    {
        return Err(invalid(format!(
            "redis_mirror: key template \"{template}\" must contain every column of the primary key or of a unique index on NOT NULL columns of {}{}",
            t.name,
            if keys.is_empty() { " (the table has none)".to_string() } else { format!(" (e.g. {})", keys[0].iter().map(|c| format!("{{{c}}}")).collect::<Vec<_>>().join(":")) }
        )));
    }
    Ok(())
}

/// A filter must be exactly one expression: parsed as `SELECT (<filter>)` it must give one
/// statement with one target and no other clause, so nothing can be smuggled around it.
pub fn filter(relid: pg_sys::Oid, table: &str, filter: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(invalid(format!(
            "redis_mirror: filter \"{filter}\" on {table}: {why}"
        )))
    };
    if filter.trim().is_empty() {
        return bad("is empty");
    }
    // Parsed on its own (not wrapped in parentheses), so that text which only becomes an
    // expression inside parentheses — `x) OR (SELECT ... ` — is refused.
    let sql = CString::new(format!("SELECT {filter}"))
        .map_err(|_| invalid("redis_mirror: filter contains a NUL byte"))?;
    // In WHERE, aggregates and window functions are refused by PostgreSQL itself.
    let probe = format!(
        "SELECT 1 FROM ONLY {} r WHERE ({filter}\n) LIMIT 0",
        super::backfill::qualified(relid)?
    );
    let typecheck = format!(
        "SELECT ({filter}\n) FROM ONLY {} r LIMIT 0",
        super::backfill::qualified(relid)?
    );
    let owner = super::catalog::table_owner(relid)?;
    let verdict = in_subtransaction(|| unsafe {
        let list = pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if list.is_null() || (*list).length != 1 {
            return Some("must be a single expression".to_string());
        }
        let raw = (*(*list).elements).ptr_value as *mut pg_sys::RawStmt;
        let stmt = (*raw).stmt;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_SelectStmt {
            return Some("must be a single expression".to_string());
        }
        let s = &*(stmt as *mut pg_sys::SelectStmt);
        let len = |l: *mut pg_sys::List| if l.is_null() { 0 } else { (*l).length };
        let target = if len(s.targetList) == 1 {
            (*(*s.targetList).elements).ptr_value as *mut pg_sys::ResTarget
        } else {
            std::ptr::null_mut()
        };
        let single = !target.is_null()
            && (*target).name.is_null()
            && s.fromClause.is_null()
            && s.whereClause.is_null()
            && s.groupClause.is_null()
            && s.havingClause.is_null()
            && s.windowClause.is_null()
            && s.valuesLists.is_null()
            && s.sortClause.is_null()
            && s.limitOffset.is_null()
            && s.limitCount.is_null()
            && s.lockingClause.is_null()
            && s.withClause.is_null()
            && s.intoClause.is_null()
            && s.distinctClause.is_null()
            && s.op == pg_sys::SetOperation::SETOP_NONE;
        if !single {
            return Some(
                "must be a single boolean SQL expression over the row's columns (no FROM, WHERE, ';' or other clauses)"
                    .to_string(),
            );
        }
        // Planned and started against the table as its owner, in the context capture runs it
        // in (fixed search_path, restricted), but never run: unknown columns or functions, a
        // missing privilege, an aggregate and a wrong type all show here.
        let typ = super::context::as_role(owner, true, || {
            super::context::with_render_settings(|| {
                Spi::connect(|c| {
                    c.select(&probe, Some(0), &[])?;
                    c.select(&typecheck, Some(0), &[])
                        .and_then(|t| t.column_type_oid(1))
                })
            })
        });
        match typ {
            Ok(t) if t.value() == pg_sys::BOOLOID => None,
            Ok(_) => Some("is not a boolean expression".to_string()),
            Err(e) => Some(e.to_string()),
        }
    });
    match verdict {
        Ok(None) => Ok(()),
        Ok(Some(why)) | Err(why) => bad(&why),
    }
}

thread_local! {
    static LOCK_TIMED_OUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the last ERROR `in_subtransaction` caught was a lock timeout (55P03).
pub fn last_error_was_lock_timeout() -> bool {
    LOCK_TIMED_OUT.with(|l| l.replace(false))
}

/// Run `f` in a subtransaction; an ERROR inside is caught, rolled back, and returned as its
/// message (the way PL/pgSQL's EXCEPTION blocks do it).
pub fn in_subtransaction<R>(
    f: impl FnOnce() -> R + std::panic::UnwindSafe,
) -> std::result::Result<R, String> {
    unsafe {
        let mcx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(mcx);
        let r = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
            .catch_others(|e| {
                Err(match e {
                    pg_sys::panic::CaughtError::PostgresError(r)
                    | pg_sys::panic::CaughtError::ErrorReport(r) => {
                        LOCK_TIMED_OUT.with(|l| {
                            l.set(
                                r.sql_error_code()
                                    == pgrx::PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
                            )
                        });
                        r.message().to_string()
                    }
                    _ => "internal error".to_string(),
                })
            })
            .execute();
        match &r {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(mcx);
        pg_sys::CurrentResourceOwner = owner;
        r
    }
}

/// `redis_fetch` and `redis_verify` read a table's rows for the caller: the caller needs SELECT.
/// SELECT on the table for the current role (as has_table_privilege: table-level), checked
/// directly — redis_fetch runs it on every call. `table` names it in the error.
pub fn require_select(
    relid: pg_sys::Oid,
    what: &str,
    table: impl FnOnce() -> String,
) -> Result<()> {
    let may = unsafe {
        pg_sys::pg_class_aclcheck(
            relid,
            pg_sys::GetUserId(),
            pg_sys::ACL_SELECT as pg_sys::AclMode,
        )
    } == pg_sys::AclResult::ACLCHECK_OK;
    if may {
        Ok(())
    } else {
        Err(Error::Privilege(format!(
            "{what}: permission denied for table {}",
            table()
        )))
    }
}

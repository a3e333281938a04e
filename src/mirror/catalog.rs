//! The mirror catalog (`redis_internal.mirrors`) as Rust values, and the SQL each mirror renders
//! rows with. Reads run as the extension's owner: callers need no privilege on the internals.

use super::context::{as_role, ext_owner};
use super::template::{self, quote_ident, quote_literal};
use crate::error::{Error, Result};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct Mirror {
    pub id: i32,
    pub tbl: pg_sys::Oid,
    pub key_template: String,
    pub key_prefix: String,
    pub format: String,
    pub columns: Option<Vec<String>>,
    pub ttl_seconds: Option<i32>,
    pub action: String,
    pub filter: Option<String>,
    pub stream: Option<String>,
    pub mode: String,
    /// The table's owner, who renders its rows and runs its filter.
    pub owner: pg_sys::Oid,
    pub state: String,
    pub key_pattern: String,
    /// Every column of the table has a built-in type: rendering its rows runs only PostgreSQL's
    /// own code (no user-defined cast to json or text can be involved), so capture may render
    /// and queue in one statement as the extension's owner.
    pub builtin_types: bool,
    /// Every column's SQL type (format_type), by name: read-through turns key values into the
    /// column's own text rendering with them.
    pub column_types: Vec<(String, String)>,
    /// What capture's rendering depends on (needed_render_settings), worked out once.
    pub render_settings: Vec<(&'static str, &'static str)>,
}

const COLS: &str =
    "id, tbl::oid, key_template, key_prefix, format, columns, action, filter, state, key_pattern, ttl_seconds, stream, mode, \
     (SELECT relowner FROM pg_catalog.pg_class WHERE oid = tbl), \
     NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl AND a.attnum > 0 \
                    AND NOT a.attisdropped AND a.atttypid >= 16384), \
     ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a \
            WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum), \
     ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a \
            WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)";

fn from_row(row: &pgrx::spi::SpiHeapTupleData) -> Result<Mirror> {
    let e = |e: pgrx::spi::SpiError| Error::Internal(format!("reading the mirror catalog: {e}"));
    Ok(Mirror {
        id: row.get::<i32>(1).map_err(e)?.unwrap_or_default(),
        tbl: row
            .get::<pg_sys::Oid>(2)
            .map_err(e)?
            .unwrap_or(pg_sys::InvalidOid),
        key_template: row.get::<String>(3).map_err(e)?.unwrap_or_default(),
        key_prefix: row.get::<String>(4).map_err(e)?.unwrap_or_default(),
        format: row.get::<String>(5).map_err(e)?.unwrap_or_default(),
        columns: row.get::<Vec<String>>(6).map_err(e)?,
        action: row.get::<String>(7).map_err(e)?.unwrap_or_default(),
        filter: row.get::<String>(8).map_err(e)?,
        state: row.get::<String>(9).map_err(e)?.unwrap_or_default(),
        key_pattern: row.get::<String>(10).map_err(e)?.unwrap_or_default(),
        ttl_seconds: row.get::<i32>(11).map_err(e)?,
        stream: row.get::<String>(12).map_err(e)?,
        mode: row.get::<String>(13).map_err(e)?.unwrap_or_default(),
        owner: row
            .get::<pg_sys::Oid>(14)
            .map_err(e)?
            .unwrap_or(pg_sys::InvalidOid),
        builtin_types: row.get::<bool>(15).map_err(e)?.unwrap_or(false),
        column_types: {
            let names = row.get::<Vec<String>>(16).map_err(e)?.unwrap_or_default();
            let types = row.get::<Vec<String>>(17).map_err(e)?.unwrap_or_default();
            names.into_iter().zip(types).collect()
        },
        render_settings: vec![],
    })
    .map(|mut m| {
        m.render_settings = m.needed_render_settings();
        m
    })
}

thread_local! {
    /// Each mirrored table's mirror, as capture last read it. Entries go when PostgreSQL
    /// invalidates the table's relcache entry: the catalog's trigger makes every change of a row
    /// do that (sql/views.sql), and so does any DDL on the table.
    static BY_TABLE: RefCell<HashMap<pg_sys::Oid, std::rc::Rc<Mirror>>> = RefCell::new(HashMap::new());
    static FORGET_ALL: Cell<bool> = const { Cell::new(false) };
}

/// Called from the relcache invalidation callback (src/plans.rs): only forget, nothing else.
pub fn forget(relid: Option<pg_sys::Oid>) {
    let _ = GENERATION.try_with(|g| g.set(g.get().wrapping_add(1)));
    let done = BY_TABLE
        .try_with(|m| match m.try_borrow_mut() {
            Ok(mut m) => {
                match relid {
                    Some(r) => m.remove(&r),
                    None => {
                        m.clear();
                        None
                    }
                };
                true
            }
            Err(_) => false,
        })
        .unwrap_or(false);
    if !done {
        let _ = FORGET_ALL.try_with(|f| f.set(true));
    }
}

thread_local! {
    /// Counts relcache invalidations seen: caches keyed otherwise (the worker's mirrors by id)
    /// drop their entries when it moves.
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Moves at every relcache invalidation (a mirror's catalog row changes invalidate its table).
pub fn generation() -> u64 {
    GENERATION.with(|g| g.get())
}

/// The table's mirror (a copy of the kept one; see by_table_shared).
pub fn by_table(relid: pg_sys::Oid) -> Result<Option<Mirror>> {
    Ok(by_table_shared(relid)?.map(|m| (*m).clone()))
}

/// The table's mirror, read on every captured statement: kept per backend (see BY_TABLE) and
/// shared, not copied.
pub fn by_table_shared(relid: pg_sys::Oid) -> Result<Option<std::rc::Rc<Mirror>>> {
    if FORGET_ALL.with(|f| f.replace(false)) {
        BY_TABLE.with(|m| m.borrow_mut().clear());
    }
    if let Some(m) = BY_TABLE.with(|m| m.borrow().get(&relid).cloned()) {
        return Ok(Some(m));
    }
    let found = read_by_table(relid)?.map(std::rc::Rc::new);
    if let Some(m) = &found {
        BY_TABLE.with(|c| c.borrow_mut().insert(relid, m.clone()));
    }
    Ok(found)
}

fn read_by_table(relid: pg_sys::Oid) -> Result<Option<Mirror>> {
    static SQL: once_cell::sync::Lazy<String> = once_cell::sync::Lazy::new(|| {
        format!("SELECT {COLS} FROM redis_internal.mirrors WHERE tbl = $1")
    });
    as_role(ext_owner(), false, || {
        Spi::connect(|c| {
            let rows = crate::plans::select(c, &SQL, Some(1), &[relid.into()])
                .map_err(|e| Error::Internal(e.to_string()))?;
            match rows.into_iter().next() {
                Some(r) => from_row(&r).map(Some),
                None => Ok(None),
            }
        })
    })
}

pub fn by_id(id: i32) -> Result<Option<Mirror>> {
    as_role(ext_owner(), false, || {
        Spi::connect(|c| {
            let rows = c
                .select(
                    &format!("SELECT {COLS} FROM redis_internal.mirrors WHERE id = $1"),
                    Some(1),
                    &[id.into()],
                )
                .map_err(|e| Error::Internal(e.to_string()))?;
            match rows.into_iter().next() {
                Some(r) => from_row(&r).map(Some),
                None => Ok(None),
            }
        })
    })
}

pub fn all() -> Result<Vec<Mirror>> {
    as_role(ext_owner(), false, || {
        Spi::connect(|c| {
            let rows = c
                .select(
                    &format!("SELECT {COLS} FROM redis_internal.mirrors ORDER BY id"),
                    None,
                    &[],
                )
                .map_err(|e| Error::Internal(e.to_string()))?;
            rows.into_iter().map(|r| from_row(&r)).collect()
        })
    })
}

impl Mirror {
    pub fn parts(&self) -> Result<Vec<template::Part>> {
        template::parse(&self.key_template)
    }

    pub fn key_sql(&self) -> Result<String> {
        Ok(template::key_sql(&self.key_prefix, &self.parts()?))
    }

    /// What the queue carries as the row: its JSON, unless the mirror only invalidates (and has
    /// no stream to carry the row in).
    pub fn payload_sql(&self) -> String {
        if self.action == "invalidate" && self.stream.is_none() {
            return "NULL::text".into();
        }
        self.row_json_sql()
    }

    /// JSON of the row aliased `r`: `row_to_json` typing, only the chosen columns.
    pub fn row_json_sql(&self) -> String {
        match &self.columns {
            None => "pg_catalog.row_to_json(r.*)::text".into(),
            Some(cols) => {
                let args: Vec<String> = cols
                    .iter()
                    .map(|c| format!("{}, r.{}", quote_literal(c), quote_ident(c)))
                    .collect();
                format!("pg_catalog.json_build_object({})::text", args.join(", "))
            }
        }
    }

    pub fn filter_sql(&self) -> String {
        match &self.filter {
            // The newline ends a trailing -- comment in the filter.
            Some(f) => format!("coalesce(({f}\n), false)"),
            None => "true".into(),
        }
    }

    /// The rendering settings (context::RENDER_SETTINGS) capture needs for this mirror: what its
    /// columns' output depends on. A key renders columns through their text output, the row
    /// through JSON (ISO dates whatever DateStyle). A filter or a user-defined type may depend on
    /// anything: then all of them.
    fn needed_render_settings(&self) -> Vec<(&'static str, &'static str)> {
        use super::context::RENDER_SETTINGS;
        if self.filter.is_some() || !self.builtin_types {
            return RENDER_SETTINGS.to_vec();
        }
        let keys: Vec<String> = self
            .parts()
            .map(|p| {
                super::template::columns(&p)
                    .iter()
                    .map(|c| c.to_string())
                    .collect()
            })
            .unwrap_or_default();
        let mut needed: Vec<&str> = vec!["search_path", "standard_conforming_strings"];
        for (name, ty) in &self.column_types {
            let in_key = keys.iter().any(|k| k == name);
            // format_type's spelling: drop "(n)" and the zone suffix, e.g.
            // "timestamp(3) with time zone" -> "timestamp".
            let mut plain = String::new();
            let mut depth = 0;
            for ch in ty.chars() {
                match ch {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ if depth == 0 => plain.push(ch),
                    _ => {}
                }
            }
            let zoned = plain.ends_with(" with time zone");
            let base = plain
                .trim_end_matches(" with time zone")
                .trim_end_matches(" without time zone")
                .trim();
            match base {
                "smallint" | "integer" | "bigint" | "numeric" | "text" | "character varying"
                | "character" | "boolean" | "uuid" | "json" | "jsonb" | "name" | "oid"
                | "\"char\"" | "inet" | "cidr" | "macaddr" | "macaddr8" => {}
                "real" | "double precision" => needed.push("extra_float_digits"),
                "bytea" => needed.push("bytea_output"),
                "interval" => needed.push("IntervalStyle"),
                "timestamp" | "date" | "time" => {
                    if zoned && base == "timestamp" {
                        needed.push("TimeZone");
                    }
                    if in_key || base == "time" {
                        needed.push("DateStyle");
                        needed.push("TimeZone");
                    }
                }
                _ => return RENDER_SETTINGS.to_vec(),
            }
        }
        RENDER_SETTINGS
            .iter()
            .copied()
            .filter(|(n, _)| needed.contains(n))
            .collect()
    }

    /// The json/jsonb columns, whose hash fields hold JSON text.
    pub fn json_columns(&self) -> Vec<String> {
        self.column_types
            .iter()
            .filter(|(_, t)| t == "json" || t == "jsonb")
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The table's name, schema-qualified, for messages and SQL.
    pub fn table_name(&self) -> String {
        relation_name(self.tbl)
    }
}

pub fn relation_name(relid: pg_sys::Oid) -> String {
    crate::spi_read::one::<String>("SELECT $1::regclass::text", &[relid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("oid {}", relid.to_u32()))
}

pub fn table_owner(relid: pg_sys::Oid) -> Result<pg_sys::Oid> {
    crate::spi_read::one::<pg_sys::Oid>(
        "SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1",
        &[relid.into()],
    )
    .map_err(|e| Error::Internal(e.to_string()))?
    .ok_or_else(|| Error::Internal(format!("table {} not found", relid.to_u32())))
}

//! Mirrors: `redis_mirror` puts a table under a mirror (catalog row + capture triggers +
//! scheduled backfill), `redis_unmirror` takes it off, `redis_resync` pushes every row again.
//! Delivery of what the triggers queue lives in `crate::delivery`.

pub mod backfill;
pub mod capture;
pub mod catalog;
pub mod context;
pub mod json_row;
pub mod native;
pub mod template;
pub mod validate;

use crate::error::{invalid, Error, OrRaise, Result};
use context::{as_role, ext_owner};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgRelation;
use template::quote_ident;

fn spi_err(e: pgrx::spi::SpiError) -> Error {
    Error::Internal(e.to_string())
}

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn redis_mirror(
    tbl: Option<PgRelation>,
    key_template: default!(Option<&str>, "NULL"),
    format: default!(Option<&str>, "'json'"),
    columns: default!(Option<Vec<Option<String>>>, "NULL"),
    ttl_seconds: default!(Option<i32>, "NULL"),
    mode: default!(Option<&str>, "'queue'"),
    action: default!(Option<&str>, "'write'"),
    filter: default!(Option<&str>, "NULL"),
    stream: default!(Option<&str>, "NULL"),
    backfill: default!(Option<bool>, "true"),
) -> i64 {
    mirror(
        tbl.map(|t| t.oid()).unwrap_or(pg_sys::InvalidOid),
        Registration::Call,
        key_template,
        format,
        columns,
        ttl_seconds,
        mode,
        action,
        filter,
        stream,
        backfill,
    )
    .or_raise()
}

#[allow(clippy::too_many_arguments)]
/// How a mirror comes to be: a `redis_mirror` call (which creates the capture triggers), or a
/// hand-written `CREATE TRIGGER ... redis_mirror_trigger('key_template=...', ...)`.
#[derive(PartialEq, Clone, Copy)]
enum Registration {
    Call,
    Trigger { creator: pg_sys::Oid },
}

#[allow(clippy::too_many_arguments)]
fn mirror(
    tbl: pg_sys::Oid,
    how: Registration,
    key_template: Option<&str>,
    format: Option<&str>,
    columns: Option<Vec<Option<String>>>,
    ttl_seconds: Option<i32>,
    mode: Option<&str>,
    action: Option<&str>,
    filter: Option<&str>,
    stream: Option<&str>,
    backfill: Option<bool>,
) -> Result<i64> {
    if tbl == pg_sys::InvalidOid {
        return Err(invalid("redis_mirror: tbl must not be NULL"));
    }
    let t = validate::table(tbl)?;
    let format = format.unwrap_or("json");
    if !matches!(format, "json" | "hash") {
        return Err(invalid(format!(
            "redis_mirror: format must be 'json' or 'hash', not '{format}'"
        )));
    }
    let mode = mode.unwrap_or("queue");
    match mode {
        "queue" => {}
        "commit" | "sync" if !crate::delivery::database_served() => {
            return Err(invalid(format!(
                "redis_mirror: mode '{mode}' needs the background worker: add pg_redis to shared_preload_libraries and this database to pg_redis.databases"
            )))
        }
        "commit" | "sync" => {}
        other => {
            return Err(invalid(format!(
                "redis_mirror: mode must be 'queue', 'commit' or 'sync', not '{other}'"
            )))
        }
    }
    let action = action.unwrap_or("write");
    if !matches!(action, "write" | "invalidate") {
        return Err(invalid(format!(
            "redis_mirror: action must be 'write' or 'invalidate', not '{action}'"
        )));
    }
    if let Some(ttl) = ttl_seconds {
        if ttl <= 0 {
            return Err(invalid(format!(
                "redis_mirror: ttl_seconds must be positive (got {ttl}); NULL means no expiry"
            )));
        }
    }
    let stream = stream.map(str::trim).filter(|s| !s.is_empty());
    let keys = validate::unique_keys(tbl)?;
    let template = match key_template {
        Some(tpl) => tpl.to_string(),
        None => {
            let Some(pk) = keys.first() else {
                return Err(invalid(format!(
                    "redis_mirror: table {} has no primary key or unique index on NOT NULL columns; add one or pass a key_template",
                    t.name
                )));
            };
            let base = if t.is_public {
                t.relname.clone()
            } else {
                t.name.clone()
            };
            let base = base.replace('{', "{{").replace('}', "}}").replace('"', "");
            let cols: Vec<String> = pk.iter().map(|c| format!("{{{c}}}")).collect();
            format!("{base}:{}", cols.join(":"))
        }
    };
    let parts = template::parse(&template).map_err(|e| {
        invalid(format!(
            "redis_mirror: {}",
            e.to_string().trim_start_matches("pg_redis: ")
        ))
    })?;
    validate::template(&t, &parts, &keys, &template)?;
    let columns: Option<Vec<String>> = match columns {
        None => None,
        Some(cols) => {
            let mut out = vec![];
            for c in cols {
                let c = c.ok_or_else(|| invalid("redis_mirror: columns must not contain NULL"))?;
                if !t.columns.contains(&c) {
                    return Err(invalid(format!("redis_mirror: column \"{c}\" of the columns list does not exist in table {}", t.name)));
                }
                out.push(c);
            }
            if out.is_empty() {
                return Err(invalid(
                    "redis_mirror: columns must name at least one column (NULL means all)",
                ));
            }
            Some(out)
        }
    };
    let filter = filter.map(str::trim).filter(|f| !f.is_empty());
    if let Some(f) = filter {
        validate::filter(tbl, &t.name, f)?;
    }
    let key_prefix = crate::settings::key_prefix();
    if mode == "sync" && crate::redis::is_cluster() {
        crate::delivery::versioned::check_prefix(&key_prefix, "redis_mirror")?;
    }
    let pattern = template::scan_pattern(&key_prefix, &parts);
    let lit = template::literal_prefix(&key_prefix, &parts);

    let previous = catalog::by_table(tbl)?;
    // Layouts that could produce the same key are refused (a TRUNCATE of one would purge the other).
    for other in catalog::all()? {
        if other.tbl == tbl {
            continue;
        }
        let olit = template::literal_prefix(&other.key_prefix, &other.parts()?);
        if olit.starts_with(&lit) || lit.starts_with(&olit) {
            return Err(invalid(format!(
                "redis_mirror: key template \"{template}\" of {} could overlap the keys of the mirror of {} (\"{}\"); give each mirror a distinct literal prefix",
                t.name,
                other.table_name(),
                other.key_template
            )));
        }
    }
    let creator = match how {
        Registration::Call => unsafe { pg_sys::GetUserId() },
        Registration::Trigger { creator } => creator,
    };
    let rekey = previous.as_ref().is_some_and(|p| {
        p.key_template != template
            || p.key_prefix != key_prefix
            || p.format != format
            || p.columns != columns
            // Rows a new filter leaves out (or an invalidate-only mirror) must lose their keys.
            || p.filter.as_deref() != filter
            || p.action != action
    });
    let id: i32 = as_role(ext_owner(), false, || {
        Spi::get_one_with_args::<i32>(
            "INSERT INTO redis_internal.mirrors AS m (tbl, tbl_name, key_template, key_prefix, format, columns, ttl_seconds, mode, action, filter, stream, key_pattern, created_by) \
             VALUES ($1::oid::regclass, $1::oid::regclass::text, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (tbl) DO UPDATE SET key_template = excluded.key_template, key_prefix = excluded.key_prefix, \
               format = excluded.format, columns = excluded.columns, ttl_seconds = excluded.ttl_seconds, mode = excluded.mode, \
               action = excluded.action, filter = excluded.filter, stream = excluded.stream, key_pattern = excluded.key_pattern, \
               state = 'active' \
             RETURNING id",
            &[
                tbl.into(),
                template.clone().into(),
                key_prefix.clone().into(),
                format.to_string().into(),
                columns.clone().into(),
                ttl_seconds.into(),
                mode.to_string().into(),
                action.to_string().into(),
                filter.map(str::to_string).into(),
                stream.map(|s| format!("{key_prefix}{s}")).into(),
                pattern.clone().into(),
                creator.into(),
            ],
        )
        .map_err(spi_err)?
        .ok_or_else(|| Error::Internal("redis_mirror: catalog insert returned nothing".into()))
    })?;
    let m = catalog::by_id(id)?.ok_or_else(|| Error::Internal("mirror vanished".into()))?;
    if let Some(p) = &previous {
        if rekey {
            // The old layout's keys go first; the rows are then written anew by the backfill.
            capture::enqueue(
                &m,
                vec![capture::Change::new("t", p.key_pattern.clone(), None)],
            )?;
        }
    }
    if how == Registration::Call {
        create_triggers(tbl)?;
    }
    if !crate::delivery::preloaded() {
        notice!("pg_redis: no background worker runs (pg_redis is not in shared_preload_libraries): changes to {} wait in the queue until you call redis_drain()", t.name);
    }
    let scheduled = if backfill.unwrap_or(true) || rekey {
        backfill::schedule(&m)?
    } else {
        0
    };
    crate::delivery::wake_at_commit();
    Ok(scheduled)
}

fn trigger_function() -> Result<String> {
    let nsp = Spi::get_one::<String>(
        "SELECT n.nspname::text FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE p.proname = 'redis_mirror_trigger'",
    )
    .map_err(spi_err)?
    .ok_or_else(|| Error::Internal("redis_mirror_trigger() not found".into()))?;
    Ok(format!("{}.redis_mirror_trigger()", quote_ident(&nsp)))
}

/// The capture triggers: statement-level, with transition tables (one queue insert per statement).
fn create_triggers(tbl: pg_sys::Oid) -> Result<()> {
    let f = trigger_function()?;
    let t = backfill::qualified(tbl)?;
    drop_triggers(tbl, false)?;
    // Hand-written capture triggers on the table stay in charge: creating ours too would
    // capture every change twice.
    let hand_written = crate::spi_read::one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid \
          WHERE t.tgrelid = $1 AND p.proname = 'redis_mirror_trigger' AND NOT t.tgisinternal)",
        &[tbl.into()],
    )
    .map_err(spi_err)?
    .unwrap_or(false);
    if hand_written {
        return Ok(());
    }
    let sql = [
        format!("CREATE TRIGGER pg_redis_capture_insert AFTER INSERT ON {t} REFERENCING NEW TABLE AS pg_redis_new FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
        format!("CREATE TRIGGER pg_redis_capture_update AFTER UPDATE ON {t} REFERENCING OLD TABLE AS pg_redis_old NEW TABLE AS pg_redis_new FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
        format!("CREATE TRIGGER pg_redis_capture_delete AFTER DELETE ON {t} REFERENCING OLD TABLE AS pg_redis_old FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
        format!("CREATE TRIGGER pg_redis_capture_truncate AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
    ];
    as_role(ext_owner(), false, || {
        for s in &sql {
            Spi::run(s).map_err(spi_err)?;
        }
        Ok(())
    })
}

/// Drop the capture triggers `redis_mirror` made; with `all`, also hand-written ones.
fn drop_triggers(tbl: pg_sys::Oid, all: bool) -> Result<()> {
    let t = backfill::qualified(tbl)?;
    as_role(ext_owner(), false, || {
        let existing: Vec<String> = Spi::connect(|c| {
            let rows = c.select(
                "SELECT t.tgname::text FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid \
                  WHERE t.tgrelid = $1 AND p.proname = 'redis_mirror_trigger' \
                    AND ($2 OR t.tgname LIKE 'pg\\_redis\\_capture\\_%')",
                None,
                &[tbl.into(), all.into()],
            )?;
            rows.into_iter().map(|r| r.get::<String>(1).map(Option::unwrap_or_default)).collect::<std::result::Result<Vec<_>, _>>()
        })
        .map_err(spi_err)?;
        for n in existing {
            Spi::run(&format!("DROP TRIGGER {} ON {t}", quote_ident(&n))).map_err(spi_err)?;
        }
        Ok(())
    })
}

fn owned_mirror(tbl: pg_sys::Oid, what: &str) -> Result<catalog::Mirror> {
    let t = validate::table(tbl).map_err(|e| match e {
        Error::WrongObject(_) => invalid(format!(
            "{what}: {} is not mirrored",
            catalog::relation_name(tbl)
        )),
        other => other,
    })?;
    catalog::by_table(tbl)?
        .ok_or_else(|| invalid(format!("{what}: table {} is not mirrored", t.name)))
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_unmirror(tbl: Option<PgRelation>, purge: default!(Option<bool>, "false")) -> bool {
    let Some(tbl) = tbl.map(|t| t.oid()) else {
        invalid("redis_unmirror: tbl must not be NULL").raise()
    };
    (|| -> Result<bool> {
        let m = owned_mirror(tbl, "redis_unmirror")?;
        drop_triggers(tbl, true)?;
        if purge.unwrap_or(false) {
            let mut purge = vec![capture::Change::new("t", m.key_pattern.clone(), None)];
            if m.mode == "sync" {
                purge.push(version_purge(&m));
            }
            capture::enqueue(&m, purge)?;
            crate::delivery::wake_at_commit();
        }
        as_role(ext_owner(), false, || {
            Spi::run_with_args(
                "WITH s AS (DELETE FROM redis_internal.mirror_stats WHERE mirror_id = $1) \
                 DELETE FROM redis_internal.mirrors WHERE id = $1",
                &[m.id.into()],
            )
            .map_err(spi_err)
        })?;
        crate::stats::forget(m.id);
        Ok(true)
    })()
    .or_raise()
}

/// The change that removes a sync mirror's versions: its version hash, or on a cluster every
/// companion (a keyspace purge by pattern, which scans every master).
fn version_purge(m: &catalog::Mirror) -> capture::Change {
    use crate::delivery::versioned::{companion_pattern, version_hash};
    if crate::redis::is_cluster() {
        capture::Change::new("t", companion_pattern(&m.key_prefix, m.id), None)
    } else {
        capture::Change::new("d", version_hash(&m.key_prefix, m.id), None)
    }
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_resync(tbl: PgRelation) -> i64 {
    let tbl = tbl.oid();
    (|| -> Result<i64> {
        let m = owned_mirror(tbl, "redis_resync")?;
        // A resync restarts capture of a mirror that overflowed the queue.
        as_role(ext_owner(), false, || {
            Spi::run_with_args(
                "UPDATE redis_internal.mirrors SET state = 'active' WHERE id = $1",
                &[m.id.into()],
            )
            .map_err(spi_err)
        })?;
        let n = backfill::schedule(&m)?;
        crate::delivery::wake_at_commit();
        Ok(n)
    })()
    .or_raise()
}

/// One backfill step for `CALL redis_backfill(tbl)` (which commits between steps).
#[pg_extern(volatile, parallel_unsafe)]
fn redis_backfill_step(
    tbl: PgRelation,
) -> TableIterator<
    'static,
    (
        name!(queued, i64),
        name!(done, bool),
        name!(rows_done, i64),
        name!(rows_total, i64),
    ),
> {
    let tbl = tbl.oid();
    let r = (|| -> Result<(i64, bool, i64, i64)> {
        let m = owned_mirror(tbl, "redis_backfill")?;
        let (q, done) = backfill::step(m.id)?;
        let (d, t) = as_role(ext_owner(), false, || {
            Spi::get_two_with_args::<i64, i64>(
                "SELECT max(rows_done), max(rows_total) FROM redis_internal.backfills WHERE mirror_id = $1",
                &[m.id.into()],
            )
            .map_err(spi_err)
        })?;
        Ok((q, done, d.unwrap_or(0), t.unwrap_or(0)))
    })()
    .or_raise();
    TableIterator::once(r)
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_drain(max_changes: default!(Option<i32>, "NULL")) -> i64 {
    if let Some(m) = max_changes {
        if m < 0 {
            invalid(format!(
                "redis_drain: max_changes must not be negative (got {m})"
            ))
            .raise();
        }
    }
    let mut left = max_changes.map(|m| m as usize).unwrap_or(usize::MAX);
    let batch = crate::settings::batch_size();
    let mut delivered = 0i64;
    while left > 0 {
        let o = crate::delivery::deliver::deliver_batch(batch.min(left), 1, true).or_raise();
        delivered += o.delivered as i64;
        left = left.saturating_sub(o.claimed);
        if o.claimed == 0 || o.failed > 0 || o.waiting_for_standby {
            break;
        }
        pgrx::check_for_interrupts!();
    }
    delivered
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_retry(tbl: default!(Option<PgRelation>, "NULL")) -> i64 {
    let tbl = tbl.map(|t| t.oid());
    (|| -> Result<i64> {
        let mirror_id = match tbl {
            Some(t) => Some(owned_mirror(t, "redis_retry")?.id),
            None => None,
        };
        // Dead letters are not replayed with the value they had (newer changes of the key may
        // have been delivered since): each key gets its row's current state, read now.
        let letters: Vec<(i32, String, String)> = as_role(ext_owner(), false, || {
            Spi::connect_mut(|c| {
                let t = c.update(
                    "DELETE FROM redis_internal.dead_letters WHERE $1::int IS NULL OR mirror_id = $1 \
                     RETURNING mirror_id, op::text, key",
                    None,
                    &[mirror_id.into()],
                )?;
                t.into_iter()
                    .map(|r| {
                        Ok((
                            r.get::<i32>(1)?.unwrap_or_default(),
                            r.get::<String>(2)?.unwrap_or_default(),
                            r.get::<String>(3)?.unwrap_or_default(),
                        ))
                    })
                    .collect::<std::result::Result<Vec<_>, pgrx::spi::SpiError>>()
            })
        })
        .map_err(spi_err)?;
        let mut n = 0i64;
        for (id, op, key) in letters {
            let Some(m) = catalog::by_id(id)? else { continue };
            if op == "t" {
                // A TRUNCATE replayed now would also delete the rows written since: instead,
                // make Redis equal the table (delete the keys without a row, write the rest).
                crate::verify::verify(m.tbl, true)?;
            } else {
                crate::delivery::sync_mode::queue_current_state(&m, &key, false)?;
            }
            n += 1;
        }
        crate::delivery::wake_at_commit();
        Ok(n)
    })()
    .or_raise()
}

/// Read-through counters of this database's mirrors, for `redis_stats` (shared memory).
#[pg_extern(volatile, parallel_safe)]
fn redis_read_through_counts(
) -> TableIterator<'static, (name!(mirror_id, i32), name!(hits, i64), name!(misses, i64))> {
    let ids: Vec<i32> = catalog::all()
        .map(|v| v.into_iter().map(|m| m.id).collect())
        .unwrap_or_default();
    TableIterator::new(ids.into_iter().map(|id| {
        let (h, m) = crate::stats::get(id);
        (id, h, m)
    }))
}

/// Worker state for the views: (pid, state).
#[pg_extern(stable, parallel_safe)]
fn redis_worker_info(
) -> TableIterator<'static, (name!(worker_pid, Option<i32>), name!(worker_state, String))> {
    let r = if !crate::delivery::preloaded() {
        (
            None,
            "not running: pg_redis is not in shared_preload_libraries (use redis_drain())"
                .to_string(),
        )
    } else {
        match crate::delivery::worker_pid() {
            Some(pid) => (Some(pid), "running".to_string()),
            None => (None, "not running: this database is not in pg_redis.databases, or the worker is restarting".to_string()),
        }
    };
    TableIterator::once(r)
}

/// Functions only the extension's own event triggers call; they live in the internal schema.
#[pg_schema]
pub mod redis_internal {
    use super::*;

    /// Wake the worker at commit (called by the extension's own event triggers).
    #[pg_extern(volatile, parallel_unsafe)]
    fn wake_worker() {
        crate::delivery::wake_at_commit();
    }

    /// A row of the mirror catalog changed (its trigger calls this): make every backend drop
    /// what it keeps of the table's mirror (capture caches it) at its next use of the table.
    #[pg_extern(volatile, parallel_unsafe)]
    fn forget_mirror(tbl: pg_sys::Oid) {
        unsafe {
            // A dropped table has no relcache entry left to invalidate.
            if pg_sys::SearchSysCacheExists(
                pg_sys::SysCacheIdentifier::RELOID as i32,
                pg_sys::Datum::from(tbl),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            ) {
                pg_sys::CacheInvalidateRelcacheByRelid(tbl);
            }
        }
    }

    /// After ALTER TABLE on a mirrored table: refuse the change if the mirror's key template,
    /// column list or filter no longer fit the table, instead of mirroring wrong data later.
    #[pg_extern(volatile, parallel_unsafe)]
    fn revalidate(tbl: pg_sys::Oid) {
        (|| -> Result<()> {
            let Some(m) = catalog::by_table(tbl)? else { return Ok(()) };
            let t = validate::table(tbl)?;
            let broken = |why: String| {
                invalid(format!(
                    "this change to table {} would break its mirror: {why}; call redis_unmirror('{}') first, or redis_mirror() again with settings that fit",
                    t.name, t.name
                ))
            };
            let parts = m.parts()?;
            let keys = validate::unique_keys(tbl)?;
            validate::template(&t, &parts, &keys, &m.key_template)
                .map_err(|e| broken(e.to_string().trim_start_matches("pg_redis: redis_mirror: ").to_string()))?;
            if let Some(cols) = &m.columns {
                if let Some(c) = cols.iter().find(|c| !t.columns.contains(c)) {
                    return Err(broken(format!("column \"{c}\" of its column list no longer exists")));
                }
            }
            if let Some(f) = &m.filter {
                validate::filter(tbl, &t.name, f)
                    .map_err(|e| broken(e.to_string().trim_start_matches("pg_redis: redis_mirror: ").to_string()))?;
            }
            Ok(())
        })()
        .or_raise()
    }

    /// A hand-written `CREATE TRIGGER ... EXECUTE FUNCTION redis_mirror_trigger(args)` registers
    /// its table as a mirror (the event trigger calls this), checked like `redis_mirror`'s
    /// arguments, so a bad trigger is refused when it is created, not at the first write.
    #[pg_extern(volatile, parallel_unsafe)]
    fn register_trigger(tgoid: pg_sys::Oid) {
        register(tgoid).or_raise()
    }

    fn register(tgoid: pg_sys::Oid) -> Result<()> {
        let row = Spi::connect(|c| {
            let t = c.select(
                "SELECT tgrelid, tgtype::int, tgoldtable::text, tgnewtable::text, tgargs, tgname::text \
                   FROM pg_catalog.pg_trigger WHERE oid = $1",
                Some(1),
                &[tgoid.into()],
            )?;
            match t.into_iter().next() {
                None => Ok(None),
                Some(r) => Ok::<_, pgrx::spi::SpiError>(Some((
                    r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    r.get::<i32>(2)?.unwrap_or(0),
                    r.get::<String>(3)?,
                    r.get::<String>(4)?,
                    r.get::<Vec<u8>>(5)?.unwrap_or_default(),
                    r.get::<String>(6)?.unwrap_or_default(),
                ))),
            }
        })
        .map_err(spi_err)?;
        let Some((relid, tgtype, old, new, args, name)) = row else {
            return Ok(());
        };
        let table = catalog::relation_name(relid);
        let bad = |why: &str| {
            Err(invalid(format!(
                "redis_mirror_trigger: trigger \"{name}\" on {table}: {why}"
            )))
        };
        // pg_trigger.tgtype bits: ROW 1, INSERT 4, DELETE 8, UPDATE 16, TRUNCATE 32.
        if tgtype & 1 != 0 {
            return bad(
                "must be FOR EACH STATEMENT (with transition tables), see docs/reference.md",
            );
        }
        if tgtype & 4 != 0 && new.is_none() {
            return bad("an INSERT trigger needs REFERENCING NEW TABLE AS ...");
        }
        if tgtype & 8 != 0 && old.is_none() {
            return bad("a DELETE trigger needs REFERENCING OLD TABLE AS ...");
        }
        if tgtype & 16 != 0 && (old.is_none() || new.is_none()) {
            return bad("an UPDATE trigger needs REFERENCING OLD TABLE AS ... NEW TABLE AS ...");
        }
        // The role that ran CREATE TRIGGER (this runs inside a SECURITY DEFINER event trigger).
        let outer = unsafe { pg_sys::GetOuterUserId() };
        let owner = crate::spi_read::one::<bool>(
            "SELECT pg_catalog.pg_has_role($1, relowner, 'USAGE') FROM pg_catalog.pg_class WHERE oid = $2",
            &[outer.into(), relid.into()],
        )
        .map_err(spi_err)?
        .unwrap_or(false);
        let args: Vec<String> = args
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.is_empty() {
            if catalog::by_table(relid)?.is_some() {
                return Ok(()); // the mirror exists: the trigger uses its settings
            }
            return bad("pass the mirror's settings as arguments ('key_template=user:{id}', 'format=json', ...) or call redis_mirror() first");
        }
        if !owner {
            return Err(Error::Privilege(format!(
                "redis_mirror_trigger: must be owner of table {table} to mirror it"
            )));
        }
        let mut o: std::collections::HashMap<String, String> = Default::default();
        for a in &args {
            let Some((k, v)) = a.split_once('=') else {
                return bad(&format!("argument \"{a}\" is not name=value"));
            };
            let k = k.trim().to_string();
            if ![
                "key_template",
                "format",
                "columns",
                "ttl_seconds",
                "mode",
                "action",
                "filter",
                "stream",
                "backfill",
            ]
            .contains(&k.as_str())
            {
                return bad(&format!("unknown argument \"{k}\""));
            }
            o.insert(k, v.to_string());
        }
        let ttl = match o.get("ttl_seconds") {
            None => None,
            Some(v) => Some(v.trim().parse::<i32>().map_err(|_| {
                invalid(format!(
                    "redis_mirror_trigger: ttl_seconds \"{v}\" is not an integer"
                ))
            })?),
        };
        let backfill = match o.get("backfill").map(|v| v.trim().to_ascii_lowercase()) {
            None => true,
            Some(v) if ["true", "on", "yes", "1"].contains(&v.as_str()) => true,
            Some(v) if ["false", "off", "no", "0"].contains(&v.as_str()) => false,
            Some(v) => return bad(&format!("backfill \"{v}\" is not a boolean")),
        };
        let columns = o
            .get("columns")
            .map(|c| c.split(',').map(|x| Some(x.trim().to_string())).collect());
        // The same settings on the table's other capture triggers: register once.
        if let Some(m) = catalog::by_table(relid)? {
            let same = Some(m.key_template.as_str()) == o.get("key_template").map(String::as_str)
                && m.format == o.get("format").map(String::as_str).unwrap_or("json");
            if same {
                return Ok(());
            }
        }
        super::mirror(
            relid,
            Registration::Trigger { creator: outer },
            o.get("key_template").map(String::as_str),
            o.get("format").map(String::as_str),
            columns,
            ttl,
            o.get("mode").map(String::as_str),
            o.get("action").map(String::as_str),
            o.get("filter").map(String::as_str),
            o.get("stream").map(String::as_str),
            Some(backfill),
        )
        .map(|_| ())
    }
}

//! The `sync` mode: changes are pushed to Redis inside the statement (its failure fails the
//! statement), and also queued as in queue mode, so the committed state is delivered again after
//! COMMIT in commit order. What a transaction pushed is recorded in Redis *before* the values
//! (`<prefix>pg_redis:sync:<db>` holds the (sub)transaction ids, `...:<db>:<xid>` the
//! `mirror_id:version:key` entries). The worker reads that registry: keys of a (sub)transaction
//! that did not commit — rolled back, rolled back to a savepoint, or lost with a crashed backend —
//! are repaired from the table through the queue; entries of committed ones are simply dropped.
//!
//! A repair carries the version of the push it undoes, not a new one: a transaction still in
//! progress when the repair read the table may commit a newer state of the key, and its own push
//! (made at its statement, with a higher version) must keep winning over the repair's older read.
//! docs/guarantees.md states the window in which readers can see an uncommitted value.

use crate::error::{invalid, Error, Result};
use crate::mirror::capture::{enqueue, Change};
use crate::mirror::catalog::{self, Mirror};
use crate::mirror::context::{as_role, ext_owner, with_render_settings};
use crate::mirror::template::{self, quote_ident};
use crate::redis::{call, call_pipeline, value, Call};
use pgrx::pg_sys;
use pgrx::prelude::*;
use redis::{cmd, Cmd, Value};

fn registry(prefix: &str, db: u32) -> String {
    format!("{prefix}pg_redis:sync:{db}")
}

/// Backend side, from the capture trigger: register, then push. One round trip on one server;
/// on a cluster the registry is written first on its own, because redis-rs splits a pipeline per
/// node and the values could land while the registry write failed (then nothing would repair a
/// rollback).
pub fn push(
    m: &Mirror,
    changes: &[(&'static str, String, Option<String>)],
    ids: &[i64],
) -> Result<()> {
    let cluster = crate::redis::is_cluster();
    if cluster {
        super::versioned::check_prefix(&m.key_prefix, &format!("writing to {}", m.table_name()))?;
    }
    let Some(register) = registration(m, changes, ids) else {
        return Ok(());
    };
    let writes = versioned_writes(m, changes, ids)?;
    let what = format!(
        "pushing {} changes of {} (sync mode)",
        changes.len(),
        m.table_name()
    );
    if cluster {
        send(&what, &register)?;
        send(&what, &writes)?;
    } else {
        send(&what, &[register, writes].concat())?;
    }
    crate::delivery::commit_wait::note_sync_mode();
    Ok(())
}

/// The registry writes of a push (None: nothing to push): the (sub)transaction in the database's
/// set, its `mirror_id:version:key` entries in its own set.
fn registration(
    m: &Mirror,
    changes: &[(&'static str, String, Option<String>)],
    ids: &[i64],
) -> Option<Vec<Cmd>> {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let xid = unsafe { pg_sys::GetCurrentFullTransactionId() }.value;
    let reg = registry(&m.key_prefix, db);
    // A stamp of this life of the server (new at every start and crash restart) tags the xid:
    // after a crash, xids whose WAL was lost are handed out again, so an entry from an earlier
    // life of the server is always repaired.
    let member = format!("{xid}@{}", server_life());
    let entries = format!("{reg}:{member}");
    let mut sadd_x = cmd("SADD");
    sadd_x.arg(&reg).arg(&member);
    let mut sadd_k = cmd("SADD");
    sadd_k.arg(&entries);
    let mut any = false;
    for ((op, key, _), id) in changes.iter().zip(ids) {
        if *op == "s" || *op == "d" {
            sadd_k.arg(format!("{}:{id}:{key}", m.id));
            any = true;
        }
    }
    any.then(|| vec![sadd_x, sadd_k])
}

/// The versioned writes of a push, each with its key's version container.
fn versioned_writes(
    m: &Mirror,
    changes: &[(&'static str, String, Option<String>)],
    ids: &[i64],
) -> Result<Vec<Cmd>> {
    let json_cols = m.json_columns();
    let shape = super::versioned::Shape {
        format: &m.format,
        ttl: m.ttl_seconds,
        json_cols: &json_cols,
    };
    let mut cmds = vec![];
    for ((op, key, payload), id) in changes.iter().zip(ids) {
        if *op != "s" && *op != "d" {
            continue; // TRUNCATE in sync mode is delivered by the queue after COMMIT
        }
        let versions = super::versioned::container(&m.key_prefix, m.id, key)?;
        cmds.push(super::versioned::command(
            key,
            &versions,
            *id,
            op,
            payload.as_deref(),
            &shape,
        ));
    }
    Ok(cmds)
}

/// One pipeline; any error reply fails the statement.
fn send(what: &str, cmds: &[Cmd]) -> Result<()> {
    let replies = call_pipeline(&Call::new(what), cmds)?;
    crate::delivery::deliver::verdict(&replies).map_err(|reply| Error::Reply {
        what: what.to_string(),
        reply,
    })
}

thread_local! {
    /// The key prefixes of sync-mode mirrors, valid while catalog::generation() stays (a change
    /// of any mirror's catalog row invalidates its table's relcache entry, which moves it).
    static PREFIXES: std::cell::RefCell<Option<(u64, Vec<String>)>> = const { std::cell::RefCell::new(None) };
}

fn cached_prefixes() -> Option<Vec<String>> {
    let generation = crate::mirror::catalog::generation();
    PREFIXES.with(|p| {
        p.borrow()
            .as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, v)| v.clone())
    })
}

/// The key prefixes of the sync-mode mirrors: read once per catalog change, not every loop.
fn sync_prefixes() -> Result<Vec<String>> {
    if let Some(p) = cached_prefixes() {
        return Ok(p);
    }
    let generation = crate::mirror::catalog::generation();
    let prefixes: Vec<String> = as_role(ext_owner(), false, || {
        Spi::connect(|c| {
            let t = crate::plans::select(
                c,
                "SELECT DISTINCT key_prefix FROM redis_internal.mirrors WHERE mode = 'sync'",
                None,
                &[],
            )?;
            t.into_iter()
                .map(|r| r.get::<String>(1).map(Option::unwrap_or_default))
                .collect::<std::result::Result<Vec<_>, _>>()
        })
    })
    .map_err(|e| Error::Internal(format!("sync repair: {e}")))?;
    PREFIXES.with(|p| *p.borrow_mut() = Some((generation, prefixes.clone())));
    Ok(prefixes)
}

/// Whether any mirror is in sync mode (the worker skips the repair pass otherwise). In doubt
/// (the catalog could not be read), yes.
pub fn any_sync_mirror() -> bool {
    if let Some(p) = cached_prefixes() {
        return !p.is_empty();
    }
    // Reading the catalog can raise (a lock timeout against a DROP EXTENSION): in a subtransaction.
    match crate::mirror::validate::in_subtransaction(sync_prefixes) {
        Ok(Ok(p)) => !p.is_empty(),
        _ => true,
    }
}

/// Worker side: repair what (sub)transactions that did not commit pushed. Returns the registry
/// entries to remove once the repairs are committed to the queue.
pub fn repair_pending() -> Result<Vec<(String, String, String)>> {
    let prefixes = sync_prefixes()?;
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut done = vec![];
    for prefix in prefixes {
        let reg = registry(&prefix, db);
        let what = format!("SMEMBERS {reg:?}");
        let xids = members(&what, call(&Call::new(&what), cmd("SMEMBERS").arg(&reg))?)?;
        let life = server_life();
        for member in xids {
            let (xid, born) = member.split_once('@').unwrap_or((member.as_str(), ""));
            let status = if born == life.to_string() {
                // pg_xact_status raises for an xid it does not know: guard it.
                crate::mirror::validate::in_subtransaction(|| {
                    crate::spi_read::one::<String>(
                        "SELECT pg_catalog.pg_xact_status($1::xid8)",
                        &[xid.to_string().into()],
                    )
                })
                .ok()
                .and_then(|r| r.ok())
                .flatten()
            } else {
                None // an earlier life of the server: repair
            };
            let entries_key = format!("{reg}:{member}");
            let entries = members(
                &what,
                call(&Call::new(&what), cmd("SMEMBERS").arg(&entries_key))?,
            )?;
            let settled = match status.as_deref() {
                Some("in progress") => continue,
                // Committed: the queue delivers the committed state, nothing to repair.
                Some("committed") => entries.clone(),
                _ => {
                    let mut ok = vec![];
                    for e in &entries {
                        if repair_entry(e)? {
                            ok.push(e.clone());
                        }
                    }
                    ok
                }
            };
            let all = settled.len() == entries.len();
            for e in settled {
                done.push((reg.clone(), entries_key.clone(), e));
            }
            if all {
                done.push((reg.clone(), entries_key.clone(), String::new()));
            }
        }
    }
    Ok(done)
}

/// After the repairs are committed: drop the registry entries (and emptied sets).
pub fn clean(done: Vec<(String, String, String)>) -> Result<()> {
    for (reg, entries_key, member) in done {
        let what = format!("cleaning sync registry {entries_key:?}");
        if !member.is_empty() {
            call(
                &Call::new(&what),
                cmd("SREM").arg(&entries_key).arg(&member),
            )?;
        }
        let left = value::int(
            &what,
            call(&Call::new(&what), cmd("SCARD").arg(&entries_key))?,
        )?;
        if left == 0 {
            let member = entries_key.rsplit(':').next().unwrap_or("");
            call(&Call::new(&what), cmd("SREM").arg(&reg).arg(member))?;
        }
    }
    Ok(())
}

fn server_life() -> i64 {
    super::server_life()
}

fn members(what: &str, v: Value) -> Result<Vec<String>> {
    match value::check(what, v)? {
        Value::Array(items) | Value::Set(items) => Ok(items
            .into_iter()
            .filter_map(|i| value::text(what, i).ok().flatten())
            .collect()),
        _ => Ok(vec![]),
    }
}

/// Queue the committed state of one key: the row read FOR SHARE NOWAIT (a row still locked by a
/// transaction in progress is left for later: its own changes will be queued at its COMMIT).
/// Returns whether the entry is settled.
fn repair_entry(entry: &str) -> Result<bool> {
    let mut parts = entry.splitn(3, ':');
    let (Some(id), Some(version), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(true);
    };
    let (Ok(id), Ok(version)) = (id.parse::<i32>(), version.parse::<i64>()) else {
        return Ok(true);
    };
    let Some(m) = catalog::by_id(id)? else {
        return Ok(true);
    };
    current_state(&m, key, true, Some(version))
}

/// Queue the committed state of one key of a mirror: its row's value (read FOR SHARE, so that no
/// change of the row can commit before this one is queued), or a delete when there is no row or
/// it is outside the filter. With `nowait`, a row locked by a transaction in progress is left
/// alone (false: try later — its own change will be queued at its COMMIT).
pub fn queue_current_state(m: &Mirror, key: &str, nowait: bool) -> Result<bool> {
    current_state(m, key, nowait, None)
}

/// As queue_current_state; `version`: queue the change under that id (the version of the sync
/// push being undone) when it is safe to.
fn current_state(m: &Mirror, key: &str, nowait: bool, version: Option<i64>) -> Result<bool> {
    let parts = m.parts()?;
    let Some(values) = template::invert(&m.key_prefix, &parts, key) else {
        enqueue_repair(m, Change::new("d", key.to_string(), None), version)?;
        return Ok(true);
    };
    let cols = template::columns(&parts);
    let mut conds = vec![];
    for (i, c) in cols.iter().enumerate() {
        let ty = crate::spi_read::one::<String>(
            "SELECT pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attname = $2",
            &[m.tbl.into(), c.to_string().into()],
        )
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| invalid(format!("column {c} vanished")))?;
        conds.push(format!("r.{} = ${}::{ty}", quote_ident(c), i + 1));
    }
    let sql = format!(
        "SELECT {}, {} FROM ONLY {} r WHERE {} FOR SHARE OF r{}",
        m.payload_sql(),
        m.filter_sql(),
        crate::mirror::backfill::qualified(m.tbl)?,
        conds.join(" AND "),
        if nowait { " NOWAIT" } else { "" }
    );
    let owner = catalog::table_owner(m.tbl)?;
    let args: Vec<pgrx::datum::DatumWithOid> = values.into_iter().map(|v| v.into()).collect();
    let row = crate::mirror::validate::in_subtransaction(|| {
        as_role(owner, true, || {
            with_render_settings(|| {
                Spi::connect_mut(|c| {
                    let t = c.update(sql.as_str(), Some(1), &args)?;
                    match t.into_iter().next() {
                        None => Ok::<_, pgrx::spi::SpiError>(None),
                        Some(r) => Ok(Some((
                            r.get::<String>(1)?,
                            r.get::<bool>(2)?.unwrap_or(false),
                        ))),
                    }
                })
            })
        })
    });
    let change = match row {
        Err(_) => return Ok(false), // locked (55P03): try again later
        Ok(Err(e)) => return Err(Error::Internal(format!("sync repair of {key:?}: {e}"))),
        Ok(Ok(Some((payload, true)))) if m.action == "write" => {
            Change::new("s", key.to_string(), payload)
        }
        Ok(Ok(_)) => Change::new("d", key.to_string(), None),
    };
    enqueue_repair(m, change, version)?;
    Ok(true)
}

/// Queue a repair under `version` (the undone push's queue id: its row was rolled back, so the
/// id is free) when the queue's sequence has already passed it in this life of the server — so
/// that it is never handed out again. Otherwise (after a crash that lost the sequence's advance),
/// or if the id is taken after all, under a new id.
fn enqueue_repair(m: &Mirror, change: Change, version: Option<i64>) -> Result<()> {
    if let Some(v) = version {
        let inserted = as_role(ext_owner(), false, || {
            Spi::connect_mut(|c| {
                let t = crate::plans::update(
                    c,
                    "INSERT INTO redis_internal.queue (id, mirror_id, op, key, payload) \
                     SELECT $1, $2, $3::\"char\", $4, $5 \
                      WHERE $1 <= (SELECT last_value FROM redis_internal.queue_id_seq) \
                     ON CONFLICT (id) DO NOTHING",
                    None,
                    &[
                        v.into(),
                        m.id.into(),
                        change.op.to_string().into(),
                        change.key.clone().into(),
                        change.payload.clone().into(),
                    ],
                )?;
                Ok::<_, pgrx::spi::SpiError>(t.len())
            })
        })
        .map_err(|e| Error::Internal(format!("sync repair of {:?}: {e}", change.key)))?;
        if inserted > 0 {
            return Ok(());
        }
    }
    enqueue(m, vec![change])?;
    Ok(())
}

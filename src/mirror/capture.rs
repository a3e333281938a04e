//! Capture: statement-level AFTER triggers with transition tables record every change of a
//! mirrored table in `redis_internal.queue`, in the writing transaction (so only committed
//! changes are ever delivered, docs/guarantees.md). Rows are rendered as the table's owner, in a
//! security-restricted context with fixed rendering settings; the queue insert runs as the
//! extension's owner, so writers need no privilege on the internals.
//!
//! A mirror without a filter over a table whose columns all have built-in types is captured in
//! one INSERT ... SELECT as the extension's owner: only PostgreSQL's own code runs then (user
//! code enters rendering only through a filter or a cast on a user-defined type). Statements of
//! few rows run through kept plans (src/plans.rs) shaped for few rows.
//!
//! Per statement: INSERT → write each new row that passes the filter; DELETE → delete each old
//! key; UPDATE → delete the old keys that no new row has, then write (or, outside the filter,
//! delete) each new row's key; TRUNCATE → delete every key of the layout.

use super::catalog::{self, Mirror};
use super::context::{as_role, ext_owner, with_render_settings, with_some_render_settings};
use crate::error::{Error, OrRaise};
type Res<T> = std::result::Result<T, Error>;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PgTrigger, PgTriggerOperation};
use std::collections::HashSet;

/// One queued change. `op`: 's' write the row, 'd' delete the key, 't' delete every key of the
/// layout, 'n' nothing in the keyspace (a stream event only). `ev` is the change event for the
/// mirror's stream ('i', 'u', 'd', 't'); None for internal changes (backfill, repair, re-key).
pub struct Change {
    pub op: &'static str,
    pub key: String,
    pub payload: Option<String>,
    pub ev: Option<&'static str>,
    pub old_key: Option<String>,
}

impl Change {
    pub fn new(op: &'static str, key: String, payload: Option<String>) -> Self {
        Change {
            op,
            key,
            payload,
            ev: None,
            old_key: None,
        }
    }

    fn event(mut self, ev: &'static str) -> Self {
        self.ev = Some(ev);
        self
    }
}

#[pg_trigger]
fn redis_mirror_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> std::result::Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Error> {
    // Errors raised by PostgreSQL while capturing (a filter that fails, a full disk) are re-raised
    // with what was being done: the writer sees which mirror refused the write.
    let relid = trigger.relid().ok();
    PgTryBuilder::new(|| capture(trigger).or_raise())
        .catch_others(|e| {
            let table = relid.map(catalog::relation_name).unwrap_or_default();
            match e {
                pg_sys::panic::CaughtError::PostgresError(r) => {
                    let msg = if r.message().starts_with("pg_redis:") {
                        r.message().to_string()
                    } else {
                        format!("pg_redis: capturing a change of {table}: {}", r.message())
                    };
                    let mut report =
                        pg_sys::panic::ErrorReport::new(r.sql_error_code(), msg, "pg_redis");
                    if let Some(d) = r.detail() {
                        report = report.set_detail(d);
                    }
                    if let Some(h) = r.hint() {
                        report = report.set_hint(h);
                    }
                    report.report(pgrx::PgLogLevel::ERROR);
                    unreachable!()
                }
                other => other.rethrow(),
            }
        })
        .execute();
    Ok(None)
}

fn capture(trigger: &PgTrigger) -> Res<()> {
    let relid = trigger
        .relid()
        .map_err(|e| Error::Internal(e.to_string()))?;
    if !matches!(trigger.level(), pgrx::PgTriggerLevel::Statement) {
        return Err(Error::InvalidArgument(format!(
            "redis_mirror_trigger on {}: must be a FOR EACH STATEMENT trigger with transition tables (see docs/mirroring.md)",
            catalog::relation_name(relid)
        )));
    }
    let Some(m) = catalog::by_table_shared(relid)? else {
        return Err(Error::InvalidArgument(format!(
            "redis_mirror_trigger on {}: the table has no mirror; call redis_mirror() first",
            catalog::relation_name(relid)
        )));
    };
    if m.state == "needs_resync" {
        return Ok(()); // the queue overflowed: capture stops until redis_resync (user writes go on)
    }
    let op = trigger.op().map_err(|e| Error::Internal(e.to_string()))?;
    let td = trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData;
    let old_name = trigger
        .old_transition_table_name()
        .ok()
        .flatten()
        .map(str::to_string);
    let new_name = trigger
        .new_transition_table_name()
        .ok()
        .flatten()
        .map(str::to_string);
    let need = |n: &Option<String>, which: &str| {
        n.clone().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "redis_mirror_trigger on {}: the trigger needs REFERENCING {which} TABLE (see docs/mirroring.md)",
                m.table_name()
            ))
        })
    };
    if m.mode != "sync" {
        // Queue and commit modes: the changes go from the transition tables to the queue in
        // one INSERT ... SELECT, without passing through this process.
        if queue_overflowing(&m)? {
            return Ok(());
        }
        let queued = if super::native::handles(&m, &op, td) {
            match super::native::capture(&m, td, &op)? {
                Some((lo, hi, n)) => {
                    note_commit_mode(&m, lo, hi);
                    Some(n)
                }
                None => None,
            }
        } else {
            None
        };
        let queued = match queued {
            Some(n) => n,
            None => {
                let tables = Transition {
                    old: old_name.as_deref(),
                    new: new_name.as_deref(),
                };
                capture_in_sql(&m, td, op, &tables, &need)?
            }
        };
        if queued > 0 {
            crate::delivery::wake_at_commit();
        }
        return Ok(());
    }
    let changes = match op {
        PgTriggerOperation::Truncate => {
            vec![Change::new("t", m.key_pattern.clone(), None).event("t")]
        }
        PgTriggerOperation::Insert => {
            let new = render(&m, td, &need(&new_name, "NEW")?)?;
            new.into_iter()
                .filter_map(|(k, p, pass)| write_or_delete(&m, k, p, pass, true))
                .map(|c| c.event("i"))
                .collect()
        }
        PgTriggerOperation::Delete => {
            let old = render_keys(&m, td, &need(&old_name, "OLD")?)?;
            old.into_iter()
                .map(|k| Change::new("d", k, None).event("d"))
                .collect()
        }
        PgTriggerOperation::Update => {
            // Old and new transition rows come in the same order (PostgreSQL appends them pair by
            // pair), which tells each new row the key it had before.
            let old = render_keys(&m, td, &need(&old_name, "OLD")?)?;
            let new = render(&m, td, &need(&new_name, "NEW")?)?;
            let new_keys: HashSet<&str> = new.iter().map(|(k, _, _)| k.as_str()).collect();
            // Removed keys first: in a statement that swaps keys, every DEL precedes the writes.
            let mut out: Vec<Change> = old
                .iter()
                .filter(|k| !new_keys.contains(k.as_str()))
                .map(|k| Change::new("d", k.clone(), None))
                .collect();
            for (i, (k, p, pass)) in new.into_iter().enumerate() {
                let before = old.get(i).filter(|o| **o != k).cloned();
                if let Some(mut c) = write_or_delete(&m, k, p, pass, false) {
                    c.old_key = before;
                    out.push(c.event("u"));
                }
            }
            out
        }
    };
    if changes.is_empty() {
        return Ok(());
    }
    if queue_overflowing(&m)? {
        return Ok(());
    }
    // Sync mode: queue first (the ids are the pushed values' versions), then push.
    let pushed: Vec<(&'static str, String, Option<String>)> = changes
        .iter()
        .map(|c| (c.op, c.key.clone(), c.payload.clone()))
        .collect();
    let ids = enqueue(&m, changes)?;
    crate::delivery::sync_mode::push(&m, &pushed, &ids)?;
    crate::delivery::wake_at_commit();
    Ok(())
}

struct Transition<'a> {
    old: Option<&'a str>,
    new: Option<&'a str>,
}

/// Capture of one statement in SQL, without copying rows into this process:
/// 1. as the table's owner (security-restricted, fixed rendering settings), one query over the
///    transition tables renders every change — keys, JSON, filter verdicts, stream events — into
///    five arrays, so that the filter, casts and output functions run with the owner's rights;
/// 2. as the extension's owner, one INSERT unnests those arrays into the queue.
///
/// Returns the number of changes queued.
fn capture_in_sql(
    m: &Mirror,
    td: *mut pg_sys::TriggerData,
    op: PgTriggerOperation,
    t: &Transition,
    need: &dyn Fn(&Option<String>, &str) -> Res<String>,
) -> Res<i64> {
    use super::template::{quote_ident, quote_literal};
    let one_row_update = matches!(op, PgTriggerOperation::Update) && unsafe { one_row_each(td) };
    // The trigger fixes the table and its transition tables' names.
    let cache_key = DirectKey {
        trigger: unsafe { (*(*td).tg_trigger).tgoid },
        op: op_code(&op),
        one_row_update,
    };
    if m.filter.is_none() && m.builtin_types {
        if let Some((sql, ordered)) = cached_direct(&cache_key) {
            let cacheable = !ordered || unsafe { small_statement(td) };
            return run_direct(m, td, &sql, cacheable);
        }
    }
    let key = m.key_sql()?;
    let stream = m.stream.is_some();
    let ev = |e: &str| {
        if stream {
            format!("'{e}'")
        } else {
            "NULL".into()
        }
    };
    let payload = if m.action == "write" || stream {
        m.payload_sql()
    } else {
        "NULL::text".into()
    };
    let pass = m.filter_sql();
    // Each change as (part, n, op, key, payload, ev, old_key); queued in (part, n) order.
    let mut return_one = None;
    let changes = match op {
        PgTriggerOperation::Truncate => format!(
            "SELECT 0 AS part, 1::int8 AS n, 't' AS op, {} AS k, NULL::text AS p, {} AS e, NULL::text AS ok",
            quote_literal(&m.key_pattern),
            ev("t")
        ),
        PgTriggerOperation::Delete => format!(
            "SELECT 0 AS part, row_number() OVER () AS n, 'd' AS op, {key} AS k, NULL::text AS p, {} AS e, NULL::text AS ok FROM {} r",
            ev("d"),
            quote_ident(&need(&t.old.map(str::to_string), "OLD")?)
        ),
        PgTriggerOperation::Insert => {
            let new = quote_ident(&need(&t.new.map(str::to_string), "NEW")?);
            // A new row outside the filter has nothing in Redis: only its event, if any.
            let (insert_op, keep) = if m.action == "write" {
                ("CASE WHEN nw.f THEN 's' ELSE 'n' END", if stream { "true" } else { "nw.f" })
            } else {
                ("'d'", "true")
            };
            format!(
                "SELECT 0 AS part, nw.n, {insert_op} AS op, nw.k, nw.p, {} AS e, NULL::text AS ok \
                   FROM (SELECT row_number() OVER () AS n, {key} AS k, {payload} AS p, {pass} AS f FROM {new} r) nw \
                  WHERE {keep}",
                ev("i")
            )
        }
        PgTriggerOperation::Update => {
            let old = quote_ident(&need(&t.old.map(str::to_string), "OLD")?);
            let new = quote_ident(&need(&t.new.map(str::to_string), "NEW")?);
            let new_op = if m.action == "write" { "CASE WHEN nw.f THEN 's' ELSE 'd' END" } else { "'d'" };
            if one_row_update {
                // One row changed (the common UPDATE): plain scans and one-time subqueries: no joins, no sort (Append keeps the
                // branches' order, so the DEL of a changed key precedes the write).
                let old_key = format!("(SELECT {key} FROM {old} r)");
                let new_key = format!("(SELECT {key} FROM {new} r)");
                let new_op = new_op.replace("nw.f", &format!("({pass})"));
                return_one = Some(format!(
                    "SELECT 0 AS part, 0::int8 AS n, 'd' AS op, {old_key} AS k, NULL::text AS p, NULL::text AS e, NULL::text AS ok \
                      WHERE {old_key} IS DISTINCT FROM {new_key} \
                     UNION ALL \
                     SELECT 1, 0, {new_op}, {key}, {payload}, {}, NULLIF({old_key}, {key}) FROM {new} r",
                    ev("u")
                ));
            }
            // Old and new rows come pair by pair in the same order, which gives each new row its
            // old key. Removed keys first: in a statement that swaps keys, DELs precede writes.
            format!(
                "WITH o AS (SELECT row_number() OVER () AS n, {key} AS k FROM {old} r), \
                      nw AS (SELECT row_number() OVER () AS n, {key} AS k, {payload} AS p, {pass} AS f FROM {new} r) \
                 SELECT 0 AS part, o.n, 'd' AS op, o.k, NULL::text AS p, NULL AS e, NULL::text AS ok \
                   FROM o WHERE NOT EXISTS (SELECT 1 FROM nw WHERE nw.k = o.k) \
                 UNION ALL \
                 SELECT 1, nw.n, {new_op}, nw.k, nw.p, {}, CASE WHEN o.k IS DISTINCT FROM nw.k THEN o.k END \
                   FROM nw LEFT JOIN o ON o.n = nw.n",
                ev("u")
            )
        }
    };
    let changes = return_one.unwrap_or(changes);
    if m.filter.is_none() && m.builtin_types {
        // Only PostgreSQL's own code renders these rows (no filter, built-in types only): one
        // INSERT ... SELECT from the transition tables, as the extension's owner.
        let rows = match op {
            PgTriggerOperation::Insert => format!(
                "SELECT {} AS op, {key} AS k, {payload} AS p, {}::text AS e, NULL::text AS ok, 0 AS part, 0 AS n FROM {} r",
                if m.action == "write" { "'s'" } else { "'d'" },
                ev("i"),
                quote_ident(&need(&t.new.map(str::to_string), "NEW")?)
            ),
            PgTriggerOperation::Delete => format!(
                "SELECT 'd' AS op, {key} AS k, NULL::text AS p, {}::text AS e, NULL::text AS ok, 0 AS part, 0 AS n FROM {} r",
                ev("d"),
                quote_ident(&need(&t.old.map(str::to_string), "OLD")?)
            ),
            _ => changes.clone(),
        };
        let ordered = matches!(op, PgTriggerOperation::Update) && !one_row_update;
        let cacheable = !ordered || unsafe { small_statement(td) };
        let sql = direct_sql(m, &rows, ordered);
        keep_direct(cache_key, sql.clone(), ordered);
        return run_direct(m, td, &sql, cacheable);
    }
    let small = unsafe { small_statement(td) };
    if small {
        // Few rows (the common OLTP statement): fetch the rendered changes as rows and queue them
        // with a plain INSERT; aggregating them into arrays costs more than it saves here. An
        // INSERT's or DELETE's rows are rendered in the transition table's order by a plain scan.
        let rows = match op {
            PgTriggerOperation::Insert => {
                let new = quote_ident(&need(&t.new.map(str::to_string), "NEW")?);
                let (insert_op, keep) = if m.action == "write" {
                    (
                        "CASE WHEN r.f THEN 's' ELSE 'n' END",
                        if stream { "true" } else { "r.f" },
                    )
                } else {
                    ("'d'", "true")
                };
                format!(
                    "SELECT {insert_op}, r.k, r.p, {}::text, NULL::text \
                       FROM (SELECT {key} AS k, {payload} AS p, {pass} AS f FROM {new} r) r WHERE {keep}",
                    ev("i")
                )
            }
            PgTriggerOperation::Delete => format!(
                "SELECT 'd', {key}, NULL::text, {}::text, NULL::text FROM {} r",
                ev("d"),
                quote_ident(&need(&t.old.map(str::to_string), "OLD")?)
            ),
            _ => format!(
                "SELECT c.op, c.k, c.p, c.e::text, c.ok FROM ({changes}) c ORDER BY c.part, c.n"
            ),
        };
        return queue_rows(m, td, &rows);
    }
    let render = format!(
        "SELECT array_agg(c.op ORDER BY c.part, c.n)::\"char\"[], array_agg(c.k ORDER BY c.part, c.n), \
                array_agg(c.p ORDER BY c.part, c.n), array_agg(c.e ORDER BY c.part, c.n)::\"char\"[], \
                array_agg(c.ok ORDER BY c.part, c.n) \
           FROM ({changes}) c"
    );
    let insert = "WITH ins AS ( \
                    INSERT INTO redis_internal.queue (mirror_id, op, key, payload, ev, old_key) \
                    SELECT $1, u.o, u.k, u.p, u.e, u.ok \
                      FROM unnest($2::\"char\"[], $3::text[], $4::text[], $5::\"char\"[], $6::text[]) \
                           WITH ORDINALITY AS u(o, k, p, e, ok, i) \
                     ORDER BY u.i \
                    RETURNING id) \
                  SELECT min(id), max(id), count(*) FROM ins";
    // A kept plan is made for the row counts it first saw: a big UPDATE's joins get their own.
    let cacheable = !matches!(op, PgTriggerOperation::Update);
    let owner = m.owner;
    queue_with(m, td, |c| {
        let rendered = as_role(owner, true, || {
            if cacheable {
                crate::plans::select_transition(c, m.tbl, &render, Some(1))
            } else {
                c.select(render.as_str(), Some(1), &[])
            }
        })?
        .first();
        let arrays: Vec<Option<pg_sys::Datum>> = (1..=5)
            .map(|i| rendered.get_datum_by_ordinal(i))
            .collect::<Result<_, _>>()?;
        if arrays[0].is_none() {
            return Ok((None, None, 0)); // nothing to queue
        }
        // The arrays stay in this SPI connection's memory until it ends.
        let types = [
            pg_sys::CHARARRAYOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::CHARARRAYOID,
            pg_sys::TEXTARRAYOID,
        ];
        let mut args: Vec<pgrx::datum::DatumWithOid> = vec![m.id.into()];
        for (d, oid) in arrays.into_iter().zip(types) {
            args.push(match d {
                Some(d) => unsafe { pgrx::datum::DatumWithOid::new(d, oid) },
                None => pgrx::datum::DatumWithOid::null_oid(oid),
            });
        }
        let t = as_role(ext_owner(), true, || {
            crate::plans::update(c, insert, Some(1), &args)
        })?;
        let row = t.first();
        Ok::<_, pgrx::spi::SpiError>((
            row.get::<i64>(1)?,
            row.get::<i64>(2)?,
            row.get::<i64>(3)?.unwrap_or(0),
        ))
    })
}

/// Whether the statement's transition tables hold few rows: those are rendered through kept
/// plans (made for few rows) into rows, and queued row by row.
unsafe fn small_statement(td: *mut pg_sys::TriggerData) -> bool {
    const SMALL: i64 = 64;
    let count = |t: *mut pg_sys::Tuplestorestate| {
        if t.is_null() {
            0
        } else {
            pg_sys::tuplestore_tuple_count(t)
        }
    };
    count((*td).tg_oldtable) <= SMALL && count((*td).tg_newtable) <= SMALL
}

/// Whether an UPDATE changed exactly one row.
unsafe fn one_row_each(td: *mut pg_sys::TriggerData) -> bool {
    let (old, new) = ((*td).tg_oldtable, (*td).tg_newtable);
    !old.is_null()
        && !new.is_null()
        && pg_sys::tuplestore_tuple_count(old) == 1
        && pg_sys::tuplestore_tuple_count(new) == 1
}

/// Render a small statement's changes as rows (op, key, payload, ev, old_key) as the table's
/// owner, then queue them as the extension's owner. Returns the number queued.
fn queue_rows(m: &Mirror, td: *mut pg_sys::TriggerData, rows_sql: &str) -> Res<i64> {
    const INSERT_ONE: &str =
        "INSERT INTO redis_internal.queue (mirror_id, op, key, payload, ev, old_key) \
                              VALUES ($1, $2::\"char\", $3, $4, $5::\"char\", $6) RETURNING id, id";
    const INSERT_MANY: &str = "WITH ins AS ( \
           INSERT INTO redis_internal.queue (mirror_id, op, key, payload, ev, old_key) \
           SELECT $1, u.o::\"char\", u.k, u.p, u.e::\"char\", u.ok \
             FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
                  WITH ORDINALITY AS u(o, k, p, e, ok, i) \
            ORDER BY u.i \
           RETURNING id) \
         SELECT min(id), max(id) FROM ins";
    let owner = m.owner;
    queue_with(m, td, |c| {
        // op, key, payload, ev, old_key of each change, in queue order
        let mut cols: [Vec<Option<String>>; 5] = Default::default();
        as_role(owner, true, || {
            for r in crate::plans::select_transition(c, m.tbl, rows_sql, None)? {
                for (i, col) in cols.iter_mut().enumerate() {
                    col.push(r.get::<String>(i + 1)?);
                }
            }
            Ok::<_, pgrx::spi::SpiError>(())
        })?;
        let n = cols[0].len() as i64;
        if n == 0 {
            return Ok((None, None, 0));
        }
        let mut args: Vec<pgrx::datum::DatumWithOid> = vec![m.id.into()];
        let sql = if n == 1 {
            args.extend(cols.into_iter().map(|mut v| v.pop().flatten().into()));
            INSERT_ONE
        } else {
            args.extend(cols.into_iter().map(|v| v.into()));
            INSERT_MANY
        };
        let t = as_role(ext_owner(), true, || {
            crate::plans::update(c, sql, Some(1), &args)
        })?;
        let row = t.first();
        Ok::<_, pgrx::spi::SpiError>((row.get::<i64>(1)?, row.get::<i64>(2)?, n))
    })
}

/// What a filterless mirror's capture statement is made of: rendered once per trigger and
/// operation, and kept until the catalog generation moves (any change of a mirror, any DDL):
/// building the SQL text and parsing the key template on every captured statement was a
/// measurable part of a single-row INSERT (bench/profile.py insert).
#[derive(PartialEq, Eq, Hash)]
struct DirectKey {
    trigger: pg_sys::Oid,
    op: u8,
    one_row_update: bool,
}

type DirectCache = (
    u64,
    std::collections::HashMap<DirectKey, (std::rc::Rc<str>, bool)>,
);

thread_local! {
    static DIRECT_SQL: std::cell::RefCell<DirectCache> =
        std::cell::RefCell::new((0, std::collections::HashMap::new()));
}

fn op_code(op: &PgTriggerOperation) -> u8 {
    match op {
        PgTriggerOperation::Insert => b'i',
        PgTriggerOperation::Update => b'u',
        PgTriggerOperation::Delete => b'd',
        PgTriggerOperation::Truncate => b't',
    }
}

fn cached_direct(k: &DirectKey) -> Option<(std::rc::Rc<str>, bool)> {
    let generation = catalog::generation();
    DIRECT_SQL.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != generation {
            *c = (generation, std::collections::HashMap::new());
        }
        c.1.get(k).cloned()
    })
}

fn keep_direct(k: DirectKey, sql: std::rc::Rc<str>, ordered: bool) {
    DIRECT_SQL.with(|c| {
        let mut c = c.borrow_mut();
        if c.1.len() >= 256 {
            c.1.clear();
        }
        c.1.insert(k, (sql, ordered));
    });
}

/// The INSERT that queues the rows of `rows_sql` (op, k, p, e, ok, part, n) in one statement.
fn direct_sql(m: &Mirror, rows_sql: &str, ordered: bool) -> std::rc::Rc<str> {
    let order = if ordered { " ORDER BY x.part, x.n" } else { "" };
    let insert = format!(
        "INSERT INTO redis_internal.queue (mirror_id, op, key, payload, ev, old_key) \
         SELECT $1, x.op::\"char\", x.k, x.p, x.e::\"char\", x.ok FROM ({rows_sql}) x{order}"
    );
    // Commit mode needs the statement's queue ids (the commit waits for them to be delivered).
    if m.mode == "commit" {
        format!("WITH ins AS ({insert} RETURNING id) SELECT min(id), max(id), count(*) FROM ins")
            .into()
    } else {
        insert.into()
    }
}

/// Run a direct_sql statement as the extension's owner (security-restricted, fixed rendering
/// settings). Returns the number queued.
fn run_direct(m: &Mirror, td: *mut pg_sys::TriggerData, sql: &str, cacheable: bool) -> Res<i64> {
    queue_with(m, td, |c| {
        as_role(ext_owner(), true, || {
            let args = [m.id.into()];
            let t = if cacheable {
                crate::plans::update_transition(c, m.tbl, sql, &args)?
            } else {
                c.update(sql, None, &args)?
            };
            if m.mode == "commit" {
                let row = t.first();
                Ok::<_, pgrx::spi::SpiError>((
                    row.get::<i64>(1)?,
                    row.get::<i64>(2)?,
                    row.get::<i64>(3)?.unwrap_or(0),
                ))
            } else {
                Ok((None, None, t.len() as i64))
            }
        })
    })
}

/// (first id, last id, count) of the changes a statement queued: what commit mode waits for.
type QueuedIds = (Option<i64>, Option<i64>, i64);

/// Run `f` in an SPI connection that sees the statement's transition tables, under the rendering
/// settings; note the queued ids for a commit-mode COMMIT. Returns how many changes were queued.
fn queue_with(
    m: &Mirror,
    td: *mut pg_sys::TriggerData,
    f: impl FnOnce(&mut pgrx::spi::SpiClient<'_>) -> pgrx::spi::SpiResult<QueuedIds>,
) -> Res<i64> {
    let (lo, hi, n) = with_some_render_settings(&m.render_settings, || {
        Spi::connect_mut(|c| {
            unsafe { pg_sys::SPI_register_trigger_data(td) };
            f(c)
        })
    })
    // The table's name is looked up only for a message: not on every statement.
    .map_err(|e| Error::Internal(format!("capturing a change of {}: {e}", m.table_name())))?;
    note_commit_mode(m, lo, hi);
    Ok(n)
}

/// A commit-mode COMMIT waits for the changes its statements queued.
fn note_commit_mode(m: &Mirror, lo: Option<i64>, hi: Option<i64>) {
    if m.mode == "commit" {
        if let (Some(lo), Some(hi)) = (lo, hi) {
            let xid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
            crate::delivery::commit_wait::note_commit_mode(xid, lo, hi);
        }
    }
}

/// Past `pg_redis.max_queue_size` a mirror stops capturing (the user's write goes on) and is
/// marked `needs_resync`; `redis_resync` brings Redis back in step once the queue has drained.
fn queue_overflowing(m: &Mirror) -> Res<bool> {
    // The queue's size is read at most once a second per backend (it costs file-system calls);
    // max_queue_size is a limit to stop runaway growth, not an exact quota.
    thread_local! {
        static LAST_CHECK: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    let now = std::time::Instant::now();
    if LAST_CHECK
        .with(|c| c.get())
        .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1))
    {
        return Ok(false);
    }
    LAST_CHECK.with(|c| c.set(Some(now)));
    let limit = crate::settings::max_queue_size_bytes();
    let size = as_role(ext_owner(), false, || {
        Spi::get_one::<i64>(
            "SELECT pg_catalog.pg_total_relation_size('redis_internal.queue'::regclass)",
        )
    })
    .map_err(|e| Error::Internal(e.to_string()))?
    .unwrap_or(0);
    if size <= limit {
        return Ok(false);
    }
    as_role(ext_owner(), false, || {
        Spi::run_with_args(
            "UPDATE redis_internal.mirrors SET state = 'needs_resync' WHERE id = $1",
            &[m.id.into()],
        )
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    warning!(
        "pg_redis: the queue is larger than pg_redis.max_queue_size ({size} bytes): mirror of {} stops capturing and needs redis_resync() once Redis catches up",
        m.table_name()
    );
    Ok(true)
}

/// What one new row means in Redis: its key written, or (invalidate / outside the filter) removed.
fn write_or_delete(
    m: &Mirror,
    key: String,
    payload: Option<String>,
    pass: bool,
    insert: bool,
) -> Option<Change> {
    // The payload rides along on deletes too when the mirror has a stream (its event's data).
    let payload = if m.stream.is_some() || m.action == "write" {
        payload
    } else {
        None
    };
    if m.action == "invalidate" {
        return Some(Change::new("d", key, payload));
    }
    if pass {
        Some(Change::new("s", key, payload))
    } else if insert {
        // A new row outside the filter: nothing can be in Redis for it; only its event.
        m.stream.as_ref().map(|_| Change::new("n", key, payload))
    } else {
        Some(Change::new("d", key, payload))
    }
}

type Rendered = Vec<(String, Option<String>, bool)>;

/// Key, JSON and filter verdict of every row of a transition table, computed as the table's owner.
fn render(m: &Mirror, td: *mut pg_sys::TriggerData, tt: &str) -> Res<Rendered> {
    let sql = format!(
        "SELECT {}, {}, {} FROM {} r",
        m.key_sql()?,
        m.payload_sql(),
        m.filter_sql(),
        super::template::quote_ident(tt)
    );
    run_as_owner(m, td, &sql, |row| {
        Ok((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<String>(2)?,
            row.get::<bool>(3)?.unwrap_or(false),
        ))
    })
}

fn render_keys(m: &Mirror, td: *mut pg_sys::TriggerData, tt: &str) -> Res<Vec<String>> {
    let sql = format!(
        "SELECT {} FROM {} r",
        m.key_sql()?,
        super::template::quote_ident(tt)
    );
    run_as_owner(m, td, &sql, |row| {
        Ok(row.get::<String>(1)?.unwrap_or_default())
    })
}

fn run_as_owner<T>(
    m: &Mirror,
    td: *mut pg_sys::TriggerData,
    sql: &str,
    f: impl Fn(&pgrx::spi::SpiHeapTupleData) -> std::result::Result<T, pgrx::spi::SpiError>,
) -> Res<Vec<T>> {
    let owner = catalog::table_owner(m.tbl)?;
    let table = m.table_name();
    as_role(owner, true, || {
        with_render_settings(|| {
            Spi::connect(|c| {
                unsafe { pg_sys::SPI_register_trigger_data(td) };
                let rows = c
                    .select(sql, None, &[])
                    .map_err(|e| Error::Internal(format!("capturing a change of {table}: {e}")))?;
                rows.into_iter()
                    .map(|r| {
                        f(&r).map_err(|e| {
                            Error::Internal(format!("capturing a change of {table}: {e}"))
                        })
                    })
                    .collect()
            })
        })
    })
}

/// Append changes to the queue, as the extension's owner, in one statement.
pub fn enqueue(m: &Mirror, changes: Vec<Change>) -> Res<Vec<i64>> {
    if changes.is_empty() {
        return Ok(vec![]);
    }
    let mut ops = Vec::with_capacity(changes.len());
    let mut keys = Vec::with_capacity(changes.len());
    let mut payloads = Vec::with_capacity(changes.len());
    let mut evs: Vec<Option<String>> = Vec::with_capacity(changes.len());
    let mut old_keys = Vec::with_capacity(changes.len());
    for c in changes {
        ops.push(c.op.to_string());
        keys.push(c.key);
        payloads.push(c.payload);
        evs.push(if m.stream.is_some() {
            c.ev.map(str::to_string)
        } else {
            None
        });
        old_keys.push(c.old_key);
    }
    let table = m.table_name();
    // Ids are drawn in the order of the changes (ORDER BY the ordinality), so the sorted ids
    // returned are the changes' ids in order: the sync push uses them as versions.
    let ids = as_role(ext_owner(), false, || {
        Spi::get_one_with_args::<Vec<i64>>(
            "WITH ins AS ( \
               INSERT INTO redis_internal.queue (mirror_id, op, key, payload, ev, old_key) \
               SELECT $1, u.o::\"char\", u.k, u.p, u.e::\"char\", u.ok \
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
                      WITH ORDINALITY AS u(o, k, p, e, ok, i) \
                ORDER BY u.i \
               RETURNING id) \
             SELECT array_agg(id ORDER BY id) FROM ins",
            &[
                m.id.into(),
                ops.into(),
                keys.into(),
                payloads.into(),
                evs.into(),
                old_keys.into(),
            ],
        )
        .map_err(|e| Error::Internal(format!("queueing changes of {table}: {e}")))
    })?;
    Ok(ids.unwrap_or_default())
}

//! Prepared plans kept for the life of the backend (or worker), keyed by their SQL text.
//!
//! Capture runs on every write of the user's application and the worker runs a handful of
//! statements per batch: parsing and planning them each time was most of their CPU
//! (docs/benchmarks.md, profiles). PostgreSQL's plan cache keeps a kept plan valid: it re-plans
//! after DDL on the tables the plan uses or when search_path differs, and privileges are checked
//! when the plan runs, as whichever role runs it.
//!
//! One gap: a plan over a trigger's transition tables does not depend on the table itself in the
//! plan cache's eyes, so an ALTER TABLE would leave it reading rows with the old row type. Such
//! plans are filed under their table and dropped when PostgreSQL invalidates the table's relcache
//! entry (a relcache callback marks them; they are freed at the next lookup, not inside the
//! callback). Keys are the full SQL text, so a mirror whose settings change produces a new text;
//! the cache is emptied when it grows past a bound (mirrors come and go over a backend's life).

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

const MAX_PLANS: usize = 512;

/// The table (for plans over its transition tables), the argument types, the SQL text.
type Key = (Option<pg_sys::Oid>, Vec<pg_sys::Oid>, String);

struct Kept {
    key: Key,
    plan: Rc<OwnedPreparedStatement>,
}

thread_local! {
    static PLANS: RefCell<HashMap<u64, Vec<Kept>>> = RefCell::new(HashMap::new());
    /// Tables whose relcache entry was invalidated since the last lookup; None inside: all.
    static STALE: RefCell<HashSet<Option<pg_sys::Oid>>> = RefCell::new(HashSet::new());
    static CALLBACK: Cell<bool> = const { Cell::new(false) };
}

unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // Runs while PostgreSQL processes invalidation messages: only note it.
    let which = (relid != pg_sys::InvalidOid).then_some(relid);
    crate::mirror::catalog::forget(which);
    let _ = STALE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            s.insert(which);
        }
    });
}

fn forget_stale() {
    let stale: Vec<Option<pg_sys::Oid>> = STALE.with(|s| {
        s.try_borrow_mut()
            .map(|mut s| s.drain().collect())
            .unwrap_or_default()
    });
    if stale.is_empty() {
        return;
    }
    PLANS.with(|m| {
        let mut m = m.borrow_mut();
        for v in m.values_mut() {
            if stale.contains(&None) {
                v.retain(|k| k.key.0.is_none());
            } else {
                v.retain(|k| k.key.0.is_none_or(|t| !stale.contains(&Some(t))));
            }
        }
        m.retain(|_, v| !v.is_empty());
    });
}

/// The kept plan for `sql`, prepared on first use with the argument types of `args`. `table`:
/// the table whose transition tables the statement reads, if any.
fn plan(
    c: &SpiClient<'_>,
    table: Option<pg_sys::Oid>,
    sql: &str,
    args: &[DatumWithOid],
    mutating: bool,
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    if !CALLBACK.with(|c| c.replace(true)) {
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(on_relcache_invalidation),
                pg_sys::Datum::from(0),
            )
        };
    }
    forget_stale();
    // Two tables can render with the same text (same template, same transition table names),
    // and one text can be run with arguments of different types. Looked up by a hash of the
    // three, without building a key (this runs on every captured statement).
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        table.hash(&mut h);
        for a in args {
            a.oid().hash(&mut h);
        }
        sql.hash(&mut h);
        h.finish()
    };
    let same = |k: &Key| {
        k.0 == table
            && k.2 == sql
            && k.1.len() == args.len()
            && k.1.iter().zip(args).all(|(o, a)| *o == a.oid())
    };
    if let Some(p) = PLANS.with(|m| {
        m.borrow()
            .get(&hash)
            .and_then(|v| v.iter().find(|k| same(&k.key)).map(|k| k.plan.clone()))
    }) {
        return Ok(p);
    }
    let oids: Vec<pg_sys::Oid> = args.iter().map(|a| a.oid()).collect();
    let types: Vec<PgOid> = oids.iter().map(|&o| PgOid::from(o)).collect();
    let prepared = if mutating {
        c.prepare_mut(sql, &types)?
    } else {
        c.prepare(sql, &types)?
    };
    let p = Rc::new(prepared.keep());
    PLANS.with(|m| {
        let mut m = m.borrow_mut();
        if m.values().map(Vec::len).sum::<usize>() >= MAX_PLANS {
            m.clear();
        }
        m.entry(hash).or_default().push(Kept {
            key: (table, oids, sql.to_string()),
            plan: p.clone(),
        });
    });
    Ok(p)
}

/// Run a read-only statement through its kept plan.
pub fn select<'conn>(
    c: &SpiClient<'conn>,
    sql: &str,
    limit: Option<i64>,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    let p = plan(c, None, sql, args, false)?;
    c.select(&*p, limit.map(|l| l as libc::c_long), args)
}

/// Run a read-only statement over `table`'s transition tables through its kept plan.
pub fn select_transition<'conn>(
    c: &SpiClient<'conn>,
    table: pg_sys::Oid,
    sql: &str,
    limit: Option<i64>,
) -> SpiResult<SpiTupleTable<'conn>> {
    let p = plan(c, Some(table), sql, &[], false)?;
    c.select(&*p, limit.map(|l| l as libc::c_long), &[])
}

/// Run a statement that writes and reads `table`'s transition tables through its kept plan.
pub fn update_transition<'conn>(
    c: &mut SpiClient<'conn>,
    table: pg_sys::Oid,
    sql: &str,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    let p = plan(c, Some(table), sql, args, true)?;
    c.update(&*p, None, args)
}

/// Run a statement that writes through its kept plan.
pub fn update<'conn>(
    c: &mut SpiClient<'conn>,
    sql: &str,
    limit: Option<i64>,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    let p = plan(c, None, sql, args, true)?;
    c.update(&*p, limit.map(|l| l as libc::c_long), args)
}

/// Run a statement that writes, in its own SPI connection, discarding its result.
pub fn run(sql: &str, args: &[DatumWithOid]) -> SpiResult<()> {
    pgrx::spi::Spi::connect_mut(|c| update(c, sql, None, args).map(|_| ()))
}

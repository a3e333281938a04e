//! Capture without SQL, for the common mirror: queue or commit mode, no filter, no stream, every
//! column, every column of a built-in type. The statement's transition rows are read straight
//! from their tuplestores, rendered by PostgreSQL's own functions (`row_to_json`, the key
//! columns' output functions) and inserted into the queue as heap tuples with their index entry.
//!
//! The SQL path (capture.rs) pays, per captured statement, an SPI connection, the executor start
//! of an INSERT ... SELECT over the transition table, and the switch of search_path around it:
//! about as much as the user's own single-row INSERT (bench/profile.py insert). What runs here is
//! the same rendering and the same queue rows, without that. Whatever this path does not handle
//! (a queue not laid out as expected, a key column missing) returns None and the SQL path runs.

use super::catalog::Mirror;
use super::context::{as_role_only, ext_owner, with_some_render_settings};
use super::json_row::{Buf, Direct, RowJson};
use super::template::Part;
use crate::error::Error;
use pgrx::pg_sys;
use pgrx::PgTriggerOperation;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::rc::{Rc, Weak};

type Res<T> = std::result::Result<T, Error>;

// PostgreSQL's own SQL-callable functions, called directly (pg_sys wraps them as Rust functions,
// which DirectFunctionCall cannot take).
extern "C-unwind" {
    fn row_to_json(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
    fn nextval_oid(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
}

/// Statements whose UPDATE pairs up at most this many rows come here: an UPDATE's old keys are
/// held in memory to know which of them no new row has (larger ones go through SQL's join).
const MAX_UPDATE_ROWS: i64 = 64;

/// The queue's columns, in order (sql/catalog.sql): checked against the table before writing.
const QUEUE_COLUMNS: [&str; 11] = [
    "id",
    "mirror_id",
    "op",
    "key",
    "payload",
    "ev",
    "old_key",
    "xid",
    "queued_at",
    "attempts",
    "last_error",
];

/// Whether this path handles the mirror's capture of `op`.
pub fn handles(m: &Mirror, op: &PgTriggerOperation, td: *mut pg_sys::TriggerData) -> bool {
    let shape = m.filter.is_none()
        && m.builtin_types
        && m.stream.is_none()
        && m.columns.is_none()
        && (m.mode == "queue" || m.mode == "commit");
    shape
        && match op {
            PgTriggerOperation::Insert | PgTriggerOperation::Delete => true,
            PgTriggerOperation::Update => unsafe {
                count((*td).tg_oldtable) <= MAX_UPDATE_ROWS
                    && count((*td).tg_newtable) <= MAX_UPDATE_ROWS
            },
            PgTriggerOperation::Truncate => false,
        }
}

unsafe fn count(t: *mut pg_sys::Tuplestorestate) -> i64 {
    if t.is_null() {
        0
    } else {
        pg_sys::tuplestore_tuple_count(t)
    }
}

/// One part of the key: literal text or a column rendered by its type's output function.
enum KeyPart {
    Lit(String),
    Col {
        attnum: usize,
        /// Integers and text are read from the datum (json_row.rs says why)...
        direct: Option<Direct>,
        /// ... other types rendered by their output function, looked up once (palloc'd in the
        /// Prepared's context).
        output: *mut pg_sys::FmgrInfo,
        name: String,
    },
}

/// (first id, last id, count) of the queued changes; None: not handled here (nothing was done).
pub type Queued = Option<(Option<i64>, Option<i64>, i64)>;

/// What capture looks up once and keeps per table in the backend: the key's parts and the row
/// renderer, with their output functions. A change of the mirror or any DDL on the table
/// invalidates the table's relcache entry, which gives the table a new `Mirror` (catalog.rs):
/// the entry is then built anew.
struct Prepared {
    mirror: Weak<Mirror>,
    /// The column types it was built for (checked again on every statement).
    types: Vec<pg_sys::Oid>,
    key: Vec<KeyPart>,
    json: Option<RowJson>,
    /// Holds the output functions' FmgrInfo (each row's JSON is built in the per-row context).
    cxt: pg_sys::MemoryContext,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        unsafe { pg_sys::MemoryContextDelete(self.cxt) };
    }
}

thread_local! {
    static PREPARED: RefCell<HashMap<pg_sys::Oid, Prepared>> = RefCell::new(HashMap::new());
}

unsafe fn column_types(desc: pg_sys::TupleDesc) -> Vec<pg_sys::Oid> {
    let natts = (*desc).natts as usize;
    (*desc)
        .attrs
        .as_slice(natts)
        .iter()
        .map(|a| {
            if a.attisdropped {
                pg_sys::InvalidOid
            } else {
                a.atttypid
            }
        })
        .collect()
}

/// The table's kept Prepared (taken out of the cache while a statement uses it), or a new one;
/// None when the key template names a column the table lacks (the SQL path reports it).
unsafe fn prepared(m: &Rc<Mirror>, rel: pg_sys::Relation) -> Res<Option<Prepared>> {
    let relid = (*rel).rd_id;
    let types = column_types((*rel).rd_att);
    let kept = PREPARED.with(|c| c.borrow_mut().remove(&relid));
    if let Some(p) = kept {
        if std::ptr::eq(p.mirror.as_ptr(), Rc::as_ptr(m)) && p.types == types {
            return Ok(Some(p));
        }
    }
    let cxt = pg_sys::AllocSetContextCreateInternal(
        pg_sys::TopMemoryContext,
        c"pg_redis capture".as_ptr(),
        pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
        pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
    );
    // Owned from here: an error below deletes the context with it.
    let mut p = Prepared {
        mirror: Rc::downgrade(m),
        types,
        key: Vec::new(),
        json: None,
        cxt,
    };
    let old = pg_sys::MemoryContextSwitchTo(cxt);
    let key = key_parts(m, (*rel).rd_att);
    let json = key.as_ref().ok().and_then(|_| RowJson::new((*rel).rd_att));
    pg_sys::MemoryContextSwitchTo(old);
    let Some(key) = key? else {
        return Ok(None);
    };
    p.key = key;
    p.json = json;
    Ok(Some(p))
}

/// Capture the statement's changes into the queue. The caller checked `handles`.
pub fn capture(
    m: &Rc<Mirror>,
    td: *mut pg_sys::TriggerData,
    op: &PgTriggerOperation,
) -> Res<Queued> {
    let Some((queue, seq)) = queue_relations() else {
        return Ok(None);
    };
    let rel = unsafe { (*td).tg_relation };
    let Some(mut p) = (unsafe { prepared(m, rel)? }) else {
        return Ok(None);
    };
    let r = capture_prepared(m, &mut p, td, op, queue, seq);
    let relid = unsafe { (*rel).rd_id };
    PREPARED.with(|c| c.borrow_mut().insert(relid, p));
    r
}

fn capture_prepared(
    m: &Mirror,
    p: &mut Prepared,
    td: *mut pg_sys::TriggerData,
    op: &PgTriggerOperation,
    queue: pg_sys::Oid,
    seq: pg_sys::Oid,
) -> Res<Queued> {
    let key = &p.key;
    let json = &mut p.json;
    // Output functions of timestamps, floats, bytea, intervals depend on these settings; the
    // path and string settings only matter to SQL, and none runs here.
    let settings: Vec<(&str, &str)> = m
        .render_settings
        .iter()
        .copied()
        .filter(|(n, _)| *n != "search_path" && *n != "standard_conforming_strings")
        .collect();
    with_some_render_settings(&settings, || {
        as_role_only(ext_owner(), true, || unsafe {
            let Some(mut w) = Writer::open(queue, seq, m.id)? else {
                return Ok(None);
            };
            // One buffer for the statement's rows (freed with the trigger's memory context).
            let mut buf = Buf::new(pg_sys::makeStringInfo());
            let r = match op {
                PgTriggerOperation::Insert => {
                    let (op, write) = if m.action == "write" {
                        (b's', true)
                    } else {
                        (b'd', false)
                    };
                    each_row(td, (*td).tg_newtable, |slot| {
                        let k = render_key(key, slot, m)?;
                        let p = if write {
                            Some(row_json(json, slot, &mut buf))
                        } else {
                            None
                        };
                        w.push(op, k, p)
                    })
                }
                PgTriggerOperation::Delete => each_row(td, (*td).tg_oldtable, |slot| {
                    let k = render_key(key, slot, m)?;
                    w.push(b'd', k, None)
                }),
                _ => update(m, td, key, json, &mut buf, &mut w),
            };
            let r = r.and_then(|_| w.flush());
            let done = w.close();
            r.map(|_| Some(done))
        })
    })
}

/// An UPDATE: the old keys that no new row has are deleted first (in a statement that swaps
/// keys every DEL precedes the writes), then each new row is written (or, for an invalidating
/// mirror, its key deleted), carrying the key it had before when that changed. Old and new
/// transition rows come pair by pair in the same order.
unsafe fn update(
    m: &Mirror,
    td: *mut pg_sys::TriggerData,
    key: &[KeyPart],
    json: &mut Option<RowJson>,
    buf: &mut Buf,
    w: &mut Writer,
) -> Res<()> {
    let mut old = Vec::new();
    each_row(td, (*td).tg_oldtable, |slot| {
        old.push(render_key(key, slot, m)?);
        Ok(())
    })?;
    let write = m.action == "write";
    let mut new = Vec::new();
    // The payloads stay in memory until written below (few rows come here).
    each_row(td, (*td).tg_newtable, |slot| {
        let k = render_key(key, slot, m)?;
        let p = if write {
            Some(row_json(json, slot, buf).to_vec())
        } else {
            None
        };
        new.push((k, p));
        Ok(())
    })?;
    let new_keys: HashSet<&str> = new.iter().map(|(k, _)| k.as_str()).collect();
    for k in old.iter().filter(|k| !new_keys.contains(k.as_str())) {
        w.insert(b'd', k, None, None)?;
    }
    for (i, (k, p)) in new.iter().enumerate() {
        let before = old.get(i).filter(|o| *o != k).map(String::as_str);
        w.insert(if write { b's' } else { b'd' }, k, p.as_deref(), before)?;
    }
    Ok(())
}

/// Whether the open queue relation has the columns of this version, in order (an extension
/// not yet updated may have others): the paths that read or write its tuples directly check it.
pub(crate) unsafe fn queue_laid_out(rel: pg_sys::Relation) -> bool {
    let desc = (*rel).rd_att;
    let natts = (*desc).natts as usize;
    let attrs = (*desc).attrs.as_slice(natts);
    natts == QUEUE_COLUMNS.len()
        && attrs.iter().zip(QUEUE_COLUMNS).all(|(a, n)| {
            !a.attisdropped && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == n.as_bytes()
        })
}

/// The queue and its id sequence, looked up by name (the syscache makes this cheap), so that a
/// dropped and re-created extension is found again; None when either is missing.
pub(crate) fn queue_relations() -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"redis_internal".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return None;
        }
        let queue = pg_sys::get_relname_relid(c"queue".as_ptr(), ns);
        let seq = pg_sys::get_relname_relid(c"queue_id_seq".as_ptr(), ns);
        (queue != pg_sys::InvalidOid && seq != pg_sys::InvalidOid).then_some((queue, seq))
    }
}

/// The key template against the table's columns: None when a column is not found (the SQL path
/// then reports it as it does).
fn key_parts(m: &Mirror, desc: pg_sys::TupleDesc) -> Res<Option<Vec<KeyPart>>> {
    let mut parts = vec![KeyPart::Lit(m.key_prefix.clone())];
    for p in m.parts()? {
        match p {
            Part::Lit(l) => parts.push(KeyPart::Lit(l)),
            Part::Col(c) => {
                let Some((attnum, typid)) = (unsafe { column(desc, &c) }) else {
                    return Ok(None);
                };
                let mut output = pg_sys::InvalidOid;
                let mut varlena = false;
                let direct = Direct::of(unsafe { pg_sys::getBaseType(typid) });
                let finfo = unsafe {
                    pg_sys::getTypeOutputInfo(typid, &mut output, &mut varlena);
                    let f = pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>())
                        as *mut pg_sys::FmgrInfo;
                    pg_sys::fmgr_info(output, f);
                    f
                };
                parts.push(KeyPart::Col {
                    attnum,
                    direct,
                    output: finfo,
                    name: c,
                });
            }
        }
    }
    Ok(Some(parts))
}

/// The 1-based number and type of a live column by name.
unsafe fn column(desc: pg_sys::TupleDesc, name: &str) -> Option<(usize, pg_sys::Oid)> {
    let natts = (*desc).natts as usize;
    let attrs = (*desc).attrs.as_slice(natts);
    attrs.iter().enumerate().find_map(|(i, a)| {
        let n = CStr::from_ptr(a.attname.data.as_ptr());
        (!a.attisdropped && n.to_bytes() == name.as_bytes()).then_some((i + 1, a.atttypid))
    })
}

/// Run `f` on every row of a transition table, in order, each in a memory context reset after
/// it (a COPY of millions of rows renders them all in one call).
unsafe fn each_row(
    td: *mut pg_sys::TriggerData,
    store: *mut pg_sys::Tuplestorestate,
    mut f: impl FnMut(*mut pg_sys::TupleTableSlot) -> Res<()>,
) -> Res<()> {
    if store.is_null() {
        return Ok(());
    }
    let desc = (*(*td).tg_relation).rd_att;
    let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple);
    // A read pointer of our own: other triggers of the statement read the same tuplestore.
    let ptr = pg_sys::tuplestore_alloc_read_pointer(store, pg_sys::EXEC_FLAG_REWIND as i32);
    pg_sys::tuplestore_select_read_pointer(store, ptr);
    pg_sys::tuplestore_rescan(store);
    let cxt = pg_sys::AllocSetContextCreateInternal(
        pg_sys::CurrentMemoryContext,
        c"pg_redis capture row".as_ptr(),
        pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
    );
    let mut r = Ok(());
    while pg_sys::tuplestore_gettupleslot(store, true, false, slot) {
        let old = pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::slot_getsomeattrs_int(slot, (*desc).natts);
        r = f(slot);
        pg_sys::MemoryContextSwitchTo(old);
        // Most rows allocate nothing here (json_row.rs): then there is no call to make.
        if !(*cxt).isReset {
            pg_sys::MemoryContextReset(cxt);
        }
        if r.is_err() {
            break;
        }
    }
    pg_sys::MemoryContextDelete(cxt);
    pg_sys::ExecDropSingleTupleTableSlot(slot);
    r
}

/// The row as `row_to_json` renders it, into `buf` (emptied first): by the statement's
/// renderer, or by row_to_json itself for the columns it renders by recursion.
unsafe fn row_json<'a>(
    json: &mut Option<RowJson>,
    slot: *mut pg_sys::TupleTableSlot,
    buf: &'a mut Buf,
) -> &'a [u8] {
    buf.clear();
    if let Some(j) = json {
        j.render(slot, buf);
    } else {
        let row = pg_sys::ExecFetchSlotHeapTupleDatum(slot);
        let d = pg_sys::DirectFunctionCall1Coll(Some(row_to_json), pg_sys::InvalidOid, row);
        buf.put(super::json_row::text_bytes(d));
    }
    buf.bytes()
}

/// The key of the row in the slot (its attributes already deformed).
unsafe fn render_key(
    parts: &[KeyPart],
    slot: *mut pg_sys::TupleTableSlot,
    m: &Mirror,
) -> Res<String> {
    let mut key = Vec::new();
    for p in parts {
        match p {
            KeyPart::Lit(l) => key.extend_from_slice(l.as_bytes()),
            KeyPart::Col {
                attnum,
                direct,
                output,
                name,
            } => {
                let i = attnum - 1;
                if *(*slot).tts_isnull.add(i) {
                    // Key columns are those of a primary key or a NOT NULL unique index.
                    pgrx::ereport!(
                        pgrx::PgLogLevel::ERROR,
                        pgrx::PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                        format!(
                            "pg_redis: capturing a change of {}: the key column {name} is NULL",
                            m.table_name()
                        )
                    );
                }
                let value = *(*slot).tts_values.add(i);
                match direct {
                    Some(d) => d.write(value, &mut key),
                    None => {
                        let s = pg_sys::OutputFunctionCall(*output, value);
                        key.extend_from_slice(CStr::from_ptr(s).to_bytes());
                    }
                }
            }
        }
    }
    Ok(String::from_utf8(key)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// A packed queue row's keys and payloads stay this many bytes under the queue's
/// toast_tuple_target (sql/catalog.sql sets 8160, a page; PostgreSQL's default is 2032): the
/// tuple stays whole in its page, not compressed, no TOAST rows. The rest of the tuple (header,
/// fixed columns, varlena headers) takes under 100 bytes.
const PACK_SLACK: usize = 232;

/// PostgreSQL's TOAST_TUPLE_THRESHOLD with 8 kB pages (a macro, not in the bindings).
const TOAST_TUPLE_THRESHOLD: usize = 2032;

/// Changes of one statement gathered into one queue row (op 'S' writes, 'D' deletes): key a
/// JSON array of the keys, payload a JSON array of the rows' JSON texts, as rendered, in order
/// (src/delivery/queue_read.rs unpacks them). One heap tuple, index entry, WAL record and id per
/// pack instead of per change: the queue's cost in a bulk INSERT or COPY (docs/benchmarks.md P2).
#[derive(Default)]
struct Pack {
    op: u8,
    keys: Vec<String>,
    /// The payloads joined by commas (for 'S').
    payloads: Vec<u8>,
    /// Bytes of keys and payloads so far.
    bytes: usize,
}

/// Inserts queue rows as the queue's owner would through SQL: ids from the queue's sequence,
/// the writing transaction's id, the clock's time when the statement's capture began.
struct Writer {
    pack: Pack,
    /// Keys and payloads of one pack at most, in bytes.
    pack_bytes: usize,
    rel: pg_sys::Relation,
    indexes: pg_sys::CatalogIndexState,
    seq: pg_sys::Oid,
    mirror_id: i32,
    xid: u64,
    /// queued_at of the statement's rows: the clock read once (the rows become visible together).
    now: pg_sys::TimestampTz,
    first: Option<i64>,
    last: Option<i64>,
    count: i64,
}

impl Writer {
    /// None when an index on the queue is one the catalog-style insert cannot maintain (an
    /// expression, partial, exclusion or deferred one a DBA added): the SQL path queues then.
    unsafe fn open(queue: pg_sys::Oid, seq: pg_sys::Oid, mirror_id: i32) -> Res<Option<Writer>> {
        let rel = pg_sys::table_open(queue, pg_sys::RowExclusiveLock as i32);
        if !queue_laid_out(rel) {
            pg_sys::table_close(rel, pg_sys::RowExclusiveLock as i32);
            return Err(Error::Internal(
                "capturing a change: redis_internal.queue does not have the columns of this version of pg_redis (ALTER EXTENSION pg_redis UPDATE)".into(),
            ));
        }
        let indexes = pg_sys::CatalogOpenIndexes(rel);
        let n = (*indexes).ri_NumIndices.max(0) as usize;
        let plain = (0..n).all(|i| {
            let info = *(*indexes).ri_IndexRelationInfo.add(i);
            let index = *(*indexes).ri_IndexRelationDescs.add(i);
            (*info).ii_Expressions.is_null()
                && (*info).ii_Predicate.is_null()
                && (*info).ii_ExclusionOps.is_null()
                && (*(*index).rd_index).indimmediate
        });
        if !plain {
            pg_sys::CatalogCloseIndexes(indexes);
            pg_sys::table_close(rel, pg_sys::RowExclusiveLock as i32);
            return Ok(None);
        }
        let options = (*rel).rd_options as *const pg_sys::StdRdOptions;
        let target = if options.is_null() {
            0
        } else {
            (*options).toast_tuple_target.max(0) as usize
        };
        Ok(Some(Writer {
            pack: Pack::default(),
            pack_bytes: target.max(TOAST_TUPLE_THRESHOLD) - PACK_SLACK,
            rel,
            indexes,
            seq,
            mirror_id,
            xid: pg_sys::GetTopFullTransactionId().value,
            now: pg_sys::GetCurrentTimestamp(),
            first: None,
            last: None,
            count: 0,
        }))
    }

    unsafe fn insert(
        &mut self,
        op: u8,
        key: &str,
        payload: Option<&[u8]>,
        old_key: Option<&str>,
    ) -> Res<()> {
        use pgrx::IntoDatum;
        let id = pg_sys::DirectFunctionCall1Coll(
            Some(nextval_oid),
            pg_sys::InvalidOid,
            pg_sys::Datum::from(self.seq),
        )
        .value() as i64;
        let text = |s: &[u8]| pg_sys::cstring_to_text_with_len(s.as_ptr().cast(), s.len() as i32);
        let none = pg_sys::Datum::from(0usize);
        let mut values = [
            id.into_datum().unwrap_or(none),
            self.mirror_id.into_datum().unwrap_or(none),
            pg_sys::Datum::from(op as i8),
            pg_sys::Datum::from(text(key.as_bytes())),
            payload.map_or(none, |p| pg_sys::Datum::from(text(p))),
            none,
            old_key.map_or(none, |k| pg_sys::Datum::from(text(k.as_bytes()))),
            pg_sys::Datum::from(self.xid as i64),
            pg_sys::Datum::from(self.now),
            0i32.into_datum().unwrap_or(none),
            none,
        ];
        let mut nulls = [
            false,
            false,
            false,
            false,
            payload.is_none(),
            true,
            old_key.is_none(),
            false,
            false,
            false,
            true,
        ];
        let tup =
            pg_sys::heap_form_tuple((*self.rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::CatalogTupleInsertWithInfo(self.rel, tup, self.indexes);
        pg_sys::heap_freetuple(tup);
        self.first.get_or_insert(id);
        self.last = Some(id);
        self.count += 1;
        Ok(())
    }

    /// Queue a change of a multi-row statement ('s' or 'd'): into the pack, which is written
    /// when full (a change too large for any pack is written on its own).
    unsafe fn push(&mut self, op: u8, key: String, text: Option<&[u8]>) -> Res<()> {
        let size = key.len() + 3 + text.map_or(0, |t| t.len() + 1);
        if !self.pack.keys.is_empty()
            && (self.pack.op != op || self.pack.bytes + size > self.pack_bytes)
        {
            self.flush()?;
        }
        if size > self.pack_bytes {
            return self.insert(op, &key, text, None);
        }
        let pack = &mut self.pack;
        pack.op = op;
        if let Some(t) = text {
            if !pack.keys.is_empty() {
                pack.payloads.push(b',');
            }
            pack.payloads.extend_from_slice(t);
        }
        pack.keys.push(key);
        pack.bytes += size;
        Ok(())
    }

    /// Write the pack: one change as a plain row, several as a packed one.
    unsafe fn flush(&mut self) -> Res<()> {
        let pack = std::mem::take(&mut self.pack);
        let payload = (pack.op == b's').then_some(&pack.payloads);
        match pack.keys.len() {
            0 => Ok(()),
            1 => self.insert(pack.op, &pack.keys[0], payload.map(Vec::as_slice), None),
            n => {
                let keys = serde_json::to_string(&pack.keys).map_err(|e| {
                    Error::Internal(format!("capturing a change: packing keys: {e}"))
                })?;
                let payload = payload.map(|p| {
                    let mut a = Vec::with_capacity(p.len() + 2);
                    a.push(b'[');
                    a.extend_from_slice(p);
                    a.push(b']');
                    a
                });
                self.insert(
                    pack.op.to_ascii_uppercase(),
                    &keys,
                    payload.as_deref(),
                    None,
                )?;
                self.count += n as i64 - 1;
                Ok(())
            }
        }
    }

    /// Close the queue (its lock held to the end of the transaction, as a statement's would be).
    unsafe fn close(self) -> (Option<i64>, Option<i64>, i64) {
        pg_sys::CatalogCloseIndexes(self.indexes);
        pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        (self.first, self.last, self.count)
    }
}

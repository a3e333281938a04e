//! The queue's head read without SQL: an index scan of the queue's primary key in id order,
//! with a fresh snapshot, the tuples deformed here. Through SPI the same read paid the executor
//! start, a copy of every row into SPI's tuple table and a conversion per column (a sixth of the
//! worker's time draining a backlog, bench/profile.py drain). When the queue is not laid out as
//! this version expects (an extension not yet updated), None: the caller reads it through SQL.

use pgrx::pg_sys;
use std::ffi::c_int;

/// One queued change as stored.
pub struct Raw {
    pub id: i64,
    pub mirror_id: i32,
    pub op: String,
    pub key: String,
    pub payload: Option<String>,
    /// How long ago it was queued, in milliseconds.
    pub age_ms: f64,
    pub ev: Option<String>,
    pub old_key: Option<String>,
    pub xid: String,
    pub tid: super::queue_delete::Tid,
    /// One of the changes of a packed row (they share its id and TID).
    pub packed: bool,
}

/// The changes of a queue row: a plain row is one; a packed row ('S' writes, 'D' deletes;
/// src/mirror/native.rs) holds a JSON array of keys and, for 'S', a JSON array of the rows' JSON,
/// each kept byte for byte. (op, key, payload, packed) each. A packed row that does not parse
/// comes back as it is, not packed: delivery refuses it (and it ends in the dead letters).
pub fn unpack(
    op: String,
    key: String,
    payload: Option<String>,
) -> Vec<(String, String, Option<String>, bool)> {
    if op != "S" && op != "D" {
        return vec![(op, key, payload, false)];
    }
    let keys = serde_json::from_str::<Vec<String>>(&key).ok();
    let parts = match (&keys, op.as_str(), payload.as_deref()) {
        (Some(k), "S", Some(p)) => serde_json::from_str::<Vec<&serde_json::value::RawValue>>(p)
            .ok()
            .filter(|v| v.len() == k.len())
            .map(|v| {
                v.into_iter()
                    .map(|r| Some(r.get().to_owned()))
                    .collect::<Vec<_>>()
            }),
        (Some(k), "D", None) => Some(vec![None; k.len()]),
        _ => None,
    };
    match (keys, parts) {
        (Some(keys), Some(parts)) => {
            let one = if op == "S" { "s" } else { "d" };
            keys.into_iter()
                .zip(parts)
                .map(|(k, p)| (one.to_string(), k, p, true))
                .collect()
        }
        _ => vec![(op, key, payload, false)],
    }
}

/// A packed row's text for the changes of it that are left: (op, key, payload), or the plain
/// row's when one is left.
pub fn repack(entries: &[(&str, &str, Option<&str>)]) -> (String, String, Option<String>) {
    if let [(op, key, payload)] = entries {
        return (op.to_string(), key.to_string(), payload.map(str::to_string));
    }
    let write = entries.first().is_some_and(|e| e.0 == "s");
    let keys: Vec<&str> = entries.iter().map(|e| e.1).collect();
    let keys = serde_json::to_string(&keys).unwrap_or_else(|_| "[]".into());
    let payload = write.then(|| {
        let mut p = String::from("[");
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                p.push(',');
            }
            p.push_str(e.2.unwrap_or("null"));
        }
        p.push(']');
        p
    });
    ((if write { "S" } else { "D" }).to_string(), keys, payload)
}

/// The oldest `max` queued changes in id order (a packed row's changes all come, so a few more
/// than `max` can), or with `after` (first id, last id, count of the queue rows of a batch still
/// in the queue) the `max` after it — Some(None) then when the queue's head no
/// longer starts with exactly that batch (a change with a smaller id committed meanwhile).
/// None: not handled here.
pub fn head(max: usize, after: Option<(i64, i64, i64)>) -> Option<Option<Vec<Raw>>> {
    let (queue, _) = crate::mirror::native::queue_relations()?;
    unsafe {
        let rel = pg_sys::table_open(queue, pg_sys::AccessShareLock as c_int);
        let index = if crate::mirror::native::queue_laid_out(rel) {
            pg_sys::RelationGetPrimaryKeyIndex(rel)
        } else {
            pg_sys::InvalidOid
        };
        if index == pg_sys::InvalidOid {
            pg_sys::table_close(rel, pg_sys::AccessShareLock as c_int);
            return None;
        }
        let idx = pg_sys::index_open(index, pg_sys::AccessShareLock as c_int);
        let on_id = {
            let i = (*idx).rd_index;
            (*i).indnatts == 1 && *(*i).indkey.values.as_slice(1).first().unwrap_or(&0) == 1
        };
        if !on_id {
            pg_sys::index_close(idx, pg_sys::AccessShareLock as c_int);
            pg_sys::table_close(rel, pg_sys::AccessShareLock as c_int);
            return None;
        }
        let out = scan(rel, idx, max, after);
        pg_sys::index_close(idx, pg_sys::NoLock as c_int);
        pg_sys::table_close(rel, pg_sys::NoLock as c_int);
        Some(out)
    }
}

unsafe fn scan(
    rel: pg_sys::Relation,
    idx: pg_sys::Relation,
    max: usize,
    after: Option<(i64, i64, i64)>,
) -> Option<Vec<Raw>> {
    // A new snapshot, as each SQL statement of a READ COMMITTED transaction takes: the WAL is
    // flushed after this read, so every commit this snapshot sees is durable before sending.
    let snap = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
    let scan = pg_sys::index_beginscan(rel, idx, snap, 0, 0);
    pg_sys::index_rescan(scan, std::ptr::null_mut(), 0, std::ptr::null_mut(), 0);
    let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
    let natts = (*(*rel).rd_att).natts;
    // Detoasted values live per row only (a batch can hold thousands of large payloads).
    let cxt = pg_sys::AllocSetContextCreateInternal(
        pg_sys::CurrentMemoryContext,
        c"pg_redis queue read".as_ptr(),
        pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
    );
    let now = pg_sys::GetCurrentTimestamp();
    let mut out = Vec::with_capacity(max.min(8192));
    let mut held = 0i64;
    let mut stale = false;
    while out.len() < max
        && pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot)
    {
        pg_sys::slot_getsomeattrs_int(slot, natts);
        let values = (*slot).tts_values;
        let nulls = (*slot).tts_isnull;
        let id = (*values).value() as i64;
        if let Some((first, last, count)) = after {
            if id <= last {
                // The batch being sent: it must be the queue's head, whole and alone.
                if held == 0 && id < first {
                    stale = true;
                    break;
                }
                held += 1;
                continue;
            }
            if held != count {
                stale = true;
                break;
            }
        }
        let old = pg_sys::MemoryContextSwitchTo(cxt);
        let text = |i: usize| -> Option<String> {
            if *nulls.add(i) {
                return None;
            }
            let v = pg_sys::pg_detoast_datum_packed((*values.add(i)).cast_mut_ptr());
            Some(match pgrx::varlena::text_to_rust_str(v) {
                Ok(s) => s.to_owned(),
                Err(_) => {
                    String::from_utf8_lossy(pgrx::varlena::varlena_to_byte_slice(v)).into_owned()
                }
            })
        };
        let chr = |i: usize| -> Option<String> {
            (!*nulls.add(i)).then(|| char::from((*values.add(i)).value() as u8).to_string())
        };
        let tid = (*slot).tts_tid;
        let block = (u32::from(tid.ip_blkid.bi_hi) << 16) | u32::from(tid.ip_blkid.bi_lo);
        let queued_at = (*values.add(8)).value() as i64;
        let mirror_id = (*values.add(1)).value() as i32;
        let (ev, old_key) = (chr(5), text(6));
        let xid = ((*values.add(7)).value() as u64).to_string();
        let changes = unpack(
            chr(2).unwrap_or_default(),
            text(3).unwrap_or_default(),
            text(4),
        );
        for (op, key, payload, packed) in changes {
            out.push(Raw {
                id,
                mirror_id,
                op,
                key,
                payload,
                age_ms: (now - queued_at) as f64 / 1000.0,
                ev: ev.clone(),
                old_key: old_key.clone(),
                xid: xid.clone(),
                tid: (block, tid.ip_posid),
                packed,
            });
        }
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::MemoryContextReset(cxt);
    }
    pg_sys::MemoryContextDelete(cxt);
    pg_sys::ExecDropSingleTupleTableSlot(slot);
    pg_sys::index_endscan(scan);
    pg_sys::UnregisterSnapshot(snap);
    (!stale).then_some(out)
}

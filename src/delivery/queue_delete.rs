//! Delivered changes deleted from the queue without SQL: heap_delete by TID, as
//! `simple_heap_delete` does, but a row someone else deleted or updated meanwhile is skipped (as
//! `DELETE ... WHERE ctid = ANY(...)` skips it) rather than raised. Through SPI the same delete
//! paid the executor start, the parse of every TID from text and a TID scan: about a fifth of the
//! worker's time while draining a backlog (bench/profile.py drain).
//!
//! Safe because every TID was read in this transaction, which holds its first snapshot (and so
//! an xmin) to the end: a row it saw cannot be pruned away, so its line pointer still holds that
//! row (or a version of it deleted since, which heap_delete reports).

use pgrx::pg_sys;
use std::ffi::c_int;

/// Where a queued row is: (block, offset).
pub type Tid = (u32, u16);

/// Delete these rows of the queue; the number deleted. None: the queue is not laid out as this
/// version expects (the caller deletes through SQL).
pub fn delete(tids: &[Tid]) -> Option<u64> {
    let (queue, _) = crate::mirror::native::queue_relations()?;
    let mut deleted = 0u64;
    unsafe {
        let rel = pg_sys::table_open(queue, pg_sys::RowExclusiveLock as c_int);
        if !crate::mirror::native::queue_laid_out(rel)
            || (*(*rel).rd_rel).relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
            || (*rel).rd_tableam != pg_sys::GetHeapamTableAmRoutine()
        {
            pg_sys::table_close(rel, pg_sys::RowExclusiveLock as c_int);
            return None;
        }
        let cid = pg_sys::GetCurrentCommandId(true);
        for &(block, offset) in tids {
            let mut tid = pg_sys::ItemPointerData {
                ip_blkid: pg_sys::BlockIdData {
                    bi_hi: (block >> 16) as u16,
                    bi_lo: (block & 0xffff) as u16,
                },
                ip_posid: offset,
            };
            let mut tmfd = pg_sys::TM_FailureData::default();
            let r = pg_sys::heap_delete(
                rel,
                &mut tid,
                cid,
                std::ptr::null_mut(),
                true,
                &mut tmfd,
                false,
            );
            // TM_Deleted / TM_Updated: gone or changed by someone else (a DBA); TM_SelfModified:
            // listed twice. The SQL delete skips all three too.
            if r == pg_sys::TM_Result::TM_Ok {
                deleted += 1;
            }
        }
        pg_sys::table_close(rel, pg_sys::NoLock as c_int);
        // The next read of the queue in this transaction must not see these rows.
        pg_sys::CommandCounterIncrement();
    }
    Some(deleted)
}

/// A TID as tid's output function writes it, "(block,offset)".
pub fn parse(text: &str) -> Option<Tid> {
    let (b, o) = text.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    Some((b.parse().ok()?, o.parse().ok()?))
}

/// The TIDs as text, for the SQL delete.
pub fn texts(tids: &[Tid]) -> Vec<String> {
    tids.iter().map(|(b, o)| format!("({b},{o})")).collect()
}

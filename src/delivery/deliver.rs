//! One delivery batch: claim the oldest queued changes, make sure their commits are durable,
//! send them to Redis in one pipeline, then delete what landed and count what failed.
//!
//! Guarantees kept here (docs/guarantees.md):
//! - durable: the WAL is flushed up to the current insert position after the batch was read, so
//!   every commit record visible to the batch's snapshot is on disk before anything is sent;
//! - order: one deliverer at a time (advisory lock), changes sent in queue order; changes to one
//!   key are queued in commit order because the row (or unique index) lock serializes writers;
//! - hash rows are replaced atomically (MULTI/EXEC around DEL + HSET + EXPIRE);
//! - at-least-once: a change is deleted from the queue only after Redis acknowledged it.

use crate::error::{Error, Result};
use crate::mirror::context::{as_role, ext_owner};
use crate::redis::{call, call_pipeline, value, Call};
use pgrx::pg_sys;
use pgrx::prelude::*;
use redis::{cmd, Cmd, Value};
use std::collections::HashMap;

thread_local! {
    /// Queue rows this process deleted (delivered), for the worker's own vacuum of the queue.
    static DELETED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Queue rows deleted since the last call.
pub fn take_deleted() -> u64 {
    DELETED.with(|d| d.replace(0))
}

/// Advisory lock key held by whoever delivers ('pg_redis' in ASCII).
pub const DELIVERY_LOCK: i64 = 0x7067_5f72_6564_6973;

struct Queued {
    id: i64,
    mirror_id: i32,
    op: String,
    key: String,
    payload: Option<String>,
    age_ms: f64,
    ev: Option<String>,
    old_key: Option<String>,
    xid: String,
    /// Its mirror's delivery settings (shared by the batch's changes); None: the mirror is gone.
    mirror: Option<std::rc::Rc<MirrorInfo>>,
    /// Where the row is: delivered rows are deleted by TID (one deliverer at a time, so the
    /// rows cannot move meanwhile), much cheaper than an index probe per id.
    tid: super::queue_delete::Tid,
    /// One of the changes of a packed queue row (they share its id and TID, and come together).
    packed: bool,
}

/// What delivery needs of a mirror. None: the mirror is gone (its changes still delete).
struct MirrorInfo {
    format: String,
    ttl: Option<i32>,
    stream: Option<String>,
    table: String,
    /// The key prefix of a sync-mode mirror: its writes carry versions (delivery::versioned).
    sync_prefix: Option<String>,
    /// json/jsonb columns of a hash-format mirror: their fields hold JSON text.
    json_cols: Vec<String>,
}

impl Queued {
    fn format(&self) -> Option<&str> {
        self.mirror.as_deref().map(|m| m.format.as_str())
    }
    fn ttl(&self) -> Option<i32> {
        self.mirror.as_deref().and_then(|m| m.ttl)
    }
    fn stream(&self) -> Option<&str> {
        self.mirror.as_deref().and_then(|m| m.stream.as_deref())
    }
    fn json_cols(&self) -> &[String] {
        self.mirror.as_deref().map_or(&[], |m| &m.json_cols)
    }
}

type MirrorsById = HashMap<i32, Option<std::rc::Rc<MirrorInfo>>>;

thread_local! {
    /// The worker's mirrors by id, valid while catalog::generation() stays (any change of a
    /// mirror's catalog row invalidates its table's relcache entry, which moves it). Ids are
    /// never reused, so "gone" is kept too.
    static MIRRORS: std::cell::RefCell<(u64, MirrorsById)> =
        std::cell::RefCell::new((0, HashMap::new()));
}

/// The cached settings of a mirror: None when not cached (Some(None): the mirror is gone).
fn cached_mirror(id: i32) -> Option<Option<std::rc::Rc<MirrorInfo>>> {
    let generation = crate::mirror::catalog::generation();
    MIRRORS.with(|m| {
        let mut m = m.borrow_mut();
        if m.0 != generation {
            *m = (generation, HashMap::new());
        }
        m.1.get(&id).cloned()
    })
}

fn mirror_info(c: &pgrx::spi::SpiClient<'_>, id: i32) -> Result<Option<std::rc::Rc<MirrorInfo>>> {
    if let Some(hit) = cached_mirror(id) {
        return Ok(hit);
    }
    let rows = crate::plans::select(
        c,
        "SELECT m.format, m.ttl_seconds, m.stream, m.tbl::text, \
                CASE WHEN m.mode = 'sync' THEN m.key_prefix END, \
                CASE WHEN m.format = 'hash' THEN ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a \
                     WHERE a.attrelid = m.tbl AND a.attnum > 0 AND NOT a.attisdropped \
                       AND a.atttypid IN ('json'::regtype, 'jsonb'::regtype)) END \
           FROM redis_internal.mirrors m WHERE m.id = $1",
        None,
        &[id.into()],
    )
    .map_err(spi_err)?;
    let mut info = None;
    for r in rows {
        info = Some(std::rc::Rc::new(MirrorInfo {
            format: r.get::<String>(1).map_err(spi_err)?.unwrap_or_default(),
            ttl: r.get::<i32>(2).map_err(spi_err)?,
            stream: r.get::<String>(3).map_err(spi_err)?,
            table: r.get::<String>(4).map_err(spi_err)?.unwrap_or_default(),
            sync_prefix: r.get::<String>(5).map_err(spi_err)?,
            json_cols: r
                .get::<Vec<String>>(6)
                .map_err(spi_err)?
                .unwrap_or_default(),
        }));
    }
    MIRRORS.with(|m| m.borrow_mut().1.insert(id, info.clone()));
    Ok(info)
}

#[derive(Default, Debug)]
pub struct Outcome {
    pub claimed: usize,
    pub delivered: usize,
    pub failed: usize,
    /// Nothing was sent: a standby of pg_redis.standby_names lacks the batch's WAL.
    pub waiting_for_standby: bool,
}

/// Deliver up to `rounds` batches of up to `max` changes (a next batch only while the previous
/// one was full). `wait_for_lock`: block for the delivery lock (drain) or give up at once when
/// another deliverer holds it (worker). Must run inside a transaction.
pub fn deliver_batch(max: usize, rounds: usize, wait_for_lock: bool) -> Result<Outcome> {
    crate::mirror::context::with_delivery_settings(|| {
        as_role(ext_owner(), false, || {
            deliver_inner(max, rounds, wait_for_lock)
        })
    })
}

/// Take the delivery lock for this transaction if no other deliverer holds it.
/// PostgreSQL's own function, called directly: the worker takes it on every step, and a query
/// for it cost a parse and an executor run each time.
pub fn try_delivery_lock() -> Result<bool> {
    extern "C-unwind" {
        fn pg_try_advisory_xact_lock_int8(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
    }
    let got = unsafe {
        pg_sys::DirectFunctionCall1Coll(
            Some(pg_try_advisory_xact_lock_int8),
            pg_sys::InvalidOid,
            pg_sys::Datum::from(DELIVERY_LOCK),
        )
    };
    Ok(got.value() != 0)
}

/// One verdict per change from a pipeline's replies, given how many commands each change sent
/// (or why it sent none).
fn verdicts(
    replies: Vec<Value>,
    counts: impl IntoIterator<Item = std::result::Result<usize, String>>,
) -> Vec<std::result::Result<(), String>> {
    let mut it = replies.into_iter();
    counts
        .into_iter()
        .map(|n| n.and_then(|n| verdict(&it.by_ref().take(n).collect::<Vec<_>>())))
        .collect()
}

fn spi_err(e: pgrx::spi::SpiError) -> Error {
    Error::Internal(format!("delivery: {e}"))
}

fn deliver_inner(max: usize, rounds_max: usize, wait_for_lock: bool) -> Result<Outcome> {
    let locked = if wait_for_lock {
        Spi::run_with_args("SELECT pg_advisory_xact_lock($1)", &[DELIVERY_LOCK.into()])
            .map_err(spi_err)?;
        true
    } else {
        try_delivery_lock()?
    };
    if !locked {
        return Ok(Outcome::default());
    }
    let mut batch = read_batch(max, None)?.unwrap_or_default();
    let mut total = Outcome::default();
    let mut rounds = 0;
    while !batch.is_empty() {
        // Durability: nothing whose commit record could still be lost in a crash goes out.
        let upto = flush_wal();
        // Nor anything a standby named in pg_redis.standby_names does not have yet.
        if !standbys_have(upto)? {
            total.claimed += batch.len();
            total.waiting_for_standby = true;
            break;
        }
        rounds += 1;
        // A full batch means a backlog: while Redis works on this one, read the next one.
        let mut next: Option<Result<Option<Vec<Queued>>>> = None;
        let results = if batch.len() >= max && rounds < rounds_max {
            let after = (
                batch.first().map_or(0, |q| q.id),
                batch.last().map_or(0, |q| q.id),
                queue_rows(&batch) as i64,
            );
            let slot = &mut next;
            let mut meanwhile: crate::redis::Meanwhile =
                Some(Box::new(move || *slot = Some(read_batch(max, Some(after)))));
            send(&batch, &mut meanwhile)?
        } else {
            send(&batch, &mut None)?
        };
        let o = settle(&batch, results)?;
        total.claimed += o.claimed;
        total.delivered += o.delivered;
        total.failed += o.failed;
        if o.failed > 0 {
            break; // the failures are retried first, from the head of the queue
        }
        batch = next.transpose()?.flatten().unwrap_or_default();
    }
    Ok(total)
}

/// The number of queue rows the batch's changes come from (a packed row's are adjacent).
fn queue_rows(batch: &[Queued]) -> usize {
    batch.windows(2).filter(|w| w[0].id != w[1].id).count() + usize::from(!batch.is_empty())
}

/// The oldest `max` queued changes, in id order; `after` (first id, last id, count of queue
/// rows): read while
/// that batch is still in the queue, being sent — the changes after it. None then when a change
/// with a smaller id than its last committed since that batch was read (the queue's first id is
/// smaller than the batch's, or its range holds more): a later change of that key could be in
/// the new batch, and must not go out before it; the next step reads from the head again.
fn read_batch(max: usize, after: Option<(i64, i64, i64)>) -> Result<Option<Vec<Queued>>> {
    let Some(raw) = super::queue_read::head(max, after) else {
        return read_batch_sql(max, after);
    };
    let Some(raw) = raw else {
        return Ok(None);
    };
    // The mirrors' settings from the worker's cache; SPI only for a mirror not seen yet.
    let mut last: Option<(i32, Option<std::rc::Rc<MirrorInfo>>)> = None;
    let mut batch = Vec::with_capacity(raw.len());
    for r in raw {
        let mirror = match &last {
            Some((id, m)) if *id == r.mirror_id => m.clone(),
            _ => {
                let m = match cached_mirror(r.mirror_id) {
                    Some(m) => m,
                    None => Spi::connect(|c| mirror_info(c, r.mirror_id))?,
                };
                last = Some((r.mirror_id, m.clone()));
                m
            }
        };
        batch.push(Queued {
            id: r.id,
            mirror_id: r.mirror_id,
            op: r.op,
            key: r.key,
            payload: r.payload,
            age_ms: r.age_ms,
            ev: r.ev,
            old_key: r.old_key,
            xid: r.xid,
            tid: r.tid,
            packed: r.packed,
            mirror,
        });
    }
    Ok(Some(batch))
}

/// read_batch through SQL, for a queue this version's direct read does not know.
fn read_batch_sql(max: usize, after: Option<(i64, i64, i64)>) -> Result<Option<Vec<Queued>>> {
    const COLS: &str = "SELECT q.id, q.mirror_id, q.op::text, q.key, q.payload, \
                    pg_catalog.date_part('epoch', clock_timestamp() - q.queued_at) * 1000, \
                    q.ev::text, q.old_key, q.xid::text, q.ctid::text";
    Spi::connect(|c| {
        // The queue alone, in id order: a plan this simple starts fast, and the mirrors'
        // settings come from the worker's own cache (mirror_info).
        let rows = match after {
            None => crate::plans::select(
                c,
                &format!("{COLS}, NULL::int8 FROM redis_internal.queue q ORDER BY q.id LIMIT $1"),
                None,
                &[(max as i64).into()],
            ),
            Some((first, last, _)) => crate::plans::select(
                c,
                &format!(
                    "{COLS}, CASE WHEN (SELECT min(h.id) FROM redis_internal.queue h) >= $3 \
                                  THEN (SELECT count(*) FROM redis_internal.queue h WHERE h.id BETWEEN $3 AND $2) END \
                       FROM redis_internal.queue q WHERE q.id > $2 ORDER BY q.id LIMIT $1"
                ),
                None,
                &[(max as i64).into(), last.into(), first.into()],
            ),
        }
        .map_err(spi_err)?;
        let mut batch = Vec::with_capacity(rows.len());
        for r in rows {
            if let Some((_, _, held)) = after {
                if batch.is_empty() && r.get::<i64>(11).map_err(spi_err)? != Some(held) {
                    return Ok(None);
                }
            }
            let mirror_id = r.get::<i32>(2).map_err(spi_err)?.unwrap_or_default();
            let id = r.get::<i64>(1).map_err(spi_err)?.unwrap_or_default();
            let age_ms = r.get::<f64>(6).map_err(spi_err)?.unwrap_or_default();
            let ev = r.get::<String>(7).map_err(spi_err)?;
            let old_key = r.get::<String>(8).map_err(spi_err)?;
            let xid = r.get::<String>(9).map_err(spi_err)?.unwrap_or_default();
            let tid = r
                .get::<String>(10)
                .map_err(spi_err)?
                .as_deref()
                .and_then(super::queue_delete::parse)
                .unwrap_or_default();
            let mirror = mirror_info(c, mirror_id)?;
            let changes = super::queue_read::unpack(
                r.get::<String>(3).map_err(spi_err)?.unwrap_or_default(),
                r.get::<String>(4).map_err(spi_err)?.unwrap_or_default(),
                r.get::<String>(5).map_err(spi_err)?,
            );
            for (op, key, payload, packed) in changes {
                batch.push(Queued {
                    id,
                    mirror_id,
                    op,
                    key,
                    payload,
                    age_ms,
                    ev: ev.clone(),
                    old_key: old_key.clone(),
                    xid: xid.clone(),
                    tid,
                    packed,
                    mirror: mirror.clone(),
                });
            }
        }
        Ok(Some(batch))
    })
}

/// Send rows a backfill read straight to Redis (each a write of its key), in one pipeline, as
/// queued writes would be; the caller holds the delivery lock and read the rows after taking it.
/// One verdict per row. Nothing goes out whose commit record (or a standby of
/// pg_redis.standby_names) could still lack: None then, and nothing was sent.
pub fn send_rows(
    mirror_id: i32,
    rows: &[(String, Option<String>)],
) -> Result<Option<Vec<std::result::Result<(), String>>>> {
    let Some(info) = Spi::connect(|c| mirror_info(c, mirror_id))? else {
        return Ok(Some(vec![Ok(()); rows.len()])); // the mirror is gone: nothing to write
    };
    if info.sync_prefix.is_some() {
        return Ok(None); // sync-mode writes carry queue ids as versions: through the queue
    }
    let upto = flush_wal();
    if !standbys_have(upto)? {
        return Ok(None);
    }
    let mut cmds = Vec::with_capacity(rows.len());
    let mut counts = Vec::with_capacity(rows.len());
    for (key, payload) in rows {
        let before = cmds.len();
        key_commands(
            "s",
            Some(info.format.as_str()),
            key,
            payload.as_deref(),
            info.ttl,
            &info.json_cols,
            &mut cmds,
        );
        counts.push(cmds.len() - before);
    }
    let what = format!("backfilling {} rows of {}", rows.len(), info.table);
    let replies = call_pipeline(&Call::new(&what), &cmds)?;
    Ok(Some(verdicts(replies, counts.into_iter().map(Ok))))
}

/// Count changes delivered outside the queue (a direct backfill step) in redis_stats.
pub fn count_delivered(mirror_id: i32, n: i64) -> Result<()> {
    crate::plans::run(
        "INSERT INTO redis_internal.mirror_stats AS s (mirror_id, delivered) \
         SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM redis_internal.mirrors WHERE id = $1) \
         ON CONFLICT (mirror_id) DO UPDATE SET delivered = s.delivered + $2",
        &[mirror_id.into(), n.into()],
    )
    .map_err(spi_err)
}

/// Flush the WAL up to everything inserted so far. The insert position points past the page
/// header when it sits at a page boundary — WAL that does not exist yet, which XLogFlush refuses —
/// so step back to the boundary then.
pub fn flush_wal() -> u64 {
    unsafe {
        let mut upto = pg_sys::GetXLogInsertRecPtr();
        let page = pg_sys::XLOG_BLCKSZ as u64;
        let segment = pg_sys::wal_segment_size as u64;
        let short = std::mem::size_of::<pg_sys::XLogPageHeaderData>() as u64;
        let long = std::mem::size_of::<pg_sys::XLogLongPageHeaderData>() as u64;
        if upto % segment == long.next_multiple_of(8) {
            upto -= long.next_multiple_of(8);
        } else if upto % page == short.next_multiple_of(8) {
            upto -= short.next_multiple_of(8);
        }
        pg_sys::XLogFlush(upto);
        upto
    }
}

/// Whether the standbys of pg_redis.standby_names have flushed the WAL up to `upto`, waiting up
/// to a second for them. Every named standby must be streaming; `*` means every connected one.
fn standbys_have(upto: u64) -> Result<bool> {
    let names = crate::settings::standby_names();
    if names.is_empty() {
        return Ok(true);
    }
    let lsn = format!("{:X}/{:X}", upto >> 32, upto & 0xffff_ffff);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        // pg_stat_replication shows LSNs to privileged roles only: read it as the superuser
        // (nothing of the user's runs here).
        let ok = as_role(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), false, || {
            crate::spi_read::one::<bool>(
                "SELECT CASE WHEN '*' = ANY($2) \
                        THEN coalesce(bool_and(flush_lsn >= $1::pg_lsn), true) \
                        ELSE count(DISTINCT application_name) FILTER (WHERE flush_lsn >= $1::pg_lsn) \
                             = cardinality(ARRAY(SELECT DISTINCT unnest($2))) END \
                   FROM pg_catalog.pg_stat_replication \
                  WHERE state = 'streaming' AND ('*' = ANY($2) OR application_name = ANY($2))",
                &[lsn.clone().into(), names.clone().into()],
            )
        })
        .map_err(spi_err)?
        .unwrap_or(false);
        if ok {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        // A plain sleep: the latch stays set for a commit's wake-up that arrives meanwhile.
        unsafe { pg_sys::pg_usleep(2000) };
        pgrx::check_for_interrupts!();
    }
}

/// Send the batch; one result per change (Ok, or Redis' error reply). Keyspace-wide deletes
/// ('t') split the batch: what precedes them is sent first, then the layout is scanned.
fn send(
    batch: &[Queued],
    meanwhile: &mut crate::redis::Meanwhile,
) -> Result<Vec<std::result::Result<(), String>>> {
    let mut results = Vec::with_capacity(batch.len());
    // Per change: the number of commands it sent, or why it could not be sent.
    let mut pending: Vec<std::result::Result<usize, String>> = vec![];
    let mut cmds: Vec<Cmd> = vec![];
    let flush = |cmds: &mut Vec<Cmd>,
                 pending: &mut Vec<std::result::Result<usize, String>>,
                 results: &mut Vec<std::result::Result<(), String>>,
                 meanwhile: &mut crate::redis::Meanwhile|
     -> Result<()> {
        if cmds.is_empty() {
            // Changes with nothing to send (their mirror is gone) are done all the same.
            results.extend(pending.drain(..).map(|n| n.map(|_| ())));
            return Ok(());
        }
        let what = format!("delivering {} queued changes", pending.len());
        let replies = crate::redis::call_pipeline_then(&Call::new(&what), cmds, meanwhile)?;
        results.extend(verdicts(replies, pending.drain(..)));
        cmds.clear();
        Ok(())
    };
    for q in batch {
        if q.op == "t" {
            flush(&mut cmds, &mut pending, &mut results, &mut None)?;
            let mut r = match purge_pattern(&q.key) {
                Err(e) if e.is_connection() => return Err(e),
                r => r.map(|_| ()).map_err(|e| e.to_string()),
            };
            let mut ev = vec![];
            event(q, &mut ev);
            if r.is_ok() && !ev.is_empty() {
                let what = format!("XADD {:?}", q.stream().unwrap_or(""));
                r = verdict(&call_pipeline(&Call::new(&what), &ev)?);
            }
            results.push(r);
            continue;
        }
        let before = cmds.len();
        let built = build(q, &mut cmds);
        if built.is_ok() {
            event(q, &mut cmds);
        }
        pending.push(built.map(|_| cmds.len() - before));
    }
    // The last pipeline carries the work to do meanwhile (a batch ending in a TRUNCATE: none).
    flush(&mut cmds, &mut pending, &mut results, meanwhile)?;
    Ok(results)
}

/// The commands for one change. A change whose mirror is gone still deletes (DROP TABLE purge),
/// but writes nothing. A sync-mode change whose version has no container (a cluster with a key
/// prefix that breaks slots) is refused.
fn build(q: &Queued, cmds: &mut Vec<Cmd>) -> std::result::Result<(), String> {
    if q.op == "S" || q.op == "D" {
        return Err(
            "a packed queue row whose keys or payloads are not a JSON array of them".into(),
        );
    }
    let sync_prefix = q.mirror.as_deref().and_then(|m| m.sync_prefix.as_deref());
    if let (Some(prefix), Some(format), "s" | "d") = (sync_prefix, q.format(), q.op.as_str()) {
        let versions =
            super::versioned::container(prefix, q.mirror_id, &q.key).map_err(|e| e.to_string())?;
        cmds.push(super::versioned::command(
            &q.key,
            &versions,
            q.id,
            &q.op,
            q.payload.as_deref(),
            &super::versioned::Shape {
                format,
                ttl: q.ttl(),
                json_cols: q.json_cols(),
            },
        ));
        return Ok(());
    }
    key_commands(
        &q.op,
        q.format(),
        &q.key,
        q.payload.as_deref(),
        q.ttl(),
        q.json_cols(),
        cmds,
    );
    Ok(())
}

/// The Redis commands that apply one change to its key: 's' writes the row (SET, or for a hash
/// MULTI/DEL/HSET/EXPIRE/EXEC so that the hash is replaced atomically), 'd' deletes the key,
/// 'n' does nothing. `format` None: the mirror is gone, so nothing is written (deletes still are).
pub fn key_commands(
    op: &str,
    format: Option<&str>,
    key: &str,
    payload: Option<&str>,
    ttl: Option<i32>,
    json_cols: &[String],
    cmds: &mut Vec<Cmd>,
) {
    match (op, format) {
        ("s", Some("hash")) => {
            let fields = hash_fields(payload.unwrap_or("{}"), json_cols);
            cmds.push(cmd("MULTI"));
            let mut del = cmd("DEL");
            del.arg(key);
            cmds.push(del);
            if !fields.is_empty() {
                let mut h = cmd("HSET");
                h.arg(key);
                for (f, v) in &fields {
                    h.arg(f).arg(v);
                }
                cmds.push(h);
                if let Some(t) = ttl {
                    let mut e = cmd("EXPIRE");
                    e.arg(key).arg(t);
                    cmds.push(e);
                }
            }
            cmds.push(cmd("EXEC"));
        }
        ("s", Some(_)) => {
            let mut c = cmd("SET");
            c.arg(key).arg(payload.unwrap_or("null"));
            if let Some(t) = ttl {
                c.arg("EX").arg(t);
            }
            cmds.push(c);
        }
        ("s", None) | ("n", _) => {}
        _ => {
            let mut c = cmd("DEL");
            c.arg(key);
            cmds.push(c);
        }
    }
}

/// The change event for the mirror's stream (docs/streams.md): XADD with an approximate cap.
fn event(q: &Queued, cmds: &mut Vec<Cmd>) {
    let (Some(stream), Some(ev)) = (q.stream(), q.ev.as_deref()) else {
        return;
    };
    let op = match ev {
        "i" => "insert",
        "u" => "update",
        "d" => "delete",
        _ => "truncate",
    };
    let mut c = cmd("XADD");
    c.arg(stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(crate::settings::stream_maxlen())
        .arg("*");
    let table = q.mirror.as_deref().map_or("", |m| m.table.as_str());
    c.arg("op").arg(op).arg("table").arg(table);
    if op != "truncate" {
        c.arg("key").arg(&q.key);
    }
    if let (Some(data), true) = (q.payload.as_deref(), op == "insert" || op == "update") {
        c.arg("data").arg(data);
    }
    if let Some(old) = &q.old_key {
        c.arg("old_key").arg(old);
    }
    c.arg("xid")
        .arg(&q.xid)
        .arg("change_id")
        .arg(format!("{}:{}", q.xid, q.id));
    cmds.push(c);
}

/// Hash fields of a row: the same text renderings as the JSON (strings unquoted, NULLs left
/// out); json/jsonb columns (`json_cols`) hold their value's JSON text, so that a JSON string
/// stays one ("123" with its quotes) and reads back as what row_to_json gives.
pub fn hash_fields(payload: &str, json_cols: &[String]) -> Vec<(String, String)> {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) if !json_cols.contains(&k) => Some((k, s)),
                other => Some((k, other.to_string())),
            })
            .collect(),
        _ => vec![],
    }
}

pub fn verdict(replies: &[Value]) -> std::result::Result<(), String> {
    for r in replies {
        if let Some(e) = value::error_text(r) {
            return Err(e);
        }
        if let Value::Array(items) = r {
            for i in items {
                if let Some(e) = value::error_text(i) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Delete every key matching a layout's pattern (TRUNCATE, purge, re-key), SCAN-based (on every
/// master of a cluster).
pub fn purge_pattern(pattern: &str) -> Result<i64> {
    let what = format!("SCAN MATCH {pattern:?}");
    let mut removed = 0i64;
    crate::redis::scan::each_page(&what, pattern, |keys| {
        if !keys.is_empty() {
            let r = call(&Call::new(&what), cmd("UNLINK").arg(&keys))?;
            removed += value::int(&what, r)?;
        }
        Ok(())
    })?;
    Ok(removed)
}

/// Record the batch's results: delete what landed (and failures superseded by a later change of
/// the same key that landed), count attempts, move what failed too often to the dead letters.
fn settle(batch: &[Queued], results: Vec<std::result::Result<(), String>>) -> Result<Outcome> {
    if results.len() != batch.len() {
        return Err(Error::Internal(format!(
            "delivery: {} results for {} changes",
            results.len(),
            batch.len()
        )));
    }
    // A failed change is superseded by a later change of its key that landed, or by a later
    // keyspace-wide delete of its mirror (TRUNCATE, re-key) that landed: retrying it afterwards
    // would bring back a key the later change removed.
    let mut last_ok: HashMap<&str, usize> = HashMap::new();
    let mut last_purge: HashMap<i32, usize> = HashMap::new();
    for (i, (q, r)) in batch.iter().zip(&results).enumerate() {
        if r.is_ok() {
            last_ok.insert(q.key.as_str(), i);
            if q.op == "t" {
                last_purge.insert(q.mirror_id, i);
            }
        }
    }
    let superseded = |i: usize, q: &Queued| {
        last_ok.get(q.key.as_str()).is_some_and(|&j| j > i)
            || last_purge.get(&q.mirror_id).is_some_and(|&j| j > i)
    };
    let mut done = 0usize;
    let mut done_tids: Vec<super::queue_delete::Tid> = vec![];
    let mut failed_ids: Vec<i64> = vec![];
    let mut failed_errs: Vec<String> = vec![];
    // The changes left of each row that failed: they go to the dead letters when it does.
    let mut left: Vec<(i64, bool, &str, &str, Option<&str>)> = vec![];
    // Packed rows some of whose changes landed: rewritten to those that did not (a retry must
    // not send again a value that a later change of its key may have replaced since).
    let mut rewrites: Vec<(i64, String, String, Option<String>)> = vec![];
    let mut transient_failures = 0usize;
    let mut per_mirror: HashMap<i32, (i64, i64, f64, Option<String>)> = HashMap::new();
    let mut results = results.into_iter();
    let mut i = 0;
    while i < batch.len() {
        // One queue row: a plain row's change, or every change of a packed one.
        let row = &batch[i..];
        let n = row.iter().take_while(|q| q.id == batch[i].id).count();
        let row = &row[..n];
        let mut not_done: Vec<&Queued> = vec![];
        let mut error: Option<String> = None;
        for (j, q) in row.iter().enumerate() {
            let r = results.next().unwrap_or(Ok(()));
            let s = per_mirror.entry(q.mirror_id).or_insert((0, 0, 0.0, None));
            match r {
                Ok(()) => {
                    done += 1;
                    s.0 += 1;
                    s.2 = q.age_ms;
                }
                Err(_) if superseded(i + j, q) => done += 1,
                Err(e) => {
                    s.1 += 1;
                    s.3 = Some(format!(
                        "{} {:?}: {e}",
                        if q.op == "s" { "SET" } else { "DEL" },
                        q.key
                    ));
                    not_done.push(q);
                    // Redis busy loading, failing over or scripting: not the change's fault, so
                    // no attempt is counted (the worker backs off as for a connection failure).
                    if transient(&e) {
                        transient_failures += 1;
                    } else if error.is_none() {
                        error = Some(e);
                    }
                }
            }
        }
        let q = &row[0];
        if not_done.is_empty() {
            done_tids.push(q.tid);
        } else {
            if q.packed && not_done.len() < row.len() {
                let entries: Vec<(&str, &str, Option<&str>)> = not_done
                    .iter()
                    .map(|q| (q.op.as_str(), q.key.as_str(), q.payload.as_deref()))
                    .collect();
                let (op, key, payload) = super::queue_read::repack(&entries);
                rewrites.push((q.id, op, key, payload));
            }
            if let Some(e) = error {
                failed_ids.push(q.id);
                failed_errs.push(e);
                let packed = not_done.len() > 1;
                left.extend(not_done.iter().map(|c| {
                    (
                        c.id,
                        packed,
                        c.op.as_str(),
                        c.key.as_str(),
                        c.payload.as_deref(),
                    )
                }));
            }
        }
        i += n;
    }
    let deleted = match super::queue_delete::delete(&done_tids) {
        Some(n) => n,
        None => {
            // A queue of another layout: through SQL.
            let n = done_tids.len() as u64;
            crate::plans::run(
                "DELETE FROM redis_internal.queue WHERE ctid = ANY($1::text[]::tid[])",
                &[super::queue_delete::texts(&done_tids).into()],
            )
            .map_err(spi_err)?;
            n
        }
    };
    DELETED.with(|d| d.set(d.get() + deleted));
    if !rewrites.is_empty() {
        let (ids, rest): (Vec<i64>, Vec<_>) = rewrites
            .into_iter()
            .map(|(id, o, k, p)| (id, (o, k, p)))
            .unzip();
        let (ops, rest): (Vec<String>, Vec<_>) =
            rest.into_iter().map(|(o, k, p)| (o, (k, p))).unzip();
        let (keys, payloads): (Vec<String>, Vec<Option<String>>) = rest.into_iter().unzip();
        crate::plans::run(
            "UPDATE redis_internal.queue q SET op = u.op::\"char\", key = u.key, payload = u.payload \
               FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS u(id, op, key, payload) \
              WHERE q.id = u.id",
            &[ids.into(), ops.into(), keys.into(), payloads.into()],
        )
        .map_err(spi_err)?;
    }
    if !failed_ids.is_empty() {
        crate::plans::run(
            "UPDATE redis_internal.queue q SET attempts = q.attempts + 1, last_error = u.e \
               FROM unnest($1::bigint[], $2::text[]) AS u(id, e) WHERE q.id = u.id",
            &[failed_ids.clone().into(), failed_errs.into()],
        )
        .map_err(spi_err)?;
        // A packed row's changes become dead letters of their own, with ids of their own.
        let ids: Vec<i64> = left.iter().map(|e| e.0).collect();
        let packed: Vec<bool> = left.iter().map(|e| e.1).collect();
        let ops: Vec<String> = left.iter().map(|e| e.2.to_string()).collect();
        let keys: Vec<String> = left.iter().map(|e| e.3.to_string()).collect();
        let payloads: Vec<Option<String>> = left.iter().map(|e| e.4.map(str::to_string)).collect();
        crate::plans::run(
            "WITH moved AS (DELETE FROM redis_internal.queue WHERE id = ANY($1) AND attempts >= $2 \
                            RETURNING id, mirror_id, last_error, attempts, queued_at) \
             INSERT INTO redis_internal.dead_letters (id, mirror_id, op, key, payload, error, attempts, first_failure, last_failure) \
             SELECT CASE WHEN c.packed THEN nextval('redis_internal.queue_id_seq') ELSE m.id END, \
                    m.mirror_id, c.op::\"char\", c.key, c.payload, m.last_error, m.attempts, m.queued_at, clock_timestamp() \
               FROM moved m \
               JOIN unnest($3::bigint[], $4::bool[], $5::text[], $6::text[], $7::text[]) \
                    WITH ORDINALITY AS c(id, packed, op, key, payload, n) ON c.id = m.id \
              ORDER BY c.n",
            &[
                failed_ids.clone().into(),
                crate::settings::max_attempts().into(),
                ids.into(),
                packed.into(),
                ops.into(),
                keys.into(),
                payloads.into(),
            ],
        )
        .map_err(spi_err)?;
    }
    for (mirror, (ok, bad, lag_ms, err)) in per_mirror {
        crate::plans::run(
            STATS_SQL,
            &[
                mirror.into(),
                ok.into(),
                bad.into(),
                lag_ms.into(),
                err.into(),
            ],
        )
        .map_err(spi_err)?;
    }
    Ok(Outcome {
        claimed: batch.len(),
        delivered: done,
        failed: failed_ids.len() + transient_failures,
        waiting_for_standby: false,
    })
}

/// Add a batch's figures to a mirror's counters: (mirror, delivered, failed, lag in ms, last error).
const STATS_SQL: &str = "INSERT INTO redis_internal.mirror_stats AS s (mirror_id, delivered, failed, last_lag, last_error, last_error_at) \
     SELECT $1::int, $2::int8, $3::int8, make_interval(secs => $4::float8 / 1000), $5::text, \
            CASE WHEN $5::text IS NULL THEN NULL ELSE clock_timestamp() END \
      WHERE EXISTS (SELECT 1 FROM redis_internal.mirrors WHERE id = $1::int) \
     ON CONFLICT (mirror_id) DO UPDATE SET delivered = s.delivered + $2::int8, failed = s.failed + $3::int8, \
         last_lag = CASE WHEN $2::int8 > 0 THEN excluded.last_lag ELSE s.last_lag END, \
         last_error = coalesce(excluded.last_error, s.last_error), \
         last_error_at = coalesce(excluded.last_error_at, s.last_error_at)";

/// Error replies that say "not now" rather than "never".
fn transient(reply: &str) -> bool {
    [
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "READONLY",
        // min-replicas-to-write: a master cut off from its replicas (before a failover).
        "NOREPLICAS",
    ]
    .iter()
    .any(|p| reply.starts_with(p))
}

/// Note a failure to reach Redis in every mirror's stats (the queue keeps the changes).
pub fn record_connection_error(e: &Error) {
    let msg = crate::error::redact(&e.to_string());
    let _ = as_role(ext_owner(), false, || {
        crate::plans::run(
            "INSERT INTO redis_internal.mirror_stats AS s (mirror_id, last_error, last_error_at) \
             SELECT id, $1, clock_timestamp() FROM redis_internal.mirrors \
             ON CONFLICT (mirror_id) DO UPDATE SET last_error = excluded.last_error, last_error_at = excluded.last_error_at",
            &[msg.into()],
        )
    });
}

//! The background worker: one per database named in `pg_redis.databases`, registered at server
//! start. It delivers queued changes in batches, woken at COMMIT by writers' latches (with a 1 s
//! safety poll), runs backfills when the queue is short, backs off while Redis is down, and idles
//! while the server is a hot standby (delivery starts on promotion).

use super::{deliver, MAX_WORKERS, SLOTS};
use crate::error::Error;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::Duration;

pub fn register_workers() {
    for (i, db) in crate::settings::databases()
        .into_iter()
        .enumerate()
        .take(MAX_WORKERS)
    {
        BackgroundWorkerBuilder::new(&format!("pg_redis worker for {db}"))
            .set_type("pg_redis worker")
            .set_function("pg_redis_worker_main")
            .set_library("pg_redis")
            .set_argument(Some(pg_sys::Datum::from(i)))
            .set_extra(&db)
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

enum Step {
    Busy,
    Idle,
    /// The extension is not created in this database (yet): nothing to do.
    NotInstalled,
    /// Redis could not be reached: back off, and say so in redis_stats.
    RedisDown(Error),
    /// Redis refused some changes (their errors are in redis_stats already): back off.
    Refused,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_redis_worker_main(arg: pg_sys::Datum) {
    let slot = arg.value().min(MAX_WORKERS - 1);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    crate::set_in_worker();
    let db = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    {
        let mut s = SLOTS.exclusive();
        s.db[slot] = unsafe { pg_sys::MyDatabaseId }.to_u32();
        s.pid[slot] = unsafe { pg_sys::MyProcPid };
        s.pausing[slot] = false; // a previous life may have died pausing
    }
    // The worker never waits long for a lock: a DROP EXTENSION or DROP TABLE locks the mirrored
    // table and the extension's tables in its own order, and waiting in the other order would
    // end in a deadlock that aborts the user's DDL. Timing out first (below deadlock_timeout's
    // default 1 s) fails only the worker's step, which is retried.
    BackgroundWorker::transaction(|| {
        if let Err(e) = Spi::run("SET lock_timeout = '300ms'") {
            warning!("pg_redis: could not set the worker's lock_timeout: {e}");
        }
        crate::mirror::context::adopt_internal_settings();
    });
    log!("pg_redis: worker started for database \"{db}\"");
    let mut backoff = Duration::from_millis(100);
    let mut vacuum = QueueVacuum::default();
    loop {
        if crate::worker_shutdown_requested() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if unsafe { pg_sys::RecoveryInProgress() } {
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                break;
            }
            continue;
        }
        super::after_failover::repair_if_due();
        pace();
        let (step, repaired) = BackgroundWorker::transaction(|| {
            commit_asynchronously();
            // An ERROR inside a step (a lost race with a DROP, a bug) rolls back that step only:
            // the worker logs it and goes on instead of dying.
            let s = match crate::mirror::validate::in_subtransaction(step) {
                Ok(s) => s,
                Err(msg) => {
                    if crate::mirror::validate::last_error_was_lock_timeout() {
                        // By design (lock_timeout above): DDL holds a table the step needs;
                        // the step is retried, nothing is wrong.
                        log!(
                            "pg_redis: delivery step gave way to a lock held by another session (retried): {}",
                            crate::error::redact(&msg)
                        );
                    } else {
                        warning!(
                            "pg_redis: delivery step failed: {}",
                            crate::error::redact(&msg)
                        );
                    }
                    return (Step::Refused, vec![]);
                }
            };
            if matches!(s, Step::NotInstalled) {
                return (s, vec![]);
            }
            // Sync-mode pushes of (sub)transactions that did not commit: repair through the queue.
            if !super::sync_mode::any_sync_mirror() {
                return (s, vec![]);
            }
            let repaired = match crate::mirror::validate::in_subtransaction(
                super::sync_mode::repair_pending,
            ) {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => {
                    if !e.is_connection() {
                        warning!("{}", crate::error::redact(&e.to_string()));
                    }
                    vec![]
                }
                Err(msg) => {
                    warning!(
                        "pg_redis: sync repair failed: {}",
                        crate::error::redact(&msg)
                    );
                    vec![]
                }
            };
            (s, repaired)
        });
        // The worker's deletes from the queue count as dead tuples for autovacuum only once
        // reported (a backend does this when idle; a background worker must do it itself).
        unsafe { pg_sys::pgstat_report_stat(false) };
        vacuum.note(deliver::take_deleted());
        // Registry entries go only once the repairs are committed to the queue — durably: with
        // synchronous_commit = off the repair's commit (and the commits of transactions read as
        // committed) could still be lost in a crash, and the entry with them.
        let step = if repaired.is_empty() {
            step
        } else {
            deliver::flush_wal();
            if let Err(e) = super::sync_mode::clean(repaired) {
                warning!("{}", crate::error::redact(&e.to_string()));
            }
            Step::Busy
        };
        if vacuum.due() {
            vacuum_queue();
            // A wait inside VACUUM (a buffer cleanup lock) resets the latch: a commit's wake-up
            // may have been swallowed, so look again at once.
            unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
        }
        match step {
            Step::Busy => {
                // No ResetLatch here: a commit's wake-up that arrived during the step must not be
                // lost; the next wait returns at once if the latch is set.
                backoff = Duration::from_millis(100);
            }
            // Under a heavy stream the next step's pause (pace) is the wait.
            Step::Idle if streaming() => backoff = Duration::from_millis(100),
            Step::Idle | Step::NotInstalled => {
                backoff = Duration::from_millis(100);
                // PostgreSQL's own waits (a heavyweight or buffer cleanup lock) reset the latch
                // and can swallow a commit's wake-up: while a commit-mode COMMIT waits, look
                // every 10 ms rather than leave it waiting up to a second.
                let nap = if super::commit_wait::anyone_waiting() {
                    Duration::from_millis(10)
                } else {
                    Duration::from_secs(1)
                };
                if !BackgroundWorker::wait_latch(Some(nap)) {
                    break;
                }
            }
            Step::Refused => {
                if !pause(backoff) {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Step::RedisDown(e) => {
                BackgroundWorker::transaction(|| deliver::record_connection_error(&e));
                if !pause(backoff) {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    {
        let mut s = SLOTS.exclusive();
        s.pid[slot] = 0;
    }
    log!("pg_redis: worker for database \"{db}\" stopped");
    // Exit code 1: the postmaster restarts the worker (after 1 s) unless the server is shutting
    // down; with 0 it would never come back after a pg_terminate_backend.
    unsafe { pg_sys::proc_exit(1) };
}

/// Back off for the whole period: commits keep setting the latch, and waking at each of them
/// would retry (and count failed attempts) as fast as the application writes. False on SIGTERM.
/// Commits do not wake it meanwhile (`pausing`): each wake-up cost the writer a signal and a
/// task switch (a fifth of a single-row INSERT load's CPU while Redis was down, bench P1 outage).
fn pause(period: Duration) -> bool {
    pause_until(std::time::Instant::now() + period, || false)
}

/// Sleep until `until` or until `end_early()` says so, commits not waking the worker meanwhile
/// (`pausing`); anything else that sets its latch (a commit-mode COMMIT starting to wait, SIGHUP)
/// makes it look at `end_early` again. False on SIGTERM.
fn pause_until(until: std::time::Instant, end_early: impl Fn() -> bool) -> bool {
    set_pausing(true);
    let alive = loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || end_early() {
            break true;
        }
        if !BackgroundWorker::wait_latch(Some(left)) {
            break false;
        }
    };
    set_pausing(false);
    alive
}

fn set_pausing(pausing: bool) {
    let me = unsafe { pg_sys::MyProcPid };
    let mut s = SLOTS.exclusive();
    if let Some(i) = (0..MAX_WORKERS).find(|&i| s.pid[i] == me) {
        s.pausing[i] = pausing;
    }
}

/// When the worker vacuums the queue itself. Every delivered change leaves a dead row and a dead
/// index entry at the head of the queue's id index, which each batch's index scan steps over until
/// a VACUUM removes them; autovacuum visits a database once per `autovacuum_naptime` (1 min), by
/// which time a busy queue has hundreds of thousands of them (bench/profile.py: 10-12 % of the
/// worker in `_bt_first`/`_bt_checkpage`). So after `VACUUM_AFTER` deletes, at most once a second (small ones: its pause is the commit → Redis lag of the changes behind it),
/// the worker runs `VACUUM (SKIP_LOCKED)` on the queue: a few milliseconds for a queue that is
/// mostly dead rows.
#[derive(Default)]
struct QueueVacuum {
    deleted: u64,
    last: Option<std::time::Instant>,
}

const VACUUM_AFTER: u64 = 10_000;

impl QueueVacuum {
    fn note(&mut self, deleted: u64) {
        self.deleted += deleted;
    }

    fn due(&mut self) -> bool {
        let now = std::time::Instant::now();
        if self.deleted < VACUUM_AFTER
            || self
                .last
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return false;
        }
        self.deleted = 0;
        self.last = Some(now);
        true
    }
}

/// `VACUUM (SKIP_LOCKED) redis_internal.queue`, run as a top-level command (VACUUM cannot run
/// inside a transaction or through SPI). Outside any transaction. A failure is logged, not fatal.
fn vacuum_queue() {
    const SQL: &std::ffi::CStr = c"VACUUM (SKIP_LOCKED) redis_internal.queue";
    let old = unsafe { pg_sys::CurrentMemoryContext };
    // The statement lives outside the transaction: VACUUM commits and starts transactions itself.
    let cx = pgrx::PgMemoryContexts::new("pg_redis queue vacuum");
    let statement = cx.value();
    let ran = PgTryBuilder::new(|| unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        // A VACUUM that skips a locked table says so with a WARNING: look first, quietly
        // (autovacuum may be at it), and leave the table to whoever has it.
        let nsp = pg_sys::get_namespace_oid(c"redis_internal".as_ptr(), true);
        let queue = pg_sys::get_relname_relid(c"queue".as_ptr(), nsp);
        if queue == pg_sys::InvalidOid
            || !pg_sys::ConditionalLockRelationOid(queue, pg_sys::ShareUpdateExclusiveLock as i32)
        {
            pg_sys::CommitTransactionCommand();
            return false;
        }
        pg_sys::MemoryContextSwitchTo(statement);
        let parsed = pg_sys::raw_parser(SQL.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        // One statement: the first cell of the parse list.
        let first = (*(*parsed).elements).ptr_value as *mut pg_sys::RawStmt;
        let mut planned = PgBox::<pg_sys::PlannedStmt>::alloc_node(pg_sys::NodeTag::T_PlannedStmt);
        planned.commandType = pg_sys::CmdType::CMD_UTILITY;
        planned.canSetTag = true;
        planned.utilityStmt = (*first).stmt;
        planned.stmt_location = (*first).stmt_location;
        planned.stmt_len = (*first).stmt_len;
        pg_sys::ProcessUtility(
            planned.into_pg(),
            SQL.as_ptr(),
            false,
            pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            pg_sys::None_Receiver,
            std::ptr::null_mut(),
        );
        pg_sys::CommitTransactionCommand();
        true
    })
    .catch_others(|e| {
        unsafe { pg_sys::AbortCurrentTransaction() };
        if let pg_sys::panic::CaughtError::PostgresError(r) = &e {
            warning!("pg_redis: vacuum of the queue failed: {}", r.message());
        }
        false
    })
    .execute();
    unsafe { pg_sys::MemoryContextSwitchTo(old) };
    drop(cx);
    if ran {
        pgrx::debug1!("pg_redis: vacuumed the queue");
    }
}

fn backfill_check_due() -> bool {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    let now = std::time::Instant::now();
    let due = LAST.with(|l| {
        l.get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(50))
    });
    if due {
        LAST.with(|l| l.set(Some(now)));
    }
    due
}

fn set_down(down: bool) {
    let me = unsafe { pg_sys::MyProcPid };
    let mut s = SLOTS.exclusive();
    if let Some(i) = (0..MAX_WORKERS).find(|&i| s.pid[i] == me) {
        s.down[i] = down;
    }
}

/// Batches one step sends at most while a backlog lasts (one transaction: its deletes, and the
/// commit-mode COMMITs waiting for them, become visible when it commits).
const ROUNDS: usize = 4;

/// Under a heavy stream of small commits the worker would start a step for every few changes,
/// each paying a transaction, a WAL flush (fdatasync) and a Redis round trip on the cores the
/// writers need: ~0.3 ms of CPU per step here against ~3 µs per change (bench/profile.py steps).
/// So the next step starts no sooner than a pause after the last one began: below RAMP_FROM
/// changes/s (averaged, see `smoothed`) 1 ms after a step that found PACED_FROM changes or more
/// (at 5k commits/s a step finds two or three), none after fewer; above it, whatever the step
/// found, a pause growing from 1 ms to `pg_redis.batch_delay` at twice that rate. A backlog (a
/// full batch) is not paced: it goes out at once.
const MIN_STEP: Duration = Duration::from_micros(1000);
const PACED_FROM: usize = 8;
const RAMP_FROM: f64 = 8000.0;

/// How long the commit rate is averaged over: a burst of an open-loop load at 5k commits/s must
/// not look like a stream of 10k (P4's p99 doubled when the pause followed each step's own rate).
const RATE_WINDOW: Duration = Duration::from_millis(50);

#[derive(Clone, Copy)]
struct Pacer {
    /// When the last step began and how many changes it found.
    began: Option<std::time::Instant>,
    claimed: usize,
    /// Changes per second, averaged over about RATE_WINDOW.
    rate: f64,
}

thread_local! {
    static PACER: std::cell::Cell<Pacer> = const {
        std::cell::Cell::new(Pacer { began: None, claimed: 0, rate: 0.0 })
    };
}

/// The rate averaged over RATE_WINDOW after `claimed` changes arrived in `interval`.
fn smoothed(rate: f64, claimed: usize, interval: Duration) -> f64 {
    let now = claimed as f64 / interval.as_secs_f64().max(1e-6);
    let weight = (interval.as_secs_f64() / RATE_WINDOW.as_secs_f64()).min(1.0);
    rate + (now - rate) * weight
}

/// The pause between the starts of two steps after one that found `claimed` changes (of a batch
/// of at most `batch`) with `rate` changes per second coming in (None: not paced).
fn pause_for(claimed: usize, batch: usize, rate: f64, max: Duration) -> Option<Duration> {
    if claimed >= batch || max.is_zero() {
        return None;
    }
    let min = MIN_STEP.min(max);
    if rate < RAMP_FROM {
        return (claimed >= PACED_FROM).then_some(min);
    }
    let ramp = ((rate - RAMP_FROM) / RAMP_FROM).clamp(0.0, 1.0);
    Some(min + (max - min).mul_f64(ramp))
}

/// Whether commits come faster than RAMP_FROM: the worker then neither waits on its latch
/// between steps nor lets commits wake it during a pause. Each wake-up is a kill() on the
/// writer's COMMIT and a task switch (~9 % of a backend under a single-row UPDATE load, perf),
/// and a worker woken by every commit found one or two changes per step, too few to be paced:
/// a stable state as costly as the one it was meant to avoid.
fn streaming() -> bool {
    PACER.with(|l| l.get().rate) >= RAMP_FROM
}

fn pace() {
    let mut p = PACER.with(|l| l.get());
    if let Some(began) = p.began {
        // A commit-mode COMMIT waiting for the worker is not held back longer than before, and
        // one that starts waiting ends the pause. A SIGTERM is seen at the top of the loop.
        let waiting = super::commit_wait::anyone_waiting;
        let mut max = crate::settings::batch_delay();
        if waiting() {
            max = max.min(MIN_STEP);
        }
        if let Some(gap) = pause_for(p.claimed, crate::settings::batch_size(), p.rate, max) {
            pause_until(began + gap, waiting);
        }
        // What the coming step finds arrived since the last one began (roughly: since it read).
        p.rate = smoothed(p.rate, p.claimed, began.elapsed());
    }
    p.began = Some(std::time::Instant::now());
    p.claimed = 0;
    PACER.with(|l| l.set(p));
}

/// The delivery step's own COMMIT need not wait for its WAL flush: losing it in a crash only
/// brings back queue rows that are then sent again (idempotent, in order), as a crash between
/// sending and committing always could; and the next step's `flush_wal` makes it durable before
/// anything else goes out. Under `synchronous_commit = on` this saves an fdatasync per step.
/// For the step's transaction only: the worker's other commits (a failover repair scheduling a
/// backfill, recorded nowhere else) keep the server's setting.
fn commit_asynchronously() {
    crate::mirror::context::set_for_transaction(c"synchronous_commit", c"off");
}

fn step() -> Step {
    let installed = super::extension_installed();
    if !installed {
        return Step::NotInstalled;
    }
    let batch = crate::settings::batch_size();
    let delivered = deliver::deliver_batch(batch, ROUNDS, false);
    if let Ok(o) = &delivered {
        PACER.with(|l| {
            let mut p = l.get();
            p.claimed = o.claimed;
            l.set(p)
        });
    }
    super::commit_wait::serve_waiters();
    set_down(matches!(&delivered, Err(e) if e.is_connection()));
    match delivered {
        // Waiting for a standby already took up to a second: look again at once.
        Ok(o) if o.claimed >= batch || o.waiting_for_standby => Step::Busy,
        Ok(o) if o.failed > 0 => Step::Refused,
        // A stream of small batches (a busy OLTP load): look for backfill work every 50 ms only,
        // not after each batch; an empty batch always looks.
        Ok(o) if o.claimed > 0 && !backfill_check_due() => Step::Idle,
        Ok(_) => match crate::mirror::backfill::step_any() {
            Ok(true) => Step::Busy,
            Ok(false) => Step::Idle,
            Err(e) => {
                warning!("{}", crate::error::redact(&e.to_string()));
                Step::Idle
            }
        },
        Err(e) if e.is_connection() => Step::RedisDown(e),
        Err(e) => {
            warning!("{}", crate::error::redact(&e.to_string()));
            Step::RedisDown(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{pause_for, smoothed};
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn light_loads_and_backlogs_are_not_paced() {
        // 5 changes in a step at 5k/s: below PACED_FROM.
        assert_eq!(pause_for(5, 5000, 5_000.0, 5 * MS), None);
        // A full batch: a backlog goes out at once.
        assert_eq!(pause_for(5000, 5000, 30_000.0, 5 * MS), None);
        // batch_delay = 0: never paced.
        assert_eq!(pause_for(100, 5000, 30_000.0, Duration::ZERO), None);
    }

    #[test]
    fn the_pause_grows_with_the_rate_up_to_batch_delay() {
        // 8k changes/s and less: 1 ms, as before batch_delay existed.
        assert_eq!(pause_for(8, 5000, 5_000.0, 5 * MS), Some(MS));
        assert_eq!(pause_for(8, 5000, 8_000.0, 5 * MS), Some(MS));
        // 12k/s: half way from 1 ms to 5 ms.
        assert_eq!(pause_for(24, 5000, 12_000.0, 5 * MS), Some(3 * MS));
        // 16k/s and more: batch_delay.
        assert_eq!(pause_for(80, 5000, 16_000.0, 5 * MS), Some(5 * MS));
        assert_eq!(pause_for(400, 5000, 40_000.0, 20 * MS), Some(20 * MS));
        // A stream is paced however few changes a step found (a worker woken by each commit).
        assert_eq!(pause_for(1, 5000, 20_000.0, 5 * MS), Some(5 * MS));
        // A batch_delay under 1 ms caps the pause too.
        let tiny = Duration::from_micros(500);
        assert_eq!(pause_for(400, 5000, 40_000.0, tiny), Some(tiny));
    }

    #[test]
    fn a_burst_does_not_make_a_stream() {
        // 5k/s steady, then one step finds 12 changes in 1 ms (12k/s on its own).
        let rate = smoothed(5_000.0, 12, MS);
        assert!(rate < 8_000.0, "{rate}");
        // A long idle wait forgets the past at once.
        assert_eq!(smoothed(30_000.0, 0, Duration::from_secs(1)), 0.0);
        // A steady stream converges to its rate.
        let mut r = 0.0;
        for _ in 0..200 {
            r = smoothed(r, 60, 2 * MS);
        }
        assert!((r - 30_000.0).abs() < 100.0, "{r}");
    }
}

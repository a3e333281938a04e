//! The cache tracker: a background worker (no database) that follows Redis' invalidation
//! messages for the shared read cache. Its reader thread blocks on the subscription and applies
//! each message to shared memory (atomics and memcpy only); the main thread serves signals, PINGs
//! Redis every second on a second connection, and takes the cache offline (flushed, unused) the
//! moment invalidations might be missed: the subscription ended, Redis stopped answering, or the
//! connection settings changed. While offline every read goes to Redis, as without a cache.

use super::store;
use crate::redis::config;
use crate::redis::tracking::{self, Event, Pinger};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

pub fn register() {
    BackgroundWorkerBuilder::new("pg_redis cache tracker")
        .set_type("pg_redis cache tracker")
        .set_function("pg_redis_cache_tracker_main")
        .set_library("pg_redis")
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

enum Ended {
    Shutdown,
    /// Start again after a pause.
    Retry(String),
    /// The reader thread may be stuck on a dead connection: end the process (restarted in 1 s).
    Exit(String),
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_redis_cache_tracker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    crate::set_in_worker();
    store::go_offline();
    store::set_tracker_pid(unsafe { pg_sys::MyProcPid });
    let mut said = String::new();
    let mut say = |msg: String| {
        // Once per change of state, not once per retry.
        if msg != said {
            log!("pg_redis: shared read cache: {msg}");
            said = msg;
        }
    };
    loop {
        if crate::worker_shutdown_requested() {
            break;
        }
        match session(&mut say) {
            Ended::Shutdown => break,
            Ended::Retry(why) => {
                store::go_offline();
                say(format!("not in use: {why}; retrying every second"));
                if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                    break;
                }
            }
            Ended::Exit(why) => {
                store::go_offline();
                log!("pg_redis: shared read cache: not in use: {why}; the tracker restarts");
                store::set_tracker_pid(0);
                unsafe { pg_sys::proc_exit(1) };
            }
        }
    }
    store::go_offline();
    store::set_tracker_pid(0);
}

fn reload_if_asked() -> bool {
    let asked = BackgroundWorker::sighup_received();
    if asked {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    asked
}

fn session(say: &mut impl FnMut(String)) -> Ended {
    reload_if_asked();
    let target = match config::current() {
        Ok(t) => t,
        Err(e) => return Ended::Retry(e.to_string()),
    };
    if let Some(why) = tracking::refusal(&target) {
        say(format!(
            "not in use: {why} (it follows one standalone server)"
        ));
        // Nothing to follow until the settings change.
        loop {
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1)))
                || crate::worker_shutdown_requested()
            {
                return Ended::Shutdown;
            }
            if reload_if_asked() {
                return Ended::Retry("the settings changed".into());
            }
        }
    }
    let connector = match target.connector() {
        Ok(c) => c,
        Err(e) => return Ended::Retry(e.to_string()),
    };
    let fp = tracking::fingerprint(&target);
    let prefixes = crate::settings::cache_prefixes();
    let con = match tracking::open(&connector, crate::settings::connect_timeout(), &prefixes) {
        Ok(c) => c,
        Err(e) => return Ended::Retry(format!("connecting to {}: {e}", target.display_addr)),
    };
    let reader = std::thread::spawn(move || {
        let why = tracking::listen(
            con,
            || store::go_online(fp),
            |ev| match ev {
                Event::Keys(keys) => keys.iter().for_each(|k| store::invalidate(k)),
                Event::All => store::flush(),
            },
        );
        store::go_offline();
        why
    });
    let mut pinger = Pinger::new(connector, crate::settings::command_timeout());
    let mut announced = false;
    loop {
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1)))
            || crate::worker_shutdown_requested()
        {
            return Ended::Shutdown;
        }
        if reload_if_asked() {
            match config::current() {
                Ok(t) if tracking::fingerprint(&t) == fp => {}
                _ => return Ended::Exit("the connection settings changed".into()),
            }
        }
        if reader.is_finished() {
            let why = reader
                .join()
                .unwrap_or_else(|_| "the reader thread failed".into());
            return Ended::Retry(format!("the subscription ended: {why}"));
        }
        if let Err(e) = pinger.ping() {
            return Ended::Exit(format!(
                "{} did not answer a PING: {e}",
                target.display_addr
            ));
        }
        if !announced && store::online() {
            say(format!("following {}", target.display_addr));
            announced = true;
        }
    }
}

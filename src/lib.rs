//! pg_redis: keep Redis in step with PostgreSQL from inside the database.
//!
//! Data path: settings → redis (connection per backend) → kv (SQL key-value functions); and for
//! mirrors: capture trigger → queue → delivery (worker / drain) → Redis; back: read-through.

use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

mod command;
mod delivery;
mod error;
mod fetch;
mod kv;
mod mirror;
mod plans;
mod redis;
mod settings;
mod spi_read;
mod stats;
mod verify;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!(
    "../sql/catalog.sql",
    name = "catalog",
    requires = ["bootstrap"]
);
extension_sql_file!(
    "../sql/views.sql",
    name = "views",
    requires = [
        "catalog",
        mirror::redis_worker_info,
        mirror::redis_read_through_counts,
        mirror::redis_backfill_step,
        mirror::redis_drain,
        mirror::redis_internal::wake_worker,
        mirror::redis_internal::revalidate,
        mirror::redis_internal::register_trigger,
        mirror::redis_internal::forget_mirror
    ]
);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);
extension_sql_file!(
    "../sql/comments.sql",
    name = "comments",
    requires = ["views"]
);

/// Set once a background worker got SIGTERM, so that a Redis call it is waiting on ends.
static WORKER_SHUTDOWN: AtomicBool = AtomicBool::new(false);
static IN_WORKER: AtomicBool = AtomicBool::new(false);

pub(crate) fn in_worker() -> bool {
    IN_WORKER.load(Ordering::Relaxed)
}

pub(crate) fn set_in_worker() {
    IN_WORKER.store(true, Ordering::Relaxed);
}

/// In a worker: has SIGTERM arrived? (pgrx's flag is consumed when read, so remember it.)
pub(crate) fn worker_shutdown_requested() -> bool {
    if IN_WORKER.load(Ordering::Relaxed) && pgrx::bgworkers::BackgroundWorker::sigterm_received() {
        WORKER_SHUTDOWN.store(true, Ordering::Relaxed);
    }
    WORKER_SHUTDOWN.load(Ordering::Relaxed)
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        delivery::init_preloaded();
        redis::failover::init_preloaded();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn settings_have_defaults() {
        let url = Spi::get_one::<String>("SELECT current_setting('pg_redis.url')");
        assert_eq!(url, Ok(Some("redis://127.0.0.1:6379/0".to_string())));
        let t = Spi::get_one::<String>("SELECT current_setting('pg_redis.command_timeout')");
        assert_eq!(t, Ok(Some("5s".to_string())));
    }

    #[pg_test(error = "pg_redis: redis_set: key must not be NULL")]
    fn set_refuses_null_key() {
        Spi::run("SELECT redis_set(NULL, 'v')").unwrap();
    }

    #[pg_test(
        error = "pg_redis: redis_command: SELECT is refused: it would change the state of the session's shared connection"
    )]
    fn command_refuses_select() {
        Spi::run("SELECT redis_command('SELECT', '1')").unwrap();
    }

    #[pg_test]
    fn read_of_null_key_is_null() {
        assert_eq!(Spi::get_one::<String>("SELECT redis_get(NULL)"), Ok(None));
    }
}

/// This module is required by `cargo pgrx test` invocations.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}

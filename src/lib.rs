//! pg_redis: keep Redis in step with PostgreSQL from inside the database.
//!
//! Data path: settings → redis (connection per backend) → kv (SQL key-value functions); and for
//! mirrors: capture trigger → queue → delivery (worker / drain) → Redis; back: read-through.

use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

mod cache;
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
    requires = ["views", cache::redis_cache_info]
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
        cache::init_preloaded();
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

    /// Issue 6's fuzz target for filters: random token sequences — SQL injection attempts,
    /// comments, statements, subqueries, unbalanced parentheses — given to the filter check of
    /// redis_mirror. Each is refused with a `pg_redis:` 22023 message or accepted; an accepted one
    /// must be one boolean expression that runs in a WHERE clause over the table as it stands.
    // proptest comes with the pg_test feature (cargo pgrx test), not with a plain `cargo test`.
    #[cfg(feature = "pg_test")]
    #[pg_test]
    fn filter_check_refuses_or_accepts_safely() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        Spi::run("CREATE TABLE fz (id int PRIMARY KEY, v text, n numeric, b boolean)").unwrap();
        let relid = Spi::get_one::<pg_sys::Oid>("SELECT 'fz'::regclass::oid")
            .unwrap()
            .unwrap();
        let token = prop_oneof![
            Just("id > 1"),
            Just("v = 'a'"),
            Just("b"),
            Just("NOT b"),
            Just("n IS NULL"),
            Just("AND"),
            Just("OR"),
            Just("("),
            Just(")"),
            Just(";"),
            Just("--"),
            Just("/*"),
            Just("*/"),
            Just("'"),
            Just("\""),
            Just("SELECT 1"),
            Just("DROP TABLE fz"),
            Just("pg_sleep(0)"),
            Just("(SELECT true)"),
            Just("EXISTS (SELECT 1 FROM pg_class)"),
            Just("count(*) > 0"),
            Just("row_number() OVER ()"),
            Just("true"),
            Just("$1"),
            Just("\n"),
            Just("1"),
            Just("::int"),
            Just("v || 'x'"),
            Just("COMMIT"),
        ];
        let filters = proptest::collection::vec(token, 1..7).prop_map(|t| t.join(" "));
        let mut runner = TestRunner::new(Config {
            cases: 300,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&filters, |f| {
                match crate::mirror::validate::filter(relid, "fz", &f) {
                    Err(e) => {
                        prop_assert_eq!(
                            e.sqlstate(),
                            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                            "{}",
                            &f
                        );
                        prop_assert!(e.to_string().starts_with("pg_redis: redis_mirror: filter"));
                    }
                    Ok(()) => {
                        let ran = crate::mirror::validate::in_subtransaction(|| {
                            Spi::get_one::<i64>(&format!("SELECT count(*) FROM fz r WHERE ({f}\n)"))
                        });
                        prop_assert!(
                            matches!(ran, Ok(Ok(_))),
                            "accepted {:?} but it does not run",
                            f
                        );
                    }
                }
                Ok(())
            })
            .unwrap();
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

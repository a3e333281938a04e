//! pg_redis: keep Redis in step with PostgreSQL from inside the database.
//!
//! Data path: settings → redis (connection per backend) → kv (SQL key-value functions); and for
//! mirrors: capture trigger → queue → delivery (worker / drain) → Redis; back: read-through.

use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

mod command;
mod error;
mod kv;
mod redis;
mod settings;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

/// Set by a background worker's SIGTERM handling so that a Redis call it is waiting on ends.
static WORKER_SHUTDOWN: AtomicBool = AtomicBool::new(false);

pub(crate) fn worker_shutdown_requested() -> bool {
    WORKER_SHUTDOWN.load(Ordering::Relaxed)
}

#[allow(dead_code)]
pub(crate) fn request_worker_shutdown() {
    WORKER_SHUTDOWN.store(true, Ordering::Relaxed);
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
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

    #[pg_test(error = "pg_redis: redis_command: SELECT is refused: it would change the state of the session's shared connection")]
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

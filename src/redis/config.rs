//! Turns the `pg_redis.*` connection settings into redis-rs connection info. The password comes
//! from the URL or, preferably, from `pg_redis.password_file`; `display_addr` is what messages show
//! (never the password).

use crate::error::{invalid, redact, Result};
use crate::settings;
use redis::{ConnectionInfo, IntoConnectionInfo};

#[derive(Clone)]
pub struct Target {
    pub info: ConnectionInfo,
    pub display_addr: String,
    /// Changes whenever any connection-relevant setting changes: a new fingerprint means reconnect.
    pub fingerprint: String,
}

pub fn current() -> Result<Target> {
    let url = settings::url();
    crate::error::remember_url_secrets(&url);
    let password_file = settings::password_file();
    let topology = settings::topology();
    let tls = settings::tls_files();
    let fingerprint = format!(
        "{url}\u{1}{password_file:?}\u{1}{topology}\u{1}{:?}\u{1}{tls:?}",
        settings::sentinel_master()
    );
    if topology != "standalone" {
        return Err(invalid(format!(
            "pg_redis.topology = '{topology}' is not supported by this build yet; use 'standalone'"
        )));
    }
    let first = url.split(',').next().unwrap_or("").trim().to_string();
    if first.starts_with("rediss://") {
        return Err(invalid(
            "TLS (rediss://) is not supported by this build yet; use redis:// or unix://",
        ));
    }
    let display_addr = redact(&first);
    let mut info = first.as_str().into_connection_info().map_err(|e| {
        invalid(format!(
            "pg_redis.url '{display_addr}' is not a valid Redis URL: {}",
            redact(&e.to_string())
        ))
    })?;
    if let Some(path) = password_file {
        let password = read_password_file(&path)?;
        crate::error::remember_secret(&password);
        let redis_settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(redis_settings);
    }
    Ok(Target {
        info,
        display_addr,
        fingerprint,
    })
}

fn read_password_file(path: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        invalid(format!(
            "could not read pg_redis.password_file \"{path}\": {e}"
        ))
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "pg_redis.password_file \"{path}\" must not be readable by group or others (chmod 600)"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(format!(
            "could not read pg_redis.password_file \"{path}\": {e}"
        ))
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

//! Turns the `pg_redis.*` connection settings into a `Target`: the topology, the parsed node
//! addresses and where the secrets live. Parsing is cached per fingerprint (it runs at every call);
//! files (password, TLS) are read only when a connection is made (`Target::connector`), on the
//! main thread, so a bad path is a clear 22023 error rather than a failure inside the helper.
//! `display_addr` is what messages show: never a password.
//!
//! URL lists: `redis://[user[:password]@]host:port[,host:port...][/db]`. Entries after the first
//! may be bare `host:port` (they take the first's scheme and credentials) or full URLs.
//! With `sentinel`, the entries are the sentinels, and the credentials and db are the master's.

use crate::error::{invalid, redact, Result};
use crate::settings;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};
use std::cell::RefCell;

#[derive(Clone, Debug, PartialEq)]
pub enum Topology {
    Standalone,
    Cluster,
    /// The master's service name.
    Sentinel(String),
}

#[derive(Clone)]
pub struct Target {
    pub topology: Topology,
    /// One entry for standalone; the seed nodes or the sentinels otherwise.
    pub nodes: Vec<ConnectionInfo>,
    pub tls: bool,
    pub display_addr: String,
    /// Changes whenever any connection-relevant setting changes: a new fingerprint means reconnect.
    pub fingerprint: String,
    password_file: Option<String>,
    tls_files: (Option<String>, Option<String>, Option<String>),
}

/// Everything the helper thread needs to connect: secrets already read, owned, `Send`.
#[derive(Clone)]
pub struct Connector {
    pub topology: Topology,
    pub nodes: Vec<ConnectionInfo>,
    pub certs: Option<TlsCertificates>,
}

thread_local! {
    static CACHE: RefCell<Option<Target>> = const { RefCell::new(None) };
}

pub fn current() -> Result<Target> {
    let url = settings::url();
    crate::error::remember_url_secrets(&url);
    let password_file = settings::password_file();
    let topology = settings::topology();
    let master = settings::sentinel_master();
    let tls = settings::tls_files();
    let fingerprint =
        format!("{url}\u{1}{password_file:?}\u{1}{topology}\u{1}{master:?}\u{1}{tls:?}");
    if let Some(hit) = CACHE.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|t| t.fingerprint == fingerprint)
            .cloned()
    }) {
        return Ok(hit);
    }
    let target = parse(&url, &topology, master, password_file, tls, fingerprint)?;
    CACHE.with(|c| *c.borrow_mut() = Some(target.clone()));
    Ok(target)
}

fn parse(
    url: &str,
    topology: &str,
    master: Option<String>,
    password_file: Option<String>,
    tls_files: (Option<String>, Option<String>, Option<String>),
    fingerprint: String,
) -> Result<Target> {
    let display_addr = redact(url);
    let topology = match topology {
        "standalone" => Topology::Standalone,
        "cluster" => Topology::Cluster,
        "sentinel" => Topology::Sentinel(master.ok_or_else(|| {
            invalid("pg_redis.topology = 'sentinel' needs pg_redis.sentinel_master (the master's service name)")
        })?),
        other => {
            return Err(invalid(format!(
                "pg_redis.topology = '{other}' is not one of standalone, cluster, sentinel"
            )))
        }
    };
    let entries = expand(url)?;
    let nodes = entries
        .iter()
        .map(|e| {
            e.as_str().into_connection_info().map_err(|err| {
                invalid(format!(
                    "pg_redis.url entry '{}' is not a valid Redis URL: {}",
                    redact(e),
                    redact(&err.to_string())
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Also `unix:///s.sock?pass=...`, decoded: scrubbed from every message (error::redact).
    for n in &nodes {
        if let Some(p) = n.redis_settings().password() {
            crate::error::remember_secret(p);
        }
    }
    let is_tls = |n: &ConnectionInfo| matches!(n.addr(), ConnectionAddr::TcpTls { .. });
    let tls = nodes.iter().any(is_tls);
    if tls && !nodes.iter().all(is_tls) {
        return Err(invalid(format!(
            "pg_redis.url '{display_addr}' mixes rediss:// and other schemes; use one for every address"
        )));
    }
    let (ca, cert, key) = &tls_files;
    if !tls && (ca.is_some() || cert.is_some() || key.is_some()) {
        return Err(invalid(format!(
            "pg_redis.tls_ca_file, tls_cert_file or tls_key_file is set but pg_redis.url '{display_addr}' does not use rediss://"
        )));
    }
    if cert.is_some() != key.is_some() {
        return Err(invalid(
            "pg_redis.tls_cert_file and pg_redis.tls_key_file must be set together",
        ));
    }
    let unix = nodes
        .iter()
        .any(|n| matches!(n.addr(), ConnectionAddr::Unix(_)));
    match &topology {
        Topology::Standalone if nodes.len() > 1 => {
            return Err(invalid(format!(
                "pg_redis.url '{display_addr}' lists {} addresses; set pg_redis.topology to 'cluster' or 'sentinel', or give one address",
                nodes.len()
            )))
        }
        Topology::Cluster | Topology::Sentinel(_) if unix => {
            return Err(invalid(format!(
                "pg_redis.url '{display_addr}': unix sockets cannot be used with pg_redis.topology = '{}' (nodes are announced by host and port)",
                settings::topology()
            )))
        }
        _ => {}
    }
    let dbs: Vec<i64> = nodes
        .iter()
        .map(|n| n.redis_settings().db())
        .filter(|&d| d != 0)
        .collect();
    if topology == Topology::Cluster && !dbs.is_empty() {
        return Err(invalid(format!(
            "pg_redis.url '{display_addr}': a Redis Cluster has only database 0"
        )));
    }
    if dbs.windows(2).any(|w| w[0] != w[1]) {
        return Err(invalid(format!(
            "pg_redis.url '{display_addr}' names different databases"
        )));
    }
    Ok(Target {
        topology,
        nodes,
        tls,
        display_addr,
        fingerprint,
        password_file,
        tls_files,
    })
}

/// Split a comma-separated list; bare `host:port` entries take the first entry's scheme and
/// credentials (`redis://u:p@h1:1,h2:2` means `redis://u:p@h1:1` and `redis://u:p@h2:2`).
fn expand(url: &str) -> Result<Vec<String>> {
    let items: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let Some(first) = items.first() else {
        return Err(invalid("pg_redis.url is empty"));
    };
    let Some(scheme_end) = first.find("://") else {
        return Err(invalid(format!(
            "pg_redis.url '{}' must start with redis://, rediss:// or unix://",
            redact(first)
        )));
    };
    let rest = &first[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let base = match rest[..authority_end].rfind('@') {
        Some(at) => &first[..scheme_end + 3 + at + 1],
        None => &first[..scheme_end + 3],
    };
    Ok(items
        .iter()
        .map(|i| {
            if i.contains("://") {
                i.to_string()
            } else {
                format!("{base}{i}")
            }
        })
        .collect())
}

impl Target {
    /// Read the secrets and make the connector. Main thread only (at connect time).
    pub fn connector(&self) -> Result<Connector> {
        let mut nodes = self.nodes.clone();
        if let Some(path) = &self.password_file {
            let password = read_secret_file(path, "pg_redis.password_file")?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            crate::error::remember_secret(&password);
            nodes = nodes
                .into_iter()
                .map(|n| {
                    let s = n.redis_settings().clone().set_password(password.clone());
                    n.set_redis_settings(s)
                })
                .collect();
        }
        let certs = if self.tls {
            let (ca, cert, key) = &self.tls_files;
            let root_cert = ca
                .as_deref()
                .map(|p| read_file(p, "pg_redis.tls_ca_file"))
                .transpose()?;
            let client_tls = match (cert, key) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read_file(c, "pg_redis.tls_cert_file")?,
                    client_key: read_secret_file(k, "pg_redis.tls_key_file")?.into_bytes(),
                }),
                _ => None,
            };
            Some(TlsCertificates {
                client_tls,
                root_cert,
            })
        } else {
            None
        };
        Ok(Connector {
            topology: self.topology.clone(),
            nodes,
            certs,
        })
    }
}

fn read_file(path: &str, setting: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| invalid(format!("could not read {setting} \"{path}\": {e}")))
}

/// A file holding a secret must not be readable by group or others (as libpq checks its key).
fn read_secret_file(path: &str, setting: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(format!("could not read {setting} \"{path}\": {e}")))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "{setting} \"{path}\" must not be readable by group or others (chmod 600)"
        )));
    }
    let bytes = read_file(path, setting)?;
    String::from_utf8(bytes).map_err(|_| invalid(format!("{setting} \"{path}\" is not UTF-8 text")))
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn bare_entries_take_scheme_and_credentials() {
        assert_eq!(
            expand("redis://u:p@h1:1, h2:2,rediss://x:3").unwrap(),
            vec!["redis://u:p@h1:1", "redis://u:p@h2:2", "rediss://x:3"]
        );
        assert_eq!(
            expand("redis://h1:1,h2:2/0").unwrap(),
            vec!["redis://h1:1", "redis://h2:2/0"]
        );
        assert!(expand("h1:1").is_err());
    }
}

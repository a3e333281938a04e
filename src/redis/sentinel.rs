//! Finding the master through the sentinels (redis-rs' sentinel client: it asks each sentinel in
//! turn and checks with `ROLE` that the address it got is a master). Helper thread only.
//!
//! The credentials and db of `pg_redis.url` are the master's; the sentinels are asked without a
//! password (docs/topologies.md). With rediss://, both the sentinels and the master use TLS.

use super::config::Connector;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{RedisResult, TlsMode};
use std::time::Duration;

/// A client for the current master, and its address (`host:port`).
pub fn master(
    c: &Connector,
    service: &str,
    timeout: Duration,
) -> RedisResult<(redis::Client, String)> {
    let sentinels = c.nodes.iter().map(|n| n.addr().clone());
    // TCP_USER_TIMEOUT bounds a connect to a host that does not answer at all (redis-rs' sentinel
    // client connects without a timeout of its own).
    let tcp = redis::io::tcp::TcpSettings::default().set_user_timeout(timeout);
    let mut b = SentinelClientBuilder::new(sentinels, service, SentinelServerType::Master)?
        .set_client_to_sentinel_tcp_settings(tcp.clone())
        .set_client_to_redis_tcp_settings(tcp);
    let first = c.nodes[0].redis_settings();
    if let Some(u) = first.username() {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = first.password() {
        b = b.set_client_to_redis_password(p);
    }
    b = b.set_client_to_redis_db(first.db());
    if let Some(certs) = &c.certs {
        b = b
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure)
            .set_client_to_redis_certificates(certs.clone())
            .set_client_to_sentinel_certificates(certs.clone());
    }
    let client = b.build()?.get_client()?;
    let addr = client.get_connection_info().addr().to_string();
    Ok((client, addr))
}

//! The Redis side of pg_redis: one connection per backend (or worker), opened on first use,
//! re-opened after a failure and re-made when the connection settings change.
//!
//! Every call runs on a helper thread that owns the redis-rs connection and blocks all signals;
//! the backend's main thread waits on its latch for the answer, so a cancel, `statement_timeout`
//! or `pg_terminate_backend` ends a call blocked on Redis at once (BUILD-NOTES, shape (b)). This
//! keeps redis-rs' own connection types: one server (TCP, TLS, unix socket), the master found
//! through Sentinel, or a Redis Cluster all sit behind the same `Link` (docs/topologies.md).

mod cluster;
pub mod config;
mod conn;
pub mod failover;
mod link;
pub mod scan;
mod sentinel;
pub mod value;

pub use link::{call, call_pipeline, masters, on_node, reset, Call};

/// Is the configured topology a Redis Cluster? (Features that need one slot for several keys
/// refuse it.)
pub fn is_cluster() -> bool {
    crate::settings::topology() == "cluster"
}

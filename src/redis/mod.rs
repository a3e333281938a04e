//! The Redis side of pg_redis: one connection per backend (or worker), opened on first use,
//! re-opened after a failure and re-made when the connection settings change.
//!
//! One server over plain TCP or a unix socket (the common case) is driven by the backend's main
//! thread itself (direct.rs): commands written to the socket, replies parsed as they arrive,
//! waits on a kept `WaitEventSet` with the latch. TLS, the master found through Sentinel and Redis
//! Cluster use redis-rs' own connection types on a helper thread that blocks all signals, while
//! the main thread waits on its latch for the answer (link.rs). Either way a cancel,
//! `statement_timeout` or `pg_terminate_backend` ends a call blocked on Redis at once
//! (BUILD-NOTES, shape (b)), and all sit behind the same `call`/`call_pipeline`
//! (docs/topologies.md).

mod cluster;
pub mod config;
mod conn;
mod direct;
pub mod failover;
mod link;
pub mod scan;
mod sentinel;
pub mod tracking;
pub mod value;

pub use link::{call, call_pipeline, call_pipeline_then, masters, on_node, reset, Call, Meanwhile};

/// Is the configured topology a Redis Cluster? (Features that need one slot for several keys
/// refuse it.)
pub fn is_cluster() -> bool {
    crate::settings::topology() == "cluster"
}

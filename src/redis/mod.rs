//! The Redis side of pg_redis: one connection per backend (or worker), opened on first use,
//! re-opened after a failure and re-made when the connection settings change.
//!
//! Every call runs on a helper thread that owns the redis-rs connection and blocks all signals;
//! the backend's main thread waits on its latch for the answer, so a cancel, `statement_timeout`
//! or `pg_terminate_backend` ends a call blocked on Redis at once (BUILD-NOTES, shape (b)). This
//! keeps redis-rs' own connection types, so TLS, Cluster and Sentinel plug in behind `Link`.

pub mod config;
mod link;
pub mod value;

pub use link::{call, call_pipeline, Call};

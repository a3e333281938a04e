//! Every `pg_redis.*` setting lives here: one documented static per GUC, registered in `init()`,
//! read through small typed accessors. The README's settings table mirrors this list.
//!
//! Connection settings are read at each call, so a superuser's `SET` takes effect at the session's
//! next call (the connection layer compares a fingerprint and reconnects when it changed).

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use std::ffi::CString;
use std::time::Duration;

/// Where Redis is: `redis://[user[:password]@]host:port/db`, `unix:///path`, `rediss://` (TLS).
static URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"redis://127.0.0.1:6379/0"));
/// A file readable only by the server's OS user that holds the Redis password.
static PASSWORD_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `standalone`, `cluster` or `sentinel`.
static TOPOLOGY: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"standalone"));
/// The master's service name, with `sentinel`.
static SENTINEL_MASTER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static TLS_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static TLS_CERT_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static TLS_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Milliseconds before giving up on connecting.
static CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);
/// Milliseconds before giving up on one command or pipeline.
static COMMAND_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// Prepended to every key this session reads or writes.
static KEY_PREFIX: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Changes per pipelined round trip.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// Longest pause between the worker's steps under a heavy stream of commits (ms).
static BATCH_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(5);
/// Longest wait of a `commit`-mode COMMIT for its changes to reach Redis (ms).
static COMMIT_WAIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// Failed deliveries of one change before it moves to the dead letters.
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(10);
/// Queue size (kB) past which a mirror stops capturing and is marked `needs_resync`.
static MAX_QUEUE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(10 * 1024 * 1024);
/// Approximate cap (`MAXLEN ~`) of change-event streams.
static STREAM_MAXLEN: GucSetting<i32> = GucSetting::<i32>::new(100_000);
/// Standbys (application_name, or `*` for every connected one) that must have flushed a change's
/// WAL before it is delivered: Redis is then never ahead of a standby promoted after a failover.
static STANDBY_NAMES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Shared memory (kB) of the shared read cache; 0 = no cache. Fixed at server start.
static CACHE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Key prefixes the cache follows (comma-separated; empty: every key). Fixed at server start.
static CACHE_PREFIXES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Does this session read through the shared cache (when there is one)?
static CACHE: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Databases whose queues the background workers serve.
static DATABASES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

pub fn init() {
    let hidden = GucFlags::SUPERUSER_ONLY;
    GucRegistry::define_string_guc(
        c"pg_redis.url",
        c"Where Redis is: redis://[user[:password]@]host:port/db, rediss://..., unix:///path.",
        c"Several comma-separated addresses name a cluster's seed nodes or the sentinels. Keep passwords in pg_redis.password_file.",
        &URL,
        GucContext::Suset,
        hidden,
    );
    GucRegistry::define_string_guc(
        c"pg_redis.password_file",
        c"File holding the Redis password, readable only by the server's OS user.",
        c"",
        &PASSWORD_FILE,
        GucContext::Suset,
        hidden,
    );
    GucRegistry::define_string_guc(
        c"pg_redis.topology",
        c"standalone, cluster or sentinel.",
        c"",
        &TOPOLOGY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_redis.sentinel_master",
        c"The master's service name, with pg_redis.topology = sentinel.",
        c"",
        &SENTINEL_MASTER,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_redis.tls_ca_file",
        c"CA certificate file to verify the Redis server with (rediss://).",
        c"",
        &TLS_CA_FILE,
        GucContext::Suset,
        hidden,
    );
    GucRegistry::define_string_guc(
        c"pg_redis.tls_cert_file",
        c"Client certificate file for TLS (rediss://).",
        c"",
        &TLS_CERT_FILE,
        GucContext::Suset,
        hidden,
    );
    GucRegistry::define_string_guc(
        c"pg_redis.tls_key_file",
        c"Client key file for TLS (rediss://).",
        c"",
        &TLS_KEY_FILE,
        GucContext::Suset,
        hidden,
    );
    GucRegistry::define_int_guc(
        c"pg_redis.connect_timeout",
        c"Time to give up on connecting to Redis.",
        c"",
        &CONNECT_TIMEOUT_MS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_redis.command_timeout",
        c"Time to give up on one Redis command or pipeline.",
        c"A blocking command's own timeout is added to it.",
        &COMMAND_TIMEOUT_MS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"pg_redis.key_prefix",
        c"Prepended to every Redis key this session reads or writes.",
        c"Set per role or database with ALTER ROLE/DATABASE ... SET to confine a role to its own part of Redis.",
        &KEY_PREFIX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_redis.batch_size",
        c"Queued changes per pipelined round trip.",
        c"",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_redis.batch_delay",
        c"Longest the worker holds changes back under a heavy stream of commits, to send more per step.",
        c"Each delivery step pays a transaction and a WAL flush; above ~8,000 changes per second the worker spaces its steps in proportion to the rate, up to this. 0: a step as soon as anything commits.",
        &BATCH_DELAY_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_redis.commit_wait_timeout",
        c"Longest a commit-mode COMMIT waits for its changes to reach Redis.",
        c"",
        &COMMIT_WAIT_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_redis.max_attempts",
        c"Failed deliveries of one change before it moves to the dead letters.",
        c"",
        &MAX_ATTEMPTS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_redis.max_queue_size",
        c"Queue size past which a mirror stops capturing and is marked needs_resync.",
        c"",
        &MAX_QUEUE_SIZE_KB,
        1024,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"pg_redis.stream_maxlen",
        c"Approximate cap (MAXLEN ~) of change-event streams.",
        c"",
        &STREAM_MAXLEN,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_redis.standby_names",
        c"Standbys that must have a change's WAL before it is delivered to Redis.",
        c"Comma-separated application_name values of streaming standbys, or * for every connected standby. Redis is then never ahead of a promoted standby after an asynchronous failover.",
        &STANDBY_NAMES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_redis.cache",
        c"Read through the shared read cache, when pg_redis.cache_size gives one.",
        c"Off: every redis_get, redis_get_bytea and redis_fetch asks Redis itself.",
        &CACHE,
        GucContext::Userset,
        GucFlags::default(),
    );
    // Only a preloaded library may define postmaster-level settings: outside preload,
    // PostgreSQL would end the session with FATAL.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"pg_redis.databases",
            c"Databases whose queues the background workers serve, comma-separated.",
            c"",
            &DATABASES,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"pg_redis.cache_size",
            c"Shared memory for the shared read cache of redis_get and redis_fetch; 0 turns it off.",
            c"Entries of up to 1000 bytes (key and value), kept true by Redis' invalidation messages.",
            &CACHE_SIZE_KB,
            0,
            8 * 1024 * 1024,
            GucContext::Postmaster,
            GucFlags::UNIT_KB,
        );
        GucRegistry::define_string_guc(
            c"pg_redis.cache_prefixes",
            c"Key prefixes the shared read cache holds, comma-separated; empty: every key.",
            c"Redis then reports changes of these keys only (CLIENT TRACKING BCAST PREFIX).",
            &CACHE_PREFIXES,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
}

fn string(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get()
        .map(|c| c.to_string_lossy().trim().to_string())
        .filter(|v| !v.is_empty())
}

pub fn url() -> String {
    string(&URL).unwrap_or_else(|| "redis://127.0.0.1:6379/0".into())
}
pub fn password_file() -> Option<String> {
    string(&PASSWORD_FILE)
}
pub fn topology() -> String {
    string(&TOPOLOGY).unwrap_or_else(|| "standalone".into())
}
pub fn sentinel_master() -> Option<String> {
    string(&SENTINEL_MASTER)
}
pub fn tls_files() -> (Option<String>, Option<String>, Option<String>) {
    (
        string(&TLS_CA_FILE),
        string(&TLS_CERT_FILE),
        string(&TLS_KEY_FILE),
    )
}
pub fn connect_timeout() -> Duration {
    Duration::from_millis(CONNECT_TIMEOUT_MS.get().max(1) as u64)
}
pub fn command_timeout() -> Duration {
    Duration::from_millis(COMMAND_TIMEOUT_MS.get().max(1) as u64)
}
/// The key prefix; not trimmed, a prefix may end in a space on purpose.
pub fn key_prefix() -> String {
    KEY_PREFIX
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}
pub fn batch_size() -> usize {
    BATCH_SIZE.get().max(1) as usize
}
pub fn batch_delay() -> std::time::Duration {
    std::time::Duration::from_millis(BATCH_DELAY_MS.get().max(0) as u64)
}
pub fn max_attempts() -> i32 {
    MAX_ATTEMPTS.get().max(1)
}
pub fn max_queue_size_bytes() -> i64 {
    MAX_QUEUE_SIZE_KB.get() as i64 * 1024
}
pub fn commit_wait_timeout() -> Duration {
    Duration::from_millis(COMMIT_WAIT_TIMEOUT_MS.get().max(0) as u64)
}
pub fn stream_maxlen() -> i64 {
    STREAM_MAXLEN.get() as i64
}
pub fn cache_size_bytes() -> usize {
    CACHE_SIZE_KB.get().max(0) as usize * 1024
}
pub fn cache_prefixes() -> Vec<String> {
    string(&CACHE_PREFIXES)
        .map(|s| {
            s.split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default()
}
pub fn cache_enabled() -> bool {
    CACHE.get()
}
pub fn databases() -> Vec<String> {
    string(&DATABASES)
        .unwrap_or_else(|| "postgres".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}
pub fn standby_names() -> Vec<String> {
    string(&STANDBY_NAMES)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

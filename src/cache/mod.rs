//! The shared read cache (docs/cache.md): `redis_get`, `redis_get_bytea` and `redis_fetch` hits
//! of string keys served from PostgreSQL's shared memory instead of a round trip to Redis, kept
//! true by Redis' own invalidation messages (client-side caching, `CLIENT TRACKING ... BCAST`).
//! Off unless `pg_redis.cache_size` is set; used only for the standalone server the server-level
//! settings name, and only while the tracker follows it.
//!
//! Writes made through pg_redis (any backend, the worker, commit mode) drop their keys here as
//! soon as Redis answered them, so a session reads its own writes at once; writes by other
//! clients reach the cache through Redis' message, a fraction of a millisecond later.

mod store;
mod tracker;

use crate::error::Result;
use crate::redis::{call, call_pipeline, config, tracking, value, Call};
use pgrx::prelude::*;
use redis::{cmd, Arg, Cmd, Value};
use std::sync::OnceLock;

pub fn init_preloaded() {
    let bytes = crate::settings::cache_size_bytes();
    if bytes == 0 {
        return;
    }
    store::init_preloaded(bytes);
    tracker::register();
}

/// The key prefixes the tracker follows (none: every key); set at server start.
fn prefixes() -> &'static [String] {
    static P: OnceLock<Vec<String>> = OnceLock::new();
    P.get_or_init(crate::settings::cache_prefixes)
}

fn ticket(key: &str) -> Option<store::Ticket> {
    if !store::exists() || crate::in_worker() || !crate::settings::cache_enabled() {
        return None;
    }
    let p = prefixes();
    if !p.is_empty() && !p.iter().any(|p| key.starts_with(p.as_str())) {
        return None; // Redis would not tell us when it changes
    }
    let target = config::current().ok()?;
    if tracking::refusal(&target).is_some() {
        return None;
    }
    store::ticket(key.as_bytes(), tracking::fingerprint(&target))
}

/// `GET key`, from the cache when it holds the key; otherwise from Redis (with its TTL, in the
/// same round trip), keeping the answer for the next reader.
pub fn get(what: &str, key: &str) -> Result<Value> {
    let Some(t) = ticket(key) else {
        return value::check(what, call(&Call::new(what), cmd("GET").arg(key))?);
    };
    if let Some(v) = store::lookup(&t, key.as_bytes()) {
        return Ok(Value::BulkString(v));
    }
    let asked_at = unsafe { pg_sys::GetCurrentTimestamp() };
    let cmds = [cmd("GET").arg(key).clone(), cmd("PTTL").arg(key).clone()];
    let mut replies = call_pipeline(&Call::new(what), &cmds)?.into_iter();
    let got = replies.next().unwrap_or(Value::Nil);
    if let (Value::BulkString(b), Some(Value::Int(ms))) = (&got, replies.next()) {
        // PTTL counts from when Redis ran it, after we asked: expiring from `asked_at` is early,
        // never late. -2: the key went away between the two commands.
        let expires_at = match ms {
            -1 => Some(0),
            ms if ms > 0 => Some(asked_at.saturating_add(ms.saturating_mul(1000))),
            _ => None,
        };
        if let Some(at) = expires_at {
            store::fill(&t, key.as_bytes(), b, at);
        }
    }
    value::check(what, got)
}

/// Commands that only read: they change no key.
const READS: &[&str] = &[
    "GET",
    "MGET",
    "GETRANGE",
    "STRLEN",
    "PTTL",
    "TTL",
    "EXPIRETIME",
    "PEXPIRETIME",
    "EXISTS",
    "TYPE",
    "HGET",
    "HGETALL",
    "HMGET",
    "HLEN",
    "HEXISTS",
    "HKEYS",
    "HVALS",
    "HSTRLEN",
    "LRANGE",
    "LLEN",
    "LINDEX",
    "SMEMBERS",
    "SISMEMBER",
    "SCARD",
    "ZRANGE",
    "ZSCORE",
    "ZCARD",
    "XRANGE",
    "XREVRANGE",
    "XLEN",
    "XREAD",
    "XINFO",
    "SCAN",
    "HSCAN",
    "SSCAN",
    "ZSCAN",
    "KEYS",
    "DUMP",
    "OBJECT",
    "MEMORY",
    "DBSIZE",
    "PING",
    "ECHO",
    "INFO",
    "CLIENT",
    "HELLO",
    "AUTH",
    "ROLE",
    "SCRIPT",
    "CONFIG",
    "TIME",
    "WAIT",
    "MULTI",
    "EXEC",
    "DISCARD",
    "COMMAND",
    "PUBLISH",
];

/// The keys a command may change, as far as its shape tells (unknown commands: the first
/// argument, which is where nearly every command has its key), each given to `key`; true when it
/// changes every key (FLUSHALL). Over-counting costs a miss only. No allocation for the common
/// shapes: the worker runs this for every command it sends while a cache exists.
fn written<'a>(c: &'a Cmd, key: impl FnMut(&'a [u8])) -> bool {
    let mut args = c.args_iter().filter_map(|a| match a {
        Arg::Simple(b) => Some(b),
        _ => None,
    });
    let Some(name) = args.next() else {
        return false;
    };
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    if is("SET") || is("HSET") || is("EXPIRE") || is("PEXPIRE") || is("XADD") || is("INCRBY") {
        args.next().into_iter().for_each(key);
    } else if is("FLUSHALL") || is("FLUSHDB") || is("SWAPDB") {
        return true;
    } else if READS.iter().any(|r| is(r)) {
    } else if is("DEL") || is("UNLINK") {
        args.for_each(key);
    } else if is("MSET") || is("MSETNX") {
        args.step_by(2).for_each(key);
    } else if [
        "EVAL",
        "EVALSHA",
        "EVAL_RO",
        "EVALSHA_RO",
        "FCALL",
        "FCALL_RO",
    ]
    .iter()
    .any(|n| is(n))
    {
        let _script = args.next();
        let n = args
            .next()
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        args.take(n).for_each(key);
    } else if ["RENAME", "RENAMENX", "COPY", "SMOVE", "LMOVE", "RPOPLPUSH"]
        .iter()
        .any(|n| is(n))
    {
        args.take(2).for_each(key);
    } else {
        args.next().into_iter().for_each(key);
    }
    false
}

/// After commands ran (or failed: a write may have landed even so): drop what they changed.
pub fn forget_written(cmds: &[Cmd]) {
    if !store::exists() {
        return;
    }
    let p = prefixes();
    for c in cmds {
        let everything = written(c, |k| {
            if p.is_empty() || p.iter().any(|p| k.starts_with(p.as_bytes())) {
                store::invalidate(k);
            }
        });
        if everything {
            store::flush();
        }
    }
}

/// What the shared read cache holds and did since the server started.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn redis_cache_info() -> TableIterator<
    'static,
    (
        name!(in_use, bool),
        name!(tracker_pid, Option<i32>),
        name!(size_bytes, i64),
        name!(capacity, i64),
        name!(entries, i64),
        name!(hits, i64),
        name!(misses, i64),
        name!(fills, i64),
        name!(invalidations, i64),
        name!(flushes, i64),
    ),
> {
    let row = match store::info() {
        Some(i) => (
            i.online,
            Some(i.tracker_pid).filter(|&p| p != 0),
            i.size_bytes,
            i.capacity,
            i.entries,
            i.hits,
            i.misses,
            i.fills,
            i.invalidations,
            i.flushes,
        ),
        None => (false, None, 0, 0, 0, 0, 0, 0, 0, 0),
    };
    TableIterator::once(row)
}

#[cfg(test)]
mod tests {
    use super::written;
    use redis::cmd;

    fn keys(c: &redis::Cmd) -> Vec<String> {
        let mut out = vec![];
        written(c, |k| out.push(String::from_utf8_lossy(k).into_owned()));
        out
    }

    #[test]
    fn written_keys_by_command_shape() {
        assert!(keys(cmd("GET").arg("a")).is_empty());
        assert!(keys(cmd("PTTL").arg("a")).is_empty());
        assert_eq!(keys(cmd("SET").arg("a").arg("v")), ["a"]);
        assert_eq!(keys(cmd("del").arg("a").arg("b")), ["a", "b"]);
        assert_eq!(
            keys(cmd("MSET").arg("a").arg("1").arg("b").arg("2")),
            ["a", "b"]
        );
        assert_eq!(
            keys(cmd("EVALSHA").arg("f00").arg(2).arg("a").arg("b").arg("x")),
            ["a", "b"]
        );
        assert_eq!(keys(cmd("RENAME").arg("a").arg("b")), ["a", "b"]);
        assert!(written(&cmd("FLUSHALL"), |_| {}));
    }
}

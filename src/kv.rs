//! The key-value functions of SPEC §2: each runs one round trip (or one pipeline) on the backend's
//! link, with every key passed through `pg_redis.key_prefix`. Reads of a NULL key return NULL
//! (STRICT); writes refuse NULL arguments with 22023 rather than silently doing nothing.

use crate::error::{invalid, OrRaise, Result};
use crate::redis::{call, value, Call};
use pgrx::prelude::*;
use pgrx::{JsonB, VariadicArray};
use redis::{cmd, Cmd};

pub fn prefixed(key: &str) -> String {
    let p = crate::settings::key_prefix();
    if p.is_empty() {
        key.to_string()
    } else {
        format!("{p}{key}")
    }
}

/// `GET "key"` — shown in messages; the key is quoted and shortened so that logs stay readable.
pub fn describe(op: &str, key: &str) -> String {
    let mut k: String = key.chars().take(120).collect();
    if k.len() < key.len() {
        k.push('…');
    }
    format!("{op} {k:?}")
}

fn need<T>(v: Option<T>, what: &str, arg: &str) -> Result<T> {
    v.ok_or_else(|| invalid(format!("{what}: {arg} must not be NULL")))
}

fn ttl_arg(what: &str, ttl: Option<i32>) -> Result<Option<i32>> {
    match ttl {
        Some(t) if t <= 0 => Err(invalid(format!(
            "{what}: ttl_seconds must be positive (got {t}); pass NULL for no expiry"
        ))),
        t => Ok(t),
    }
}

fn run(what: &str, c: &Cmd) -> Result<redis::Value> {
    value::check(what, call(&Call::new(what), c)?)
}

#[pg_extern(strict, volatile, parallel_restricted)]
fn redis_get(key: &str) -> Option<String> {
    let k = prefixed(key);
    let what = describe("GET", &k);
    crate::cache::get(&what, &k)
        .and_then(|v| value::text(&what, v))
        .or_raise()
}

#[pg_extern(strict, volatile, parallel_restricted)]
fn redis_get_bytea(key: &str) -> Option<Vec<u8>> {
    let k = prefixed(key);
    let what = describe("GET", &k);
    crate::cache::get(&what, &k)
        .and_then(|v| value::bytes(&what, v))
        .or_raise()
}

fn set_impl(func: &str, key: Option<&str>, value: Option<&[u8]>, ttl: Option<i32>) -> Result<()> {
    let key = need(key, func, "key")?;
    let k = prefixed(key);
    let what = describe("SET", &k);
    let value = need(value, &what, "value (use redis_del to remove a key)")?;
    let ttl = ttl_arg(&what, ttl)?;
    let mut c = cmd("SET");
    c.arg(&k).arg(value);
    if let Some(t) = ttl {
        c.arg("EX").arg(t);
    }
    run(&what, &c).map(|_| ())
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_set(key: Option<&str>, value: Option<&str>, ttl_seconds: default!(Option<i32>, "NULL")) {
    set_impl("redis_set", key, value.map(str::as_bytes), ttl_seconds).or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_set_bytea(
    key: Option<&str>,
    value: Option<&[u8]>,
    ttl_seconds: default!(Option<i32>, "NULL"),
) {
    set_impl("redis_set_bytea", key, value, ttl_seconds).or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_del(keys: Option<VariadicArray<'_, &str>>) -> i64 {
    let keys: Vec<String> = match keys {
        None => return 0,
        Some(a) => a.iter().flatten().map(prefixed).collect(),
    };
    if keys.is_empty() {
        return 0;
    }
    let what = describe("DEL", &keys.join(" "));
    run(&what, cmd("DEL").arg(&keys))
        .and_then(|v| value::int(&what, v))
        .or_raise()
}

#[pg_extern(strict, volatile, parallel_restricted)]
fn redis_exists(key: &str) -> bool {
    let k = prefixed(key);
    let what = describe("EXISTS", &k);
    run(&what, cmd("EXISTS").arg(&k))
        .and_then(|v| value::int(&what, v))
        .or_raise()
        > 0
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_expire(key: Option<&str>, ttl_seconds: Option<i32>) -> bool {
    (|| {
        let k = prefixed(need(key, "redis_expire", "key")?);
        let what = describe("EXPIRE", &k);
        let ttl = need(ttl_arg(&what, ttl_seconds)?, &what, "ttl_seconds")?;
        run(&what, cmd("EXPIRE").arg(&k).arg(ttl)).and_then(|v| value::int(&what, v))
    })()
    .or_raise()
        > 0
}

#[pg_extern(strict, volatile, parallel_restricted)]
fn redis_ttl(key: &str) -> i64 {
    let k = prefixed(key);
    let what = describe("TTL", &k);
    run(&what, cmd("TTL").arg(&k))
        .and_then(|v| value::int(&what, v))
        .or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_incrby(key: Option<&str>, delta: default!(Option<i64>, 1)) -> i64 {
    (|| {
        let k = prefixed(need(key, "redis_incrby", "key")?);
        let what = describe("INCRBY", &k);
        let d = need(delta, &what, "delta")?;
        run(&what, cmd("INCRBY").arg(&k).arg(d)).and_then(|v| value::int(&what, v))
    })()
    .or_raise()
}

#[pg_extern(strict, volatile, parallel_restricted)]
fn redis_mget(keys: Vec<Option<String>>) -> Vec<Option<String>> {
    // NULL keys keep their place in the answer (as NULL) without being sent.
    let sent: Vec<String> = keys.iter().flatten().map(|k| prefixed(k)).collect();
    if sent.is_empty() {
        return keys.iter().map(|_| None).collect();
    }
    let what = describe("MGET", &sent.join(" "));
    let reply = run(&what, cmd("MGET").arg(&sent)).or_raise();
    let redis::Value::Array(items) = reply else {
        value::unexpected(&what, &reply).raise()
    };
    let mut items = items.into_iter();
    let mut total = 0usize;
    keys.iter()
        .map(|k| {
            k.as_ref()?;
            let v = items.next().unwrap_or(redis::Value::Nil);
            let t = value::text(&what, v).or_raise();
            total += t.as_ref().map_or(0, |s| s.len());
            if total > value::MAX_VALUE_BYTES {
                value::too_large(&what, total).raise();
            }
            t
        })
        .collect()
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_hset(key: Option<&str>, fields: Option<JsonB>) -> i64 {
    (|| {
        let k = prefixed(need(key, "redis_hset", "key")?);
        let what = describe("HSET", &k);
        let fields = need(fields, &what, "fields")?;
        let serde_json::Value::Object(map) = fields.0 else {
            return Err(invalid(format!(
                "{what}: fields must be a JSON object of field: value"
            )));
        };
        let mut c = cmd("HSET");
        c.arg(&k);
        let mut n = 0;
        for (f, v) in map {
            let text = match v {
                serde_json::Value::Null => continue, // a NULL column has no field (as in mirrors)
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            c.arg(f).arg(text);
            n += 1;
        }
        if n == 0 {
            return Err(invalid(format!(
                "{what}: fields must hold at least one non-null value"
            )));
        }
        run(&what, &c).and_then(|v| value::int(&what, v))
    })()
    .or_raise()
}

#[pg_extern(strict, volatile, parallel_restricted)]
fn redis_hget(key: &str, field: &str) -> Option<String> {
    let k = prefixed(key);
    let what = describe("HGET", &k);
    run(&what, cmd("HGET").arg(&k).arg(field))
        .and_then(|v| value::text(&what, v))
        .or_raise()
}

#[pg_extern(strict, volatile, parallel_restricted)]
fn redis_hgetall(key: &str) -> Option<JsonB> {
    let k = prefixed(key);
    let what = describe("HGETALL", &k);
    let reply = run(&what, cmd("HGETALL").arg(&k)).or_raise();
    hash_to_json(&what, reply).or_raise().map(JsonB)
}

/// An HGETALL reply (RESP2 flat array or RESP3 map) as a JSON object of text values; None if empty.
pub fn hash_to_json(what: &str, reply: redis::Value) -> Result<Option<serde_json::Value>> {
    let pairs: Vec<(redis::Value, redis::Value)> = match reply {
        redis::Value::Map(p) => p,
        redis::Value::Array(items) => {
            let mut it = items.into_iter();
            let mut p = vec![];
            while let (Some(a), Some(b)) = (it.next(), it.next()) {
                p.push((a, b));
            }
            p
        }
        redis::Value::Nil => vec![],
        other => return Err(value::unexpected(what, &other)),
    };
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut obj = serde_json::Map::new();
    for (f, v) in pairs {
        let f = value::text(what, f)?.unwrap_or_default();
        let v = value::text(what, v)?
            .map(serde_json::Value::String)
            .unwrap_or_default();
        obj.insert(f, v);
    }
    Ok(Some(serde_json::Value::Object(obj)))
}

#[pg_extern(volatile, parallel_unsafe)]
fn redis_publish(channel: Option<&str>, message: Option<&str>) -> i64 {
    (|| {
        // Channels follow the key prefix too, so a confined role publishes only in its namespace.
        let ch = prefixed(need(channel, "redis_publish", "channel")?);
        let what = describe("PUBLISH", &ch);
        let m = need(message, &what, "message")?;
        run(&what, cmd("PUBLISH").arg(&ch).arg(m)).and_then(|v| value::int(&what, v))
    })()
    .or_raise()
}

#[pg_extern(volatile, parallel_restricted)]
fn redis_ping() -> String {
    run("PING", &cmd("PING"))
        .and_then(|v| value::text("PING", v))
        .or_raise()
        .unwrap_or_default()
}

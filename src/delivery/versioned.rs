//! Versioned writes for `sync`-mode mirrors, the one place where two paths write a key: the
//! statement's own push (before COMMIT) and the worker's delivery of the queue (after COMMIT).
//! The queue delivers an earlier transaction's change late — after the next statement already
//! pushed a newer value — unless every write carries its change's queue id as a version and a
//! Lua script applies it only if no newer version was applied. Queue ids follow commit order per
//! key (the row lock orders writers), repairs and retries take new, higher ids, and a redelivery
//! of the same change has the same version (applied again, harmlessly).
//!
//! Versions live in one hash per mirror, `<key_prefix>pg_redis:ver:<mirror id>`, field = key.
//! Other modes have a single writer of committed state (the worker) and need no versions.

use redis::{cmd, Cmd};

/// KEYS[1] the key, KEYS[2] the version hash; ARGV: version, op ('s' | 'd'), format ('json' |
/// 'hash'), ttl (0: none), then the JSON text or the hash's field/value pairs.
const SCRIPT: &str = r#"
local v = tonumber(ARGV[1])
local cur = tonumber(redis.call('HGET', KEYS[2], KEYS[1]) or '-1')
if v < cur then return 0 end
redis.call('HSET', KEYS[2], KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[4])
if ARGV[2] == 'd' then
  redis.call('DEL', KEYS[1])
elseif ARGV[3] == 'json' then
  if ttl > 0 then redis.call('SET', KEYS[1], ARGV[5], 'EX', ttl) else redis.call('SET', KEYS[1], ARGV[5]) end
else
  redis.call('DEL', KEYS[1])
  if #ARGV >= 6 then
    redis.call('HSET', KEYS[1], unpack(ARGV, 5))
    if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
  end
end
return 1
"#;

/// Sync mode writes a key and its mirror's version hash in one script: two keys that a Redis
/// Cluster keeps in different slots, so it is refused there (docs/topologies.md).
pub fn not_on_cluster(what: &str) -> crate::error::Error {
    crate::error::Error::NotSupported(format!(
        "{what}: mode 'sync' is not supported with pg_redis.topology = 'cluster'; use mode 'commit' (read-your-writes after COMMIT) or 'queue'"
    ))
}

pub fn version_hash(key_prefix: &str, mirror_id: i32) -> String {
    format!("{key_prefix}pg_redis:ver:{mirror_id}")
}

/// How a mirror writes a key: its format, TTL and (hash) json/jsonb columns.
pub struct Shape<'a> {
    pub format: &'a str,
    pub ttl: Option<i32>,
    pub json_cols: &'a [String],
}

/// The command that applies change `version` ('s' or 'd') to `key` unless a newer one was.
pub fn command(
    key: &str,
    versions: &str,
    version: i64,
    op: &str,
    payload: Option<&str>,
    shape: &Shape,
) -> Cmd {
    let (format, ttl, json_cols) = (shape.format, shape.ttl, shape.json_cols);
    let mut c = cmd("EVAL");
    c.arg(SCRIPT).arg(2).arg(key).arg(versions).arg(version);
    c.arg(if op == "s" { "s" } else { "d" })
        .arg(format)
        .arg(ttl.unwrap_or(0));
    if op == "s" {
        if format == "hash" {
            for (f, v) in super::deliver::hash_fields(payload.unwrap_or("{}"), json_cols) {
                c.arg(f).arg(v);
            }
        } else {
            c.arg(payload.unwrap_or("null"));
        }
    }
    c
}

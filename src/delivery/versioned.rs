//! Versioned writes for `sync`-mode mirrors, the one place where two paths write a key: the
//! statement's own push (before COMMIT) and the worker's delivery of the queue (after COMMIT).
//! The queue delivers an earlier transaction's change late — after the next statement already
//! pushed a newer value — unless every write carries its change's queue id as a version and a
//! Lua script applies it only if no newer version was applied. Queue ids follow commit order per
//! key (the row lock orders writers), repairs and retries take new, higher ids, and a redelivery
//! of the same change has the same version (applied again, harmlessly).
//!
//! Where a key's version lives (its *container*, KEYS[2] of the script, a hash with the key as
//! field):
//! - one server or Sentinel: one hash per mirror, `<key_prefix>pg_redis:ver:<mirror id>`;
//! - Redis Cluster: a script's keys must share a slot, so each key has its own companion hash,
//!   `<key_prefix>pg_redis:ver:<mirror id>:{<tag>}<key>`, where `<tag>` is a short string that
//!   hashes to the key's slot (`slot_tag`). The companion keeps the key as its only field, so the
//!   same script serves both layouts; unmirror with purge removes the companions by pattern.
//!
//! Other modes have a single writer of committed state (the worker) and need no versions.

use crate::error::{Error, Result};
use redis::{cmd, Cmd};
use std::sync::OnceLock;

/// Redis Cluster's number of hash slots.
const SLOTS: u16 = 16384;

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

pub fn version_hash(key_prefix: &str, mirror_id: i32) -> String {
    format!("{key_prefix}pg_redis:ver:{mirror_id}")
}

/// The container of `key`'s version for the configured topology.
pub fn container(key_prefix: &str, mirror_id: i32, key: &str) -> Result<String> {
    if crate::redis::is_cluster() {
        companion(key_prefix, mirror_id, key)
    } else {
        Ok(version_hash(key_prefix, mirror_id))
    }
}

/// The SCAN MATCH pattern of every companion of a mirror (cluster): what unmirror purges.
pub fn companion_pattern(key_prefix: &str, mirror_id: i32) -> String {
    format!(
        "{}:*",
        crate::mirror::template::glob_escape(&version_hash(key_prefix, mirror_id))
    )
}

/// The cluster container of `key`'s version: in the key's slot, checked.
pub fn companion(key_prefix: &str, mirror_id: i32, key: &str) -> Result<String> {
    check_prefix(key_prefix, "writing a key's version")?;
    let slot = hash_slot(key.as_bytes());
    let c = format!(
        "{}:{{{}}}{key}",
        version_hash(key_prefix, mirror_id),
        slot_tag(slot)
    );
    if hash_slot(c.as_bytes()) != slot {
        // Only a key outside the mirror's prefix could get here (every mirror key starts with it).
        return Err(Error::NotSupported(format!(
            "sync mode on a Redis Cluster: the version of key {key:?} cannot be kept in its slot (key_prefix {key_prefix:?})"
        )));
    }
    Ok(c)
}

/// Sync mode on a cluster needs companions in their key's slot. A companion starts with the key
/// prefix: a `{` in the prefix without a non-empty `{...}` tag closed inside the prefix makes
/// Redis hash a part of the companion that differs from the key's (0A000). A prefix with a
/// complete tag is fine: keys and companions all hash by it.
pub fn check_prefix(key_prefix: &str, what: &str) -> Result<()> {
    let Some(open) = key_prefix.find('{') else {
        return Ok(());
    };
    match key_prefix[open + 1..].find('}') {
        Some(len) if len > 0 => Ok(()),
        _ => Err(Error::NotSupported(format!(
            "{what}: mode 'sync' on a Redis Cluster needs a pg_redis.key_prefix whose '{{' opens a non-empty hash tag closed inside the prefix; key_prefix is {key_prefix:?}"
        ))),
    }
}

/// Redis Cluster's slot of a key: CRC16-XMODEM of the key, or of its hash tag (the text between
/// the first `{` and the first `}` after it, when not empty), mod 16384. redis-rs computes it too
/// (`cluster_routing::Slot::for_key`) but does not expose the number, which the tag table is
/// indexed by; the tests check that both agree.
pub fn hash_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % SLOTS
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    // The crc16 crate is the one redis-rs routes cluster commands with.
    crc16::State::<crc16::XMODEM>::calculate(data)
}

/// A short hash tag for each slot: the first of "0", "1", "2", ... that hashes to it. Built
/// once per process (about 150,000 CRCs, a few ms).
fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = n.to_string();
            let t = &mut tags[usize::from(hash_slot(tag.as_bytes()))];
            if t.is_empty() {
                *t = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    tags.get(usize::from(slot)).map_or("", String::as_str)
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

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    fn same_as_redis_rs(key: &[u8]) -> bool {
        Slot::new(hash_slot(key)) == Some(Slot::for_key(key))
    }

    #[test]
    fn hash_slot_known_values() {
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"bar"), 5061);
        assert_eq!(hash_slot(b""), 0);
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3); // the CRC16-XMODEM check value
        assert_eq!(
            hash_slot(b"{user1000}.following"),
            hash_slot(b"{user1000}.followers")
        );
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        // An empty first tag: the whole key is hashed.
        assert_eq!(
            hash_slot(b"foo{}{bar}"),
            crc16_xmodem(b"foo{}{bar}") % SLOTS
        );
        assert_ne!(hash_slot(b"foo{}{bar}"), hash_slot(b"bar"));
        // The tag ends at the first '}' after the first '{'.
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
        assert_eq!(hash_slot(b"foo{bar}{zap}"), hash_slot(b"bar"));
        assert_eq!(
            hash_slot(b"foo}bar{zap"),
            crc16_xmodem(b"foo}bar{zap") % SLOTS
        );
        for k in [
            &b"foo"[..],
            b"{a}b",
            b"x{}y",
            b"}{",
            b"{{}}",
            b"\xff\x00{\xc3\xa9}",
            b"users:42",
        ] {
            assert!(same_as_redis_rs(k), "{k:?}");
        }
    }

    #[test]
    fn every_slot_has_a_tag() {
        let t = std::time::Instant::now();
        let first = slot_tag(0);
        let took = t.elapsed();
        println!("slot tag table built in {took:?}");
        assert!(!first.is_empty());
        for s in 0..SLOTS {
            let tag = slot_tag(s);
            assert_eq!(hash_slot(tag.as_bytes()), s, "tag {tag:?}");
            assert!(tag.len() <= 6, "tag {tag:?}");
        }
    }

    #[test]
    fn companions_share_their_key_slot() {
        let keys = [
            "users:1",
            "{user}:order:42",
            "prefs:{u7}",
            "a}b{c",
            "}{",
            "x{}y{z}",
            "{}",
            "{",
            "}",
            "ключ:{ü}:🦀",
            "日本:{}",
            "",
        ];
        for prefix in ["", "app:", "a}b:", "{tenant1}:", "t{x}{}:", "é{日}"] {
            for k in keys {
                let key = format!("{prefix}{k}");
                let c = companion(prefix, 7, &key).expect("companion");
                assert_eq!(hash_slot(c.as_bytes()), hash_slot(key.as_bytes()), "{c:?}");
                assert!(same_as_redis_rs(c.as_bytes()), "{c:?}");
                assert!(
                    c.starts_with(&format!("{prefix}pg_redis:ver:7:{{")),
                    "{c:?}"
                );
                assert!(c.ends_with(&key));
            }
        }
    }

    #[test]
    fn prefixes_that_break_the_slot_are_refused() {
        for bad in ["a{b:", "{", "a{}b:", "x}{y", "{}{t}:"] {
            assert!(check_prefix(bad, "t").is_err(), "{bad:?}");
            assert!(companion(bad, 1, &format!("{bad}k")).is_err(), "{bad:?}");
        }
        for good in ["", "a:", "}a:", "{t}:", "a{t}{:"] {
            assert!(check_prefix(good, "t").is_ok(), "{good:?}");
        }
        let e = check_prefix("a{b:", "redis_mirror")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("pg_redis: redis_mirror:") && e.contains("\"a{b:\""),
            "{e}"
        );
    }

    #[test]
    fn companion_pattern_is_escaped() {
        assert_eq!(companion_pattern("", 3), "pg_redis:ver:3:*");
        assert_eq!(
            companion_pattern("a*[b]?\\:", 3),
            "a\\*\\[b\\]\\?\\\\:pg_redis:ver:3:*"
        );
    }
}

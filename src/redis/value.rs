//! Redis replies turned into SQL values: text (UTF-8 checked, size checked), integers, booleans,
//! and any reply as JSON for `redis_command`.

use crate::error::{Error, Result};
use pgrx::PgSqlErrorCode;
use redis::Value;
use serde_json::Value as Json;

/// PostgreSQL's limit for one varlena value (MaxAllocSize - header).
pub const MAX_VALUE_BYTES: usize = 0x3fff_ffff - 4;

/// An error reply as Redis wrote it (`WRONGTYPE Operation against ...`).
pub fn error_text(v: &Value) -> Option<String> {
    match v {
        Value::ServerError(e) => Some(match e.details() {
            Some(d) => format!("{} {}", e.code(), d),
            None => e.code().to_string(),
        }),
        _ => None,
    }
}

/// Fail with the Redis error reply, if this is one.
pub fn check(what: &str, v: Value) -> Result<Value> {
    match error_text(&v) {
        Some(reply) => Err(Error::Reply {
            what: what.to_string(),
            reply,
        }),
        None => Ok(v),
    }
}

pub fn too_large(what: &str, len: usize) -> Error {
    Error::BadReply {
        what: what.to_string(),
        why: format!(
            "the reply of {len} bytes is larger than PostgreSQL can hold in one value (1 GB)"
        ),
        code: PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
    }
}

/// Bytes of a string reply; `None` for nil.
pub fn bytes(what: &str, v: Value) -> Result<Option<Vec<u8>>> {
    match check(what, v)? {
        Value::Nil => Ok(None),
        Value::BulkString(b) => {
            if b.len() > MAX_VALUE_BYTES {
                return Err(too_large(what, b.len()));
            }
            Ok(Some(b))
        }
        Value::SimpleString(s) => Ok(Some(s.into_bytes())),
        Value::Okay => Ok(Some(b"OK".to_vec())),
        Value::Int(i) => Ok(Some(i.to_string().into_bytes())),
        Value::Double(d) => Ok(Some(d.to_string().into_bytes())),
        Value::VerbatimString { text, .. } => Ok(Some(text.into_bytes())),
        other => Err(unexpected(what, &other)),
    }
}

/// Text of a string reply: UTF-8 checked, NUL bytes refused (PostgreSQL text cannot hold them).
pub fn text(what: &str, v: Value) -> Result<Option<String>> {
    match bytes(what, v)? {
        None => Ok(None),
        Some(b) => to_text(what, b).map(Some),
    }
}

pub fn to_text(what: &str, b: Vec<u8>) -> Result<String> {
    if b.contains(&0) {
        return Err(Error::BadReply {
            what: what.to_string(),
            why: "the value contains NUL bytes, which text cannot hold; use redis_get_bytea".into(),
            code: PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        });
    }
    String::from_utf8(b).map_err(|e| Error::BadReply {
        what: what.to_string(),
        why: format!(
            "the value is not valid UTF-8 (invalid byte at offset {}); use redis_get_bytea",
            e.utf8_error().valid_up_to()
        ),
        code: PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
    })
}

pub fn int(what: &str, v: Value) -> Result<i64> {
    match check(what, v)? {
        Value::Int(i) => Ok(i),
        Value::BulkString(b) => std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unexpected(what, &Value::BulkString(b))),
        Value::Boolean(b) => Ok(b as i64),
        other => Err(unexpected(what, &other)),
    }
}

pub fn unexpected(what: &str, v: &Value) -> Error {
    let mut shown = format!("{v:?}");
    shown.truncate(200);
    Error::Internal(format!("{what}: unexpected reply from Redis: {shown}"))
}

/// Any reply as JSON: nil → null, integers → numbers, strings → strings, arrays → arrays,
/// maps → objects (keys as text), error replies → an ERROR. Binary strings that are not UTF-8
/// are refused (use the bytea functions).
pub fn to_json(what: &str, v: Value) -> Result<Json> {
    Ok(match v {
        Value::Nil => Json::Null,
        Value::Int(i) => Json::from(i),
        Value::BulkString(b) => Json::String(to_text_allow_nul(what, b)?),
        Value::SimpleString(s) => Json::String(s),
        Value::Okay => Json::String("OK".into()),
        Value::Array(items) | Value::Set(items) => Json::Array(
            items
                .into_iter()
                .map(|i| to_json(what, i))
                .collect::<Result<Vec<_>>>()?,
        ),
        Value::Map(pairs) => {
            let mut obj = serde_json::Map::new();
            for (k, val) in pairs {
                let key = match to_json(what, k)? {
                    Json::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key, to_json(what, val)?);
            }
            Json::Object(obj)
        }
        Value::Attribute { data, .. } => to_json(what, *data)?,
        Value::Double(d) => serde_json::Number::from_f64(d)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(d.to_string())),
        Value::Boolean(b) => Json::Bool(b),
        Value::VerbatimString { text, .. } => Json::String(text),
        Value::BigNumber(n) => Json::String(String::from_utf8_lossy(&n).into_owned()),
        Value::Push { data, .. } => Json::Array(
            data.into_iter()
                .map(|i| to_json(what, i))
                .collect::<Result<Vec<_>>>()?,
        ),
        Value::ServerError(_) => {
            return Err(check(what, v)
                .err()
                .unwrap_or_else(|| Error::Internal("error reply".into())))
        }
        other => return Err(unexpected(what, &other)),
    })
}

/// jsonb can hold U+0000 escapes? It cannot: jsonb refuses \u0000. So NUL is refused too.
fn to_text_allow_nul(what: &str, b: Vec<u8>) -> Result<String> {
    to_text(what, b)
}

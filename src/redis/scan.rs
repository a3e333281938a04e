//! SCAN over the whole keyspace: one server, or every master of a cluster in turn (SCAN has no
//! key to route by). Keys are handed over a page at a time, so memory stays flat. A resharding
//! while a cluster is scanned can move a key past the scan (SCAN's usual "a key that moves may be
//! missed" applies per node): docs/topologies.md.

use super::{masters, on_node, value, Call};
use crate::error::Result;
use redis::{cmd, Value};

/// Call `page` with each page of keys matching `pattern` (binary keys as they are).
pub fn each_page(
    what: &str,
    pattern: &str,
    mut page: impl FnMut(Vec<Vec<u8>>) -> Result<()>,
) -> Result<()> {
    for node in masters(&Call::new(what))? {
        let mut cursor = "0".to_string();
        loop {
            let reply = on_node(
                &Call::new(what),
                &node,
                cmd("SCAN")
                    .arg(&cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000),
            )?;
            let reply = value::check(what, reply)?;
            let Value::Array(mut parts) = reply else {
                return Err(value::unexpected(what, &reply));
            };
            let keys = parts.pop().unwrap_or(Value::Nil);
            let next = parts.pop().unwrap_or(Value::Nil);
            cursor = value::text(what, next)?.unwrap_or_else(|| "0".into());
            let keys: Vec<Vec<u8>> = match keys {
                Value::Array(keys) => keys
                    .into_iter()
                    .filter_map(|k| match k {
                        Value::BulkString(b) => Some(b),
                        _ => None,
                    })
                    .collect(),
                _ => vec![],
            };
            page(keys)?;
            if cursor == "0" {
                break;
            }
        }
    }
    Ok(())
}

//! `redis_command(VARIADIC args)`: any Redis command, its reply as JSON. Commands that would break
//! the session's connection are refused; under a key prefix every key argument is prefixed using
//! the key positions Redis itself reports (`COMMAND INFO`), and a command whose keys cannot be
//! found that way (movable keys, or keyspace-wide like KEYS/SCAN/FLUSHALL) is refused.

use crate::error::{invalid, OrRaise, Result};
use crate::redis::{call, value, Call};
use pgrx::prelude::*;
use pgrx::{JsonB, VariadicArray};
use redis::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

/// Commands that change the connection's state or protocol; the link must stay as it is.
const REFUSED: &[&str] = &[
    "SELECT",
    "MULTI",
    "EXEC",
    "DISCARD",
    "WATCH",
    "UNWATCH",
    "SUBSCRIBE",
    "PSUBSCRIBE",
    "SSUBSCRIBE",
    "UNSUBSCRIBE",
    "PUNSUBSCRIBE",
    "SUNSUBSCRIBE",
    "MONITOR",
    "HELLO",
    "AUTH",
    "RESET",
    "QUIT",
    "SYNC",
    "PSYNC",
    "REPLCONF",
    "READONLY",
    "READWRITE",
    "ASKING",
];
/// CLIENT subcommands that would change how this connection behaves.
const REFUSED_CLIENT: &[&str] = &["REPLY", "TRACKING", "SETNAME", "CACHING", "SETINFO"];
/// Keyless commands that are harmless under a key prefix.
const KEYLESS_OK: &[&str] = &["PING", "ECHO", "TIME"];

#[pg_extern(volatile, parallel_unsafe)]
fn redis_command(args: Option<VariadicArray<'_, &str>>) -> Option<JsonB> {
    let args: Vec<Option<&str>> = match &args {
        None => vec![],
        Some(a) => a.iter().collect(),
    };
    run(args).or_raise().map(JsonB)
}

fn run(args: Vec<Option<&str>>) -> Result<Option<serde_json::Value>> {
    if args.is_empty() {
        return Err(invalid("redis_command: no command given"));
    }
    let mut args: Vec<String> = args
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            a.map(str::to_string)
                .ok_or_else(|| invalid(format!("redis_command: argument {} is NULL", i + 1)))
        })
        .collect::<Result<_>>()?;
    let name = args[0].to_ascii_uppercase();
    let sub = args
        .get(1)
        .map(|s| s.to_ascii_uppercase())
        .unwrap_or_default();
    if REFUSED.contains(&name.as_str())
        || (name == "CLIENT" && REFUSED_CLIENT.contains(&sub.as_str()))
    {
        return Err(invalid(format!(
            "redis_command: {name}{} is refused: it would change the state of the session's shared connection",
            if name == "CLIENT" { format!(" {sub}") } else { String::new() }
        )));
    }
    let prefix = crate::settings::key_prefix();
    if !prefix.is_empty() {
        apply_prefix(&prefix, &mut args)?;
    }
    let what = crate::kv::describe(&name, args.get(1).map(String::as_str).unwrap_or(""));
    let extra = blocking_timeout(&name, &args)?;
    let mut c = redis::cmd(&args[0]);
    for a in &args[1..] {
        c.arg(a);
    }
    let reply = call(&Call { what: &what, extra }, &c)?;
    let json = value::to_json(&what, reply)?;
    Ok(Some(json))
}

/// Extra time a blocking command may legitimately take on the server; None = it may block forever.
fn blocking_timeout(name: &str, args: &[String]) -> Result<Option<Duration>> {
    let secs = |s: &str| -> Result<Option<Duration>> {
        let v: f64 = s.parse().map_err(|_| {
            invalid(format!(
                "redis_command: {name}: timeout \"{s}\" is not a number"
            ))
        })?;
        Ok(if v <= 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(v))
        })
    };
    let millis = |s: &str| -> Result<Option<Duration>> {
        let v: u64 = s.parse().map_err(|_| {
            invalid(format!(
                "redis_command: {name}: timeout \"{s}\" is not a number"
            ))
        })?;
        Ok(if v == 0 {
            None
        } else {
            Some(Duration::from_millis(v))
        })
    };
    let last = || args.last().map(String::as_str).unwrap_or("0");
    match name {
        "BLPOP" | "BRPOP" | "BZPOPMIN" | "BZPOPMAX" | "BRPOPLPUSH" | "BLMOVE" => secs(last()),
        "BLMPOP" | "BZMPOP" => secs(args.get(1).map(String::as_str).unwrap_or("0")),
        "WAIT" | "WAITAOF" => millis(last()),
        "XREAD" | "XREADGROUP" => match args.iter().position(|a| a.eq_ignore_ascii_case("BLOCK")) {
            Some(i) => millis(args.get(i + 1).map(String::as_str).unwrap_or("0")),
            None => Ok(Some(Duration::ZERO)),
        },
        _ => Ok(Some(Duration::ZERO)),
    }
}

#[derive(Clone)]
struct KeySpec {
    movable: bool,
    first: i64,
    last: i64,
    step: i64,
    has_subcommands: bool,
}

thread_local! {
    static SPECS: RefCell<HashMap<String, Option<KeySpec>>> = RefCell::new(HashMap::new());
}

fn apply_prefix(prefix: &str, args: &mut [String]) -> Result<()> {
    let name = args[0].to_ascii_lowercase();
    let refuse = |why: &str| {
        Err(invalid(format!(
            "redis_command: {} is refused under pg_redis.key_prefix: {why}",
            name.to_uppercase()
        )))
    };
    let mut spec = match command_info(&name)? {
        Some(s) => s,
        None => return refuse("unknown command"),
    };
    if spec.has_subcommands {
        let Some(sub) = args.get(1) else {
            return refuse("missing subcommand");
        };
        let full = format!("{name}|{}", sub.to_ascii_lowercase());
        spec = match command_info(&full)? {
            Some(s) => s,
            None => return refuse("unknown subcommand"),
        };
    }
    if spec.movable {
        return refuse("its keys cannot be located reliably (movable keys)");
    }
    if spec.first <= 0 {
        if KEYLESS_OK.contains(&name.to_uppercase().as_str()) {
            return Ok(());
        }
        return refuse("it does not name its keys, so it could reach keys outside the prefix");
    }
    let n = args.len() as i64;
    let last = if spec.last < 0 {
        n + spec.last
    } else {
        spec.last.min(n - 1)
    };
    let step = spec.step.max(1);
    let mut i = spec.first;
    while i <= last && i < n {
        let a = &mut args[i as usize];
        *a = format!("{prefix}{a}");
        i += step;
    }
    Ok(())
}

fn command_info(name: &str) -> Result<Option<KeySpec>> {
    if let Some(hit) = SPECS.with(|s| s.borrow().get(name).cloned()) {
        return Ok(hit);
    }
    let what = format!("COMMAND INFO {name}");
    let reply = call(
        &Call::new(&what),
        redis::cmd("COMMAND").arg("INFO").arg(name),
    )?;
    let reply = value::check(&what, reply)?;
    let spec = parse_info(reply);
    SPECS.with(|s| s.borrow_mut().insert(name.to_string(), spec.clone()));
    Ok(spec)
}

fn parse_info(reply: Value) -> Option<KeySpec> {
    let Value::Array(mut outer) = reply else {
        return None;
    };
    let Value::Array(entry) = outer.pop()? else {
        return None;
    };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(i)) => *i,
        _ => 0,
    };
    let flags: Vec<String> = match entry.get(2) {
        Some(Value::Array(f)) | Some(Value::Set(f)) => f
            .iter()
            .filter_map(|v| match v {
                Value::SimpleString(s) => Some(s.to_ascii_lowercase()),
                Value::BulkString(b) => Some(String::from_utf8_lossy(b).to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => vec![],
    };
    let has_subcommands = matches!(entry.get(9), Some(Value::Array(s)) if !s.is_empty());
    Some(KeySpec {
        movable: flags.iter().any(|f| f == "movablekeys"),
        first: int(entry.get(3)),
        last: int(entry.get(4)),
        step: int(entry.get(5)),
        has_subcommands,
    })
}

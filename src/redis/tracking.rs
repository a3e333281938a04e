//! The shared read cache's ear on Redis: one connection on which Redis reports every change of a
//! key (`CLIENT TRACKING on BCAST`, redirected to the connection itself) as a message on
//! `__redis__:invalidate`: a list of keys, or nil for FLUSHALL/FLUSHDB. Standalone servers only
//! (a cluster or a Sentinel-found master would need one per node or follow failovers).
//! Runs on the tracker's reader thread: nothing here touches PostgreSQL.

use super::config::{Connector, Target, Topology};
use super::conn::{self, Conn};
use std::hash::{Hash, Hasher};
use std::time::Duration;

pub const CHANNEL: &str = "__redis__:invalidate";

pub enum Event {
    Keys(Vec<Vec<u8>>),
    /// The whole keyspace (FLUSHALL, FLUSHDB) or a message we cannot read: drop everything.
    All,
}

/// Which connection settings a cache entry was read with: the link's fingerprint, hashed.
pub fn fingerprint(target: &Target) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    target.fingerprint.hash(&mut h);
    h.finish()
}

/// Can the cache follow this target? Why not, if not.
pub fn refusal(target: &Target) -> Option<&'static str> {
    match target.topology {
        Topology::Standalone if target.nodes.len() == 1 => None,
        Topology::Standalone => Some("pg_redis.url names several servers"),
        Topology::Cluster => Some("pg_redis.topology is cluster"),
        Topology::Sentinel(_) => Some("pg_redis.topology is sentinel"),
    }
}

fn text(e: redis::RedisError) -> String {
    crate::error::redact(&e.to_string())
}

/// Connect and turn tracking on; `prefixes` narrow it (and the keys the cache may hold).
pub fn open(
    c: &Connector,
    timeout: Duration,
    prefixes: &[String],
) -> Result<redis::Connection, String> {
    let opened = conn::open(c, timeout, vec![]).map_err(text)?;
    let Conn::Single(mut con) = opened.conn else {
        return Err("not a single server".into());
    };
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query(&mut con)
        .map_err(text)?;
    let mut t = redis::cmd("CLIENT");
    t.arg("TRACKING")
        .arg("on")
        .arg("REDIRECT")
        .arg(id)
        .arg("BCAST");
    for p in prefixes {
        t.arg("PREFIX").arg(p);
    }
    t.query::<()>(&mut con).map_err(text)?;
    Ok(con)
}

/// Subscribe, call `subscribed`, then hand every invalidation to `on_event` until the connection
/// fails; returns why it ended. Blocks without a timeout (a read timed out in the middle of a
/// message would lose its start): the tracker ends the whole process to stop it.
pub fn listen(
    mut con: redis::Connection,
    subscribed: impl FnOnce(),
    mut on_event: impl FnMut(Event),
) -> String {
    if let Err(e) = con.set_read_timeout(None) {
        return text(e);
    }
    let mut ps = con.as_pubsub();
    if let Err(e) = ps.subscribe(CHANNEL) {
        return text(e);
    }
    subscribed();
    loop {
        let msg = match ps.get_message() {
            Ok(m) => m,
            Err(e) => return text(e),
        };
        if msg.get_channel_name() != CHANNEL {
            continue;
        }
        on_event(match msg.get_payload::<Option<Vec<Vec<u8>>>>() {
            Ok(Some(keys)) => Event::Keys(keys),
            Ok(None) | Err(_) => Event::All,
        });
    }
}

/// PINGs on a connection of its own: is Redis still answering us? (The subscription cannot tell
/// a silent Redis from a cut-off one.)
pub struct Pinger {
    c: Connector,
    timeout: Duration,
    con: Option<redis::Connection>,
}

impl Pinger {
    pub fn new(c: Connector, timeout: Duration) -> Self {
        Pinger {
            c,
            timeout,
            con: None,
        }
    }

    pub fn ping(&mut self) -> Result<(), String> {
        let mut con = match self.con.take() {
            Some(con) => con,
            None => match conn::open(&self.c, self.timeout, vec![])
                .map_err(text)?
                .conn
            {
                Conn::Single(con) => con,
                Conn::Cluster(_) => return Err("not a single server".into()),
            },
        };
        redis::cmd("PING").query::<()>(&mut con).map_err(text)?;
        self.con = Some(con);
        Ok(())
    }
}

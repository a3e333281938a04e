//! Redis Cluster behind a `Link`, on redis-rs' `ClusterConnection`: slot routing, MOVED/ASK on
//! single commands, multi-node commands and per-node pipelines are redis-rs'. Helper thread only.
//!
//! What this adds, because pg_redis' callers need it and redis-rs 1.8's sync cluster client does
//! not do it for pipelines (it returns MOVED/ASK replies of a pipeline as they are, and reports a
//! pipeline with any error reply as one error):
//! - a `MULTI ... EXEC` block becomes one EVAL over the block's key, atomic on its node (a cluster
//!   pipeline has no transactions);
//! - multi-key DEL/UNLINK/EXISTS/TOUCH/MGET become one command per key, pipelined per node by
//!   redis-rs, and their replies are merged back (MGET keeps its order and its nil for non-strings);
//! - a pipeline's replies that mean "not run here" (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, READONLY)
//!   are sent again one by one through redis-rs' single-command path, which follows them. Per key,
//!   order is kept: all commands of one key go to one node in order, and once one of them is
//!   redirected, so are the ones after it (a slot only moves away from a node).

use super::config::Connector;
use super::conn::{identity, kill_cmd, name_cmd, ClientId, Ran, Request};
use redis::cluster::{cluster_pipe, ClusterClientBuilder, ClusterConnection};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ConnectionLike, ErrorKind, RedisError, RedisResult, ServerError, Value};
use std::collections::BTreeSet;
use std::time::Duration;

pub struct Cluster {
    con: ClusterConnection,
}

/// Runs the commands of a MULTI block in order and returns their replies as EXEC would; an
/// error stops the block (as a failed command would not undo the earlier ones in MULTI either).
const BLOCK_SCRIPT: &str = r#"
local out, i = {}, 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  out[#out + 1] = redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return out
"#;

/// Commands whose lost reply can be had again by asking again.
const READS: &[&str] = &[
    "GET", "HGETALL", "HGET", "EXISTS", "TTL", "PTTL", "TYPE", "SMEMBERS", "SCARD", "STRLEN",
    "HLEN", "LLEN", "XLEN",
];

/// How one of the caller's commands is answered from the replies of what was sent.
enum Shape {
    Sent(usize),
    Okay,
    Queued,
    /// Per-key replies summed (DEL, UNLINK, EXISTS, TOUCH).
    Sum(std::ops::Range<usize>),
    /// Per-key GET replies as MGET's array.
    Array(std::ops::Range<usize>),
}

impl Cluster {
    pub fn open(
        c: &Connector,
        timeout: Duration,
        to_kill: &[ClientId],
    ) -> RedisResult<(Self, Vec<ClientId>)> {
        let mut b = ClusterClientBuilder::new(c.nodes.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // Redirections cost no wait; waits (TRYAGAIN, CLUSTERDOWN) stay short, since the
            // command timeout bounds the whole call anyway.
            .retries(8)
            .min_retry_wait(10)
            .max_retry_wait(500);
        if let Some(certs) = &c.certs {
            b = b.certs(certs.clone());
        }
        let con = b.build()?.get_connection()?;
        // A connection that failed is never re-made inside a call: the call fails and the link
        // is replaced (as for one server). Otherwise redis-rs would send a command again on a new
        // connection after ours was killed, e.g. a BLPOP abandoned by a cancel.
        con.set_auto_reconnect(false);
        let mut cluster = Cluster { con };
        for k in to_kill {
            if let Some(node) = &k.node {
                let _ = cluster.on_node(node, &kill_cmd(k));
            }
        }
        let clients = cluster.identities()?;
        Ok((cluster, clients))
    }

    pub fn set_timeouts(
        &mut self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> RedisResult<()> {
        self.con.set_read_timeout(read)?;
        self.con.set_write_timeout(write)
    }

    pub fn run(&mut self, req: &Request) -> RedisResult<Ran> {
        match req {
            Request::Cmds(cmds) => {
                let (values, redirected) = self.cmds(cmds)?;
                // Redirections mean the cluster changed: our clients may live on other nodes now.
                let clients = if redirected {
                    Some(self.identities()?)
                } else {
                    None
                };
                Ok(Ran { values, clients })
            }
            Request::OnNode(node, cmd) => Ok(Ran {
                values: vec![self.on_node(node, cmd)?],
                clients: None,
            }),
            Request::Masters => Ok(Ran {
                values: self
                    .masters()?
                    .into_iter()
                    .map(|m| Value::BulkString(m.into_bytes()))
                    .collect(),
                clients: None,
            }),
        }
    }

    /// The caller's commands, one reply each; and whether any was redirected.
    fn cmds(&mut self, cmds: &[Cmd]) -> RedisResult<(Vec<Value>, bool)> {
        let (sent, shapes) = rewrite(cmds);
        let (replies, redirected) = if sent.len() == 1 {
            (vec![self.single(&sent[0])?], false)
        } else {
            self.pipeline(&sent, 0)?
        };
        Ok((reassemble(shapes, replies), redirected))
    }

    /// One command through redis-rs' routing (redirections followed); an error reply as a value.
    fn single(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        reply_value(self.con.req_command(cmd))
    }

    fn on_node(&mut self, node: &str, cmd: &Cmd) -> RedisResult<Value> {
        let (host, port) = split_node(node)?;
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        reply_value(self.con.route_command(cmd, route))
    }

    fn pipeline(&mut self, sent: &[Cmd], depth: u8) -> RedisResult<(Vec<Value>, bool)> {
        let mut p = cluster_pipe();
        for c in sent {
            p.add_command(c.clone());
        }
        let err = match p.query::<Vec<Value>>(&mut self.con) {
            Ok(values) if values.len() == sent.len() => return Ok((values, false)),
            Ok(values) => {
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "cluster pipeline",
                    format!("{} replies for {} commands", values.len(), sent.len()),
                )))
            }
            Err(e) => e,
        };
        // Some reply was an error: the pipeline ran, but redis-rs kept only the errors (as a list
        // by command; our commands never nest an error in a reply). Anything else (a lost node)
        // fails the whole call, which its callers retry.
        let errors = match err.clone().into_server_errors() {
            Some(list) => list.to_vec(),
            None => return Err(err),
        };
        let mut values: Vec<Option<Value>> = vec![None; sent.len()];
        let mut redirect = vec![];
        for (i, e) in errors.iter() {
            let Some(slot) = values.get_mut(*i) else {
                continue;
            };
            if matches!(
                e.code(),
                "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY"
            ) {
                redirect.push(*i);
            } else {
                *slot = Some(Value::ServerError(e.clone()));
            }
        }
        // Replies lost with the successes: ask again for reads, report writes as done.
        let reads: Vec<usize> = (0..sent.len())
            .filter(|i| values[*i].is_none() && !redirect.contains(i) && is_read(&sent[*i]))
            .collect();
        if !reads.is_empty() {
            let again: Vec<Cmd> = reads.iter().map(|&i| sent[i].clone()).collect();
            let replies = if depth == 0 && again.len() > 1 {
                self.pipeline(&again, depth + 1)?.0
            } else {
                again
                    .iter()
                    .map(|c| self.single(c))
                    .collect::<RedisResult<Vec<_>>>()?
            };
            for (i, v) in reads.into_iter().zip(replies) {
                values[i] = Some(v);
            }
        }
        // In queue order, so that per key the order stays the one the caller gave.
        redirect.sort_unstable();
        let redirected = !redirect.is_empty();
        for i in redirect {
            values[i] = Some(self.single(&sent[i])?);
        }
        Ok((
            values
                .into_iter()
                .map(|v| v.unwrap_or(Value::Okay))
                .collect(),
            redirected,
        ))
    }

    /// Every master's `host:port`, from CLUSTER SLOTS.
    pub fn masters(&mut self) -> RedisResult<Vec<String>> {
        let reply = self.con.req_command(redis::cmd("CLUSTER").arg("SLOTS"))?;
        let mut out = BTreeSet::new();
        if let Value::Array(ranges) = reply {
            for r in ranges {
                let Value::Array(parts) = r else { continue };
                let Some(Value::Array(master)) = parts.get(2) else {
                    continue;
                };
                let host = match master.first() {
                    Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                    Some(Value::SimpleString(h)) => h.clone(),
                    _ => continue,
                };
                if let Some(Value::Int(port)) = master.get(1) {
                    out.insert(format!("{host}:{port}"));
                }
            }
        }
        if out.is_empty() {
            return Err(RedisError::from((
                ErrorKind::ClusterConnectionNotFound,
                "CLUSTER SLOTS named no master",
            )));
        }
        Ok(out.into_iter().collect())
    }

    /// Name our connection on every master and learn its identity there (for CLIENT KILL).
    fn identities(&mut self) -> RedisResult<Vec<ClientId>> {
        let mut out = vec![];
        for m in self.masters()? {
            let _ = self.on_node(&m, &name_cmd());
            let info = self.on_node(&m, redis::cmd("CLIENT").arg("INFO")).ok();
            out.extend(identity(info, Some(m)));
        }
        Ok(out)
    }
}

fn reply_value(r: RedisResult<Value>) -> RedisResult<Value> {
    match r {
        Ok(v) => Ok(v),
        Err(e) if e.code().is_some() => ServerError::try_from(e).map(Value::ServerError),
        Err(e) => Err(e),
    }
}

fn split_node(node: &str) -> RedisResult<(String, u16)> {
    node.rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
        .ok_or_else(|| {
            RedisError::from((ErrorKind::Client, "bad cluster node name", node.to_string()))
        })
}

fn args(c: &Cmd) -> Vec<Vec<u8>> {
    c.args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => b.to_vec(),
            // Only SCAN-like commands carry a cursor argument; we never send those through here.
            _ => b"0".to_vec(),
        })
        .collect()
}

fn name(a: &[Vec<u8>]) -> String {
    a.first()
        .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
        .unwrap_or_default()
}

fn is_read(c: &Cmd) -> bool {
    READS.contains(&name(&args(c)).as_str())
}

fn rewrite(cmds: &[Cmd]) -> (Vec<Cmd>, Vec<Shape>) {
    let mut sent = vec![];
    let mut shapes = vec![];
    let mut i = 0;
    while i < cmds.len() {
        let a = args(&cmds[i]);
        let n = name(&a);
        if n == "MULTI" {
            if let Some(len) = cmds[i + 1..].iter().position(|c| name(&args(c)) == "EXEC") {
                let inner = &cmds[i + 1..i + 1 + len];
                shapes.push(Shape::Okay);
                shapes.extend(inner.iter().map(|_| Shape::Queued));
                shapes.push(Shape::Sent(sent.len()));
                sent.push(block(inner));
                i += len + 2;
                continue;
            }
        }
        let per_key =
            matches!(n.as_str(), "DEL" | "UNLINK" | "EXISTS" | "TOUCH" | "MGET") && a.len() > 2;
        if per_key {
            let start = sent.len();
            for key in &a[1..] {
                let mut c = redis::cmd(if n == "MGET" { "GET" } else { &n });
                c.arg(key.as_slice());
                sent.push(c);
            }
            let range = start..sent.len();
            shapes.push(if n == "MGET" {
                Shape::Array(range)
            } else {
                Shape::Sum(range)
            });
        } else {
            shapes.push(Shape::Sent(sent.len()));
            sent.push(cmds[i].clone());
        }
        i += 1;
    }
    (sent, shapes)
}

/// The EVAL that runs a MULTI block's commands; its keys are the commands' first arguments.
fn block(inner: &[Cmd]) -> Cmd {
    let all: Vec<Vec<Vec<u8>>> = inner.iter().map(args).collect();
    let mut keys: Vec<&[u8]> = vec![];
    for a in &all {
        if let Some(k) = a.get(1) {
            if !keys.contains(&k.as_slice()) {
                keys.push(k);
            }
        }
    }
    let mut c = redis::cmd("EVAL");
    c.arg(BLOCK_SCRIPT).arg(keys.len());
    for k in &keys {
        c.arg(*k);
    }
    for a in &all {
        c.arg(a.len());
        for x in a {
            c.arg(x.as_slice());
        }
    }
    c
}

fn reassemble(shapes: Vec<Shape>, replies: Vec<Value>) -> Vec<Value> {
    let mut replies: Vec<Option<Value>> = replies.into_iter().map(Some).collect();
    let mut take = |i: usize| {
        replies
            .get_mut(i)
            .and_then(Option::take)
            .unwrap_or(Value::Nil)
    };
    shapes
        .into_iter()
        .map(|s| match s {
            Shape::Sent(i) => take(i),
            Shape::Okay => Value::Okay,
            Shape::Queued => Value::SimpleString("QUEUED".into()),
            Shape::Sum(r) => {
                let mut sum = 0;
                for i in r {
                    match take(i) {
                        Value::Int(n) => sum += n,
                        e @ Value::ServerError(_) => return e,
                        _ => {}
                    }
                }
                Value::Int(sum)
            }
            Shape::Array(r) => Value::Array(
                r.map(|i| match take(i) {
                    // MGET answers nil for a key that holds no string.
                    Value::ServerError(e) if e.code() == "WRONGTYPE" => Value::Nil,
                    v => v,
                })
                .collect(),
            ),
        })
        .collect()
}

//! The connection kinds behind a `Link`: one server (standalone, or the master found through the
//! sentinels) or a Redis Cluster. Used only on the helper thread: nothing here touches PostgreSQL.

use super::cluster::Cluster;
use super::config::{Connector, Topology};
use redis::{Cmd, ConnectionLike, RedisResult, Value};
use std::time::Duration;

/// A connection as the server knows it, so that an abandoned one can be killed (`CLIENT KILL`).
/// `node` is the cluster node it lives on (None: the one server).
#[derive(Clone, Debug)]
pub struct ClientId {
    pub node: Option<String>,
    pub id: i64,
    pub addr: String,
}

/// What the main thread asks for.
#[derive(Clone)]
pub enum Request {
    /// Commands in one round trip (a pipeline; per node in a cluster), one reply each.
    Cmds(Vec<Cmd>),
    /// One command on one master (`masters()` names them): SCAN, which has no key to route by.
    OnNode(String, Cmd),
    /// The masters, as node names for `OnNode`.
    Masters,
}

pub struct Opened {
    pub conn: Conn,
    pub clients: Vec<ClientId>,
    /// With sentinel: the master's address, to notice a failover.
    pub master: Option<String>,
}

pub enum Conn {
    Single(redis::Connection),
    Cluster(Box<Cluster>),
}

/// What one request produced, besides its replies.
pub struct Ran {
    pub values: Vec<Value>,
    /// New identities of this connection's clients (a cluster reconnected to other nodes).
    pub clients: Option<Vec<ClientId>>,
}

pub fn open(c: &Connector, timeout: Duration, to_kill: Vec<ClientId>) -> RedisResult<Opened> {
    match &c.topology {
        Topology::Cluster => {
            let (cluster, clients) = Cluster::open(c, timeout, &to_kill)?;
            Ok(Opened {
                conn: Conn::Cluster(Box::new(cluster)),
                clients,
                master: None,
            })
        }
        Topology::Standalone => {
            let client = match &c.certs {
                Some(certs) => redis::Client::build_with_tls(c.nodes[0].clone(), certs.clone())?,
                None => redis::Client::open(c.nodes[0].clone())?,
            };
            let con = client.get_connection_with_timeout(timeout)?;
            single(con, timeout, &to_kill, None)
        }
        Topology::Sentinel(service) => {
            let (client, master) = super::sentinel::master(c, service, timeout)?;
            let con = client.get_connection_with_timeout(timeout)?;
            single(con, timeout, &to_kill, Some(master))
        }
    }
}

fn single(
    mut con: redis::Connection,
    timeout: Duration,
    to_kill: &[ClientId],
    master: Option<String>,
) -> RedisResult<Opened> {
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    for k in to_kill {
        // Best effort: the ACL user may lack CLIENT, or the old client may be gone already.
        let _ = con.req_command(&kill_cmd(k));
    }
    let _ = con.req_command(&name_cmd());
    let info = con.req_command(&redis::cmd("CLIENT").arg("INFO").to_owned());
    let clients = identity(info.ok(), None).into_iter().collect();
    Ok(Opened {
        conn: Conn::Single(con),
        clients,
        master,
    })
}

pub fn kill_cmd(k: &ClientId) -> Cmd {
    let mut c = redis::cmd("CLIENT");
    c.arg("KILL")
        .arg("ID")
        .arg(k.id)
        .arg("ADDR")
        .arg(&k.addr)
        .arg("SKIPME")
        .arg("yes");
    c
}

pub fn name_cmd() -> Cmd {
    let mut c = redis::cmd("CLIENT");
    c.arg("SETNAME")
        .arg(format!("pg_redis:{}", std::process::id()));
    c
}

/// `CLIENT INFO`'s `id=` and `addr=` fields.
pub fn identity(info: Option<Value>, node: Option<String>) -> Option<ClientId> {
    let line = match info? {
        Value::BulkString(b) => String::from_utf8(b).ok()?,
        Value::VerbatimString { text, .. } => text,
        Value::SimpleString(s) => s,
        _ => return None,
    };
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
    };
    Some(ClientId {
        node,
        id: field("id=")?.parse().ok()?,
        addr: field("addr=")?,
    })
}

impl Conn {
    pub fn set_timeouts(&mut self, timeout: Option<Duration>) -> RedisResult<()> {
        // A little more on the read side: the main thread's own deadline fires first, with the
        // clearer message; this one only frees the helper thread.
        let read = timeout.map(|t| t + Duration::from_millis(100));
        match self {
            Conn::Single(c) => {
                c.set_read_timeout(read)?;
                c.set_write_timeout(timeout)
            }
            Conn::Cluster(c) => c.set_timeouts(read, timeout),
        }
    }

    pub fn run(&mut self, req: &Request) -> RedisResult<Ran> {
        match (self, req) {
            (Conn::Single(c), Request::Cmds(cmds)) => {
                let values = if cmds.len() == 1 {
                    vec![c.req_command(&cmds[0])?]
                } else {
                    let mut packed = Vec::new();
                    for cmd in cmds {
                        cmd.write_packed_command(&mut packed);
                    }
                    c.req_packed_commands(&packed, 0, cmds.len())?
                };
                Ok(Ran {
                    values,
                    clients: None,
                })
            }
            (Conn::Single(c), Request::OnNode(_, cmd)) => Ok(Ran {
                values: vec![c.req_command(cmd)?],
                clients: None,
            }),
            (Conn::Single(_), Request::Masters) => Ok(Ran {
                values: vec![Value::BulkString(vec![])],
                clients: None,
            }),
            (Conn::Cluster(c), req) => c.run(req),
        }
    }
}

/// Does any reply say "this server is a read-only replica" (a master demoted by a failover)?
pub fn any_readonly(values: &[Value]) -> bool {
    values.iter().any(|v| match v {
        Value::ServerError(e) => e.code() == "READONLY",
        Value::Array(items) => any_readonly(items),
        _ => false,
    })
}

//! One Redis server over plain TCP or a unix socket, driven by the backend's own main thread:
//! commands are packed by redis-rs and written to the socket, replies are parsed by redis-rs'
//! `Parser` as they arrive, and every wait is on a kept `WaitEventSet` of the socket, the latch
//! and postmaster death, so a cancel or `statement_timeout` is served at once. No thread hand-off
//! per call: that hand-off was about two thirds of a `redis_get` (docs/benchmarks.md, P5).
//! TLS, Sentinel and Cluster keep redis-rs' own connections on the helper thread (link.rs).
//!
//! As there: a call that failed, timed out or was interrupted (an ERROR unwinding through it)
//! leaves the connection in doubt. It is never reused; the next connection kills its client on
//! the server before it sends anything, so nothing of the old call can land after newer writes.

use super::config::Target;
use super::conn::{self, ClientId, Request};
use super::link::{self, Attempt, Call};
use crate::error::Error;
use pgrx::pg_sys;
use redis::{Cmd, ConnectionAddr, ProtocolVersion, Value};
use socket2::{Domain, SockAddr, Socket, Type};
use std::cell::RefCell;
use std::io::{self, Read};
use std::net::ToSocketAddrs;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Does this target get a main-thread connection? One plain server, RESP2 (as redis-rs' default).
pub fn serves(target: &Target) -> bool {
    target.topology == super::config::Topology::Standalone
        && !target.tls
        && target.nodes.len() == 1
        && matches!(
            target.nodes[0].addr(),
            ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_)
        )
        && target.nodes[0].redis_settings().protocol() == ProtocolVersion::RESP2
}

thread_local! {
    static DIRECT: RefCell<Option<Direct>> = const { RefCell::new(None) };
}

/// Drop the connection (the next call connects afresh).
pub fn reset() {
    DIRECT.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            if let Some(d) = slot.take() {
                d.retire();
            }
        }
    });
}

struct Direct {
    fingerprint: String,
    io: Io,
    parser: redis::Parser,
    clients: Vec<ClientId>,
    /// Set while a call runs; a call that did not end normally (an ERROR unwound through it)
    /// leaves it set, and the next call retires the connection.
    in_doubt: bool,
}

impl Direct {
    /// Give up the connection; its server-side client is killed by the next one if in doubt.
    fn retire(self) {
        if self.in_doubt {
            link::remember_abandoned(&self.clients);
        }
    }
}

/// The socket and the wait set; what the parser's reader needs.
struct Io {
    sock: Socket,
    events: *mut pg_sys::WaitEventSet,
    socket_pos: i32,
    /// The socket event the set waits for now (READABLE or WRITEABLE).
    waiting_for: u32,
    deadline: Option<Instant>,
    /// A latch set during the call that was not ours: set again at the end for whoever waits.
    latch_was_set: bool,
    /// Bytes received in this call, and how reading ended when it failed.
    received: usize,
    failure: Option<Failure>,
}

#[derive(Clone, Copy, PartialEq)]
enum Failure {
    TimedOut,
    /// The server closed the connection (EOF, reset, broken pipe).
    Closed,
    Other,
}

impl Drop for Io {
    fn drop(&mut self) {
        // The set holds the socket in its epoll set: free it before the socket closes.
        if !self.events.is_null() {
            unsafe { pg_sys::FreeWaitEventSet(self.events) };
            self.events = std::ptr::null_mut();
        }
    }
}

impl Io {
    fn wait(&mut self, what: u32) -> io::Result<()> {
        if self.waiting_for != what {
            unsafe {
                pg_sys::ModifyWaitEvent(self.events, self.socket_pos, what, std::ptr::null_mut())
            };
            self.waiting_for = what;
        }
        loop {
            let timeout_ms: i64 = match self.deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.fail(Failure::TimedOut, io::ErrorKind::TimedOut.into()));
                    }
                    left.as_millis().max(1) as i64
                }
                None => -1,
            };
            let mut ev = pg_sys::WaitEvent::default();
            let n = unsafe {
                pg_sys::WaitEventSetWait(
                    self.events,
                    timeout_ms as _,
                    &mut ev,
                    1,
                    pg_sys::PG_WAIT_EXTENSION,
                )
            };
            if n == 0 {
                continue;
            }
            if ev.events & pg_sys::WL_LATCH_SET != 0 {
                unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
                self.latch_was_set = true;
                if crate::worker_shutdown_requested() {
                    return Err(self.fail(Failure::TimedOut, io::ErrorKind::TimedOut.into()));
                }
                // An ERROR here unwinds through the call and leaves the connection in doubt.
                pgrx::check_for_interrupts!();
                continue;
            }
            if ev.events & what != 0 {
                return Ok(());
            }
        }
    }

    fn fail(&mut self, f: Failure, e: io::Error) -> io::Error {
        self.failure.get_or_insert(f);
        e
    }

    fn io_failure(&mut self, e: io::Error) -> io::Error {
        let f = match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => Failure::Closed,
            _ => Failure::Other,
        };
        self.fail(f, e)
    }

    fn send_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.sock.send_with_flags(buf, libc::MSG_NOSIGNAL) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(pg_sys::WL_SOCKET_WRITEABLE)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_failure(e)),
            }
        }
        Ok(())
    }
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.sock).read(buf) {
                Ok(0) if !buf.is_empty() => {
                    return Err(self.io_failure(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(n) => {
                    self.received += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(pg_sys::WL_SOCKET_READABLE)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_failure(e)),
            }
        }
    }
}

/// Run a request on the main-thread connection; link.rs' `run` retries a stale one.
pub fn run_once(
    c: &Call,
    req: &Request,
    target: &Target,
    timeout: Option<Duration>,
    meanwhile: &mut link::Meanwhile,
) -> std::result::Result<Vec<Value>, Attempt> {
    DIRECT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot
            .as_ref()
            .is_some_and(|d| d.in_doubt || d.fingerprint != target.fingerprint)
        {
            if let Some(d) = slot.take() {
                d.retire();
            }
        }
        let connecting = slot.is_none();
        let start = Instant::now();
        if connecting {
            let budget = timeout.map(|t| t + crate::settings::connect_timeout());
            *slot = Some(connect(c, target, budget.map(|b| start + b))?);
        }
        let d = slot
            .as_mut()
            .ok_or_else(|| Error::Internal("no Redis connection".into()))?;
        d.in_doubt = true;
        d.io.deadline = timeout.map(|t| Instant::now() + t);
        d.io.received = 0;
        d.io.failure = None;
        let result = exchange(d, req, meanwhile);
        let latch_was_set = std::mem::take(&mut d.io.latch_was_set);
        if latch_was_set {
            // Maybe someone's wake-up call (a commit waking the worker): leave it set.
            unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
        }
        match result {
            Ok(values) => {
                d.in_doubt = false;
                Ok(values)
            }
            Err(e) => {
                let failure = d.io.failure.unwrap_or(Failure::Other);
                let received = d.io.received;
                if let Some(d) = slot.take() {
                    d.retire();
                }
                Err(match failure {
                    Failure::TimedOut => Attempt::Failed(Error::Timeout {
                        what: c.what.to_string(),
                        ms: timeout.map_or(0, |t| t.as_millis()),
                    }),
                    // A kept connection the server had closed before it answered anything.
                    Failure::Closed if !connecting && received == 0 => Attempt::Stale(lost(c, &e)),
                    _ => Attempt::Failed(lost(c, &e)),
                })
            }
        }
    })
}

fn lost(c: &Call, e: &redis::RedisError) -> Error {
    Error::ConnectionLost {
        what: c.what.to_string(),
        cause: crate::error::redact(&e.to_string()),
    }
}

/// Send the request's commands in one write and read one reply per command.
fn exchange(
    d: &mut Direct,
    req: &Request,
    meanwhile: &mut link::Meanwhile,
) -> redis::RedisResult<Vec<Value>> {
    let cmds: &[Cmd] = match req {
        Request::Cmds(cmds) => cmds,
        Request::OnNode(_, cmd) => std::slice::from_ref(cmd),
        Request::Masters => return Ok(vec![Value::BulkString(vec![])]),
    };
    let mut packed = Vec::new();
    for cmd in cmds {
        cmd.write_packed_command(&mut packed);
    }
    d.io.send_all(&packed)?;
    if let Some(f) = meanwhile.take() {
        f();
    }
    let mut values = Vec::with_capacity(cmds.len());
    while values.len() < cmds.len() {
        match d.parser.parse_value(&mut d.io)? {
            Value::Push { .. } => {} // RESP3 only; never a reply
            v => values.push(v),
        }
    }
    Ok(values)
}

/// Connect, authenticate, select the database, kill abandoned clients, name ourselves.
fn connect(
    c: &Call,
    target: &Target,
    deadline: Option<Instant>,
) -> std::result::Result<Direct, Attempt> {
    let connector = target.connector()?;
    let info = &connector.nodes[0];
    let addr = &target.display_addr;
    let refused = |cause: String| {
        Attempt::Failed(Error::Connect {
            what: c.what.to_string(),
            addr: addr.clone(),
            cause: crate::error::redact(&cause),
        })
    };
    let io = open(info.addr(), deadline).map_err(|(timed_out, e)| {
        if timed_out {
            Attempt::Failed(Error::Timeout {
                what: c.what.to_string(),
                ms: crate::settings::connect_timeout().as_millis(),
            })
        } else {
            refused(e.to_string())
        }
    })?;
    let settings = info.redis_settings();
    let mut setup = vec![];
    if let Some(password) = settings.password() {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        setup.push(auth.arg(password).to_owned());
    }
    if settings.db() != 0 {
        setup.push(redis::cmd("SELECT").arg(settings.db()).to_owned());
    }
    let checked = setup.len();
    for k in link::take_abandoned() {
        // Best effort: the ACL user may lack CLIENT, or the old client may be gone already.
        setup.push(conn::kill_cmd(&k));
    }
    setup.push(conn::name_cmd());
    setup.push(redis::cmd("CLIENT").arg("INFO").to_owned());
    let mut d = Direct {
        fingerprint: target.fingerprint.clone(),
        io,
        parser: redis::Parser::new(),
        clients: vec![],
        in_doubt: true,
    };
    let replies = exchange(&mut d, &Request::Cmds(setup), &mut None).map_err(|e| {
        if d.io.failure == Some(Failure::TimedOut) {
            Attempt::Failed(Error::Timeout {
                what: c.what.to_string(),
                ms: crate::settings::connect_timeout().as_millis(),
            })
        } else {
            refused(e.to_string())
        }
    })?;
    // AUTH refused (WRONGPASS, NOAUTH): the connection could not be established; SELECT refused
    // (a database index out of range): the server's answer.
    for (i, reply) in replies[..checked].iter().enumerate() {
        if let Value::ServerError(e) = reply {
            let answer = format!("{} {}", e.code(), e.details().unwrap_or(""));
            return Err(if i == 0 && settings.password().is_some() {
                refused(format!("authentication failed: {answer}"))
            } else {
                Attempt::Failed(Error::Reply {
                    what: c.what.to_string(),
                    reply: answer,
                })
            });
        }
    }
    d.clients = conn::identity(replies.last().cloned(), None)
        .into_iter()
        .collect();
    d.in_doubt = false;
    Ok(d)
}

/// A connected socket with its wait set, trying each address of the host in turn; the error
/// says whether the deadline passed.
fn open(addr: &ConnectionAddr, deadline: Option<Instant>) -> Result<Io, (bool, io::Error)> {
    let targets: Vec<SockAddr> = match addr {
        ConnectionAddr::Tcp(host, port) => (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|e| (false, e))?
            .map(SockAddr::from)
            .collect(),
        ConnectionAddr::Unix(path) => vec![SockAddr::unix(path).map_err(|e| (false, e))?],
        _ => return Err((false, io::Error::other("not a plain TCP or unix address"))),
    };
    let mut last = io::Error::other("no address");
    for sa in targets {
        match connect_to(&sa, deadline) {
            Ok(io) => return Ok(io),
            Err((true, e)) => return Err((true, e)),
            Err((false, e)) => last = e,
        }
    }
    Err((false, last))
}

fn connect_to(sa: &SockAddr, deadline: Option<Instant>) -> Result<Io, (bool, io::Error)> {
    let e = |e| (false, e);
    // Socket::new sets close-on-exec.
    let sock = Socket::new(sa.domain(), Type::STREAM, None).map_err(e)?;
    if sa.domain() != Domain::UNIX {
        sock.set_tcp_nodelay(true).map_err(e)?;
    }
    sock.set_nonblocking(true).map_err(e)?;
    match sock.connect(sa) {
        Ok(()) => {}
        Err(err)
            if err.raw_os_error() == Some(libc::EINPROGRESS)
                || err.kind() == io::ErrorKind::WouldBlock => {}
        Err(err) => return Err((false, err)),
    }
    let mut io = Io {
        sock,
        events: std::ptr::null_mut(),
        socket_pos: 0,
        waiting_for: pg_sys::WL_SOCKET_WRITEABLE,
        deadline,
        latch_was_set: false,
        received: 0,
        failure: None,
    };
    unsafe {
        io.events = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
        pg_sys::AddWaitEventToSet(
            io.events,
            pg_sys::WL_LATCH_SET,
            pg_sys::PGINVALID_SOCKET,
            pg_sys::MyLatch,
            std::ptr::null_mut(),
        );
        pg_sys::AddWaitEventToSet(
            io.events,
            pg_sys::WL_EXIT_ON_PM_DEATH,
            pg_sys::PGINVALID_SOCKET,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        io.socket_pos = pg_sys::AddWaitEventToSet(
            io.events,
            pg_sys::WL_SOCKET_WRITEABLE,
            io.sock.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
    // A non-blocking connect completes when the socket turns writable.
    let done = io
        .wait(pg_sys::WL_SOCKET_WRITEABLE)
        .and_then(|_| match io.sock.take_error()? {
            Some(err) => Err(err),
            None => Ok(()),
        });
    match done {
        Ok(()) => Ok(io),
        Err(err) => {
            if io.latch_was_set {
                unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
            }
            Err((io.failure == Some(Failure::TimedOut), err))
        }
    }
}

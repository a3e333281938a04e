//! The per-process link to Redis: a helper thread owning a redis-rs connection (any kind of
//! `conn::Conn`: one server, the master found through the sentinels, or a cluster), a channel for
//! requests and answers, and a pipe whose read end the main thread waits on with
//! `WaitLatchOrSocket`, together with its latch (which cancels and timeouts set).
//!
//! Invariants:
//! - Only the main thread touches PostgreSQL; the helper thread never does, and blocks all signals.
//! - A link whose call timed out or was interrupted is never reused: redis-rs may then read a
//!   stale reply. The next link kills the abandoned client on the server (`CLIENT KILL ID .. ADDR ..`)
//!   before sending anything, so a pipeline stuck in the old connection cannot land after newer
//!   writes (Redis is single-threaded: once the kill is answered, the old client is gone). In a
//!   cluster, the old link's client on every master is killed.
//! - With sentinel, a READONLY reply means our master was demoted: the link is dropped so that the
//!   next call asks the sentinels again; a single command refused that way is sent once more.

use super::config::{self, Connector, Target, Topology};
use super::conn::{self, ClientId, Request};
use crate::error::{Error, Result};
use pgrx::pg_sys;
use redis::{Cmd, Value};
use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a call does, for messages: e.g. `GET "user:1"`.
pub struct Call<'a> {
    pub what: &'a str,
    /// Extra time the command may block on the server (BLPOP's timeout); `None` = forever.
    pub extra: Option<Duration>,
}

impl<'a> Call<'a> {
    pub fn new(what: &'a str) -> Self {
        Call {
            what,
            extra: Some(Duration::ZERO),
        }
    }
}

struct Job {
    req: Request,
    timeout: Option<Duration>,
}

/// What the helper sends back.
enum Msg {
    /// Connected, before the job runs (a job may never answer: a BLPOP cancelled): who we are
    /// on the server(s), so that an abandoned call can be killed, and with sentinel the master.
    Connected(Vec<ClientId>, Option<String>),
    Answer(Answer),
}

/// The result of one job.
struct Answer {
    values: std::result::Result<Vec<Value>, redis::RedisError>,
    /// Our clients moved (a cluster reconnected to other nodes).
    clients: Option<Vec<ClientId>>,
    /// Sentinel: the server answered READONLY (demoted); the helper has dropped the connection.
    readonly: bool,
}

struct Link {
    fingerprint: String,
    display_addr: String,
    jobs: mpsc::Sender<Job>,
    answers: mpsc::Receiver<Msg>,
    wake: OwnedFd,
    connected: bool,
    /// The server-side identities of the connection (CLIENT ID, ADDR), once connected.
    clients: Vec<ClientId>,
}

thread_local! {
    static LINK: RefCell<Option<Link>> = const { RefCell::new(None) };
    /// Clients abandoned mid-call, to be killed by the next link before it sends anything.
    static ABANDONED: RefCell<Vec<ClientId>> = const { RefCell::new(Vec::new()) };
}

/// Redis refuses a bulk argument longer than its proto-max-bulk-len (512 MB by default) by
/// closing the connection, which would read as a connection failure: say what it is instead.
const MAX_BULK: usize = 512 * 1024 * 1024;

fn check_sizes(c: &Call, cmd: &Cmd) -> Result<()> {
    for arg in cmd.args_iter() {
        if let redis::Arg::Simple(b) = arg {
            if b.len() > MAX_BULK {
                return Err(crate::error::Error::BadReply {
                    what: c.what.to_string(),
                    why: format!(
                        "an argument of {} bytes is longer than Redis accepts (512 MB)",
                        b.len()
                    ),
                    code: pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                });
            }
        }
    }
    Ok(())
}

/// Run one command; returns its reply (server error replies come back as `Value::ServerError`).
/// In a cluster it is routed by its key; multi-key DEL/MGET/... are split per node.
pub fn call(c: &Call, cmd: &Cmd) -> Result<Value> {
    check_sizes(c, cmd)?;
    let mut v = run(c, Request::Cmds(vec![cmd.clone()]), &mut None)?;
    Ok(v.pop().unwrap_or(Value::Nil))
}

/// Run a pipeline of commands in one round trip (per node in a cluster); one reply per command,
/// in order.
pub fn call_pipeline(c: &Call, cmds: &[Cmd]) -> Result<Vec<Value>> {
    call_pipeline_then(c, cmds, &mut None)
}

/// Work to do while Redis runs a pipeline: after the commands are written, before the replies
/// are read (the worker reads its next batch meanwhile). Runs at most once, even when a stale
/// connection makes the pipeline go out twice.
pub type Meanwhile<'a> = Option<Box<dyn FnOnce() + 'a>>;

/// `call_pipeline`, running `meanwhile` while Redis works.
pub fn call_pipeline_then(c: &Call, cmds: &[Cmd], meanwhile: &mut Meanwhile) -> Result<Vec<Value>> {
    if cmds.is_empty() {
        return Ok(vec![]);
    }
    for cmd in cmds {
        check_sizes(c, cmd)?;
    }
    run(c, Request::Cmds(cmds.to_vec()), meanwhile)
}

/// The masters to visit for keyspace-wide commands (SCAN): one for a single server.
pub fn masters(c: &Call) -> Result<Vec<String>> {
    run(c, Request::Masters, &mut None)?
        .into_iter()
        .map(|v| match v {
            Value::BulkString(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            other => Err(super::value::unexpected(c.what, &other)),
        })
        .collect()
}

/// Run one command on one of `masters()`.
pub fn on_node(c: &Call, node: &str, cmd: &Cmd) -> Result<Value> {
    check_sizes(c, cmd)?;
    let mut v = run(c, Request::OnNode(node.to_string(), cmd.clone()), &mut None)?;
    Ok(v.pop().unwrap_or(Value::Nil))
}

/// Drop the link (the next call connects afresh): after a failover, to ask the sentinels again.
pub fn reset() {
    super::direct::reset();
    reset_thread_link();
}

fn reset_thread_link() {
    LINK.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            slot.take();
        }
    });
}

fn run(c: &Call, req: Request, meanwhile: &mut Meanwhile) -> Result<Vec<Value>> {
    // A kept connection may have been closed by the server since the last call (Redis
    // restarted, CLIENT KILL, idle timeout): then reconnect and send once more. The command
    // cannot have run twice, since the server that closed the connection did not answer it.
    let result = match run_once(c, req.clone(), meanwhile) {
        Err(Attempt::Stale(_)) => run_once(c, req.clone(), meanwhile).map_err(Attempt::into_error),
        other => other.map_err(Attempt::into_error),
    };
    // Whatever it changed is no longer what the shared read cache holds (even after a failure:
    // a write may have landed unanswered).
    if let Request::Cmds(cmds) = &req {
        crate::cache::forget_written(cmds);
    }
    result
}

pub(super) enum Attempt {
    /// The kept connection turned out to be closed before it answered.
    Stale(Error),
    Failed(Error),
}

impl Attempt {
    fn into_error(self) -> Error {
        match self {
            Attempt::Stale(e) | Attempt::Failed(e) => e,
        }
    }
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

fn run_once(
    c: &Call,
    req: Request,
    meanwhile: &mut Meanwhile,
) -> std::result::Result<Vec<Value>, Attempt> {
    let target = config::current()?;
    let command_timeout = crate::settings::command_timeout();
    let connect_timeout = crate::settings::connect_timeout();
    let timeout = c.extra.map(|e| command_timeout + e);
    if super::direct::serves(&target) {
        reset_thread_link();
        return super::direct::run_once(c, &req, &target, timeout, meanwhile);
    }
    super::direct::reset();
    LINK.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot
            .as_ref()
            .is_some_and(|l| l.fingerprint != target.fingerprint)
        {
            *slot = None; // settings changed within the session: reconnect at this call
        }
        if slot.is_none() {
            *slot = Some(spawn(&target)?);
        }
        let link = slot
            .as_mut()
            .ok_or_else(|| Error::Internal("no link".into()))?;
        let connecting = !link.connected;
        let single = matches!(&req, Request::Cmds(cmds) if cmds.len() == 1);
        link.jobs
            .send(Job { req, timeout })
            .map_err(|_| Error::Internal("Redis helper thread is gone".into()))?;
        let budget = timeout.map(|t| if connecting { t + connect_timeout } else { t });
        if let Some(f) = meanwhile.take() {
            f();
        }
        let outcome = wait(link, budget);
        match outcome {
            Waited::Answer(answer) => {
                // Connected during this call: a failure now is of the call, not of connecting.
                let still_connecting = !link.connected;
                if let Some(clients) = answer.clients {
                    link.clients = clients;
                }
                match answer.values {
                    Ok(values) if answer.readonly => {
                        // The helper dropped the demoted master's connection: so do we.
                        slot.take();
                        if single {
                            // Refused without running: safe to send again, to the new master.
                            let reply = values
                                .first()
                                .and_then(super::value::error_text)
                                .unwrap_or_default();
                            return Err(Attempt::Stale(Error::Reply {
                                what: c.what.to_string(),
                                reply,
                            }));
                        }
                        Ok(values)
                    }
                    Ok(values) => Ok(values),
                    Err(e) => {
                        let addr = link.display_addr.clone();
                        // The old client is gone with the server's close: nothing to kill.
                        let stale = !connecting && e.is_connection_dropped() && !e.is_timeout();
                        if stale {
                            slot.take();
                        } else {
                            abandon(&mut slot);
                        }
                        let err = classify(c.what, &addr, still_connecting, e);
                        Err(if stale {
                            Attempt::Stale(err)
                        } else {
                            Attempt::Failed(err)
                        })
                    }
                }
            }
            Waited::TimedOut => {
                abandon(&mut slot);
                Err(Attempt::Failed(Error::Timeout {
                    what: c.what.to_string(),
                    ms: budget.map(|b| b.as_millis()).unwrap_or(0),
                }))
            }
        }
    })
}

enum Waited {
    Answer(Answer),
    TimedOut,
}

/// Wait for the helper's answer on the latch, so interrupts are served while Redis is slow.
fn wait(link: &mut Link, budget: Option<Duration>) -> Waited {
    let mut latch_was_set = false;
    let r = wait_inner(link, budget, &mut latch_was_set);
    // A latch set while we waited may be someone's wake-up call (a commit waking the worker):
    // leave it set for whoever waits next, rather than swallowing it.
    if latch_was_set {
        unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
    }
    r
}

fn wait_inner(link: &mut Link, budget: Option<Duration>, latch_was_set: &mut bool) -> Waited {
    let start = Instant::now();
    loop {
        match link.answers.try_recv() {
            Ok(Msg::Connected(clients, master)) => {
                link.connected = true;
                link.clients = clients;
                if let Some(m) = master {
                    super::failover::observe(&link.fingerprint, &m);
                }
                continue;
            }
            Ok(Msg::Answer(answer)) => {
                drain(&link.wake);
                return Waited::Answer(answer);
            }
            Err(mpsc::TryRecvError::Disconnected) => {
                return Waited::Answer(Answer {
                    values: Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "helper thread ended",
                    ))),
                    clients: None,
                    readonly: false,
                })
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        let remaining_ms: i64 = match budget {
            Some(b) => {
                let left = b.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Waited::TimedOut;
                }
                left.as_millis().max(1) as i64
            }
            None => -1,
        };
        let events = unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET
                    | pg_sys::WL_SOCKET_READABLE
                    | pg_sys::WL_EXIT_ON_PM_DEATH
                    | if remaining_ms >= 0 {
                        pg_sys::WL_TIMEOUT
                    } else {
                        0
                    }) as i32,
                link.wake.as_raw_fd(),
                remaining_ms,
                pg_sys::PG_WAIT_EXTENSION,
            )
        };
        if events & pg_sys::WL_LATCH_SET as i32 != 0 {
            unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
            *latch_was_set = true;
            if interrupt_pending() {
                // The call may be abandoned by the ERROR that follows: make sure this link is
                // not reused, then let PostgreSQL act on the interrupt.
                remember_abandoned_link(link);
                let fingerprint = std::mem::take(&mut link.fingerprint);
                pgrx::check_for_interrupts!();
                link.fingerprint = fingerprint;
                if crate::worker_shutdown_requested() {
                    return Waited::TimedOut;
                }
            }
        }
    }
}

fn interrupt_pending() -> bool {
    let pending = unsafe { pg_sys::InterruptPending != 0 };
    pending || crate::worker_shutdown_requested()
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 64];
    unsafe { while libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0 {} }
}

fn remember_abandoned_link(link: &Link) {
    remember_abandoned(&link.clients);
}

/// A connection left in doubt: its clients are killed by the next connection.
pub(super) fn remember_abandoned(clients: &[ClientId]) {
    if !clients.is_empty() {
        ABANDONED.with(|a| *a.borrow_mut() = clients.to_vec());
    }
}

pub(super) fn take_abandoned() -> Vec<ClientId> {
    ABANDONED.with(|a| std::mem::take(&mut *a.borrow_mut()))
}

fn abandon(slot: &mut Option<Link>) {
    if let Some(link) = slot.take() {
        remember_abandoned_link(&link);
    }
}

fn classify(what: &str, addr: &str, connecting: bool, e: redis::RedisError) -> Error {
    let cause = crate::error::redact(&e.to_string());
    if e.is_timeout() {
        return Error::Timeout {
            what: what.to_string(),
            ms: crate::settings::command_timeout().as_millis(),
        };
    }
    if let Some(code) = e.code() {
        // AUTH/SELECT refused during the handshake, e.g. WRONGPASS or NOPERM.
        return Error::Reply {
            what: what.to_string(),
            reply: format!("{code} {}", e.detail().unwrap_or("")),
        };
    }
    if matches!(
        e.kind(),
        redis::ErrorKind::Client | redis::ErrorKind::InvalidClientConfig
    ) {
        // Refused before anything was sent: e.g. a command a cluster cannot route (SCAN).
        return Error::InvalidArgument(format!("{what}: {cause}"));
    }
    if connecting || e.is_connection_refusal() {
        Error::Connect {
            what: what.to_string(),
            addr: addr.to_string(),
            cause,
        }
    } else {
        Error::ConnectionLost {
            what: what.to_string(),
            cause,
        }
    }
}

fn spawn(target: &Target) -> Result<Link> {
    let connector = target.connector()?;
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(Error::Internal(format!(
            "pipe2: {}",
            std::io::Error::last_os_error()
        )));
    }
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (ans_tx, ans_rx) = mpsc::channel();
    let connect_timeout = crate::settings::connect_timeout();
    let to_kill = take_abandoned();

    // The helper inherits the signal mask of its creator: block everything while spawning so no
    // PostgreSQL signal handler ever runs on the helper thread.
    let spawned = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = std::thread::Builder::new()
            .name("pg_redis-io".into())
            .spawn(move || {
                helper(
                    connector,
                    connect_timeout,
                    to_kill,
                    job_rx,
                    ans_tx,
                    write_end,
                )
            });
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    };
    spawned.map_err(|e| Error::Internal(format!("could not start the Redis I/O thread: {e}")))?;
    Ok(Link {
        fingerprint: target.fingerprint.clone(),
        display_addr: target.display_addr.clone(),
        jobs: job_tx,
        answers: ans_rx,
        wake: read_end,
        connected: false,
        clients: vec![],
    })
}

/// The helper thread: connects lazily, runs jobs in order, answers through the channel and
/// pokes the pipe. Ends when the main thread drops its sender (link abandoned or replaced).
fn helper(
    connector: Connector,
    connect_timeout: Duration,
    to_kill: Vec<ClientId>,
    jobs: mpsc::Receiver<Job>,
    answers: mpsc::Sender<Msg>,
    wake: OwnedFd,
) {
    let sentinel = matches!(connector.topology, Topology::Sentinel(_));
    let mut con: Option<conn::Conn> = None;
    let mut to_kill = to_kill;
    while let Ok(job) = jobs.recv() {
        if con.is_none() {
            match conn::open(&connector, connect_timeout, std::mem::take(&mut to_kill)) {
                Ok(opened) => {
                    con = Some(opened.conn);
                    if answers
                        .send(Msg::Connected(opened.clients, opened.master))
                        .is_err()
                    {
                        return;
                    }
                    poke(&wake);
                }
                Err(e) => {
                    let _ = answers.send(Msg::Answer(Answer {
                        values: Err(e),
                        clients: None,
                        readonly: false,
                    }));
                    poke(&wake);
                    return;
                }
            }
        }
        let Some(c) = con.as_mut() else { return };
        let ran = c.set_timeouts(job.timeout).and_then(|_| c.run(&job.req));
        let failed = ran.is_err();
        let (values, clients) = match ran {
            Ok(r) => (Ok(r.values), r.clients),
            Err(e) => (Err(e), None),
        };
        let readonly = sentinel && values.as_deref().is_ok_and(conn::any_readonly);
        let answer = Answer {
            values,
            clients,
            readonly,
        };
        if answers.send(Msg::Answer(answer)).is_err() {
            return;
        }
        poke(&wake);
        if failed || readonly {
            return; // a connection in doubt, or to a demoted master, is never reused
        }
    }
}

fn poke(wake: &OwnedFd) {
    let b = [1u8];
    unsafe { libc::write(wake.as_raw_fd(), b.as_ptr().cast(), 1) };
}

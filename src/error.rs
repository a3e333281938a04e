//! One error type for the whole extension, turned into a PostgreSQL ERROR with the SQLSTATE that
//! SPEC §6 names. Messages start with `pg_redis:`, say what was attempted on which key or table,
//! and never carry a password: every text that came from a URL goes through `redact` first.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not reach Redis, or the connection dropped (class 08).
    #[error("pg_redis: {what}: could not connect to Redis at {addr}: {cause}")]
    Connect {
        what: String,
        addr: String,
        cause: String,
    },
    #[error("pg_redis: {what}: connection to Redis lost: {cause}")]
    ConnectionLost { what: String, cause: String },
    /// The command or pipeline took longer than `pg_redis.command_timeout` (57014).
    #[error("pg_redis: {what}: Redis did not answer within {ms} ms (pg_redis.command_timeout)")]
    Timeout { what: String, ms: u128 },
    /// Redis answered with an error reply.
    #[error("pg_redis: {what}: Redis replied: {reply}")]
    Reply { what: String, reply: String },
    /// Bad argument (22023).
    #[error("pg_redis: {0}")]
    InvalidArgument(String),
    /// Privilege (42501).
    #[error("pg_redis: {0}")]
    Privilege(String),
    /// Object of the wrong kind (42809).
    #[error("pg_redis: {0}")]
    WrongObject(String),
    /// Not available in this configuration, e.g. sync mode on a Redis Cluster (0A000).
    #[error("pg_redis: {0}")]
    NotSupported(String),
    /// A reply that does not fit the SQL return type (invalid UTF-8: 22021, too large: 54000).
    #[error("pg_redis: {what}: {why}")]
    BadReply {
        what: String,
        why: String,
        code: PgSqlErrorCode,
    },
    /// Anything else, internal (XX000).
    #[error("pg_redis: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Error::Connect { .. } => ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            Error::ConnectionLost { .. } => ERRCODE_CONNECTION_FAILURE,
            Error::Timeout { .. } => ERRCODE_QUERY_CANCELED,
            Error::Reply { reply, .. } if reply.starts_with("NOPERM") => {
                ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            // Authentication refused: the connection could not be established.
            Error::Reply { reply, .. }
                if reply.starts_with("NOAUTH") || reply.starts_with("WRONGPASS") =>
            {
                ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
            }
            Error::Reply { .. } => ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
            Error::InvalidArgument(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::Privilege(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Error::WrongObject(_) => ERRCODE_WRONG_OBJECT_TYPE,
            Error::NotSupported(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            Error::BadReply { code, .. } => *code,
            Error::Internal(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    /// Is this a failure of the link to Redis (as opposed to Redis refusing a command)?
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::ConnectionLost { .. } | Error::Timeout { .. }
        )
    }

    /// Raise as a PostgreSQL ERROR; does not return.
    pub fn raise(self) -> ! {
        let code = self.sqlstate();
        let msg = redact(&self.to_string());
        ErrorReport::new(code, msg, "pg_redis").report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) returned")
    }
}

/// Unwrap a result or raise its error as a PostgreSQL ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}
impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}

pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Remove a password from anything that looks like a Redis URL (`scheme://user:pass@host`) or an
/// AUTH argument, so that messages and logs never show it.
/// Passwords of the configured URL and password file, scrubbed from every message by `redact`
/// whatever they contain (a space, a quote or a slash defeats any pattern). Filled by the
/// connection layer on the backend's main thread; read from any thread.
static SECRETS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

pub fn remember_secret(secret: &str) {
    // Very short secrets would scrub ordinary words; the URL pattern still hides them.
    if secret.chars().count() < 3 {
        return;
    }
    if let Ok(mut s) = SECRETS.lock() {
        if !s.iter().any(|x| x == secret) {
            if s.len() >= 16 {
                s.remove(0);
            }
            s.push(secret.to_string());
        }
    }
}

/// Remember the password of each address of a `pg_redis.url` value, as written and decoded.
pub fn remember_url_secrets(url: &str) {
    for part in url.split(',') {
        let Some(pos) = part.find("://") else {
            continue;
        };
        let rest = &part[pos + 3..];
        let Some(at) = rest.rfind('@') else { continue };
        let Some((_, password)) = rest[..at].split_once(':') else {
            continue;
        };
        remember_secret(password);
        remember_secret(&percent_decode(password));
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn redact(text: &str) -> String {
    let mut text = text.to_string();
    if let Ok(secrets) = SECRETS.lock() {
        for s in secrets.iter() {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), "***");
            }
        }
    }
    redact_urls(&text)
}

fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote; userinfo ends at the last '@'.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'' || c == ',')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    redact_query(&out)
}

/// `unix:///path?pass=secret` and `?password=secret`: the password as a URL query parameter.
fn redact_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("pass") {
        let (head, tail) = rest.split_at(pos);
        let at_param = head.ends_with('?') || head.ends_with('&');
        let name_len = if tail.starts_with("password=") {
            9
        } else if tail.starts_with("pass=") {
            5
        } else {
            0
        };
        out.push_str(head);
        if at_param && name_len > 0 {
            out.push_str(&tail[..name_len]);
            out.push_str("***");
            let value = &tail[name_len..];
            let end = value
                .find(|c: char| c == '&' || c.is_whitespace() || c == '"' || c == '\'' || c == ',')
                .unwrap_or(value.len());
            rest = &value[end..];
        } else {
            out.push_str(&tail[..4]);
            rest = &tail[4..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("x redis://:s3cret@h:1/0 y"),
            "x redis://:***@h:1/0 y"
        );
        assert_eq!(redact("rediss://u:p@a@h:1"), "rediss://u:***@h:1");
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact("redis://user@h"), "redis://user@h");
        assert_eq!(
            redact("unix:///s.sock?db=1&pass=s3cret&user=u"),
            "unix:///s.sock?db=1&pass=***&user=u"
        );
        assert_eq!(redact("unix:///s?password=p q"), "unix:///s?password=*** q");
        assert_eq!(redact("passing pass=x"), "passing pass=x");
    }
}

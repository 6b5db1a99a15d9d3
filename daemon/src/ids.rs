//! Identities: of processes across pid reuse, of TCP connections, and of sessions. Typed, so
//! they are compared and hashed as values and formatted only where a person or the ledger
//! reads them.
use std::{fmt, net::SocketAddr, str::FromStr};

use serde::Serialize;
use strum::{EnumIter, EnumString, IntoStaticStr};

/// A process across pid reuse: its pid and start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ProcId {
    pub pid: u32,
    pub start_time: u64,
}

/// A connection session, keyed by its 4-tuple (unique while the connection exists).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ConnKey {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.local, self.remote)
    }
}

/// The two kinds of session (DESIGN.md), named as the API, the ledger and metrics spell them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, IntoStaticStr, EnumIter, EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SessionKind {
    Process,
    Connection,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for SessionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So that a kind compares with its name where names are what a test or a filter holds.
impl PartialEq<&str> for SessionKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A session: a service's process tree (by its root) or one TCP connection. Written
/// `pid:PID@START` or `LOCAL->REMOTE`, as the API and the ledger show it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SessionKey {
    Process(ProcId),
    Connection(ConnKey),
}

impl SessionKey {
    pub fn kind(&self) -> SessionKind {
        match self {
            Self::Process(_) => SessionKind::Process,
            Self::Connection(_) => SessionKind::Connection,
        }
    }

    /// The process session's root pid.
    pub fn root_pid(&self) -> Option<u32> {
        match self {
            Self::Process(id) => Some(id.pid),
            Self::Connection(_) => None,
        }
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Process(id) => write!(f, "pid:{}@{}", id.pid, id.start_time),
            Self::Connection(k) => k.fmt(f),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a session key (pid:PID@START_TIME or LOCAL->REMOTE)")]
pub struct BadSessionKey(pub String);

impl FromStr for SessionKey {
    type Err = BadSessionKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSessionKey(s.to_owned());
        if let Some(rest) = s.strip_prefix("pid:") {
            let (pid, start) = rest.split_once('@').ok_or_else(bad)?;
            return Ok(Self::Process(ProcId {
                pid: pid.parse().map_err(|_| bad())?,
                start_time: start.parse().map_err(|_| bad())?,
            }));
        }
        let (local, remote) = s.split_once("->").ok_or_else(bad)?;
        Ok(Self::Connection(ConnKey {
            local: local.parse().map_err(|_| bad())?,
            remote: remote.parse().map_err(|_| bad())?,
        }))
    }
}

impl Serialize for SessionKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back_as_written() {
        for text in [
            "pid:4242@987654",
            "127.0.0.1:8000->127.0.0.1:51234",
            "[::1]:8000->[::1]:40000",
        ] {
            let key: SessionKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
        }
        let key: SessionKey = "pid:7@1".parse().unwrap();
        assert_eq!(key.kind(), SessionKind::Process);
        assert_eq!(key.root_pid(), Some(7));
    }

    #[test]
    fn malformed_keys_are_refused_with_the_text() {
        for text in ["", "pid:7", "pid:x@1", "1.2.3.4:5", "a->b", "pid:7@1->x"] {
            let err = text.parse::<SessionKey>().unwrap_err();
            assert_eq!(err.0, text);
        }
    }

    #[test]
    fn kinds_have_one_spelling() {
        use strum::IntoEnumIterator as _;
        let names: Vec<&str> = SessionKind::iter().map(SessionKind::as_str).collect();
        assert_eq!(names, ["process", "connection"]);
        assert_eq!("connection".parse(), Ok(SessionKind::Connection));
    }
}

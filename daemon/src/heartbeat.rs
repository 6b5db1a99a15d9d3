//! Arming a connection's heartbeat with no code in the server: reclaimd takes a duplicate
//! of the holder's socket fd (`pidfd_getfd`), and sets kernel keepalive and
//! `TCP_USER_TIMEOUT` on the socket, which the server shares. A peer that fails the probes is
//! closed by the kernel with ETIMEDOUT, which the TCP program reports.
use std::{
    net::{SocketAddr, TcpStream},
    os::fd::OwnedFd,
    time::Duration,
};

use rustix::{
    net::sockopt,
    process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open},
};

use crate::{config::Heartbeat, engine::Arm, ids::ConnKey};

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("pid {0} is no process")]
    NoPid(u32),
    #[error("pidfd_open({pid}): {source}")]
    Pidfd { pid: u32, source: rustix::io::Errno },
    #[error("pidfd_getfd({pid}, fd {fd}): {source}")]
    Getfd {
        pid: u32,
        fd: u32,
        source: rustix::io::Errno,
    },
    #[error("fd {fd} of pid {pid} is now another socket ({found}), not {conn}")]
    Moved {
        pid: u32,
        fd: u32,
        found: String,
        conn: ConnKey,
    },
    #[error("{what} on fd {fd} of pid {pid}: {source}")]
    Sockopt {
        what: &'static str,
        pid: u32,
        fd: u32,
        source: rustix::io::Errno,
    },
}

/// What arming did to the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Armed {
    /// reclaimd's keepalive and user timeout are set.
    Set,
    /// The application's own settings were kept where it had any (never lowered, never
    /// replaced); `keepalive`/`user_timeout` say which of ours were set.
    Kept { keepalive: bool, user_timeout: bool },
    /// reclaimd had armed it already (another holder of the same socket).
    Already,
}

/// Arms `arm` and logs what was set on whose socket.
pub fn arm(arm: &Arm) {
    match try_arm(arm) {
        Ok(how) => tracing::info!(
            service = %arm.service,
            conn = %arm.conn,
            pid = arm.holder.pid,
            fd = arm.holder.fd,
            ?how,
            idle_s = arm.beat.idle.as_secs(),
            interval_s = arm.beat.interval.as_secs(),
            count = arm.beat.count,
            user_timeout_ms = arm.beat.user_timeout.as_millis() as u64,
            "heartbeat armed"
        ),
        Err(error) => tracing::warn!(
            service = %arm.service,
            conn = %arm.conn,
            %error,
            "could not arm the heartbeat: a vanished peer of this connection is found only when the kernel gives up on its own"
        ),
    }
}

fn try_arm(arm: &Arm) -> Result<Armed, HeartbeatError> {
    let (pid, fd) = (arm.holder.pid, arm.holder.fd);
    let socket = TcpStream::from(duplicate(pid, fd)?);
    let found = (socket.local_addr(), socket.peer_addr());
    let same = match &found {
        (Ok(l), Ok(r)) => same_addr(*l, arm.conn.local) && same_addr(*r, arm.conn.remote),
        _ => false,
    };
    if !same {
        return Err(HeartbeatError::Moved {
            pid,
            fd,
            found: format!("{found:?}"),
            conn: arm.conn.clone(),
        });
    }
    let opt = |what: &'static str| {
        move |source| HeartbeatError::Sockopt {
            what,
            pid,
            fd,
            source,
        }
    };
    let beat = arm.beat;
    let keepalive = sockopt::socket_keepalive(&socket).map_err(opt("SO_KEEPALIVE"))?;
    let user_timeout = sockopt::tcp_user_timeout(&socket).map_err(opt("TCP_USER_TIMEOUT"))?;
    let ours_ms = beat.user_timeout.as_millis() as u32;
    if keepalive && user_timeout == ours_ms && is_ours(&socket, &beat) {
        return Ok(Armed::Already);
    }
    if !keepalive {
        sockopt::set_tcp_keepidle(&socket, beat.idle).map_err(opt("TCP_KEEPIDLE"))?;
        sockopt::set_tcp_keepintvl(&socket, beat.interval).map_err(opt("TCP_KEEPINTVL"))?;
        sockopt::set_tcp_keepcnt(&socket, beat.count).map_err(opt("TCP_KEEPCNT"))?;
        sockopt::set_socket_keepalive(&socket, true).map_err(opt("SO_KEEPALIVE"))?;
    }
    if user_timeout == 0 {
        sockopt::set_tcp_user_timeout(&socket, ours_ms).map_err(opt("TCP_USER_TIMEOUT"))?;
    }
    // Dropping the duplicate closes only reclaimd's fd: the server's socket stays open.
    Ok(match (keepalive, user_timeout) {
        (false, 0) => Armed::Set,
        (k, u) => Armed::Kept {
            keepalive: !k,
            user_timeout: u == 0,
        },
    })
}

fn duplicate(pid: u32, fd: u32) -> Result<OwnedFd, HeartbeatError> {
    let p = Pid::from_raw(pid as i32).ok_or(HeartbeatError::NoPid(pid))?;
    let pidfd = pidfd_open(p, PidfdFlags::empty())
        .map_err(|source| HeartbeatError::Pidfd { pid, source })?;
    pidfd_getfd(&pidfd, fd as i32, PidfdGetfdFlags::empty())
        .map_err(|source| HeartbeatError::Getfd { pid, fd, source })
}

/// Whether the socket's keepalive times are exactly `beat`'s (set by reclaimd before).
fn is_ours(socket: &TcpStream, beat: &Heartbeat) -> bool {
    let secs = |d: rustix::io::Result<Duration>| d.ok().map(|d| d.as_secs());
    secs(sockopt::tcp_keepidle(socket)) == Some(beat.idle.as_secs())
        && secs(sockopt::tcp_keepintvl(socket)) == Some(beat.interval.as_secs())
        && sockopt::tcp_keepcnt(socket).ok() == Some(beat.count)
}

/// Equal, an IPv4-mapped IPv6 address counting as its IPv4 address.
fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

//! Typed kernel events, decoded from the ring buffer's raw `reclaimd_common::Event` records.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use reclaimd_common::{AF_INET, AF_INET6, COMM_LEN, Event, EventKind, OwnerSource, TcpState};
use serde_json::{Value, json};
use smol_str::SmolStr;
use thiserror::Error;

/// A record that is not a well-formed event; it is counted and skipped, never acted on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes, expected {want}")]
    Size { got: usize, want: usize },
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("unknown owner source {0}")]
    OwnerSource(u8),
}

/// How a process ended, from the kernel's wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn from_raw(raw: i32) -> Self {
        match raw & 0x7f {
            0 => Self::Code((raw >> 8) & 0xff),
            sig => Self::Signal(sig),
        }
    }
}

/// One end of a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    /// Kernel `struct sock` address: the connection's identity while it lives.
    pub sock: u64,
    pub local: Endpoint,
    pub remote: Endpoint,
}

impl Socket {
    /// The connection's 4-tuple, which names its session.
    pub fn conn_key(&self) -> crate::ids::ConnKey {
        crate::ids::ConnKey {
            local: std::net::SocketAddr::new(self.local.addr, self.local.port),
            remote: std::net::SocketAddr::new(self.remote.addr, self.remote.port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Fork {
        ts_ns: u64,
        pid: u32,
        ppid: u32,
        /// The forking thread's name: the parent's as it is at the fork.
        comm: SmolStr,
        /// When the parent started, in `/proc/PID/stat`'s clock ticks since boot (its
        /// start time), if the kernel said.
        parent_start: Option<u64>,
    },
    Exit {
        ts_ns: u64,
        /// The last thread to exit.
        pid: u32,
        tgid: u32,
        status: ExitStatus,
        comm: SmolStr,
    },
    Tcp {
        ts_ns: u64,
        socket: Socket,
        old_state: TcpState,
        new_state: TcpState,
        /// 0 while the owner is unknown.
        owner_tgid: u32,
        owner_comm: SmolStr,
        /// The socket's error (`sk_err`, an errno) on entering CLOSE; 0 when none or unknown.
        error: i32,
    },
    Owner {
        ts_ns: u64,
        socket: Socket,
        pid: u32,
        tgid: u32,
        source: OwnerSource,
        /// The fd `accept` returned, for `OwnerSource::Accept`.
        fd: Option<i32>,
        comm: SmolStr,
    },
}

/// A task's name, held inline (a `comm` is at most 15 bytes): decoding an event allocates
/// nothing for it.
fn comm(raw: &[u8; COMM_LEN]) -> SmolStr {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    SmolStr::new(String::from_utf8_lossy(&raw[..end]))
}

fn addr(family: u8, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*raw))
    }
}

fn socket(ev: &Event) -> Result<Socket, DecodeError> {
    if ev.family != AF_INET && ev.family != AF_INET6 {
        return Err(DecodeError::Family(ev.family));
    }
    Ok(Socket {
        sock: ev.sock,
        local: Endpoint {
            addr: addr(ev.family, &ev.saddr),
            port: ev.sport,
        },
        remote: Endpoint {
            addr: addr(ev.family, &ev.daddr),
            port: ev.dport,
        },
    })
}

/// Nanoseconds since boot in `/proc/PID/stat`'s unit, clock ticks (USER_HZ): the kernel
/// divides the same way (`nsec_to_clock_t`).
fn boot_ns_to_ticks(ns: u64) -> u64 {
    let per_tick = 1_000_000_000 / rustix::param::clock_ticks_per_second().max(1);
    ns / per_tick.max(1)
}

impl KernelEvent {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let want = size_of::<Event>();
        if bytes.len() != want {
            return Err(DecodeError::Size {
                got: bytes.len(),
                want,
            });
        }
        // SAFETY: length checked; Event is plain old data valid for any bit pattern, and
        // read_unaligned copes with the ring buffer's alignment.
        let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = EventKind::from_u8(ev.kind).ok_or(DecodeError::Kind(ev.kind))?;
        Ok(match kind {
            EventKind::Fork => Self::Fork {
                ts_ns: ev.ts_ns,
                pid: ev.tgid,
                ppid: ev.ppid,
                comm: comm(&ev.comm),
                parent_start: (ev.start_ns != 0).then(|| boot_ns_to_ticks(ev.start_ns)),
            },
            EventKind::Exit => Self::Exit {
                ts_ns: ev.ts_ns,
                pid: ev.pid,
                tgid: ev.tgid,
                status: ExitStatus::from_raw(ev.exit_code),
                comm: comm(&ev.comm),
            },
            EventKind::Tcp => Self::Tcp {
                ts_ns: ev.ts_ns,
                socket: socket(&ev)?,
                old_state: TcpState::from_raw(ev.old_state),
                new_state: TcpState::from_raw(ev.new_state),
                owner_tgid: ev.owner_tgid,
                owner_comm: comm(&ev.comm),
                error: ev.exit_code,
            },
            EventKind::Owner => {
                let source =
                    OwnerSource::from_u8(ev.detail).ok_or(DecodeError::OwnerSource(ev.detail))?;
                Self::Owner {
                    ts_ns: ev.ts_ns,
                    socket: socket(&ev)?,
                    pid: ev.pid,
                    tgid: ev.tgid,
                    source,
                    fd: (source == OwnerSource::Accept).then_some(ev.exit_code),
                    comm: comm(&ev.comm),
                }
            }
        })
    }

    pub fn ts_ns(&self) -> u64 {
        match self {
            Self::Fork { ts_ns, .. }
            | Self::Exit { ts_ns, .. }
            | Self::Tcp { ts_ns, .. }
            | Self::Owner { ts_ns, .. } => *ts_ns,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Fork { .. } => "fork",
            Self::Exit { .. } => "exit",
            Self::Tcp { .. } => "tcp",
            Self::Owner { .. } => "owner",
        }
    }

    /// One JSON object, as `reclaimd trace --json` prints it. `recv_ns` is when user space
    /// received the event, on the same clock as `ts_ns` (CLOCK_MONOTONIC).
    pub fn to_json(&self, recv_ns: u64) -> Value {
        let mut v = match self {
            Self::Fork {
                pid,
                ppid,
                comm,
                parent_start,
                ..
            } => json!({ "pid": pid, "tgid": pid, "ppid": ppid, "comm": comm,
                         "parent_start": parent_start }),
            Self::Exit {
                pid,
                tgid,
                status,
                comm,
                ..
            } => {
                let (code, signal) = match status {
                    ExitStatus::Code(c) => (Some(*c), None),
                    ExitStatus::Signal(s) => (None, Some(*s)),
                };
                json!({ "pid": pid, "tgid": tgid, "comm": comm, "exit_code": code,
                        "signal": signal })
            }
            Self::Tcp {
                socket,
                old_state,
                new_state,
                owner_tgid,
                owner_comm,
                error,
                ..
            } => {
                let mut v = socket_json(socket, *owner_tgid, *owner_tgid, owner_comm);
                v["old_state"] = json!(old_state.name());
                v["new_state"] = json!(new_state.name());
                v["error"] = json!(error);
                v
            }
            Self::Owner {
                socket,
                pid,
                tgid,
                source,
                fd,
                comm,
                ..
            } => {
                let mut v = socket_json(socket, *pid, *tgid, comm);
                v["source"] = json!(owner_source_name(*source));
                v["fd"] = json!(fd);
                v
            }
        };
        v["kind"] = json!(self.kind());
        v["ts_ns"] = json!(self.ts_ns());
        v["recv_ns"] = json!(recv_ns);
        v
    }

    /// One line for people, in the spirit of exitsnoop and tcplife.
    pub fn to_text(&self) -> String {
        let secs = self.ts_ns() as f64 / 1e9;
        match self {
            Self::Fork {
                pid, ppid, comm, ..
            } => format!("{secs:>14.6} fork  {pid:>7} {comm:<16} ppid={ppid}"),
            Self::Exit {
                tgid, status, comm, ..
            } => {
                let how = match status {
                    ExitStatus::Code(c) => format!("code={c}"),
                    ExitStatus::Signal(s) => format!("signal={s}"),
                };
                format!("{secs:>14.6} exit  {tgid:>7} {comm:<16} {how}")
            }
            Self::Tcp {
                socket,
                old_state,
                new_state,
                owner_tgid,
                owner_comm,
                ..
            } => format!(
                "{secs:>14.6} tcp   {owner_tgid:>7} {owner_comm:<16} {} -> {} {} -> {}",
                socket.local,
                socket.remote,
                old_state.name(),
                new_state.name()
            ),
            Self::Owner {
                socket,
                tgid,
                source,
                fd,
                comm,
                ..
            } => {
                let via = match fd {
                    Some(fd) => format!("{} fd={fd}", owner_source_name(*source)),
                    None => owner_source_name(*source).to_owned(),
                };
                format!(
                    "{secs:>14.6} owner {tgid:>7} {comm:<16} {} -> {} via {via}",
                    socket.local, socket.remote
                )
            }
        }
    }
}

/// A socket event's fields; `pid`, `tgid` and `comm` are the owner's, who is `tgid`.
fn socket_json(s: &Socket, pid: u32, tgid: u32, comm: &str) -> Value {
    json!({
        "pid": pid,
        "tgid": tgid,
        "owner_tgid": tgid,
        "comm": comm,
        "sock": format!("{:#x}", s.sock),
        "saddr": s.local.addr.to_string(),
        "sport": s.local.port,
        "daddr": s.remote.addr.to_string(),
        "dport": s.remote.port,
    })
}

fn owner_source_name(s: OwnerSource) -> &'static str {
    match s {
        OwnerSource::Accept => "accept",
        OwnerSource::Io => "io",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) plain data without implicit padding.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    fn named(s: &str) -> [u8; COMM_LEN] {
        let mut c = [0; COMM_LEN];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    #[test]
    fn exit_status_splits_code_and_signal() {
        assert_eq!(ExitStatus::from_raw(7 << 8), ExitStatus::Code(7));
        assert_eq!(ExitStatus::from_raw(9), ExitStatus::Signal(9));
        assert_eq!(ExitStatus::from_raw(0), ExitStatus::Code(0));
    }

    #[test]
    fn decodes_exit() {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::Exit as u8;
        ev.ts_ns = 42;
        ev.pid = 101;
        ev.tgid = 100;
        ev.exit_code = 7 << 8;
        ev.comm = named("worker");
        let got = KernelEvent::decode(&raw(&ev)).unwrap();
        let j = got.to_json(50);
        assert_eq!(j["kind"], "exit");
        assert_eq!(j["tgid"], 100);
        assert_eq!(j["pid"], 101);
        assert_eq!(j["exit_code"], 7);
        assert_eq!(j["signal"], Value::Null);
        assert_eq!(j["comm"], "worker");
        assert_eq!(j["recv_ns"], 50);
        assert!(got.to_text().contains("code=7"));
    }

    #[test]
    fn decodes_tcp_v4_and_v6() {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::Tcp as u8;
        ev.family = AF_INET;
        ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        ev.sport = 8000;
        ev.dport = 40000;
        ev.old_state = reclaimd_common::tcp_state::ESTABLISHED;
        ev.new_state = reclaimd_common::tcp_state::CLOSE_WAIT;
        ev.owner_tgid = 77;
        ev.sock = 0xffff_8880_dead_beef;
        let j = KernelEvent::decode(&raw(&ev)).unwrap().to_json(0);
        assert_eq!(j["saddr"], "127.0.0.1");
        assert_eq!(j["daddr"], "10.1.2.3");
        assert_eq!(j["sport"], 8000);
        assert_eq!(j["old_state"], "ESTABLISHED");
        assert_eq!(j["new_state"], "CLOSE_WAIT");
        assert_eq!(j["owner_tgid"], 77);
        assert_eq!(j["sock"], "0xffff8880deadbeef");

        ev.family = AF_INET6;
        ev.saddr = Ipv6Addr::LOCALHOST.octets();
        let j = KernelEvent::decode(&raw(&ev)).unwrap().to_json(0);
        assert_eq!(j["saddr"], "::1");
    }

    #[test]
    fn rejects_malformed_records() {
        let mut ev = Event::zeroed();
        assert_eq!(KernelEvent::decode(&raw(&ev)), Err(DecodeError::Kind(0)));
        ev.kind = 200;
        assert_eq!(KernelEvent::decode(&raw(&ev)), Err(DecodeError::Kind(200)));
        ev.kind = EventKind::Tcp as u8;
        ev.family = 1;
        assert_eq!(KernelEvent::decode(&raw(&ev)), Err(DecodeError::Family(1)));
        ev.kind = EventKind::Owner as u8;
        ev.family = AF_INET;
        ev.detail = 9;
        assert_eq!(
            KernelEvent::decode(&raw(&ev)),
            Err(DecodeError::OwnerSource(9))
        );
        assert!(matches!(
            KernelEvent::decode(&[0u8; 12]),
            Err(DecodeError::Size { got: 12, .. })
        ));
    }

    #[test]
    fn decoding_never_panics_on_arbitrary_bytes() {
        // A deterministic sweep over many byte patterns of the right size and of wrong sizes.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0, 1, 103, 104, 105, 208] {
            for _ in 0..2000 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                if let Ok(ev) = KernelEvent::decode(&bytes) {
                    assert_eq!(len, size_of::<Event>());
                    let _ = ev.to_json(0);
                    let _ = ev.to_text();
                }
            }
        }
    }
}

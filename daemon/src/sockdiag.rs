//! The TCP sockets of the service ports, asked of the kernel through NETLINK_SOCK_DIAG: a
//! state mask (no LISTEN, no TIME_WAIT) and a port filter in the request's bytecode, so the
//! kernel serialises only the services' sockets and the sweep's cost follows them, not the
//! host's socket count (`/proc/net/tcp` formats every socket, TIME_WAIT included).
//!
//! Hand-written rather than through `netlink-packet-sock-diag`: that crate builds no
//! `INET_DIAG_REQ_BYTECODE` attribute, and the filter is the point. The wire format is a
//! stable kernel ABI (`linux/inet_diag.h`, `linux/netlink.h`) and small.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::Path,
};

use reclaimd_common::TcpState;
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink, recv, send, socket_with,
};

use crate::model::{ConnKey, TcpSocket};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
/// `struct inet_diag_msg`: family, state, timer, retrans, the socket id (48), expires,
/// rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 72;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Every state but LISTEN (10), TIME_WAIT (6) and NEW_SYN_RECV (12): a listener is no
/// session, and a TIME_WAIT socket no longer belongs to any process (inode 0).
const STATES: u32 = ((1 << 12) - 1) & !(1 << 10) & !(1 << 6) & !1;

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("sock_diag socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("sock_diag request: {0}")]
    Io(#[source] std::io::Error),
    #[error("sock_diag: the kernel refused the request: {0}")]
    Refused(#[source] std::io::Error),
    #[error("sock_diag: malformed reply ({0})")]
    Malformed(&'static str),
    #[error("entering the network namespace {path}: {source}")]
    Namespace {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The bytecode that accepts a socket whose local port is one of `ports` (at least one):
/// per port `sport >= P && sport <= P`, an accepting jump to the end, else the next port;
/// after the last port, past the end (reject).
pub fn port_filter(ports: &[u16]) -> Vec<u8> {
    const BLOCK: usize = 20;
    let total = BLOCK * ports.len();
    let mut bc = Vec::with_capacity(total);
    let op = |bc: &mut Vec<u8>, code: u8, yes: u8, no: u16| {
        bc.extend_from_slice(&[code, yes]);
        bc.extend_from_slice(&no.to_ne_bytes());
    };
    for (i, &port) in ports.iter().enumerate() {
        let left = total - BLOCK * i;
        let last = i + 1 == ports.len();
        // The `no` of a comparison: the next block, or past the end (reject) after the last.
        let miss = |at: usize| -> u16 {
            let rest = left - at;
            (if last { rest + 4 } else { BLOCK - at }) as u16
        };
        op(&mut bc, INET_DIAG_BC_S_GE, 8, miss(0));
        op(&mut bc, 0, 0, port);
        op(&mut bc, INET_DIAG_BC_S_LE, 8, miss(8));
        op(&mut bc, 0, 0, port);
        op(&mut bc, INET_DIAG_BC_JMP, 4, (left - 16) as u16);
    }
    bc
}

/// One dump request for `family`'s TCP sockets in [`STATES`] matching `bytecode`.
fn request(family: u8, bytecode: &[u8]) -> Vec<u8> {
    let attr_len = 4 + bytecode.len();
    let len = NLMSG_HDR + 56 + attr_len;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&[0; 8]); // sequence number, port id
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&STATES.to_ne_bytes());
    m.extend_from_slice(&[0; 48]); // any socket id
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    m.extend_from_slice(bytecode);
    m
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, SockDiagError> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or(SockDiagError::Malformed("short message"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, SockDiagError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(SockDiagError::Malformed("short message"))
}

/// One `inet_diag_msg`: its inode and socket, or `None` for a family it does not know.
fn parse_msg(b: &[u8]) -> Result<Option<(u64, TcpSocket)>, SockDiagError> {
    if b.len() < DIAG_MSG_LEN {
        return Err(SockDiagError::Malformed("short inet_diag_msg"));
    }
    let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let addr = |at: usize| -> Option<IpAddr> {
        match b[0] {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                b[at],
                b[at + 1],
                b[at + 2],
                b[at + 3],
            ))),
            AF_INET6 => {
                let bytes: [u8; 16] = b[at..at + 16].try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(bytes)))
            }
            _ => None,
        }
    };
    let (Some(local), Some(remote)) = (addr(8), addr(24)) else {
        return Ok(None);
    };
    let inode = u64::from(u32_at(b, 68)?);
    Ok(Some((
        inode,
        TcpSocket {
            key: ConnKey {
                local: SocketAddr::new(local, port(4)),
                remote: SocketAddr::new(remote, port(6)),
            },
            state: TcpState::from_raw(b[1]),
        },
    )))
}

/// Reads the dump's replies into `out` until NLMSG_DONE.
fn read_dump(fd: &OwnedFd, out: &mut HashMap<u64, TcpSocket>) -> Result<(), SockDiagError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = loop {
            match recv(fd, &mut buf, RecvFlags::empty()) {
                Ok((n, _)) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(SockDiagError::Io(e.into())),
            }
        };
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let len = u32_at(&buf, at)? as usize;
            let kind = u16_at(&buf, at + 4)?;
            if len < NLMSG_HDR || at + len > n {
                return Err(SockDiagError::Malformed("bad message length"));
            }
            let body = &buf[at + NLMSG_HDR..at + len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = u32_at(body, 0)? as i32;
                    if errno == 0 {
                        return Ok(());
                    }
                    return Err(SockDiagError::Refused(std::io::Error::from_raw_os_error(
                        -errno,
                    )));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some((inode, sock)) = parse_msg(body)? {
                        out.insert(inode, sock);
                    }
                }
                _ => {}
            }
            // Messages are 4-byte aligned.
            at += (len + 3) & !3;
        }
    }
}

/// The TCP sockets (IPv4 and IPv6) whose local port is one of `ports`, in every state but
/// LISTEN and TIME_WAIT, in the calling thread's network namespace, by inode.
pub fn tcp_sockets_on(ports: &[u16]) -> Result<HashMap<u64, TcpSocket>, SockDiagError> {
    let mut out = HashMap::new();
    if ports.is_empty() {
        return Ok(out);
    }
    let fd = socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )
    .map_err(|e| SockDiagError::Socket(e.into()))?;
    let bytecode = port_filter(ports);
    for family in [AF_INET, AF_INET6] {
        send(&fd, &request(family, &bytecode), SendFlags::empty())
            .map_err(|e| SockDiagError::Io(e.into()))?;
        read_dump(&fd, &mut out)?;
    }
    Ok(out)
}

/// [`tcp_sockets_on`] in the network namespace `ns` (a `/proc/PID/ns/net`), asked from a
/// thread that enters it, so no other thread's namespace changes.
pub fn tcp_sockets_in(ns: &Path, ports: &[u16]) -> Result<HashMap<u64, TcpSocket>, SockDiagError> {
    let enter = |ns: &Path| -> Result<(), SockDiagError> {
        let fail = |source: std::io::Error| SockDiagError::Namespace {
            path: ns.display().to_string(),
            source,
        };
        let file = std::fs::File::open(ns).map_err(fail)?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(|e| fail(e.into()))
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            tcp_sockets_on(ports)
        })
        .join()
        .unwrap_or(Err(SockDiagError::Malformed(
            "the namespace thread panicked",
        )))
    })
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn the_filter_is_one_block_per_port_ending_in_accept_or_reject() {
        let bc = port_filter(&[8000, 9000]);
        assert_eq!(bc.len(), 40);
        // First port: a miss goes to the second block (20 bytes on, 12 from the S_LE).
        assert_eq!(&bc[0..4], &[INET_DIAG_BC_S_GE, 8, 20, 0]);
        assert_eq!(u16::from_ne_bytes([bc[6], bc[7]]), 8000);
        assert_eq!(&bc[8..12], &[INET_DIAG_BC_S_LE, 8, 12, 0]);
        // A match jumps to the very end: 40 - 16 = 24 bytes on.
        assert_eq!(&bc[16..20], &[INET_DIAG_BC_JMP, 4, 24, 0]);
        // Last port: a miss goes past the end (rejected); a match ends exactly there.
        assert_eq!(&bc[20..24], &[INET_DIAG_BC_S_GE, 8, 24, 0]);
        assert_eq!(&bc[28..32], &[INET_DIAG_BC_S_LE, 8, 16, 0]);
        assert_eq!(&bc[36..40], &[INET_DIAG_BC_JMP, 4, 4, 0]);
    }

    #[test]
    fn states_are_all_but_listen_and_time_wait() {
        for (state, wanted) in [(1, true), (6, false), (8, true), (10, false), (11, true)] {
            assert_eq!(STATES & (1 << state) != 0, wanted, "state {state}");
        }
    }

    /// Needs nothing but a kernel with sock_diag (built in or loadable).
    #[test]
    fn finds_the_connections_of_the_ports_asked_and_only_those() {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        let clients: Vec<TcpStream> = listeners
            .iter()
            .map(|l| TcpStream::connect(l.local_addr().unwrap()).unwrap())
            .collect();
        let _accepted: Vec<TcpStream> = listeners.iter().map(|l| l.accept().unwrap().0).collect();
        // The first two ports are asked for, the third is not.
        let found = match tcp_sockets_on(&ports[..2]) {
            Ok(f) => f,
            Err(e @ (SockDiagError::Socket(_) | SockDiagError::Refused(_))) => {
                eprintln!("skipped: this kernel has no sock_diag ({e}); /proc/net/tcp serves");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let mut socks: Vec<&TcpSocket> = found.values().collect();
        socks.sort_by_key(|s| s.key.local.port());
        let mut want: Vec<(u16, std::net::SocketAddr)> = (0..2)
            .map(|i| (ports[i], clients[i].local_addr().unwrap()))
            .collect();
        want.sort();
        let got: Vec<(u16, std::net::SocketAddr)> = socks
            .iter()
            .map(|s| (s.key.local.port(), s.key.remote))
            .collect();
        assert_eq!(got, want, "{socks:?}");
        assert!(socks.iter().all(|s| s.state == TcpState::Established));
    }
}

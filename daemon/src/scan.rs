//! Reads /proc for the model: process facts, and the TCP connections behind a process's
//! socket fds (`/proc/<pid>/fd` → socket inode → `/proc/net/tcp{,6}`).
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use reclaimd_common::TcpState;

use crate::{
    gpu::{LiveProc, ProcStat, fd_links, procfs::pids},
    model::{ConnKey, ProcFacts},
};

/// The cgroup v2 path (`0::/path`) in `dir/cgroup` (a process's or a thread's /proc
/// directory), or the first hierarchy's path on v1.
fn cgroup_in(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("cgroup")).ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with("0::"))
        .or_else(|| text.lines().next())?;
    Some(line.splitn(3, ':').nth(2)?.to_owned())
}

/// Facts of a process any thread of which runs (a leader that exited first is no death:
/// invariant 9); `None` once its last thread has exited.
pub fn facts(proc_root: &Path, pid: u32) -> Option<ProcFacts> {
    let LiveProc { stat, dir } = LiveProc::find(proc_root, pid)?;
    Some(ProcFacts {
        pid,
        ppid: stat.ppid,
        start_time: stat.start_time,
        comm: stat.comm,
        exe: std::fs::read_link(dir.join("exe")).ok(),
        cgroup: cgroup_in(&dir),
        cmdline: cmdline_in(&dir),
    })
}

/// The command line in `dir/cmdline`, its NUL-separated arguments joined by spaces (the
/// first 4 KiB: enough for any matcher, bounded for a process with a huge argv).
fn cmdline_in(dir: &Path) -> Option<String> {
    use std::io::Read as _;
    let mut buf = Vec::new();
    std::fs::File::open(dir.join("cmdline"))
        .ok()?
        .take(4096)
        .read_to_end(&mut buf)
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    Some(text.trim_end_matches('\0').replace('\0', " "))
}

/// Facts of every live process.
pub fn all_facts(proc_root: &Path) -> Vec<ProcFacts> {
    pids(proc_root)
        .into_iter()
        .filter_map(|pid| facts(proc_root, pid))
        .collect()
}

/// The socket fds `pid` holds open, with their inodes.
pub fn socket_fds(proc_root: &Path, pid: u32) -> Vec<(u32, u64)> {
    fd_links(proc_root, pid)
        .into_iter()
        .filter_map(|(fd, t)| {
            let inode = t
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
}

pub use crate::model::TcpSocket;

/// Every TCP socket of this network namespace, by inode.
pub fn tcp_sockets(proc_root: &Path) -> HashMap<u64, TcpSocket> {
    let mut out = HashMap::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let path: PathBuf = proc_root.join("net").join(file);
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        out.extend(text.lines().skip(1).filter_map(|l| parse_tcp_line(l, v6)));
    }
    out
}

/// The TCP sockets on `ports` (local), open or closing (not listening, not in TIME_WAIT), of
/// the daemon's network namespace and of each namespace one of `pids` lives in (a pod has
/// its own, and its sockets are only in its own table), by inode; each namespace is asked
/// once. Through sock_diag, whose cost follows these sockets alone; where the kernel has no
/// sock_diag, from `/proc/net/tcp{,6}`, filtered the same way.
pub fn tcp_sockets_seen_by(
    proc_root: &Path,
    pids: impl IntoIterator<Item = u32>,
    ports: &[u16],
) -> HashMap<u64, TcpSocket> {
    if ports.is_empty() {
        return HashMap::new();
    }
    let netns = |dir: &Path| std::fs::read_link(dir.join("ns/net")).ok();
    let own = proc_root.join("self");
    let mut out = sockets_of_namespace(&own, ports, crate::sockdiag::tcp_sockets_on(ports));
    let mut seen: std::collections::HashSet<PathBuf> = netns(&own).into_iter().collect();
    for pid in pids {
        // A leader that exited before its threads has no namespaces left: read a thread's.
        let Some(LiveProc { dir, .. }) = LiveProc::find(proc_root, pid) else {
            continue;
        };
        if let Some(ns) = netns(&dir)
            && seen.insert(ns)
        {
            let asked = crate::sockdiag::tcp_sockets_in(&dir.join("ns/net"), ports);
            out.extend(sockets_of_namespace(&dir, ports, asked));
        }
    }
    out
}

/// What sock_diag answered for the namespace of the /proc directory `dir`, or (it failed)
/// the same sockets read from that directory's `net/tcp{,6}`.
fn sockets_of_namespace(
    dir: &Path,
    ports: &[u16],
    asked: Result<HashMap<u64, TcpSocket>, crate::sockdiag::SockDiagError>,
) -> HashMap<u64, TcpSocket> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match asked {
        Ok(found) => found,
        Err(error) => {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(%error, "sock_diag lookup failed: reading net/tcp instead (said \
                    once; its cost grows with every socket of the namespace)");
            }
            let mut all = tcp_sockets(dir);
            all.retain(|_, s| {
                ports.contains(&s.key.local.port())
                    && !matches!(s.state, TcpState::Listen | TcpState::TimeWait)
            });
            all
        }
    }
}

/// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`
fn parse_tcp_line(line: &str, v6: bool) -> Option<(u64, TcpSocket)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let local = parse_endpoint(f.get(1)?, v6)?;
    let remote = parse_endpoint(f.get(2)?, v6)?;
    let state = TcpState::from_raw(u8::from_str_radix(f.get(3)?, 16).ok()?);
    let inode = f.get(9)?.parse().ok()?;
    Some((
        inode,
        TcpSocket {
            key: ConnKey { local, remote },
            state,
        },
    ))
}

/// `0100007F:1F40` (IPv4, the address as a little-endian word) or 32 hex digits of four
/// little-endian words (IPv6), then the port.
fn parse_endpoint(s: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        let word = u32::from_str_radix(addr, 16).ok()?;
        IpAddr::V4(Ipv4Addr::from(word.to_le_bytes()))
    };
    Some(SocketAddr::new(ip, port))
}

/// The TCP connections behind `pid`'s socket fds.
pub fn connections_of(proc_root: &Path, pid: u32, table: &HashMap<u64, TcpSocket>) -> Vec<ConnKey> {
    connections_held(&socket_fds(proc_root, pid), table)
        .into_iter()
        .map(|(_, sock)| sock.key)
        .collect()
}

/// The TCP connections of these socket fds, each with its fd and its state.
pub fn connections_held(
    fds: &[(u32, u64)],
    table: &HashMap<u64, TcpSocket>,
) -> Vec<(u32, TcpSocket)> {
    fds.iter()
        .filter_map(|(fd, i)| Some((*fd, table.get(i)?.clone())))
        .collect()
}

/// This process and its ancestors, which reclaimd never signals.
pub fn self_and_ancestors(proc_root: &Path) -> Vec<u32> {
    let mut out = vec![std::process::id()];
    let mut cur = std::process::id();
    for _ in 0..64 {
        match ProcStat::read(proc_root, cur) {
            Some(s) if s.ppid != 0 && s.ppid != cur => {
                out.push(s.ppid);
                cur = s.ppid;
            }
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_lines() {
        let v4 = "   0: 0100007F:1F40 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        let (inode, s) = parse_tcp_line(v4, false).unwrap();
        assert_eq!(inode, 123456);
        assert_eq!(s.state, TcpState::Established);
        assert_eq!(s.key.local, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(s.key.remote, "127.0.0.1:50000".parse().unwrap());
        let v6 = "   0: 00000000000000000000000001000000:1F40 00000000000000000000000001000000:C350 08 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1";
        let (inode, s) = parse_tcp_line(v6, true).unwrap();
        assert_eq!(inode, 777);
        assert_eq!(s.state, TcpState::CloseWait);
        assert_eq!(s.key.local, "[::1]:8000".parse().unwrap());
        assert!(parse_tcp_line("garbage", false).is_none());
    }

    #[test]
    fn finds_own_connection_through_its_fd() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let proc_root = Path::new("/proc");
        let conns = connections_of(proc_root, std::process::id(), &tcp_sockets(proc_root));
        let want = ConnKey {
            local: client.local_addr().unwrap(),
            remote: listener.local_addr().unwrap(),
        };
        assert!(conns.contains(&want), "{want:?} not in {conns:?}");
    }

    #[test]
    fn sees_connections_in_another_network_namespace_through_a_process_there() {
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "sh", "-c"])
            .arg(
                "ip link set lo up && exec python3 -c 'import socket,sys; \
                 l=socket.socket(); l.bind((\"127.0.0.1\",0)); l.listen(); \
                 c=socket.create_connection(l.getsockname()); s,_=l.accept(); \
                 print(l.getsockname()[1], flush=True); sys.stdin.read()'",
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line.trim().parse().expect("port");
        let proc_root = Path::new("/proc");
        let inside = connections_of(
            proc_root,
            child.id(),
            &tcp_sockets_seen_by(proc_root, [child.id()], &[port]),
        );
        let only_ours = connections_of(proc_root, child.id(), &tcp_sockets(proc_root));
        drop(child.stdin.take());
        let _ = child.wait();
        // Only the accepted side: its local port is the one asked for.
        assert_eq!(inside.len(), 1, "{inside:?}");
        assert_eq!(inside[0].local.port(), port, "{inside:?}");
        assert!(only_ours.is_empty(), "{only_ours:?}");
    }

    #[test]
    fn own_facts_and_ancestry() {
        let f = facts(Path::new("/proc"), std::process::id()).unwrap();
        assert!(f.start_time > 0);
        assert!(f.exe.is_some());
        assert!(f.cgroup.as_deref().is_some_and(|c| c.starts_with('/')));
        let chain = self_and_ancestors(Path::new("/proc"));
        assert_eq!(chain[0], std::process::id());
        assert!(chain.contains(&1) || chain.len() > 1);
    }
}

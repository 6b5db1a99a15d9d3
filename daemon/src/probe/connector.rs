//! The fallback's process events: the kernel's proc connector (netlink, CN_IDX_PROC), which
//! reports every fork and exit without eBPF. It needs the host's network namespace (and
//! CAP_NET_ADMIN before Linux 6.6); it says nothing about sockets (the /proc sweep covers
//! those).
use std::{
    collections::HashSet,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

use super::Received;
use crate::{
    clock,
    event::{ExitStatus, KernelEvent},
};

const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

const NLMSG_HDR: usize = 16;
const CN_MSG_HDR: usize = 20;
/// `struct proc_event`: what, cpu, timestamp_ns, then the per-kind data.
const EV_WHAT: usize = 0;
const EV_TS: usize = 8;
const EV_DATA: usize = 16;

/// A receive buffer larger than the socket default absorbs bursts of exits; beyond it the
/// kernel drops messages and says so with ENOBUFS.
const RCVBUF_BYTES: libc::c_int = 8 << 20;

pub struct ProcConnector {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
    /// Overruns seen (ENOBUFS): each one lost an unknown number of events.
    overruns: u64,
    deaths: GroupDeaths,
}

impl ProcConnector {
    /// Subscribes to process events. Must run inside a tokio runtime.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a valid c_int of the size given.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&RCVBUF_BYTES as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SAFETY: zeroed sockaddr_nl is valid; fields set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: addr is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let msg = listen_message();
        // SAFETY: msg is a valid buffer of its length.
        let sent = unsafe { libc::send(raw, msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd: super::readable(fd)?,
            buf: vec![0; 64 * 1024],
            overruns: 0,
            deaths: GroupDeaths::default(),
        })
    }

    /// Waits for messages, then appends every fork of a process, and the exit of every
    /// process whose last thread has exited, among them to `out`.
    pub async fn read_batch(&mut self, out: &mut Vec<Received>) -> io::Result<usize> {
        let before = out.len();
        let mut guard = self.fd.readable().await?;
        loop {
            let fd = guard.get_inner().as_raw_fd();
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        guard.clear_ready();
                        return Ok(out.len() - before);
                    }
                    Some(libc::ENOBUFS) => self.overruns += 1,
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
                continue;
            }
            let recv_ns = clock::monotonic_ns();
            for event in decode(&self.buf[..n as usize]) {
                if self.deaths.is_death(&event, &out[before..]) {
                    out.push(Received { event, recv_ns });
                }
            }
        }
    }

    /// Times the kernel dropped messages for want of room in the socket buffer.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }
}

fn listen_message() -> Vec<u8> {
    let payload = PROC_CN_MCAST_LISTEN.to_ne_bytes();
    let len = NLMSG_HDR + CN_MSG_HDR + payload.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&std::process::id().to_ne_bytes());
    m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // ack
    m.extend_from_slice(&(payload.len() as u16).to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&payload);
    m
}

/// Tells the exits of whole processes among the connector's thread exits. The connector has
/// no `group_dead`, and it reports every thread's exit after the thread is gone, so the last
/// thread's report finds no thread of its group running in /proc (invariant 9), while a
/// leader that exits first finds its other threads.
#[derive(Debug, Default)]
struct GroupDeaths {
    /// Processes whose leader exited before their other threads: only their threads' exits
    /// can end them, so only those are looked up in /proc (thread churn elsewhere costs none).
    leaders_gone: HashSet<u32>,
}

/// A bound on `leaders_gone`: a death lost in an overrun leaves its entry behind.
const LEADERS_GONE_MAX: usize = 4096;

impl GroupDeaths {
    /// Whether `event` is to be reported: forks always; a thread's exit only when it ended
    /// its process. Several threads that die together may each find the group dead: the
    /// first report in the batch stands.
    fn is_death(&mut self, event: &KernelEvent, batch: &[Received]) -> bool {
        let KernelEvent::Exit { pid, tgid, .. } = event else {
            return true;
        };
        if pid != tgid && !self.leaders_gone.contains(tgid) {
            return false; // the leader runs: a thread came and went
        }
        let proc_root = std::path::Path::new("/proc");
        if crate::gpu::process_alive(proc_root, *tgid) {
            if pid == tgid {
                if self.leaders_gone.len() >= LEADERS_GONE_MAX {
                    self.leaders_gone
                        .retain(|t| crate::gpu::process_alive(proc_root, *t));
                }
                self.leaders_gone.insert(*tgid);
            }
            return false;
        }
        self.leaders_gone.remove(tgid);
        !batch
            .iter()
            .any(|r| matches!(r.event, KernelEvent::Exit { tgid: t, .. } if t == *tgid))
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The events of one datagram (one or more netlink messages). Truncated or unknown messages
/// are skipped: a message we cannot read is one the /proc sweep will make up for.
pub fn decode(datagram: &[u8]) -> Vec<KernelEvent> {
    let mut events = Vec::new();
    let mut rest = datagram;
    while let Some(len) = u32_at(rest, 0) {
        let len = len as usize;
        if len < NLMSG_HDR || len > rest.len() {
            break;
        }
        if let Some(ev) = rest.get(NLMSG_HDR + CN_MSG_HDR..len).and_then(proc_event) {
            events.push(ev);
        }
        // Netlink messages are 4-byte aligned.
        let next = (len + 3) & !3;
        rest = rest.get(next..).unwrap_or_default();
    }
    events
}

fn proc_event(ev: &[u8]) -> Option<KernelEvent> {
    let what = u32_at(ev, EV_WHAT)?;
    let ts_ns = u64_at(ev, EV_TS)?;
    let d = |i: usize| u32_at(ev, EV_DATA + 4 * i);
    match what {
        PROC_EVENT_FORK => {
            // parent_pid, parent_tgid, child_pid, child_tgid
            let (ppid, pid, tgid) = (d(1)?, d(2)?, d(3)?);
            // A new thread is not a new process.
            (pid == tgid).then(|| KernelEvent::Fork {
                ts_ns,
                pid,
                ppid,
                comm: Default::default(),
                parent_start: None,
            })
        }
        PROC_EVENT_EXIT => {
            // process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid.
            // Every thread's exit: which one ended the process is told from /proc (see
            // `GroupDeaths`).
            let (pid, tgid, code) = (d(0)?, d(1)?, d(2)?);
            Some(KernelEvent::Exit {
                ts_ns,
                pid,
                tgid,
                status: ExitStatus::from_raw(code as i32),
                comm: Default::default(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, data: &[u32]) -> Vec<u8> {
        let mut ev = Vec::new();
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&0u32.to_ne_bytes());
        ev.extend_from_slice(&123u64.to_ne_bytes());
        for v in data {
            ev.extend_from_slice(&v.to_ne_bytes());
        }
        let len = NLMSG_HDR + CN_MSG_HDR + ev.len();
        let mut m = vec![0u8; NLMSG_HDR + CN_MSG_HDR];
        m[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ev);
        m
    }

    #[test]
    fn forks_of_processes_and_exits_of_every_thread() {
        let mut d = message(PROC_EVENT_FORK, &[10, 10, 11, 11]);
        d.extend(message(PROC_EVENT_FORK, &[11, 11, 12, 11])); // a thread
        d.extend(message(PROC_EVENT_EXIT, &[12, 11, 0, 17, 10, 10])); // a thread
        d.extend(message(PROC_EVENT_EXIT, &[11, 11, 9, 17, 10, 10])); // SIGKILLed
        let got = decode(&d);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(
            got[0],
            KernelEvent::Fork {
                pid: 11,
                ppid: 10,
                ts_ns: 123,
                ..
            }
        ));
        assert!(matches!(
            got[1],
            KernelEvent::Exit {
                pid: 12,
                tgid: 11,
                ..
            }
        ));
        assert!(matches!(
            got[2],
            KernelEvent::Exit {
                tgid: 11,
                status: ExitStatus::Signal(9),
                ..
            }
        ));
    }

    #[test]
    fn an_exit_counts_once_no_thread_of_its_process_runs() {
        let exit = |pid, tgid| KernelEvent::Exit {
            ts_ns: 1,
            pid,
            tgid,
            status: ExitStatus::Code(0),
            comm: Default::default(),
        };
        let mut deaths = GroupDeaths::default();
        let me = std::process::id();
        // This process runs: neither its leader's nor a thread's exit is its death.
        assert!(!deaths.is_death(&exit(me, me), &[]));
        assert!(
            deaths.leaders_gone.contains(&me),
            "watched for its last thread"
        );
        assert!(!deaths.is_death(&exit(me + 1, me), &[]));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let gone = child.id();
        child.wait().expect("wait");
        // A thread of a process whose leader was never seen exiting: not looked at.
        assert!(!deaths.is_death(&exit(gone + 1, gone), &[]));
        assert!(deaths.is_death(&exit(gone, gone), &[]));
        let first = Received {
            event: exit(gone, gone),
            recv_ns: 2,
        };
        assert!(
            !deaths.is_death(&exit(gone, gone), &[first]),
            "reported twice"
        );
    }

    #[test]
    fn truncated_and_unknown_messages_are_skipped() {
        let mut d = message(0x2, &[1, 1]); // exec
        d.extend(message(PROC_EVENT_EXIT, &[5, 5, 0x100, 17, 1, 1]));
        let whole = decode(&d);
        assert!(matches!(
            whole[..],
            [KernelEvent::Exit {
                tgid: 5,
                status: ExitStatus::Code(1),
                ..
            }]
        ));
        for cut in 0..d.len() {
            assert!(decode(&d[..cut]).len() <= 1);
        }
        assert!(decode(&[0xff; 3]).is_empty());
        assert!(decode(&1u32.to_ne_bytes()).is_empty());
    }

    #[test]
    fn sees_a_real_exit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let Ok(mut c) = ProcConnector::open() else {
                // Not the host's network namespace (or, before Linux 6.6, no
                // CAP_NET_ADMIN): the daemon then falls back to the sweep alone.
                assert_ne!(unsafe { libc::geteuid() }, 0, "root must get the connector");
                return;
            };
            let mut child = std::process::Command::new("true").spawn().expect("spawn");
            let pid = child.id();
            child.wait().expect("wait");
            let mut out = Vec::new();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while !out.iter().any(
                |r: &Received| matches!(r.event, KernelEvent::Exit { tgid, .. } if tgid == pid),
            ) {
                tokio::time::timeout_at(deadline, c.read_batch(&mut out))
                    .await
                    .expect("the exit within 10 s")
                    .expect("read");
            }
            assert!(
                out.iter()
                    .any(|r| matches!(r.event, KernelEvent::Fork { pid: p, .. } if p == pid))
            );
        });
    }
}

//! Types shared by reclaimd's eBPF programs and its daemon.
//!
//! Everything here is `repr(C)` and plain old data: the kernel writes it, user space reads it
//! back from the ring buffer byte for byte. Any change to a layout is a change to both sides,
//! which is why the two sides share this one definition.
#![no_std]

/// Length of `task_struct.comm`, NUL included.
pub const COMM_LEN: usize = 16;

/// Names of the maps and globals, so the loader and the programs cannot drift apart.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const DROPS: &str = "DROPS";
    pub const WATCHED_PORTS: &str = "WATCHED_PORTS";
    pub const SOCKS: &str = "SOCKS";
    pub const EXITED: &str = "EXITED";
    /// Sockets bound to GPU holders (by `struct sock` address): their deaths wake user
    /// space at once. Filled by user space after each snapshot.
    pub const BOUND: &str = "BOUND";
    /// One word: non-zero while the daemon's reader waits without a timer (it found the
    /// ring empty), so that batched events wake it too. Written by user space only.
    pub const READER: &str = "READER";
    /// One word the I/O programs' per-CPU memory of sockets is valid under; user space
    /// bumps it when it watches another port (a socket remembered as unwatched may be on it).
    pub const IO_EPOCH: &str = "IO_EPOCH";
    /// A global (`.rodata`), not a map.
    pub const OFFSETS: &str = "OFFSETS";
    /// A global (`.rodata`), not a map.
    pub const SETTINGS: &str = "SETTINGS";
}

/// The watched local ports as a bitmap: `WATCHED_PORTS` is an array of [`ports::WORDS`]
/// `u64` words, bit `port % 64` of word `port / 64`. An array lookup is inlined by the
/// verifier, where a hash lookup hashes the key: the filter runs on every TCP state change
/// of the host.
pub mod ports {
    /// Words in the bitmap: one bit for each of the 65536 ports.
    pub const WORDS: u32 = 65536 / 64;

    /// The word that holds `port`'s bit, and the bit.
    pub const fn slot(port: u16) -> (u32, u64) {
        ((port / 64) as u32, 1 << (port % 64))
    }
}

/// What an [`Event`] reports; the discriminant travels as `Event::kind`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A new process (thread-group leader) was created.
    Fork = 1,
    /// The last thread of a process exited: the process is dead.
    Exit = 2,
    /// A socket on a watched local port changed TCP state.
    Tcp = 3,
    /// The process owning a watched socket became known (accept, send, recv).
    Owner = 4,
}

impl EventKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Fork),
            2 => Some(Self::Exit),
            3 => Some(Self::Tcp),
            4 => Some(Self::Owner),
            _ => None,
        }
    }
}

/// How the owner of a socket was learned (`Event::detail` for `Owner` events).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerSource {
    /// `accept`/`accept4` returned the socket to this process.
    Accept = 1,
    /// The process sent or received on the socket.
    Io = 2,
}

impl OwnerSource {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Accept),
            2 => Some(Self::Io),
            _ => None,
        }
    }
}

/// One kernel event. A single fixed layout for every kind keeps the ring-buffer reader
/// trivial; fields a kind does not use are zero.
///
/// * `Fork`: `pid`/`tgid` the child, `ppid` the parent process, `comm` the parent's command
///   (of the thread that forked), `start_ns` when the parent process started (its leader's
///   `start_boottime`, ns since boot, as `/proc/PID/stat` derives its start time; 0 when
///   unknown).
/// * `Exit`: `pid` the last exiting thread, `tgid` the process, `exit_code` the raw wait
///   status (`code << 8`, or the signal number), `comm` the command.
/// * `Tcp`: `sock` the kernel socket (stable session key), ports and addresses local (`s*`)
///   and remote (`d*`), `old_state`/`new_state` TCP states, `owner_tgid` the owning process
///   when known (0 otherwise), `comm` the owner's command when known.
/// * `Owner`: `sock`, ports and addresses as for `Tcp`, `owner_tgid` the new owner,
///   `detail` an [`OwnerSource`], `exit_code` the accepted fd for `Accept`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC in nanoseconds.
    pub ts_ns: u64,
    pub sock: u64,
    pub pid: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub owner_tgid: u32,
    pub exit_code: i32,
    pub sport: u16,
    pub dport: u16,
    pub kind: u8,
    /// `AF_INET` (2) or `AF_INET6` (10) for socket events.
    pub family: u8,
    pub old_state: u8,
    pub new_state: u8,
    pub detail: u8,
    pub _pad: [u8; 3],
    pub start_ns: u64,
    /// IPv4 addresses use the first four bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; COMM_LEN],
}

impl Event {
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            sock: 0,
            pid: 0,
            tgid: 0,
            ppid: 0,
            owner_tgid: 0,
            exit_code: 0,
            sport: 0,
            dport: 0,
            kind: 0,
            family: 0,
            old_state: 0,
            new_state: 0,
            detail: 0,
            _pad: [0; 3],
            start_ns: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; COMM_LEN],
        }
    }
}

/// What the programs remember about a watched socket, keyed by the `struct sock` address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockInfo {
    pub owner_tgid: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub state: u8,
    /// Non-zero while the socket's birth (a listener's child established in softirq, no
    /// owner known) waits to be reported with its owner, or with its death.
    pub birth_pending: u8,
    pub _pad: [u8; 5],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub owner_comm: [u8; COMM_LEN],
    /// When it became ESTABLISHED (`bpf_ktime_get_ns`), the time its birth record carries.
    pub born_ns: u64,
}

impl SockInfo {
    pub const fn zeroed() -> Self {
        Self {
            owner_tgid: 0,
            sport: 0,
            dport: 0,
            family: 0,
            state: 0,
            birth_pending: 0,
            _pad: [0; 5],
            saddr: [0; 16],
            daddr: [0; 16],
            owner_comm: [0; COMM_LEN],
            born_ns: 0,
        }
    }
}

/// Kernel structure offsets the programs need, read by user space from the kernel's BTF
/// (`/sys/kernel/btf/vmlinux`) and written into the programs' read-only global `OFFSETS`
/// before they load, so the verifier sees constants and the programs stay portable across
/// kernel builds without CO-RE.
///
/// `valid` is 0 unless user space filled the global; the programs then report what they can
/// without reading kernel memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub valid: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_exit_code: u32,
    pub task_real_parent: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub task_signal: u32,
    /// `signal_struct.live`: the thread group's running threads.
    pub signal_live: u32,
    pub task_group_leader: u32,
    pub task_start_time: u32,
    /// `task_struct.start_boottime`, what `/proc/PID/stat` derives a start time from. 0:
    /// unknown.
    pub task_start_boottime: u32,
    /// How the exit program tells a process's death from a thread's: an [`exit_filter`]
    /// value. `NONE` keeps the program silent.
    pub exit_filter: u32,
    /// Offset of `group_dead` in the `sched_process_exit` record (Linux >= 6.16), for
    /// `exit_filter::GROUP_DEAD`.
    pub exit_group_dead: u32,
    /// Offset of `sock.sk_err`, read when a socket enters CLOSE: ETIMEDOUT there means the
    /// kernel gave up on a peer that stopped answering (keepalive or user timeout). 0: unknown.
    pub sock_sk_err: u32,
    /// Offset of `sock.__sk_common.skc_num`, the local port: the I/O programs skip sockets
    /// on unwatched ports with it before their map lookup. 0: unknown (every TCP socket's
    /// I/O is looked up).
    pub sock_num: u32,
}

/// How the exit program knows that the exiting thread was its process's last
/// (`KernelOffsets::exit_filter`). A thread-group leader may exit before its other threads:
/// its exit is not the process's (DESIGN invariant 9).
pub mod exit_filter {
    /// Not known: no exit is reported.
    pub const NONE: u32 = 0;
    /// The tracepoint's own `group_dead` field (Linux >= 6.16).
    pub const GROUP_DEAD: u32 = 1;
    /// `task->signal->live`, which `do_exit` has decremented when the tracepoint fires:
    /// zero means no thread of the group runs any more (every kernel).
    pub const SIGNAL_LIVE: u32 = 2;
}

/// Field offsets in tracepoint records the programs read at fixed places; user space checks
/// each against the running kernel's `format` file before loading the program that reads it.
pub mod layout {
    /// `sock/inet_sock_set_state`, stable since Linux 4.16.
    pub mod set_state {
        pub const SKADDR: u32 = 8;
        pub const OLDSTATE: u32 = 16;
        pub const NEWSTATE: u32 = 20;
        pub const SPORT: u32 = 24;
        pub const DPORT: u32 = 26;
        pub const FAMILY: u32 = 28;
        pub const PROTOCOL: u32 = 30;
        pub const SADDR: u32 = 32;
        pub const DADDR: u32 = 36;
        pub const SADDR_V6: u32 = 40;
        pub const DADDR_V6: u32 = 56;

        /// Every field, by its name in the format file.
        pub const FIELDS: [(&str, u32); 11] = [
            ("skaddr", SKADDR),
            ("oldstate", OLDSTATE),
            ("newstate", NEWSTATE),
            ("sport", SPORT),
            ("dport", DPORT),
            ("family", FAMILY),
            ("protocol", PROTOCOL),
            ("saddr", SADDR),
            ("daddr", DADDR),
            ("saddr_v6", SADDR_V6),
            ("daddr_v6", DADDR_V6),
        ];
    }

    /// `sk` in `sock/sock_{send,recv}_length` (Linux >= 6.3).
    pub const SOCK_LENGTH_SK: u32 = 8;
    /// `protocol` in `sock/sock_{send,recv}_length`.
    pub const SOCK_LENGTH_PROTOCOL: u32 = 18;
    /// `ret` in `syscalls/sys_exit_*`.
    pub const SYS_EXIT_RET: u32 = 16;
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// The kernel's name for a state, as `ss` and tcplife print it.
    pub const fn name(state: u8) -> &'static str {
        super::TcpState::from_raw(state).name()
    }

    /// Whether a change from `old` to `new` starts a socket's life: `connect` (SYN_SENT),
    /// `listen` (LISTEN), or a listener's new child (its copy of LISTEN to SYN_RECV; a
    /// simultaneous open enters SYN_RECV from SYN_SENT, the same life).
    pub const fn starts_a_life(old: u8, new: u8) -> bool {
        matches!((old, new), (_, SYN_SENT | LISTEN) | (LISTEN, SYN_RECV))
    }

    /// States entered only through the owning process's own syscalls, so the current task
    /// in the tracepoint is the owner (connect, listen, close/shutdown).
    pub const fn entered_by_owner(state: u8) -> bool {
        matches!(state, SYN_SENT | LISTEN | FIN_WAIT1 | LAST_ACK)
    }
}

/// A TCP state as user space handles it. `Other` keeps a number this list does not know (a
/// newer kernel's), so nothing read from the kernel is lost or misnamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Other(u8),
}

/// A state equals the kernel's number for it (what raw records and `/proc/net/tcp` hold).
impl PartialEq<u8> for TcpState {
    fn eq(&self, other: &u8) -> bool {
        self.raw() == *other
    }
}

impl TcpState {
    pub const fn from_raw(state: u8) -> Self {
        use tcp_state::*;
        match state {
            ESTABLISHED => Self::Established,
            SYN_SENT => Self::SynSent,
            SYN_RECV => Self::SynRecv,
            FIN_WAIT1 => Self::FinWait1,
            FIN_WAIT2 => Self::FinWait2,
            TIME_WAIT => Self::TimeWait,
            CLOSE => Self::Close,
            CLOSE_WAIT => Self::CloseWait,
            LAST_ACK => Self::LastAck,
            LISTEN => Self::Listen,
            CLOSING => Self::Closing,
            NEW_SYN_RECV => Self::NewSynRecv,
            n => Self::Other(n),
        }
    }

    /// The kernel's number for the state.
    pub const fn raw(self) -> u8 {
        use tcp_state::*;
        match self {
            Self::Established => ESTABLISHED,
            Self::SynSent => SYN_SENT,
            Self::SynRecv => SYN_RECV,
            Self::FinWait1 => FIN_WAIT1,
            Self::FinWait2 => FIN_WAIT2,
            Self::TimeWait => TIME_WAIT,
            Self::Close => CLOSE,
            Self::CloseWait => CLOSE_WAIT,
            Self::LastAck => LAST_ACK,
            Self::Listen => LISTEN,
            Self::Closing => CLOSING,
            Self::NewSynRecv => NEW_SYN_RECV,
            Self::Other(n) => n,
        }
    }

    /// The kernel's name, as `ss` and tcplife print it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
            Self::Other(_) => "UNKNOWN",
        }
    }

    /// Whether a connection in this state is a live session (open, or being opened).
    pub const fn is_open(self) -> bool {
        matches!(self, Self::Established | Self::SynRecv)
    }
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_TCP: u16 = 6;

impl KernelOffsets {
    pub const fn zeroed() -> Self {
        Self {
            valid: 0,
            task_pid: 0,
            task_tgid: 0,
            task_exit_code: 0,
            task_real_parent: 0,
            task_files: 0,
            files_fdt: 0,
            fdtable_max_fds: 0,
            fdtable_fd: 0,
            file_private_data: 0,
            socket_sk: 0,
            task_signal: 0,
            signal_live: 0,
            task_group_leader: 0,
            task_start_time: 0,
            task_start_boottime: 0,
            exit_filter: exit_filter::NONE,
            exit_group_dead: 0,
            sock_sk_err: 0,
            sock_num: 0,
        }
    }
}

/// How much the programs report (`ProbeSettings::report`).
pub mod report {
    /// What a connection's life needs: its birth (ESTABLISHED), its owner, its death (the
    /// first move out of an open state); later closing moves stay in the kernel. Only
    /// forks, exits and the deaths of connections in `BOUND` wake user space; the rest is
    /// read in batches (or when the ring fills up). The daemon's mode, and the default.
    pub const LIFECYCLE: u32 = 0;
    /// Every state change of a watched socket, each waking its reader (`reclaimd trace`).
    pub const EVERY_CHANGE: u32 = 1;
}

/// What user space tells the programs before they load (the read-only global `SETTINGS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeSettings {
    /// A [`report`] value.
    pub report: u32,
    pub _pad: u32,
}

impl ProbeSettings {
    pub const fn zeroed() -> Self {
        Self {
            report: report::LIFECYCLE,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain repr(C) struct of integers with no implicit padding.
    unsafe impl aya::Pod for super::ProbeSettings {}
    // SAFETY: plain repr(C) structs of integers and byte arrays with no implicit padding.
    unsafe impl aya::Pod for super::SockInfo {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}

// Layouts are ABI between kernel and user space: catch accidental changes at compile time.
const _: () = assert!(core::mem::size_of::<Event>() == 104);
const _: () = assert!(core::mem::size_of::<SockInfo>() == 72);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 80);

#[cfg(test)]
mod tests {
    use super::{ports, tcp_state::*};

    #[test]
    fn a_life_starts_at_connect_listen_and_a_listeners_child_only() {
        assert!(starts_a_life(CLOSE, SYN_SENT));
        assert!(starts_a_life(CLOSE, LISTEN));
        assert!(starts_a_life(LISTEN, SYN_RECV));
        // A simultaneous open: the connecting socket's life (and owner) goes on.
        assert!(!starts_a_life(SYN_SENT, SYN_RECV));
        for (old, new) in [
            (SYN_RECV, ESTABLISHED),
            (SYN_SENT, ESTABLISHED),
            (ESTABLISHED, FIN_WAIT1),
            (ESTABLISHED, CLOSE_WAIT),
            (FIN_WAIT2, CLOSE),
            (LISTEN, CLOSE),
        ] {
            assert!(!starts_a_life(old, new), "{old} -> {new}");
        }
    }

    #[test]
    fn every_port_has_its_own_bit_inside_the_bitmap() {
        assert_eq!(ports::slot(0), (0, 1));
        assert_eq!(ports::slot(63), (0, 1 << 63));
        assert_eq!(ports::slot(64), (1, 1));
        assert_eq!(ports::slot(u16::MAX), (ports::WORDS - 1, 1 << 63));
        let mut seen = [0u64; ports::WORDS as usize];
        for port in 0..=u16::MAX {
            let (word, bit) = ports::slot(port);
            assert_eq!(bit.count_ones(), 1);
            assert_eq!(seen[word as usize] & bit, 0, "port {port} shares a bit");
            seen[word as usize] |= bit;
        }
        assert!(seen.iter().all(|w| *w == u64::MAX));
    }
}

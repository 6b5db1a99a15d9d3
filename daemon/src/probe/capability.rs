//! What the kernel side can see, one capability per kind of event, and where each one's
//! events come from. A kernel that lacks a tracepoint (or a field, or a structure member)
//! narrows the capability that needs it, and only that one: the daemon makes up for it from
//! the proc connector, the /proc sweep or the snapshot's fd reading, and says so (DESIGN
//! invariant 10).

/// A kind of kernel event reclaimd acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// Process deaths (`sched/sched_process_exit`).
    Exit,
    /// New processes and their parents (raw `sched_process_fork`).
    Fork,
    /// TCP state changes of sockets on service ports (`sock/inet_sock_set_state`).
    Tcp,
    /// A socket's owner, learned when `accept`/`accept4` returns it (`syscalls/sys_exit_accept*`).
    OwnerAccept,
    /// A socket's owner, learned from who sends or receives on it
    /// (`sock/sock_{send,recv}_length`, Linux >= 6.3).
    OwnerIo,
}

impl Capability {
    pub const ALL: [Self; 5] = [
        Self::Exit,
        Self::Fork,
        Self::Tcp,
        Self::OwnerAccept,
        Self::OwnerIo,
    ];

    /// As status, metrics and `reclaimd trace` name it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Exit => "exit",
            Self::Fork => "fork",
            Self::Tcp => "tcp",
            Self::OwnerAccept => "owner:accept",
            Self::OwnerIo => "owner:io",
        }
    }

    /// Where its events come from when its programs are not in the kernel.
    pub const fn fallback(self, connector: bool) -> Source {
        match self {
            Self::Exit | Self::Fork if connector => Source::ProcConnector,
            Self::Exit | Self::Fork | Self::Tcp => Source::ProcSweep,
            // The snapshot reads every holder's fds and joins them to the socket tables.
            Self::OwnerAccept | Self::OwnerIo => Source::Snapshot,
        }
    }
}

/// Where a capability's events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Programs in the kernel: at once.
    Ebpf,
    /// The kernel's proc connector (netlink): at once, processes only.
    ProcConnector,
    /// The periodic /proc sweep (`[probe] fallback_sweep`): within a sweep.
    ProcSweep,
    /// The fds each snapshot reads from /proc for every holder.
    Snapshot,
}

impl Source {
    pub const ALL: [Self; 4] = [
        Self::Ebpf,
        Self::ProcConnector,
        Self::ProcSweep,
        Self::Snapshot,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::ProcConnector => "proc-connector",
            Self::ProcSweep => "proc-sweep",
            Self::Snapshot => "snapshot",
        }
    }
}

/// One capability as the daemon runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityStatus {
    pub capability: Capability,
    pub source: Source,
    /// With eBPF, how (the exit filter in use); otherwise why not, in a sentence.
    pub detail: String,
}

impl CapabilityStatus {
    /// One line for people: `exit (ebpf: signal->live)`.
    pub fn describe(&self) -> String {
        if self.detail.is_empty() {
            format!("{} ({})", self.capability.name(), self.source.name())
        } else {
            format!(
                "{} ({}: {})",
                self.capability.name(),
                self.source.name(),
                self.detail
            )
        }
    }
}

/// How the exit program tells a process's death from a thread's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ExitFilter {
    /// `group_dead` where the tracepoint has it (Linux >= 6.16), else `signal->live`.
    #[default]
    Auto,
    /// The tracepoint's `group_dead` field only.
    GroupDead,
    /// `task->signal->live` from the kernel's BTF, as on kernels before 6.16.
    SignalLive,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_fallbacks_never_ebpf() {
        let names: std::collections::HashSet<_> =
            Capability::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Capability::ALL.len());
        for c in Capability::ALL {
            for connector in [false, true] {
                assert_ne!(c.fallback(connector), Source::Ebpf);
            }
        }
        assert_eq!(Capability::Exit.fallback(true), Source::ProcConnector);
        assert_eq!(Capability::Tcp.fallback(true), Source::ProcSweep);
        assert_eq!(Capability::OwnerIo.fallback(false), Source::Snapshot);
    }
}

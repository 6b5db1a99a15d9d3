//! The one owner of the process tree and the session table: pure state transitions fed by
//! kernel events and /proc scans, no I/O. Times are CLOCK_MONOTONIC nanoseconds, the clock
//! of the kernel's event timestamps.
//!
//! Sessions (DESIGN.md): a *process* session is a service's process tree, dead when its root
//! exits; a *connection* session is one TCP connection into a service port, dead when the
//! peer closes it. A holder is bound to the process session of its nearest service root
//! (pinned when first seen, so reparenting after the root's death changes nothing) and, for
//! connection-scoped services, to the connections whose sockets it holds.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use reclaimd_common::TcpState;
use serde::Serialize;

use crate::{
    config::{MatchKind, Scope, Service},
    conn_tally::ConnTally,
    event::{ExitStatus, KernelEvent},
};

pub type Ns = u64;

pub use crate::ids::{ConnKey, ProcId, SessionKey, SessionKind};

/// What /proc says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcFacts {
    pub pid: u32,
    pub ppid: u32,
    pub start_time: u64,
    pub comm: String,
    pub exe: Option<PathBuf>,
    pub cgroup: Option<String>,
    /// The command line, arguments joined by spaces (empty for kernel threads).
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone)]
struct Proc {
    start_time: Option<u64>,
    /// The parent at fork (or at first sight): kept when the kernel reparents the process,
    /// because the lineage is what binds a worker to the server that spawned it.
    ppid: u32,
    comm: String,
    exe: Option<PathBuf>,
    cgroup: Option<String>,
    cmdline: Option<String>,
    /// When this record was created: a /proc scan that started earlier cannot vouch for it.
    since: Ns,
    exited: Option<Exited>,
}

#[derive(Debug, Clone, Copy)]
struct Exited {
    at: Ns,
    /// `None` when the process was found missing rather than seen exiting.
    status: Option<ExitStatus>,
}

/// Why and when a session died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Death {
    pub at: Ns,
    pub cause: String,
}

/// A TCP socket as `/proc/net/tcp{,6}` lists it: its connection and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub key: ConnKey,
    pub state: TcpState,
}

#[derive(Debug, Clone, Serialize)]
pub struct Conn {
    pub key: ConnKey,
    pub sock: u64,
    pub service: String,
    pub opened_at: Ns,
    pub owner_tgid: u32,
    pub death: Option<Death>,
}

impl Conn {
    /// Records the connection's death, counted in `tally`, unless it died already (a later
    /// closing move is no second death). Every death goes through here, so the tally the
    /// gauges and pruning read cannot miss one. Returns whether this was its death.
    fn die(&mut self, tally: &mut ConnTally, at: Ns, cause: impl FnOnce() -> String) -> bool {
        if self.death.is_some() {
            return false;
        }
        tally.died(&self.service);
        self.death = Some(Death { at, cause: cause() });
        true
    }
}

/// A holder's process-session binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Binding {
    pub service: String,
    pub root: ProcId,
    /// What made the holder the service's; `None` for a binding remembered by a ledger
    /// written before reclaimd recorded it.
    pub matched: Option<Matched>,
}

/// Why a process is a service's: the nearest process (itself or an ancestor) that one of
/// the service's matchers recognised, and which matcher did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub pid: u32,
    pub by: MatchKind,
}

/// A process's service, the root of its process session, and why it is the service's.
#[derive(Debug, Clone, Copy)]
pub struct Membership<'a> {
    pub service: &'a Service,
    pub root: ProcId,
    pub matched: Matched,
}

/// A session a holder is bound to, and whether it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BoundSession {
    pub kind: SessionKind,
    pub key: SessionKey,
    pub death: Option<Death>,
    /// When the session was first seen (CLOCK_MONOTONIC ns), if known.
    pub seen: Option<Ns>,
}

fn death_of(e: Exited) -> Death {
    Death {
        at: e.at,
        cause: match e.status {
            None => "gone (missing from /proc)".to_owned(),
            Some(ExitStatus::Code(c)) => format!("exited with code {c}"),
            Some(ExitStatus::Signal(s)) => format!("killed by signal {s}"),
        },
    }
}

/// A session as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub kind: SessionKind,
    pub key: SessionKey,
    pub service: String,
    pub death: Option<Death>,
    /// The process session's root, or the connection's owner (0 until known).
    pub pid: u32,
}

/// Dead sessions are kept this long after their death, then dropped (invariant 5).
pub const RETENTION: Ns = 120 * 1_000_000_000;

/// A map the kernel's events reach several times each: hashed with foldhash (hashbrown's
/// own default), not std's SipHash, which was a tenth of the daemon's time under connection
/// churn. The keys are pids, socket addresses and 4-tuples the kernel reports, and foldhash
/// is seeded per process.
type EventMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug)]
pub struct Model {
    services: Vec<Service>,
    procs: EventMap<u32, Proc>,
    conns: EventMap<ConnKey, Conn>,
    /// How many of `conns` each service has, live and dead.
    conn_tally: ConnTally,
    /// Sockets of watched connections → their key, for transitions that carry only the sock.
    socks: EventMap<u64, ConnKey>,
    pins: HashMap<ProcId, Binding>,
    /// Roots found gone without an exit event (e.g. died while reclaimd was down).
    noticed_dead: HashMap<ProcId, Ns>,
    /// Holders outside every service seen reparented: how their original parent died.
    reparented: HashMap<ProcId, Death>,
    /// Pins made since the last `take_new_pins`, for the ledger.
    new_pins: Vec<(ProcId, Binding)>,
}

/// A TCP state change as the model needs it.
struct Change {
    old: TcpState,
    new: TcpState,
    owner: u32,
    /// `sk_err` on entering CLOSE.
    error: i32,
}

/// Why a connection ended. `heartbeat`: reclaimd arms keepalive probes on the service's
/// connections, so a timeout there is the heartbeat's verdict on a vanished peer.
fn close_cause(new: TcpState, error: i32, heartbeat: bool) -> String {
    match new {
        TcpState::CloseWait => "peer closed (CLOSE_WAIT)".to_owned(),
        // tcp_write_err reports the last ICMP error seen instead of ETIMEDOUT where there
        // was one: a timeout all the same.
        TcpState::Close => match timeout_name(error) {
            Some(e) if heartbeat => format!("heartbeat: the peer stopped answering ({e})"),
            Some(e) => format!("peer timed out ({e})"),
            None if error == libc::ECONNRESET => "reset by peer (CLOSE)".to_owned(),
            None => "reset or closed (CLOSE)".to_owned(),
        },
        s => format!("closed locally ({})", s.name()),
    }
}

/// The errno's name when it says the kernel gave up on the peer.
fn timeout_name(error: i32) -> Option<&'static str> {
    match error {
        libc::ETIMEDOUT => Some("ETIMEDOUT"),
        libc::EHOSTUNREACH => Some("EHOSTUNREACH"),
        libc::ENETUNREACH => Some("ENETUNREACH"),
        _ => None,
    }
}

/// The service a port belongs to, for connection-scoped services.
fn service_of_port(services: &[Service], port: u16) -> Option<&Service> {
    services
        .iter()
        .find(|s| s.scope == Scope::Connection && s.ports.contains(&port))
}

/// Which of a service's matchers recognises a process directly (the first that does, in
/// the order of [`MatchKind`]); `None` when none does.
pub fn matches(
    s: &Service,
    comm: &str,
    exe: Option<&std::path::Path>,
    cgroup: Option<&str>,
    cmdline: Option<&str>,
) -> Option<MatchKind> {
    let m = &s.matcher;
    // Cheapest first: the regex last.
    if m.comm.iter().any(|c| c == comm) {
        return Some(MatchKind::Comm);
    }
    if m.exe
        .as_ref()
        .zip(exe)
        .is_some_and(|(p, e)| p.matches_path(e))
    {
        return Some(MatchKind::Exe);
    }
    if m.cgroup
        .as_ref()
        .zip(cgroup)
        .is_some_and(|(p, cg)| in_cgroup(p, cg))
    {
        return Some(MatchKind::Cgroup);
    }
    if m.unit
        .as_ref()
        .zip(cgroup)
        .is_some_and(|(u, cg)| in_unit(u, cg))
    {
        return Some(MatchKind::Unit);
    }
    let by_cmdline = m.cmdline.as_ref().zip(cmdline);
    by_cmdline
        .is_some_and(|(re, line)| re.0.is_match(line))
        .then_some(MatchKind::Cmdline)
}

/// Whether cgroup `cg` is `prefix` or lies below it.
fn in_cgroup(prefix: &str, cg: &str) -> bool {
    cg == prefix || cg.starts_with(&format!("{}/", prefix.trim_end_matches('/')))
}

/// Whether cgroup `cg` is (or lies in) the systemd unit `unit` (`NAME` means `NAME.service`).
fn in_unit(unit: &str, cg: &str) -> bool {
    let want = if unit.contains('.') {
        unit.to_owned()
    } else {
        format!("{unit}.service")
    };
    cg.split('/').any(|part| part == want)
}

impl Model {
    pub fn new(services: Vec<Service>) -> Self {
        Self {
            services,
            procs: EventMap::default(),
            conns: EventMap::default(),
            conn_tally: ConnTally::default(),
            socks: EventMap::default(),
            pins: HashMap::new(),
            noticed_dead: HashMap::new(),
            reparented: HashMap::new(),
            new_pins: Vec::new(),
        }
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    pub fn process_count(&self) -> usize {
        self.procs.len()
    }

    /// Whether the kernel said this very process exited (its files may still be open: the
    /// exit tracepoint fires before they close).
    pub fn has_exited(&self, id: ProcId) -> bool {
        self.procs
            .get(&id.pid)
            .is_some_and(|p| p.exited.is_some() && p.start_time == Some(id.start_time))
    }

    /// Every session in the table: service roots (a process in a service whose parent is
    /// not in the same service) and connections on service ports.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .process_sessions()
            .map(|(pid, start_time, p, service)| SessionInfo {
                kind: SessionKind::Process,
                key: SessionKey::Process(ProcId { pid, start_time }),
                service: service.name.clone(),
                death: p.exited.map(death_of),
                pid,
            })
            .collect();
        out.extend(self.conns.values().map(|c| SessionInfo {
            kind: SessionKind::Connection,
            key: SessionKey::Connection(c.key.clone()),
            service: c.service.clone(),
            death: c.death.clone(),
            pid: c.owner_tgid,
        }));
        // The order the API has always listed them in: by the keys as written.
        out.sort_by_cached_key(|s| s.key.to_string());
        out
    }

    /// How many sessions there are per kind, service and whether they died (`true`): the
    /// listing's tally, without building it (it runs after every snapshot, over every
    /// connection).
    pub fn session_tally(&self) -> Vec<((SessionKind, &str, bool), u64)> {
        // A handful of services: a linear search beats hashing a key per session.
        fn count<'a>(
            tally: &mut Vec<((SessionKind, &'a str, bool), u64)>,
            key: (SessionKind, &'a str, bool),
        ) {
            match tally.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => tally.push((key, 1)),
            }
        }
        let mut tally = Vec::new();
        for (_, _, p, service) in self.process_sessions() {
            let key = (
                SessionKind::Process,
                service.name.as_str(),
                p.exited.is_some(),
            );
            count(&mut tally, key);
        }
        tally.extend(
            self.conn_tally
                .iter()
                .map(|(service, dead, n)| ((SessionKind::Connection, service, dead), n)),
        );
        tally
    }

    /// The roots of process sessions: service members whose parent is not a member of the
    /// same service (pid, start time, the process, its service).
    fn process_sessions(&self) -> impl Iterator<Item = (u32, u64, &Proc, &Service)> {
        self.procs.iter().filter_map(|(pid, p)| {
            let start_time = p.start_time?;
            let (service, _) = self.direct_service(*pid)?;
            let parent_same = self
                .direct_service(p.ppid)
                .is_some_and(|(parent, _)| parent.name == service.name);
            (!parent_same).then_some((*pid, start_time, p, service))
        })
    }

    /// Table sizes (processes, connections, pinned holders), for logs and memory checks.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.procs.len(), self.conns.len(), self.pins.len())
    }

    pub fn conn(&self, key: &ConnKey) -> Option<&Conn> {
        self.conns.get(key)
    }

    pub fn conns(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    pub fn pins(&self) -> impl Iterator<Item = (&ProcId, &Binding)> {
        self.pins.iter()
    }

    /// Feeds one kernel event. Returns true when a session may have died (worth a
    /// reconciliation soon).
    pub fn apply(&mut self, ev: &KernelEvent) -> bool {
        match ev {
            KernelEvent::Fork {
                pid,
                ppid,
                comm,
                parent_start,
                ts_ns,
            } => {
                self.learn_parent(*ppid, comm, *parent_start, *ts_ns);
                // A child starts as a copy of its parent: same executable and cgroup.
                let parent = self.procs.get(ppid).cloned();
                self.procs.insert(
                    *pid,
                    Proc {
                        start_time: None,
                        ppid: *ppid,
                        comm: comm.to_string(),
                        exe: parent.as_ref().and_then(|p| p.exe.clone()),
                        cgroup: parent.as_ref().and_then(|p| p.cgroup.clone()),
                        cmdline: parent.and_then(|p| p.cmdline),
                        since: *ts_ns,
                        exited: None,
                    },
                );
                false
            }
            KernelEvent::Exit {
                tgid,
                status,
                ts_ns,
                ..
            } => {
                // Only deaths that can end a session are worth a reconciliation.
                let relevant = self.pins.values().any(|b| b.root.pid == *tgid)
                    || self.service_root(*tgid).is_some();
                match self.procs.get_mut(tgid) {
                    // One death per process: a second report (threads dying together, the
                    // connector and the sweep both) changes nothing.
                    Some(p) if p.exited.is_none() => {
                        p.exited = Some(Exited {
                            at: *ts_ns,
                            status: Some(*status),
                        });
                        relevant
                    }
                    _ => false,
                }
            }
            KernelEvent::Tcp {
                ts_ns,
                socket,
                old_state,
                new_state,
                owner_tgid,
                error,
                ..
            } => self.apply_tcp(
                *ts_ns,
                socket.sock,
                socket.conn_key(),
                Change {
                    old: *old_state,
                    new: *new_state,
                    owner: *owner_tgid,
                    error: *error,
                },
            ),
            KernelEvent::Owner { socket, tgid, .. } => {
                if let Some(key) = self.socks.get(&socket.sock)
                    && let Some(c) = self.conns.get_mut(key)
                {
                    c.owner_tgid = *tgid;
                }
                false
            }
        }
    }

    fn apply_tcp(&mut self, ts: Ns, sock: u64, key: ConnKey, change: Change) -> bool {
        let Change {
            old,
            new,
            owner,
            error,
        } = change;
        let Some(service) = service_of_port(&self.services, key.local.port()) else {
            return false;
        };
        if new == TcpState::Listen || old == TcpState::Listen {
            return false; // the listener, or a half-open request: not a session yet
        }
        let heartbeat = service.heartbeat.is_some();
        // The service's name is copied only for a new connection: most changes are of one
        // already known.
        let conn = self.conns.entry(key.clone()).or_insert_with(|| {
            self.conn_tally.entered(&service.name);
            Conn {
                key: key.clone(),
                sock,
                service: service.name.clone(),
                opened_at: ts,
                owner_tgid: owner,
                death: None,
            }
        });
        if owner != 0 {
            conn.owner_tgid = owner;
        }
        if conn.sock == 0 {
            // Found in the socket table before its events named it.
            conn.sock = sock;
        }
        self.socks.insert(sock, key);
        !new.is_open()
            && conn.die(&mut self.conn_tally, ts, || {
                close_cause(new, error, heartbeat)
            })
    }

    /// Records a connection found in /proc/net/tcp (at start-up or resync).
    pub fn observe_conn(&mut self, key: ConnKey, state: TcpState, now: Ns) {
        let Some(service) = service_of_port(&self.services, key.local.port()) else {
            return;
        };
        let dead = !state.is_open();
        let name = service.name.clone();
        let conn = self.conns.entry(key.clone()).or_insert_with(|| {
            self.conn_tally.entered(&name);
            Conn {
                key,
                sock: 0,
                service: name,
                opened_at: now,
                owner_tgid: 0,
                death: None,
            }
        });
        if dead {
            conn.die(&mut self.conn_tally, now, || {
                format!("found {}", state.name())
            });
        }
    }

    /// After a full socket scan that started at `scan_start` and listed `present`: a live
    /// connection known from before the scan and absent from it closed while its events were
    /// lost (ring-buffer drops), so it is dead now (invariant 4).
    pub fn observe_conns_gone(&mut self, present: &HashSet<&ConnKey>, scan_start: Ns) {
        for c in self
            .conns
            .values_mut()
            .filter(|c| c.death.is_none() && c.opened_at < scan_start && !present.contains(&c.key))
        {
            c.die(&mut self.conn_tally, scan_start, || {
                "connection gone (closing events lost)".to_owned()
            });
        }
    }

    /// Merges a /proc scan that started at `scan_start`: every live process with its facts.
    /// Processes the scan could have seen but did not are dead (an exit event may have been
    /// lost); records newer than the scan are left alone. A pid whose start time changed was
    /// reused.
    pub fn observe_procs(&mut self, scan: &[ProcFacts], scan_start: Ns) {
        let live: HashSet<u32> = scan.iter().map(|f| f.pid).collect();
        for (_, p) in self
            .procs
            .iter_mut()
            .filter(|(pid, p)| !live.contains(pid) && p.since < scan_start && p.exited.is_none())
        {
            p.exited = Some(Exited {
                at: scan_start,
                status: None,
            });
        }
        for f in scan {
            self.observe_proc(f, scan_start);
        }
    }

    /// Learns one process's facts, read from /proc at time `at`.
    pub fn observe_proc(&mut self, f: &ProcFacts, at: Ns) {
        match self.procs.get_mut(&f.pid) {
            Some(p) if p.start_time.is_none() || p.start_time == Some(f.start_time) => {
                p.start_time = Some(f.start_time);
                p.comm.clone_from(&f.comm);
                p.exe.clone_from(&f.exe);
                p.cgroup.clone_from(&f.cgroup);
                p.cmdline.clone_from(&f.cmdline);
            }
            _ => {
                self.procs.insert(
                    f.pid,
                    Proc {
                        start_time: Some(f.start_time),
                        ppid: f.ppid,
                        comm: f.comm.clone(),
                        exe: f.exe.clone(),
                        cgroup: f.cgroup.clone(),
                        cmdline: f.cmdline.clone(),
                        since: at,
                        exited: None,
                    },
                );
            }
        }
    }

    fn direct_service(&self, pid: u32) -> Option<(&Service, MatchKind)> {
        let p = self.procs.get(&pid)?;
        self.services.iter().find_map(|s| {
            let by = matches(
                s,
                &p.comm,
                p.exe.as_deref(),
                p.cgroup.as_deref(),
                p.cmdline.as_deref(),
            )?;
            Some((s, by))
        })
    }

    /// The service `pid` belongs to (its own match, else its ancestors'), and that
    /// service's root: the topmost ancestor-or-self in the service whose parent is not.
    pub fn service_root(&self, pid: u32) -> Option<Membership<'_>> {
        let mut chain = Vec::new();
        let mut cur = pid;
        for _ in 0..64 {
            let Some(p) = self.procs.get(&cur) else { break };
            chain.push(cur);
            if p.ppid == 0 || p.ppid == cur {
                break;
            }
            cur = p.ppid;
        }
        // Innermost service wins: the nearest matching process from the holder upwards.
        let (idx, (service, by)) = chain
            .iter()
            .enumerate()
            .find_map(|(i, pid)| self.direct_service(*pid).map(|m| (i, m)))?;
        // Climb while ancestors still match the same service.
        let mut root_idx = idx;
        for (i, pid) in chain.iter().enumerate().skip(idx + 1) {
            match self.direct_service(*pid) {
                Some((s, _)) if s.name == service.name => root_idx = i,
                _ => break,
            }
        }
        let root_pid = chain[root_idx];
        let start_time = self.procs.get(&root_pid)?.start_time?;
        Some(Membership {
            service,
            root: ProcId {
                pid: root_pid,
                start_time,
            },
            matched: Matched {
                pid: chain[idx],
                by,
            },
        })
    }

    /// The holder's binding, pinned at first call; `None` outside every service.
    pub fn bind(&mut self, holder: ProcId) -> Option<Binding> {
        if let Some(b) = self.pins.get(&holder) {
            return Some(b.clone());
        }
        let m = self.service_root(holder.pid)?;
        let b = Binding {
            service: m.service.name.clone(),
            root: m.root,
            matched: Some(m.matched),
        };
        self.pins.insert(holder, b.clone());
        self.new_pins.push((holder, b.clone()));
        Some(b)
    }

    /// What a fork record says of the parent, kept where /proc was never read for it (the
    /// engine reads /proc first, while the parent lives): its name as it forks (perhaps set
    /// after its own exec, by prctl) and its start time. A server killed before user space
    /// could read /proc is then still its workers' service root.
    fn learn_parent(&mut self, ppid: u32, comm: &str, start: Option<u64>, ts: Ns) {
        let Some(start) = start.filter(|_| ppid != 0) else {
            return;
        };
        let p = self.procs.entry(ppid).or_insert_with(|| Proc {
            start_time: None,
            ppid: 0,
            comm: Default::default(),
            exe: None,
            cgroup: None,
            cmdline: None,
            since: ts,
            exited: None,
        });
        if p.start_time.is_none() {
            p.start_time = Some(start);
            comm.clone_into(&mut p.comm);
        }
    }

    /// Whether /proc has never been read for `pid` (its facts are its parent's, from the fork).
    pub fn needs_facts(&self, pid: u32) -> bool {
        self.procs.get(&pid).is_none_or(|p| p.start_time.is_none())
    }

    pub fn is_pinned(&self, holder: ProcId) -> bool {
        self.pins.contains_key(&holder)
    }

    /// Restores a binding remembered across a restart (the ledger's lineage).
    pub fn restore_pin(&mut self, holder: ProcId, b: Binding) {
        self.pins.entry(holder).or_insert(b);
    }

    pub fn take_new_pins(&mut self) -> Vec<(ProcId, Binding)> {
        std::mem::take(&mut self.new_pins)
    }

    /// Whether the process `id` lives, and if not, when and how it died.
    pub fn process_death(&mut self, id: ProcId, now: Ns) -> Option<Death> {
        match self.procs.get(&id.pid) {
            Some(p) if p.start_time == Some(id.start_time) || p.start_time.is_none() => {
                p.exited.map(death_of)
            }
            _ => {
                let at = *self.noticed_dead.entry(id).or_insert(now);
                Some(Death {
                    at,
                    cause: "gone (seen missing)".to_owned(),
                })
            }
        }
    }

    /// The sessions a holder is bound to: the process session of its binding, and for
    /// connection-scoped services the connections whose sockets it holds (`conns`), which
    /// replace the process session when there are any.
    pub fn bound_sessions(
        &mut self,
        binding: &Binding,
        conns: &[ConnKey],
        now: Ns,
    ) -> Vec<BoundSession> {
        let scope = self
            .service(&binding.service)
            .map(|s| s.scope)
            .unwrap_or(Scope::Process);
        if scope == Scope::Connection {
            let bound: Vec<BoundSession> = conns
                .iter()
                .filter_map(|k| self.conns.get(k))
                .filter(|c| c.service == binding.service)
                .map(|c| BoundSession {
                    kind: SessionKind::Connection,
                    key: SessionKey::Connection(c.key.clone()),
                    death: c.death.clone(),
                    seen: Some(c.opened_at),
                })
                .collect();
            if !bound.is_empty() {
                return bound;
            }
        }
        let death = self.process_death(binding.root, now);
        let seen = self
            .procs
            .get(&binding.root.pid)
            .filter(|p| p.start_time == Some(binding.root.start_time))
            .map(|p| p.since);
        vec![BoundSession {
            kind: SessionKind::Process,
            key: SessionKey::Process(binding.root),
            death,
            seen,
        }]
    }

    /// Whether `id`'s original parent is gone, now that its parent is `ppid`: when and how
    /// the original one died (its exit if seen, else when the reparenting was first seen).
    /// `None` while the parent is the original one, or when the original one was never
    /// known (seen first after the reparenting, or a child of init).
    pub fn parent_death(&mut self, id: ProcId, ppid: u32, now: Ns) -> Option<Death> {
        let p = self.procs.get(&id.pid)?;
        if p.start_time != Some(id.start_time) || p.ppid <= 1 || p.ppid == ppid {
            return None;
        }
        let original = p.ppid;
        if let Some(e) = self.procs.get(&original).and_then(|q| q.exited) {
            let d = death_of(e);
            let death = Death {
                at: d.at,
                cause: format!(
                    "original parent {original} {}; reparented to {ppid}",
                    d.cause
                ),
            };
            // Kept: the parent's record is pruned a while after its death.
            self.reparented.insert(id, death.clone());
            return Some(death);
        }
        match self.reparented.get(&id) {
            // Seen before, with or without the exit: that stands.
            Some(d) => Some(d.clone()),
            // First sight of the reparenting with no exit seen: the exit event may still be
            // on its way (a snapshot's /proc read can beat it), so judge at the next look;
            // by then an exit names the cause, or the parent is taken as gone from now.
            None => {
                self.reparented.insert(
                    id,
                    Death {
                        at: now,
                        cause: format!("original parent {original} gone; reparented to {ppid}"),
                    },
                );
                None
            }
        }
    }

    /// Forgets a holder that is gone (reclaimed, released, or exited).
    pub fn forget_holder(&mut self, holder: ProcId) {
        self.pins.remove(&holder);
    }

    /// Drops settled state: exited processes no pin refers to, dead connections past
    /// retention, and pins of holders that are gone. Keeps memory flat (invariant 5).
    pub fn prune(&mut self, live_holders: &HashSet<ProcId>, now: Ns) {
        self.pins.retain(|h, _| live_holders.contains(h));
        let roots: HashSet<u32> = self.pins.values().map(|b| b.root.pid).collect();
        // A dead process stays while a live one names it as parent: lineage for bindings.
        let parents: HashSet<u32> = self
            .procs
            .values()
            .filter(|p| p.exited.is_none())
            .map(|p| p.ppid)
            .collect();
        self.procs.retain(|pid, p| match p.exited {
            None => true,
            Some(e) => {
                roots.contains(pid)
                    || (parents.contains(pid) && now.saturating_sub(e.at) < RETENTION)
            }
        });
        // At rest no connection is dead: no pass over every connection.
        if self.conn_tally.dead() > 0 {
            self.prune_conns(now);
        }
        let pinned: HashSet<ProcId> = self.pins.values().map(|b| b.root).collect();
        self.noticed_dead.retain(|id, _| pinned.contains(id));
        self.reparented.retain(|id, _| live_holders.contains(id));
    }

    /// Drops the connections dead for longer than [`RETENTION`], or whose service no pinned
    /// holder is in, with their sockets.
    fn prune_conns(&mut self, now: Ns) {
        let keep: HashSet<String> = self.pins.values().map(|b| b.service.clone()).collect();
        let before = self.conns.len();
        let tally = &mut self.conn_tally;
        self.conns.retain(|_, c| match &c.death {
            None => true,
            Some(d) => {
                let stays = now.saturating_sub(d.at) < RETENTION && keep.contains(&c.service);
                if !stays {
                    tally.dropped_dead(&c.service);
                }
                stays
            }
        });
        // Sockets are entered with their connection, so only a connection dropped here can
        // leave one behind: at rest, no second pass over every socket (hashing each key).
        if self.conns.len() != before {
            let conns = &self.conns;
            self.socks.retain(|_, k| conns.contains_key(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::Duration,
    };

    use super::*;
    use crate::{
        config::Matcher,
        event::{Endpoint, Socket},
    };

    fn svc(name: &str, comm: &str, scope: Scope, ports: Vec<u16>) -> Service {
        Service {
            name: name.to_owned(),
            matcher: Matcher {
                comm: vec![comm.to_owned()],
                ..Matcher::default()
            },
            ports,
            scope,
            mode: None,
            grace: None,
            hook: None,
            hook_timeout: Duration::from_secs(1),
            heartbeat: None,
        }
    }

    fn facts(pid: u32, ppid: u32, start: u64, comm: &str) -> ProcFacts {
        ProcFacts {
            pid,
            ppid,
            start_time: start,
            comm: comm.to_owned(),
            exe: None,
            cgroup: None,
            cmdline: None,
        }
    }

    #[test]
    fn a_command_line_names_a_service_whose_comm_and_exe_are_the_interpreters() {
        let mut s = svc("vllm", "unused-comm", Scope::Process, vec![]);
        s.matcher.comm.clear();
        s.matcher.cmdline = Some(crate::config::Cmdline(
            regex::Regex::new(r"-m vllm\.entrypoints").unwrap(),
        ));
        let mut m = Model::new(vec![s]);
        let mut server = facts(10, 1, 2, "python3");
        server.cmdline = Some("python3 -m vllm.entrypoints.openai.api_server --port 8000".into());
        let mut worker = facts(11, 10, 3, "VLLM::EngineCor");
        worker.cmdline = Some("python3 -c from multiprocessing.spawn import spawn_main".into());
        let mut other = facts(12, 1, 4, "python3");
        other.cmdline = Some("python3 -m http.server".into());
        m.observe_procs(&[server, worker, other], 1);
        let member = m.service_root(11).expect("the worker is in the service");
        assert_eq!(
            (member.service.name.as_str(), member.root.pid),
            ("vllm", 10)
        );
        assert_eq!(
            member.matched,
            Matched {
                pid: 10,
                by: MatchKind::Cmdline
            },
            "the worker is the service's through its server's command line"
        );
        assert!(m.service_root(12).is_none(), "another python3 is not");
    }

    #[test]
    fn a_reparenting_seen_before_the_parents_exit_waits_for_it() {
        let mut m = Model::new(vec![svc("llm", "server", Scope::Process, vec![])]);
        // Two holders outside every service, each the child of a trainer; the first
        // trainer's exit arrives late, the second's never.
        fn first_look(m: &mut Model, parent: u32, child: u32, at: Ns) -> ProcId {
            m.observe_procs(
                &[
                    facts(parent, 1, 1, "trainer"),
                    facts(child, parent, 2, "gpu"),
                ],
                at,
            );
            // A snapshot's /proc read sees the reparenting before any exit event.
            let id = ProcId {
                pid: child,
                start_time: 2,
            };
            assert_eq!(
                m.parent_death(id, 1, at + 20),
                None,
                "not judged on first sight"
            );
            id
        }
        let late = first_look(&mut m, 100, 200, 10);
        m.apply(&exit(100, 25, ExitStatus::Signal(9)));
        let d = m.parent_death(late, 1, 40).expect("the exit names it");
        assert_eq!(
            (d.cause.as_str(), d.at),
            (
                "original parent 100 killed by signal 9; reparented to 1",
                25
            )
        );
        let never = first_look(&mut m, 300, 400, 50);
        let d = m.parent_death(never, 1, 90).expect("taken as gone");
        assert_eq!(
            (d.cause.as_str(), d.at),
            ("original parent 300 gone; reparented to 1", 70)
        );
    }

    fn exit(pid: u32, at: Ns, status: ExitStatus) -> KernelEvent {
        KernelEvent::Exit {
            ts_ns: at,
            pid,
            tgid: pid,
            status,
            comm: Default::default(),
        }
    }

    /// The server renamed itself after exec (prctl) and was killed before /proc could be
    /// read for it: the fork record's name and start time make it its worker's root.
    #[test]
    fn a_parent_never_read_is_known_from_its_fork_record() {
        let mut m = Model::new(vec![svc("llm", "llm-server", Scope::Process, vec![])]);
        m.observe_procs(&[facts(1, 0, 1, "systemd"), facts(90, 1, 40, "sh")], 10);
        // The shell forks the server (comm "sh" until its exec and prctl).
        m.apply(&KernelEvent::Fork {
            ts_ns: 15,
            pid: 100,
            ppid: 90,
            comm: "sh".into(),
            parent_start: Some(40),
        });
        assert!(m.needs_facts(100));
        m.apply(&KernelEvent::Fork {
            ts_ns: 20,
            pid: 200,
            ppid: 100,
            comm: "llm-server".into(),
            parent_start: Some(50),
        });
        m.apply(&exit(100, 21, ExitStatus::Signal(9)));
        m.observe_proc(&facts(200, 100, 60, "worker"), 22);
        let worker = ProcId {
            pid: 200,
            start_time: 60,
        };
        let b = m.bind(worker).expect("bound through the fork record");
        let root = ProcId {
            pid: 100,
            start_time: 50,
        };
        assert_eq!((b.service.as_str(), b.root), ("llm", root));
        let death = m.process_death(root, 30).expect("dead");
        assert_eq!(death.cause, "killed by signal 9");
        // A parent /proc was read for keeps what /proc said.
        m.apply(&KernelEvent::Fork {
            ts_ns: 25,
            pid: 91,
            ppid: 90,
            comm: "renamed".into(),
            parent_start: Some(41),
        });
        let sh = &m.procs[&90];
        assert_eq!((sh.comm.as_str(), sh.start_time), ("sh", Some(40)));
    }

    #[test]
    fn worker_is_bound_to_its_server_and_dies_with_it() {
        let mut m = Model::new(vec![svc("llm", "server", Scope::Process, vec![])]);
        m.observe_procs(
            &[facts(1, 0, 1, "systemd"), facts(100, 1, 50, "server")],
            10,
        );
        m.apply(&KernelEvent::Fork {
            ts_ns: 20,
            pid: 200,
            ppid: 100,
            comm: "server".into(),
            parent_start: None,
        });
        m.observe_proc(&facts(200, 100, 60, "worker"), 21);
        let worker = ProcId {
            pid: 200,
            start_time: 60,
        };
        let b = m.bind(worker).unwrap();
        assert_eq!(b.service, "llm");
        assert_eq!(
            b.root,
            ProcId {
                pid: 100,
                start_time: 50
            }
        );
        assert_eq!(m.take_new_pins().len(), 1);
        let s = m.bound_sessions(&b, &[], 30);
        assert!(s[0].death.is_none());

        assert!(m.apply(&exit(100, 40, ExitStatus::Signal(9))));
        // The kernel reparents the worker; the binding stays.
        m.observe_procs(
            &[facts(1, 0, 1, "systemd"), facts(200, 1, 60, "worker")],
            50,
        );
        let b = m.bind(worker).unwrap();
        assert_eq!(b.root.pid, 100);
        let s = m.bound_sessions(&b, &[], 60);
        let d = s[0].death.as_ref().unwrap();
        assert_eq!(d.at, 40);
        assert_eq!(d.cause, "killed by signal 9");
    }

    #[test]
    fn a_root_is_the_topmost_matching_ancestor_and_outsiders_have_no_service() {
        let mut m = Model::new(vec![svc("llm", "server", Scope::Process, vec![])]);
        m.observe_procs(
            &[
                facts(1, 0, 1, "systemd"),
                facts(10, 1, 2, "server"),
                facts(11, 10, 3, "server"),
                facts(12, 11, 4, "python"),
                facts(13, 1, 5, "bash"),
            ],
            1,
        );
        let member = m.service_root(12).unwrap();
        assert_eq!(member.service.name, "llm");
        assert_eq!(member.root.pid, 10);
        assert_eq!(
            member.matched,
            Matched {
                pid: 11,
                by: MatchKind::Comm
            },
            "the nearest matching ancestor made it the service's"
        );
        assert!(m.service_root(13).is_none());
        assert!(
            m.bind(ProcId {
                pid: 13,
                start_time: 5
            })
            .is_none()
        );
    }

    #[test]
    fn a_scan_older_than_a_fork_does_not_kill_the_child() {
        let mut m = Model::new(vec![svc("llm", "server", Scope::Process, vec![])]);
        m.observe_procs(&[facts(10, 1, 2, "server")], 1);
        // The server forks while a scan (started at 100) is being read; the scan misses it.
        m.apply(&KernelEvent::Fork {
            ts_ns: 150,
            pid: 20,
            ppid: 10,
            comm: "server".into(),
            parent_start: None,
        });
        m.observe_procs(&[facts(10, 1, 2, "server")], 100);
        m.observe_proc(&facts(20, 10, 7, "server"), 160);
        // Its own child, seen in a later scan, must bind to a live root.
        m.observe_proc(&facts(21, 20, 8, "w"), 170);
        let b = m
            .bind(ProcId {
                pid: 21,
                start_time: 8,
            })
            .unwrap();
        assert_eq!(b.root.pid, 10);
        assert!(
            m.process_death(
                ProcId {
                    pid: 20,
                    start_time: 7
                },
                200
            )
            .is_none()
        );
        assert!(m.bound_sessions(&b, &[], 200)[0].death.is_none());
    }

    #[test]
    fn a_reused_pid_is_not_the_root() {
        let mut m = Model::new(vec![svc("llm", "server", Scope::Process, vec![])]);
        m.observe_procs(&[facts(10, 1, 2, "server"), facts(11, 10, 3, "w")], 1);
        let b = m
            .bind(ProcId {
                pid: 11,
                start_time: 3,
            })
            .unwrap();
        // The server dies unseen and its pid is reused by something else.
        m.observe_procs(&[facts(10, 1, 99, "other"), facts(11, 1, 3, "w")], 5);
        let s = m.bound_sessions(&b, &[], 6);
        assert!(s[0].death.is_some(), "{s:?}");
    }

    fn tcp(sock: u64, cport: u16, old: u8, new: u8, owner: u32, at: Ns) -> KernelEvent {
        KernelEvent::Tcp {
            ts_ns: at,
            socket: Socket {
                sock,
                local: Endpoint {
                    addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port: 8000,
                },
                remote: Endpoint {
                    addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port: cport,
                },
            },
            old_state: TcpState::from_raw(old),
            new_state: TcpState::from_raw(new),
            owner_tgid: owner,
            owner_comm: Default::default(),
            error: 0,
        }
    }

    fn key(cport: u16) -> ConnKey {
        key_on(8000, cport)
    }

    fn key_on(port: u16, cport: u16) -> ConnKey {
        ConnKey {
            local: format!("127.0.0.1:{port}").parse().unwrap(),
            remote: format!("127.0.0.1:{cport}").parse().unwrap(),
        }
    }

    #[test]
    fn connections_die_on_peer_close_and_bind_their_holders() {
        use reclaimd_common::tcp_state::*;
        let mut m = Model::new(vec![svc("llm", "server", Scope::Connection, vec![8000])]);
        m.observe_procs(&[facts(10, 1, 2, "server"), facts(11, 10, 3, "server")], 1);
        assert!(!m.apply(&tcp(0xa, 5000, CLOSE, LISTEN, 10, 2)));
        m.apply(&tcp(0xb, 5001, SYN_RECV, ESTABLISHED, 0, 3));
        m.apply(&tcp(0xc, 5002, SYN_RECV, ESTABLISHED, 0, 3));
        assert_eq!(m.conns().count(), 2, "the listener is not a session");

        let worker = ProcId {
            pid: 11,
            start_time: 3,
        };
        let b = m.bind(worker).unwrap();
        let s = m.bound_sessions(&b, &[key(5001)], 4);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].kind, "connection");
        assert!(s[0].death.is_none());

        assert!(m.apply(&tcp(0xb, 5001, ESTABLISHED, CLOSE_WAIT, 11, 5)));
        let s = m.bound_sessions(&b, &[key(5001)], 6);
        assert_eq!(
            s[0].death.as_ref().unwrap().cause,
            "peer closed (CLOSE_WAIT)"
        );
        // The other connection lives on.
        let s = m.bound_sessions(&b, &[key(5002)], 6);
        assert!(s[0].death.is_none());
        // No socket held: the process session decides.
        let s = m.bound_sessions(&b, &[], 6);
        assert_eq!(s[0].kind, "process");
        assert!(s[0].death.is_none());
    }

    #[test]
    fn an_exit_names_one_process_not_a_reused_pid() {
        let mut m = Model::new(vec![svc("llm", "server", Scope::Process, vec![])]);
        m.observe_procs(&[facts(10, 1, 2, "server")], 1);
        let first = ProcId {
            pid: 10,
            start_time: 2,
        };
        assert!(!m.has_exited(first));
        m.apply(&exit(10, 5, ExitStatus::Code(0)));
        assert!(m.has_exited(first));
        // The pid comes back as another process: that one has not exited.
        m.observe_procs(&[facts(10, 1, 9, "other")], 20);
        assert!(!m.has_exited(ProcId {
            pid: 10,
            start_time: 9
        }));
    }

    #[test]
    fn a_connection_missing_from_a_full_scan_is_dead() {
        use reclaimd_common::tcp_state::*;
        let mut m = Model::new(vec![svc("llm", "server", Scope::Connection, vec![8000])]);
        m.apply(&tcp(0xb, 5001, SYN_RECV, ESTABLISHED, 0, 3));
        m.apply(&tcp(0xc, 5002, SYN_RECV, ESTABLISHED, 0, 3));
        // Opened after the scan began: absent from it proves nothing.
        m.apply(&tcp(0xd, 5003, SYN_RECV, ESTABLISHED, 0, 20));
        let still = key(5002);
        m.observe_conns_gone(&[&still].into_iter().collect(), 10);
        let dead: Vec<u16> = m
            .conns()
            .filter(|c| c.death.is_some())
            .map(|c| c.key.remote.port())
            .collect();
        assert_eq!(dead, vec![5001]);
    }

    /// The connections' counts the gauges and pruning read, kept as connections come and
    /// go, against a count of the table.
    fn recount(m: &Model) -> Vec<(&str, bool, u64)> {
        let mut by: Vec<(&str, bool, u64)> = Vec::new();
        for c in m.conns() {
            let k = (c.service.as_str(), c.death.is_some());
            match by.iter_mut().find(|(s, d, _)| (*s, *d) == k) {
                Some((_, _, n)) => *n += 1,
                None => by.push((k.0, k.1, 1)),
            }
        }
        by.sort();
        by
    }

    #[test]
    fn the_connection_tally_matches_the_table_through_births_deaths_and_pruning() {
        use reclaimd_common::tcp_state::*;
        let mut m = Model::new(vec![
            svc("llm", "server", Scope::Connection, vec![8000]),
            svc("api", "api", Scope::Connection, vec![9000]),
        ]);
        fn tally(m: &Model) -> Vec<(&str, bool, u64)> {
            let mut t: Vec<(&str, bool, u64)> = m
                .session_tally()
                .into_iter()
                .filter(|((kind, _, _), _)| *kind == SessionKind::Connection)
                .map(|((_, service, dead), n)| (service, dead, n))
                .collect();
            t.sort();
            t
        }
        for i in 0..6u16 {
            m.apply(&tcp(u64::from(i), 5000 + i, SYN_RECV, ESTABLISHED, 0, 1));
        }
        m.observe_conn(key_on(9000, 6000), TcpState::Established, 1);
        m.observe_conn(key_on(9000, 6001), TcpState::CloseWait, 1);
        assert_eq!(tally(&m), recount(&m));
        m.apply(&tcp(0, 5000, ESTABLISHED, CLOSE_WAIT, 0, 2));
        // A second closing move of the same connection is no second death.
        m.apply(&tcp(0, 5000, CLOSE_WAIT, LAST_ACK, 0, 3));
        let still = key(5001);
        m.observe_conns_gone(&[&still].into_iter().collect(), 10);
        assert_eq!(tally(&m), recount(&m));
        m.prune(&HashSet::new(), 10 + RETENTION);
        assert_eq!(tally(&m), recount(&m));
        assert_eq!(m.conn_tally.dead(), 0);
        assert!(!tally(&m).is_empty(), "the live ones remain counted");
    }

    #[test]
    fn memory_stays_flat_as_sessions_come_and_go() {
        use reclaimd_common::tcp_state::*;
        let mut m = Model::new(vec![svc("llm", "server", Scope::Connection, vec![8000])]);
        m.observe_procs(&[facts(10, 1, 2, "server")], 0);
        let mut t: Ns = 1;
        for round in 0..20u32 {
            for i in 0..500u16 {
                let port = 10_000 + i;
                let sock = u64::from(round) << 32 | u64::from(i);
                m.apply(&tcp(sock, port, SYN_RECV, ESTABLISHED, 10, t));
                m.apply(&tcp(sock, port, ESTABLISHED, CLOSE_WAIT, 10, t + 1));
                m.apply(&tcp(sock, port, LAST_ACK, CLOSE, 10, t + 2));
                let pid = 1000 + u32::from(i);
                m.apply(&KernelEvent::Fork {
                    ts_ns: t,
                    pid,
                    ppid: 10,
                    comm: "server".into(),
                    parent_start: None,
                });
                m.apply(&exit(pid, t + 3, ExitStatus::Code(0)));
                t += 10;
            }
            t += RETENTION;
            m.prune(&HashSet::new(), t);
            assert!(m.conns.len() <= 500, "round {round}: {}", m.conns.len());
            assert!(m.procs.len() <= 501, "round {round}: {}", m.procs.len());
            assert!(m.socks.len() <= 500);
        }
        assert_eq!(m.conns.len(), 0);
        assert_eq!(m.procs.len(), 1, "only the live server remains");
    }

    #[test]
    fn unit_cgroup_and_exe_matchers() {
        let mut s = svc("nb", "nomatch", Scope::Process, vec![]);
        s.matcher.unit = Some("jupyter".into());
        assert_eq!(
            matches(
                &s,
                "python",
                None,
                Some("/system.slice/jupyter.service"),
                None
            ),
            Some(MatchKind::Unit)
        );
        assert_eq!(
            matches(
                &s,
                "python",
                None,
                Some("/system.slice/other.service"),
                None
            ),
            None
        );
        s.matcher.unit = None;
        s.matcher.cgroup = Some("/kubepods/burstable".into());
        assert_eq!(
            matches(&s, "x", None, Some("/kubepods/burstable/pod1/c1"), None),
            Some(MatchKind::Cgroup)
        );
        assert_eq!(
            matches(&s, "x", None, Some("/kubepods/burstable2"), None),
            None
        );
        s.matcher.cgroup = None;
        s.matcher.exe = Some(glob::Pattern::new("/opt/llm/*").unwrap());
        assert_eq!(
            matches(
                &s,
                "x",
                Some(std::path::Path::new("/opt/llm/bin")),
                None,
                None
            ),
            Some(MatchKind::Exe)
        );
        assert_eq!(
            matches(
                &s,
                "x",
                Some(std::path::Path::new("/usr/bin/llm")),
                None,
                None
            ),
            None
        );
    }
}

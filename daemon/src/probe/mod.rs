//! The kernel side, from user space: load and attach the eBPF programs, read the ring buffer
//! on tokio, decode events, and count what the kernel could not deliver.
//!
//! Dropping a [`Probe`] detaches every program.
mod btf;
mod capability;
mod connector;
mod error;
mod preflight;
mod source;

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, RawTracePoint, TracePoint},
};
use reclaimd_common::names;
use tokio::io::unix::AsyncFd;

pub use self::{
    btf::{Btf, BtfError},
    capability::{Capability, CapabilityStatus, ExitFilter, Source},
    // The proc connector's datagram decoder, public so tests can feed it arbitrary bytes.
    connector::{ProcConnector, decode as decode_proc_connector},
    error::ProbeError,
    source::{EventSource, Opened},
};
pub use crate::config::{DEFAULT_BTF_PATH, DEFAULT_RING_BYTES};
use crate::{clock, event::KernelEvent};

/// Where a program attaches.
#[derive(Debug, Clone, Copy)]
enum Attach {
    /// A classic tracepoint: category and name.
    Tracepoint(&'static str, &'static str),
    /// A raw tracepoint, by name.
    Raw(&'static str),
}

/// The programs of each capability (named as in the object) and where they attach.
const fn programs(cap: Capability) -> &'static [(&'static str, Attach)] {
    use Attach::{Raw, Tracepoint};
    match cap {
        Capability::Exit => &[(
            "sched_process_exit",
            Tracepoint("sched", "sched_process_exit"),
        )],
        Capability::Fork => &[("sched_process_fork", Raw("sched_process_fork"))],
        Capability::Tcp => &[(
            "inet_sock_set_state",
            Tracepoint("sock", "inet_sock_set_state"),
        )],
        Capability::OwnerAccept => &[
            (
                "sys_exit_accept4",
                Tracepoint("syscalls", "sys_exit_accept4"),
            ),
            ("sys_exit_accept", Tracepoint("syscalls", "sys_exit_accept")),
        ],
        Capability::OwnerIo => &[
            ("sock_send_length", Tracepoint("sock", "sock_send_length")),
            ("sock_recv_length", Tracepoint("sock", "sock_recv_length")),
        ],
    }
}

#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Local TCP ports whose sockets are reported.
    pub watched_ports: Vec<u16>,
    pub ring_bytes: u32,
    /// The kernel's BTF, for structure offsets.
    pub btf_path: PathBuf,
    /// How process deaths are told from thread exits.
    pub exit_filter: ExitFilter,
    /// Every state change of a watched socket, each read at once (`reclaimd trace`);
    /// otherwise a connection's birth, owner and death only, read in batches unless it
    /// matters now (the daemon).
    pub every_change: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            watched_ports: Vec::new(),
            ring_bytes: DEFAULT_RING_BYTES,
            btf_path: PathBuf::from(DEFAULT_BTF_PATH),
            exit_filter: ExitFilter::Auto,
            every_change: false,
        }
    }
}

/// How late an event that wakes nobody (a birth, an owner, the death of a connection no
/// holder is bound to) is read at most: the ring buffer is also drained on this timer.
pub const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a parked reader (one that found the ring empty, and asked the kernel to wake
/// it for any event) waits before it looks anyway: only a safety net, the kernel wakes it.
const PARKED_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// An event and when user space got it (CLOCK_MONOTONIC ns, the clock of `ts_ns`).
#[derive(Debug, Clone)]
pub struct Received {
    pub event: KernelEvent,
    pub recv_ns: u64,
}

pub struct Probe {
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    watched: Array<MapData, u64>,
    /// The word the I/O programs' memory of sockets is valid under (`IO_EPOCH`).
    io_epoch: Array<MapData, u64>,
    /// The kernel's `BOUND` map, and what user space last put in it.
    bound: HashMap<MapData, u64, u8>,
    bound_now: std::collections::HashSet<u64>,
    /// Wake-ups are batched ([`BATCH_WAIT`]): not in `every_change` mode.
    batched: bool,
    /// The kernel's `READER` word: set while the reader is parked.
    reader: Array<MapData, u32>,
    parked: bool,
    /// When a batched reader looks at the ring by itself next. Kept across calls: a read
    /// cancelled by another branch of the caller's `select!` (a timer firing more often than
    /// this wait) must not put the look off again.
    look_at: Option<tokio::time::Instant>,
    malformed: u64,
    /// Capabilities whose programs are attached, with how they run.
    attached: Vec<(Capability, String)>,
    /// Capabilities this kernel cannot give, with why.
    missing: Vec<(Capability, String)>,
    /// Capabilities left out by choice although the kernel has them, with why.
    spared: Vec<(Capability, String)>,
    // Last: dropping it detaches the programs after the maps above are released.
    _ebpf: Ebpf,
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reclaimd-ebpf"));

impl Probe {
    /// Checks the host, then loads and attaches the programs of every capability this kernel
    /// can give; fails only when none of them loads. Must run inside a tokio runtime.
    pub fn load(opts: &ProbeOptions) -> Result<Self, ProbeError> {
        preflight::check_privileges()?;
        if !opts.ring_bytes.is_power_of_two() || opts.ring_bytes < 4096 {
            return Err(ProbeError::RingSize(opts.ring_bytes));
        }
        if !opts.btf_path.exists() {
            return Err(ProbeError::NoBtf {
                path: opts.btf_path.display().to_string(),
            });
        }
        let tracefs = preflight::tracefs_root()?;
        let kernel_btf = Btf::from_file(&opts.btf_path)?;
        let plan = preflight::plan(&tracefs, &kernel_btf, opts.exit_filter);
        tracing::debug!(offsets = ?plan.offsets, "kernel structure offsets");
        if plan.ready.is_empty() {
            return Err(ProbeError::NothingLoaded(list(&plan.missing)));
        }
        raise_memlock_limit();

        let aya_btf = aya::Btf::parse_file(&opts.btf_path, aya::Endianness::default())
            .map_err(|e| ProbeError::Load(e.into()))?;
        let settings = reclaimd_common::ProbeSettings {
            report: if opts.every_change {
                reclaimd_common::report::EVERY_CHANGE
            } else {
                reclaimd_common::report::LIFECYCLE
            },
            _pad: 0,
        };
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global(names::OFFSETS, &plan.offsets, true)
            .override_global(names::SETTINGS, &settings, true)
            .map_max_entries(names::EVENTS, opts.ring_bytes)
            .load(OBJECT)?;
        start_program_logs(&mut ebpf);

        let mut watched = Array::try_from(take_map(&mut ebpf, names::WATCHED_PORTS)?)
            .map_err(map_error(names::WATCHED_PORTS))?;
        for &port in &opts.watched_ports {
            watch(&mut watched, port)?;
        }
        let io_epoch = Array::try_from(take_map(&mut ebpf, names::IO_EPOCH)?)
            .map_err(map_error(names::IO_EPOCH))?;
        let drops = PerCpuArray::try_from(take_map(&mut ebpf, names::DROPS)?)
            .map_err(map_error(names::DROPS))?;
        let bound = HashMap::try_from(take_map(&mut ebpf, names::BOUND)?)
            .map_err(map_error(names::BOUND))?;
        let reader = Array::try_from(take_map(&mut ebpf, names::READER)?)
            .map_err(map_error(names::READER))?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)
            .map_err(map_error(names::EVENTS))?;
        let ring = readable(ring)?;

        let Attached {
            attached,
            missing,
            spared,
        } = attach_all(&mut ebpf, plan, !opts.every_change)?;
        for (cap, why) in &missing {
            tracing::warn!(capability = cap.name(), reason = %why,
                "kernel capability unavailable: made up for without eBPF");
        }
        for (cap, why) in &spared {
            tracing::info!(capability = cap.name(), reason = %why, "capability left out");
        }
        tracing::info!(
            capabilities = %attached.iter().map(|(c, _)| c.name()).collect::<Vec<_>>().join(","),
            ring_bytes = opts.ring_bytes,
            watched_ports = ?opts.watched_ports,
            "eBPF programs attached"
        );
        Ok(Self {
            ring,
            drops,
            watched,
            io_epoch,
            bound,
            bound_now: Default::default(),
            batched: !opts.every_change,
            reader,
            parked: false,
            look_at: None,
            malformed: 0,
            attached,
            missing,
            spared,
            _ebpf: ebpf,
        })
    }

    /// Capabilities whose programs run in the kernel, with how (e.g. the exit filter).
    pub fn attached(&self) -> &[(Capability, String)] {
        &self.attached
    }

    /// Capabilities this kernel could not give, with why.
    pub fn missing(&self) -> &[(Capability, String)] {
        &self.missing
    }

    /// Capabilities the kernel has but that were left out by choice, with why.
    pub fn spared(&self) -> &[(Capability, String)] {
        &self.spared
    }

    /// Waits until events are ready, then appends every available one to `out`. Returns how
    /// many were appended; malformed records are counted (see [`Probe::malformed`]) and
    /// skipped.
    ///
    /// In batched mode it also returns after [`BATCH_WAIT`] with what the kernel wrote
    /// without waking it (possibly nothing). A batch that finds nothing parks the reader:
    /// the kernel then wakes it for the next event of any kind, so an idle daemon is not
    /// woken 20 times a second for nothing, and the next batch with events unparks it.
    pub async fn read_batch(&mut self, out: &mut Vec<Received>) -> Result<usize, ProbeError> {
        let before = out.len();
        if !self.batched {
            let mut guard = self.ring.readable_mut().await?;
            drain(guard.get_inner_mut(), out, &mut self.malformed);
            guard.clear_ready();
            return Ok(out.len() - before);
        }
        let wait = if self.parked { PARKED_WAIT } else { BATCH_WAIT };
        let look_at = *self
            .look_at
            .get_or_insert_with(|| tokio::time::Instant::now() + wait);
        let malformed = &mut self.malformed;
        match tokio::time::timeout_at(look_at, self.ring.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), out, malformed);
                guard.clear_ready();
            }
            Err(_) => drain(self.ring.get_mut(), out, malformed),
        }
        self.look_at = None;
        self.park(out.len() == before, out)?;
        Ok(out.len() - before)
    }

    /// Parks the reader after an empty batch, unparks it after one with events.
    fn park(&mut self, parked: bool, out: &mut Vec<Received>) -> Result<(), ProbeError> {
        if parked == self.parked {
            return Ok(());
        }
        self.reader
            .set(0, u32::from(parked), 0)
            .map_err(map_error(names::READER))?;
        self.parked = parked;
        if parked {
            // An event written between the last drain and the word did not wake anyone.
            drain(self.ring.get_mut(), out, &mut self.malformed);
        }
        Ok(())
    }

    /// Keeps the kernel's `BOUND` map equal to `socks`: the sockets whose death must wake
    /// the daemon at once.
    pub fn set_bound(&mut self, socks: &std::collections::HashSet<u64>) -> Result<(), ProbeError> {
        for gone in self.bound_now.difference(socks) {
            // The kernel forgets a socket itself when it closes: absent is fine.
            let _ = self.bound.remove(gone);
        }
        for new in socks.difference(&self.bound_now) {
            self.bound
                .insert(new, 1, 0)
                .map_err(map_error(names::BOUND))?;
        }
        self.bound_now.clone_from(socks);
        Ok(())
    }

    /// Events the kernel could not put in the ring buffer since load, summed over CPUs.
    pub fn drops(&self) -> Result<u64, ProbeError> {
        let per_cpu = self.drops.get(&0, 0).map_err(|source| ProbeError::Map {
            map: names::DROPS,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Starts reporting sockets on local `port`, and makes the I/O programs forget which
    /// sockets they found unwatched: one of them may be on `port`.
    pub fn watch_port(&mut self, port: u16) -> Result<(), ProbeError> {
        watch(&mut self.watched, port)?;
        // Not atomic against the programs' own bumps, and need not be: a program's bump
        // lost here happened after this read, so what was remembered under the value
        // written was found after the port was watched.
        let epoch = self
            .io_epoch
            .get(&0, 0)
            .map_err(map_error(names::IO_EPOCH))?;
        self.io_epoch
            .set(0, epoch.wrapping_add(1), 0)
            .map_err(map_error(names::IO_EPOCH))
    }
}

/// Sets `port`'s bit in the kernel's port bitmap (`reclaimd_common::ports`). Only this
/// process writes the map, so reading the word and writing it back loses no other bit.
fn watch(bitmap: &mut Array<MapData, u64>, port: u16) -> Result<(), ProbeError> {
    let (word, bit) = reclaimd_common::ports::slot(port);
    let now = bitmap
        .get(&word, 0)
        .map_err(map_error(names::WATCHED_PORTS))?;
    bitmap
        .set(word, now | bit, 0)
        .map_err(map_error(names::WATCHED_PORTS))
}

/// Appends every event `ring` holds to `out`, counting malformed records. The time of
/// receipt is read once per drain, and again only for a record stamped after it (written
/// while this drain ran): a clock read per record showed in the daemon's profile under
/// connection churn.
fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<Received>, malformed: &mut u64) {
    let mut recv_ns = clock::monotonic_ns();
    while let Some(item) = ring.next() {
        match KernelEvent::decode(&item) {
            Ok(event) => {
                if event.ts_ns() > recv_ns {
                    recv_ns = clock::monotonic_ns();
                }
                out.push(Received { event, recv_ns });
            }
            Err(error) => {
                *malformed += 1;
                tracing::warn!(%error, total = *malformed, "skipped malformed event");
            }
        }
    }
}

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |source| ProbeError::Map { map, source }
}

/// `cap: why; cap: why`.
fn list(missing: &[(Capability, String)]) -> String {
    missing
        .iter()
        .map(|(c, why)| format!("{}: {why}", c.name()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What [`attach_all`] did with each capability.
struct Attached {
    attached: Vec<(Capability, String)>,
    missing: Vec<(Capability, String)>,
    spared: Vec<(Capability, String)>,
}

/// Why `owner:accept` is left out where `owner:io` runs.
const ACCEPT_SPARED: &str = "owner:io names each socket's owner at its first send or \
    receive; a syscalls tracepoint would put every system call of the host on the kernel's \
    traced path";

/// Loads and attaches the programs of each capability the plan found ready. A capability
/// whose program the kernel refuses is left out whole (its other programs detached), and so
/// are the owner capabilities when tcp is left out. With `lean`, `owner:accept` is spared
/// where `owner:io` attached: the owner only names a connection's process (decisions bind
/// holders through their fds), and its `syscalls` tracepoints tax every system call on the
/// host, while `owner:io`'s run only on sockets. Fails when nothing is attached.
fn attach_all(ebpf: &mut Ebpf, plan: preflight::Plan, lean: bool) -> Result<Attached, ProbeError> {
    let mut done = Attached {
        attached: Vec::new(),
        missing: plan.missing,
        spared: Vec::new(),
    };
    // owner:io first, so that whether it attached decides owner:accept.
    let mut ready = plan.ready;
    ready.sort_by_key(|(c, _)| *c == Capability::OwnerAccept);
    let has = |c: Capability, done: &Attached| done.attached.iter().any(|(a, _)| *a == c);
    for (cap, detail) in ready {
        let needs_tcp = matches!(cap, Capability::OwnerAccept | Capability::OwnerIo);
        if needs_tcp && !has(Capability::Tcp, &done) {
            done.missing
                .push((cap, "needs the tcp capability".to_owned()));
            continue;
        }
        if lean && cap == Capability::OwnerAccept && has(Capability::OwnerIo, &done) {
            done.spared.push((cap, ACCEPT_SPARED.to_owned()));
            continue;
        }
        match attach(ebpf, cap) {
            Ok(()) => done.attached.push((cap, detail)),
            Err(e) => done.missing.push((cap, e.to_string())),
        }
    }
    done.attached.sort_by_key(|(c, _)| *c);
    done.missing.sort_by_key(|(c, _)| *c);
    if done.attached.is_empty() {
        return Err(ProbeError::NothingLoaded(list(&done.missing)));
    }
    Ok(done)
}

/// Loads and attaches every program of `cap`; on a failure, unloads those already loaded.
fn attach(ebpf: &mut Ebpf, cap: Capability) -> Result<(), ProbeError> {
    let progs = programs(cap);
    for (i, (prog, at)) in progs.iter().enumerate() {
        if let Err(e) = attach_one(ebpf, prog, *at) {
            for (done, at) in &progs[..i] {
                unload(ebpf, done, *at);
            }
            return Err(e);
        }
    }
    Ok(())
}

fn attach_one(ebpf: &mut Ebpf, prog: &str, at: Attach) -> Result<(), ProbeError> {
    match at {
        Attach::Tracepoint(category, name) => {
            let p: &mut TracePoint = program(ebpf, prog)?;
            p.load().map_err(|e| load_error(prog, e))?;
            p.attach(category, name)
                .map_err(|e| attach_error(prog, e))?;
        }
        Attach::Raw(name) => {
            let p: &mut RawTracePoint = program(ebpf, prog)?;
            p.load().map_err(|e| load_error(prog, e))?;
            p.attach(name).map_err(|e| attach_error(prog, e))?;
        }
    }
    Ok(())
}

fn unload(ebpf: &mut Ebpf, prog: &str, at: Attach) {
    let unloaded = match at {
        Attach::Tracepoint(..) => program::<TracePoint>(ebpf, prog).map(|p| p.unload()),
        Attach::Raw(_) => program::<RawTracePoint>(ebpf, prog).map(|p| p.unload()),
    };
    match unloaded {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(program = prog, %error, "could not unload program"),
        Err(error) => tracing::warn!(program = prog, %error, "could not unload program"),
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name).ok_or_else(|| ProbeError::Missing {
        what: "map",
        name: name.to_owned(),
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| ProbeError::Missing {
        what: "program",
        name: name.to_owned(),
    })?;
    p.try_into().map_err(|source| ProbeError::Program {
        program: name.to_owned(),
        source,
    })
}

fn load_error(program: &str, e: ProgramError) -> ProbeError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => ProbeError::Verifier {
            program: program.to_owned(),
            source: io_error,
            verifier_log: verifier_log.to_string(),
        },
        source => ProbeError::Program {
            program: program.to_owned(),
            source,
        },
    }
}

fn attach_error(program: &str, source: ProgramError) -> ProbeError {
    ProbeError::Program {
        program: program.to_owned(),
        source,
    }
}

/// Registers an object that owns its file descriptor (ring buffer, log reader, netlink
/// socket) with tokio.
fn readable<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: aya's RingBuf and EbpfLogger, and OwnedFd, own their fd and keep it open,
    // unchanged, until they are dropped, and the AsyncFd owns them.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the cgroup, where
/// raising the limit fails harmlessly without CAP_SYS_RESOURCE.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (not needed on Linux >= 5.11)"
        );
    }
}

/// Forwards the programs' aya-log records to `tracing` (through the `log` bridge).
fn start_program_logs(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "eBPF program logs unavailable");
            return;
        }
    };
    let mut logger = match readable(logger) {
        Ok(l) => l,
        Err(error) => {
            tracing::warn!(%error, "eBPF program logs unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

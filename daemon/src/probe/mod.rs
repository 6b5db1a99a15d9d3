//! The kernel side, from user space: load and attach the eBPF programs, read the ring buffer
//! on tokio, decode events, and count what the kernel could not deliver.
//!
//! Dropping a [`Probe`] detaches every program.
mod btf;
mod connector;
mod error;
mod preflight;
mod source;

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, RawTracePoint, TracePoint},
};
use reclaimd_common::names;
use tokio::io::unix::AsyncFd;

pub use self::{
    btf::{Btf, BtfError},
    // The proc connector's datagram decoder, public so tests can feed it arbitrary bytes.
    connector::{ProcConnector, decode as decode_proc_connector},
    error::ProbeError,
    source::{EventSource, Opened},
};
use crate::{clock, event::KernelEvent};

/// The programs and where they attach.
const TRACEPOINTS: [(&str, &str, &str); 6] = [
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("sys_exit_accept4", "syscalls", "sys_exit_accept4"),
    ("sys_exit_accept", "syscalls", "sys_exit_accept"),
    ("sock_send_length", "sock", "sock_send_length"),
    ("sock_recv_length", "sock", "sock_recv_length"),
];
const RAW_TRACEPOINTS: [(&str, &str); 1] = [("sched_process_fork", "sched_process_fork")];

/// Default ring buffer: 1 MiB holds about ten thousand events in flight.
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;
pub const DEFAULT_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Local TCP ports whose sockets are reported.
    pub watched_ports: Vec<u16>,
    pub ring_bytes: u32,
    /// The kernel's BTF, for structure offsets.
    pub btf_path: PathBuf,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            watched_ports: Vec::new(),
            ring_bytes: DEFAULT_RING_BYTES,
            btf_path: PathBuf::from(DEFAULT_BTF_PATH),
        }
    }
}

/// An event and when user space got it (CLOCK_MONOTONIC ns, the clock of `ts_ns`).
#[derive(Debug, Clone)]
pub struct Received {
    pub event: KernelEvent,
    pub recv_ns: u64,
}

pub struct Probe {
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    watched: HashMap<MapData, u16, u8>,
    malformed: u64,
    // Last: dropping it detaches the programs after the maps above are released.
    _ebpf: Ebpf,
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reclaimd-ebpf"));

impl Probe {
    /// Checks the host, loads and attaches every program. Must run inside a tokio runtime.
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
        let group_dead = preflight::check_formats(&tracefs)?;
        let kernel_btf = Btf::from_file(&opts.btf_path)?;
        let offsets = preflight::kernel_offsets(&kernel_btf, group_dead)?;
        tracing::debug!(?offsets, "kernel structure offsets");
        raise_memlock_limit();

        let aya_btf = aya::Btf::parse_file(&opts.btf_path, aya::Endianness::default())
            .map_err(|e| ProbeError::Load(e.into()))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global(names::OFFSETS, &offsets, true)
            .map_max_entries(names::EVENTS, opts.ring_bytes)
            .load(OBJECT)?;
        start_program_logs(&mut ebpf);

        let mut watched: HashMap<MapData, u16, u8> =
            HashMap::try_from(take_map(&mut ebpf, names::WATCHED_PORTS)?).map_err(|source| {
                ProbeError::Map {
                    map: names::WATCHED_PORTS,
                    source,
                }
            })?;
        for port in &opts.watched_ports {
            watched
                .insert(port, 1, 0)
                .map_err(|source| ProbeError::Map {
                    map: names::WATCHED_PORTS,
                    source,
                })?;
        }
        let drops =
            PerCpuArray::try_from(take_map(&mut ebpf, names::DROPS)?).map_err(|source| {
                ProbeError::Map {
                    map: names::DROPS,
                    source,
                }
            })?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?).map_err(|source| {
            ProbeError::Map {
                map: names::EVENTS,
                source,
            }
        })?;
        let ring = readable(ring)?;

        for (prog, category, name) in TRACEPOINTS {
            let p: &mut TracePoint = program(&mut ebpf, prog)?;
            p.load().map_err(|e| load_error(prog, e))?;
            p.attach(category, name)
                .map_err(|e| attach_error(prog, e))?;
        }
        for (prog, name) in RAW_TRACEPOINTS {
            let p: &mut RawTracePoint = program(&mut ebpf, prog)?;
            p.load().map_err(|e| load_error(prog, e))?;
            p.attach(name).map_err(|e| attach_error(prog, e))?;
        }
        tracing::info!(
            programs = TRACEPOINTS.len() + RAW_TRACEPOINTS.len(),
            ring_bytes = opts.ring_bytes,
            watched_ports = ?opts.watched_ports,
            "eBPF programs attached"
        );
        Ok(Self {
            ring,
            drops,
            watched,
            malformed: 0,
            _ebpf: ebpf,
        })
    }

    /// Waits until events are ready, then appends every available one to `out`. Returns how
    /// many were appended; malformed records are counted (see [`Probe::malformed`]) and
    /// skipped.
    pub async fn read_batch(&mut self, out: &mut Vec<Received>) -> Result<usize, ProbeError> {
        let before = out.len();
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let recv_ns = clock::monotonic_ns();
            match KernelEvent::decode(&item) {
                Ok(event) => out.push(Received { event, recv_ns }),
                Err(error) => {
                    self.malformed += 1;
                    tracing::warn!(%error, total = self.malformed, "skipped malformed event");
                }
            }
        }
        guard.clear_ready();
        Ok(out.len() - before)
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

    /// Starts reporting sockets on local `port`.
    pub fn watch_port(&mut self, port: u16) -> Result<(), ProbeError> {
        self.watched
            .insert(port, 1, 0)
            .map_err(|source| ProbeError::Map {
                map: names::WATCHED_PORTS,
                source,
            })
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

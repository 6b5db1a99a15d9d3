use thiserror::Error;

use super::btf::BtfError;

/// Why the kernel side could not be started or read. Each message says what to do.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "reclaimd needs root to load its eBPF programs (CAP_BPF and CAP_PERFMON, or \
         CAP_SYS_ADMIN); it runs as uid {uid} without them. Run it with sudo."
    )]
    NotPermitted { uid: u32 },

    #[error(
        "the kernel's BTF was not found at {path}: reclaimd needs Linux >= 5.8 built with \
         CONFIG_DEBUG_INFO_BTF=y (or pass --btf PATH to a BTF file for this kernel)"
    )]
    NoBtf { path: String },

    #[error("cannot use the kernel's BTF: {0}")]
    Btf(#[from] BtfError),

    #[error(
        "tracefs is not mounted and could not be mounted at /sys/kernel/tracing ({reason}); \
         mount it with `mount -t tracefs nodev /sys/kernel/tracing` and try again"
    )]
    NoTracefs { reason: String },

    #[error(
        "this kernel has no tracepoint {category}/{name} (looked in {tracefs}); reclaimd needs \
         it for {why}"
    )]
    MissingTracepoint {
        category: &'static str,
        name: &'static str,
        tracefs: String,
        why: &'static str,
    },

    #[error(
        "tracepoint {tracepoint} has field {field} at offset {found:?}, the programs expect \
         {expected}: unsupported kernel, please report it with `uname -r`"
    )]
    TracepointLayout {
        tracepoint: &'static str,
        field: &'static str,
        expected: u32,
        found: Option<u32>,
    },

    #[error("the kernel rejected program {program}: {source}\nverifier log:\n{verifier_log}")]
    Verifier {
        program: String,
        #[source]
        source: std::io::Error,
        verifier_log: String,
    },

    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),

    #[error("program {program}: {source}")]
    Program {
        program: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("the eBPF object has no {what} named {name} (build mismatch)")]
    Missing { what: &'static str, name: String },

    #[error(
        "no eBPF program could be loaded on this kernel ({0}); reclaimd needs Linux >= 5.8 \
         with BTF and tracepoints"
    )]
    NothingLoaded(String),

    #[error("invalid ring buffer size {0}: must be a power of two and at least 4096 bytes")]
    RingSize(u32),

    #[error("reading kernel events: {0}")]
    Io(#[from] std::io::Error),
}

//! The `reclaimd` binary: command line, logging, and exit codes. The work is in the library.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use reclaimd::{
    gpu::{DEFAULT_DEVICE_GLOB, GpuOptions},
    inventory_cmd,
    probe::{DEFAULT_BTF_PATH, DEFAULT_RING_BYTES, ExitFilter, ProbeOptions},
    trace::{self, TraceOptions},
};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Gets back GPU memory left behind by dead sessions.
///
/// reclaimd watches the kernel (eBPF tracepoints) for sessions that die, joins that with who
/// holds GPU memory, and reclaims what is orphaned. It needs root (or CAP_BPF + CAP_PERFMON)
/// and a kernel with BTF (Linux >= 5.8, CONFIG_DEBUG_INFO_BTF=y); where eBPF cannot load it
/// runs degraded on the proc connector and a /proc sweep, and says so.
///
/// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=reclaimd=debug) for more.
#[derive(Debug, Parser)]
#[command(name = "reclaimd", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: watch the configured services, find the GPU memory of dead sessions,
    /// and reclaim it (in enforce mode) or report it (the default).
    ///
    /// Every decision and action is recorded in the ledger ([ledger] path). An invalid
    /// configuration is refused before anything starts, with the key and line at fault.
    Run {
        /// The configuration file (TOML); see README for every key. Without it,
        /// /etc/reclaimd/config.toml when that exists, else the defaults: report mode, no
        /// service (holders are listed, nothing is signalled), the ledger in
        /// /var/lib/reclaimd, the API on /run/reclaimd/reclaimd.sock.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,

        /// Check the configuration, print what it means, and exit.
        #[arg(long)]
        check: bool,

        /// Run without eBPF, as `[probe] mode = "fallback"`: process exits from the kernel's
        /// proc connector (or, where it is unavailable, a /proc sweep) and socket closes from a
        /// /proc sweep every `[probe] fallback_sweep`. Deaths are seen later; status and the
        /// reclaimd_probe_mode metric say so.
        #[arg(long)]
        no_ebpf: bool,
    },

    /// Stream the kernel events reclaimd sees, one per line, until interrupted.
    ///
    /// Process forks and exits (whole processes only, never threads) and TCP state changes
    /// of sockets on the given local ports, with the process that owns each socket. Use it to
    /// check that the kernel side works on a host, or to watch a service's sessions.
    ///
    /// It starts on any kernel where one of its programs loads, and says first (on stderr,
    /// and in the ready line with --json) which events this kernel cannot show: for example
    /// owners learned from socket I/O before Linux 6.3.
    ///
    /// Example: sudo reclaimd trace --json --port 8000
    Trace {
        /// One JSON object per line (kind, ts_ns, recv_ns, pid, tgid, comm, and per kind:
        /// ppid; exit_code/signal; saddr, sport, daddr, dport, old_state, new_state,
        /// owner_tgid). The first line is {"kind":"ready"} once the programs are attached.
        #[arg(long)]
        json: bool,

        /// Report TCP sockets whose local port is PORT (repeat for more). Without it, no TCP
        /// events are reported: the kernel filters everything else out.
        #[arg(long = "port", value_name = "PORT")]
        ports: Vec<u16>,

        /// Size of the kernel-to-daemon ring buffer, a power of two in bytes. Raise it if
        /// events are lost under bursts.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_RING_BYTES)]
        ring_bytes: u32,

        /// The kernel's BTF (type information), used to find kernel structure offsets.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_BTF_PATH)]
        btf: PathBuf,

        /// How a process's death is told from the exit of one of its threads: the
        /// tracepoint's `group_dead` field (Linux >= 6.16), or `task->signal->live` (every
        /// kernel); `auto` takes the first this kernel has. The daemon always uses `auto`;
        /// the others are for checking a filter on a kernel that has both.
        #[arg(long, value_enum, default_value_t = ExitFilter::Auto)]
        exit_filter: ExitFilter,

        /// Only what the daemon reads: a connection's birth (ESTABLISHED), its owner, and
        /// its death (the first move out of an open state), the closing moves after it
        /// filtered in the kernel; events that need no action at once arrive in batches
        /// (at most 50 ms late). As the daemon, it learns owners at accept only where the
        /// kernel cannot report them at a socket's first send or receive (before 6.3).
        #[arg(long)]
        lifecycle: bool,
    },

    /// Print one GPU inventory: devices, and every process that holds GPU memory (NVML) or
    /// a GPU device file (procfs), with what reclaimd concludes about it.
    ///
    /// Status `live`: alive and holding a device file. `not-in-proc`: NVML lists the pid but
    /// /proc does not show it (another pid namespace, or gone). `no-device-fd`: NVML lists
    /// it but it holds no device file, so the number may be another process by now. Only
    /// `live` holders are ever acted on.
    Inventory {
        /// The snapshot as JSON.
        #[arg(long)]
        json: bool,

        /// The NVML library to load (default: the system's libnvidia-ml.so.1).
        #[arg(long, value_name = "PATH")]
        nvml_library: Option<PathBuf>,

        /// Open files matching this glob are GPU device handles.
        #[arg(long, value_name = "GLOB", default_value = DEFAULT_DEVICE_GLOB)]
        device_glob: String,
    },
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // try_init also routes the `log` records of aya and aya-log into tracing.
    let _ = tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .try_init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        // The reader went away (`reclaimd inventory | head`): not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Run {
            config,
            check,
            no_ebpf,
        } => {
            let (mut cfg, config) = load_config(config)?;
            if no_ebpf {
                cfg.probe.mode = reclaimd::config::ProbeMode::Fallback;
            }
            if check {
                println!(
                    "{}: ok: mode {:?}, probe {:?}, {} service(s), ledger {}",
                    config,
                    cfg.policy.mode,
                    cfg.probe.mode,
                    cfg.services.len(),
                    cfg.ledger_path.display()
                );
                return Ok(());
            }
            runtime.block_on(reclaimd::runtime::run(cfg))?;
        }
        Command::Trace {
            json,
            ports,
            ring_bytes,
            btf,
            exit_filter,
            lifecycle,
        } => {
            let opts = TraceOptions {
                probe: ProbeOptions {
                    watched_ports: ports,
                    ring_bytes,
                    btf_path: btf,
                    exit_filter,
                    every_change: !lifecycle,
                },
                json,
            };
            runtime.block_on(trace::run(opts))?;
        }
        Command::Inventory {
            json,
            nvml_library,
            device_glob,
        } => inventory_cmd::run(
            &GpuOptions {
                nvml_library,
                device_glob,
            },
            json,
        )?,
    }
    Ok(())
}

/// Where the daemon's configuration lives when none is named.
const INSTALLED_CONFIG: &str = "/etc/reclaimd/config.toml";

/// The named configuration, else the installed one, else the defaults; with what to call it
/// in messages.
fn load_config(named: Option<PathBuf>) -> anyhow::Result<(reclaimd::config::Config, String)> {
    let path = match named {
        Some(p) => p,
        None if std::path::Path::new(INSTALLED_CONFIG).exists() => PathBuf::from(INSTALLED_CONFIG),
        None => {
            tracing::info!(
                "no --config and no {INSTALLED_CONFIG}: the defaults (report mode, no service)"
            );
            let cfg = reclaimd::config::Config::parse("", "the defaults")?;
            return Ok((cfg, "the defaults".to_owned()));
        }
    };
    let cfg = reclaimd::config::Config::load(&path)?;
    Ok((cfg, path.display().to_string()))
}

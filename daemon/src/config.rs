//! The configuration file (TOML), validated up front: every error names the key and its line,
//! and a daemon with an invalid configuration does not start.
//!
//! Defaults are safe: `mode = "report"` signals nothing.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys and wrong types; toml's message names the line and key.
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}, {}: {key}: {message}", line.map(|l| format!("line {l}")).unwrap_or_else(|| "(no line)".to_owned()))]
    Invalid {
        path: String,
        key: String,
        line: Option<usize>,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decide and record, never signal.
    Report,
    /// Reclaim orphans.
    Enforce,
}

/// Where kernel events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// eBPF where it loads; otherwise the fallback, saying why.
    Auto,
    /// eBPF or nothing: the daemon refuses to start without it.
    Ebpf,
    /// No eBPF: process events from the kernel's proc connector, everything else from a
    /// /proc sweep every `fallback_sweep`. Slower to see deaths.
    Fallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// A session is the service's process tree, dead when its root exits.
    Process,
    /// A session is one TCP connection into a service port, dead on the peer's FIN/RST.
    Connection,
}

/// How processes are recognised as a service's. A process matches when any given matcher
/// matches; its descendants belong to the service too.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Matcher {
    /// Exact command names (`/proc/<pid>/comm`).
    pub comm: Vec<String>,
    /// A glob on the executable path (`/proc/<pid>/exe`).
    pub exe: Option<glob::Pattern>,
    /// A cgroup path prefix (from `/proc/<pid>/cgroup`, cgroup v2).
    pub cgroup: Option<String>,
    /// A systemd unit (matched as the cgroup's last component `NAME.service` or `NAME`).
    pub unit: Option<String>,
    /// A regular expression searched in the command line (`/proc/<pid>/cmdline`, its
    /// arguments joined by spaces): what names `python3 -m vllm…` or `ollama runner`.
    pub cmdline: Option<Cmdline>,
}

/// Which of a service's matchers recognised a process: the key under `match`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, strum::IntoStaticStr, strum::EnumString,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum MatchKind {
    Comm,
    Exe,
    Cgroup,
    Unit,
    Cmdline,
}

impl MatchKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A compiled `cmdline` pattern; equal when written the same.
#[derive(Debug, Clone)]
pub struct Cmdline(pub regex::Regex);

impl PartialEq for Cmdline {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub matcher: Matcher,
    pub ports: Vec<u16>,
    pub scope: Scope,
    /// Overrides of the policy for this service.
    pub mode: Option<Mode>,
    pub grace: Option<Duration>,
    /// Run before signalling, with the session's facts in its environment.
    pub hook: Option<PathBuf>,
    pub hook_timeout: Duration,
    /// Kernel keepalive probes on the service's connections held by GPU holders, so that a
    /// peer that vanished without FIN or RST is found dead (connection scope only).
    pub heartbeat: Option<Heartbeat>,
}

/// `[service.heartbeat]`: what reclaimd sets on a connection's socket (`SO_KEEPALIVE`,
/// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`, `TCP_USER_TIMEOUT`). A peer that fails
/// `count` probes is closed by the kernel with ETIMEDOUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Silence before the first probe (whole seconds).
    pub idle: Duration,
    /// Between probes (whole seconds).
    pub interval: Duration,
    /// Unanswered probes before the kernel closes the connection.
    pub count: u32,
    /// How long sent data may stay unacknowledged (default idle + count × interval).
    pub user_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    /// How long a session must have been dead before its holders count as orphaned.
    pub grace: Duration,
    /// Between SIGTERM and SIGKILL.
    pub term_grace: Duration,
    /// Device memory use (fraction of total) above which grace is halved.
    pub soft: f64,
    /// Above which grace is skipped.
    pub hard: f64,
    /// Never signalled: command names, or executable globs (entries containing '/').
    pub protect: Vec<String>,
    /// Breaker: more reclaims than this in a minute stop all action until an operator resets it.
    pub max_reclaims_per_minute: u32,
    /// How often the GPU inventory is re-read and every holder judged again.
    pub sweep: Duration,
    /// How often a sweep also re-reads all of /proc (processes and their open files) and the
    /// services' socket tables, to catch what kernel events missed (at once after lost
    /// events; every sweep when events come from the degraded sources).
    pub resync: Duration,
    /// Decisions waiting for the executor; beyond this they are counted and dropped.
    pub queue: usize,
    /// Reclaims carried out at once (independent holders; a parent still waits for its
    /// children).
    pub parallel: usize,
    /// What is done with suspects (holders outside every service whose original parent died
    /// and who were reparented): reported, or (opted into) reclaimed like orphans.
    pub suspects: Mode,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    pub nvml_library: Option<PathBuf>,
    pub device_glob: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    pub mode: ProbeMode,
    pub ring_bytes: u32,
    pub btf: PathBuf,
    /// How often the fallback re-reads /proc and the socket tables.
    pub fallback_sweep: Duration,
}

/// The gRPC API's listeners and who may act through them.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// Unix socket, mode 0660, owned by root and `group`.
    pub socket: PathBuf,
    pub group: String,
    /// Members may call `Reclaim` (root always may); `None`: root only.
    pub admin_group: Option<String>,
    /// Optional TCP listener; only with TLS and client certificates.
    pub listen: Option<std::net::SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Events a watcher may fall behind before it is dropped.
    pub watch_buffer: usize,
}

/// OTLP export of traces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryConfig {
    /// E.g. "http://127.0.0.1:4317" (grpc) or "http://127.0.0.1:4318" (http/protobuf);
    /// `None`: the standard OTEL_EXPORTER_OTLP_* variables decide (off when unset).
    pub otlp_endpoint: Option<String>,
    /// "grpc" or "http/protobuf"; `None`: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc.
    pub otlp_protocol: Option<String>,
}

/// Where Prometheus scrapes `/metrics`; `None` turns the endpoint off.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

pub const DEFAULT_API_SOCKET: &str = "/run/reclaimd/reclaimd.sock";

// The defaults of the gpu, ledger and probe modules (re-exported there) are defined here,
// so that the configuration, which pure modules use, depends on none of them.

/// Open files matching this are GPU device handles.
pub const DEFAULT_DEVICE_GLOB: &str = "/dev/nvidia*";

pub const DEFAULT_LEDGER_PATH: &str = "/var/lib/reclaimd/ledger.db";

/// Default ring buffer: 1 MiB holds about ten thousand events in flight.
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;
pub const DEFAULT_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub policy: Policy,
    pub api: ApiConfig,
    /// `[metrics] listen`: the Prometheus endpoint, or `None` when set to "".
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub telemetry: TelemetryConfig,
    pub gpu: GpuConfig,
    pub ledger_path: PathBuf,
    pub probe: ProbeConfig,
    /// `[kubernetes] containers_dir`: the kubelet's container log names, to attribute holders
    /// to pods; `None` when set to "".
    pub containers_dir: Option<PathBuf>,
    pub services: Vec<Service>,
}

/// Each reclaim in progress holds a thread (and an NVML handle) while it waits for its
/// holder to exit: more than this many is a mistake, not a speed-up.
pub const MAX_PARALLEL: usize = 256;

pub const DEFAULT_CONTAINERS_DIR: &str = "/var/log/containers";

impl Default for Config {
    fn default() -> Self {
        Self {
            policy: Policy {
                mode: Mode::Report,
                grace: Duration::from_secs(10),
                term_grace: Duration::from_secs(5),
                soft: 0.75,
                hard: 0.90,
                protect: Vec::new(),
                max_reclaims_per_minute: 30,
                suspects: Mode::Report,
                sweep: Duration::from_secs(5),
                resync: Duration::from_secs(60),
                queue: 1024,
                parallel: 16,
            },
            gpu: GpuConfig {
                nvml_library: None,
                device_glob: DEFAULT_DEVICE_GLOB.to_owned(),
            },
            ledger_path: PathBuf::from(DEFAULT_LEDGER_PATH),
            probe: ProbeConfig {
                mode: ProbeMode::Auto,
                ring_bytes: DEFAULT_RING_BYTES,
                btf: PathBuf::from(DEFAULT_BTF_PATH),
                fallback_sweep: Duration::from_secs(1),
            },
            services: Vec::new(),
            containers_dir: Some(PathBuf::from(DEFAULT_CONTAINERS_DIR)),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().ok(),
            telemetry: TelemetryConfig::default(),
            api: ApiConfig {
                socket: PathBuf::from(DEFAULT_API_SOCKET),
                group: "root".to_owned(),
                admin_group: None,
                listen: None,
                tls_cert: None,
                tls_key: None,
                client_ca: None,
                watch_buffer: 1024,
            },
        }
    }
}

impl Config {
    /// The mode that applies to a service.
    pub fn mode_of(&self, service: &Service) -> Mode {
        service.mode.unwrap_or(self.policy.mode)
    }

    pub fn grace_of(&self, service: &Service) -> Duration {
        service.grace.unwrap_or(self.policy.grace)
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Every port some service watches.
    pub fn watched_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .services
            .iter()
            .flat_map(|s| s.ports.iter().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: raw::Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let doc = toml_edit::Document::parse(text.to_owned()).ok();
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            key: key.to_owned(),
            line: doc.as_ref().and_then(|d| line_of(text, d, key)),
            message,
        };
        raw.validate(&invalid)
    }
}

/// The 1-based line where dotted `key` (with `service[N]` for array entries) is written, or
/// where the nearest enclosing table is, when the key itself is absent.
fn line_of(text: &str, doc: &toml_edit::Document<String>, key: &str) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Some((k, v)) = table.get_key_value(name) else {
            break;
        };
        span = k.span().or(span);
        if let Some(n) = index {
            let entry = v.as_array_of_tables()?.get(n)?;
            span = entry.span().or(span);
            table = entry;
        } else if let Some(t) = v.as_table_like() {
            table = t;
        } else {
            break;
        }
    }
    span.map(|s| line_at(text, s.start))
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The file's shape, as serde reads it: unknown keys are errors.
mod raw {
    use std::{path::PathBuf, time::Duration};

    use serde::Deserialize;

    use super::{ConfigError, Mode, Scope};

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Config {
        #[serde(default)]
        pub policy: Policy,
        #[serde(default)]
        pub gpu: Gpu,
        #[serde(default)]
        pub ledger: Ledger,
        #[serde(default)]
        pub probe: Probe,
        #[serde(default)]
        pub api: Api,
        #[serde(default)]
        pub metrics: Metrics,
        #[serde(default)]
        pub telemetry: Telemetry,
        #[serde(default)]
        pub kubernetes: Kubernetes,
        #[serde(default)]
        pub service: Vec<Service>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Kubernetes {
        pub containers_dir: Option<PathBuf>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Policy {
        pub mode: Option<Mode>,
        pub grace: Option<String>,
        pub term_grace: Option<String>,
        pub soft: Option<f64>,
        pub hard: Option<f64>,
        #[serde(default)]
        pub protect: Vec<String>,
        pub max_reclaims_per_minute: Option<u32>,
        pub sweep: Option<String>,
        pub resync: Option<String>,
        pub queue: Option<usize>,
        pub parallel: Option<usize>,
        pub suspects: Option<Mode>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Gpu {
        pub nvml_library: Option<PathBuf>,
        pub device_glob: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Ledger {
        pub path: Option<PathBuf>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Telemetry {
        pub otlp_endpoint: Option<String>,
        pub otlp_protocol: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Metrics {
        pub listen: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Api {
        pub socket: Option<PathBuf>,
        pub group: Option<String>,
        pub admin_group: Option<String>,
        pub listen: Option<String>,
        pub tls_cert: Option<PathBuf>,
        pub tls_key: Option<PathBuf>,
        pub client_ca: Option<PathBuf>,
        pub watch_buffer: Option<usize>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Probe {
        pub mode: Option<super::ProbeMode>,
        pub ring_bytes: Option<u32>,
        pub btf: Option<PathBuf>,
        pub fallback_sweep: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Match {
        #[serde(default)]
        pub comm: Vec<String>,
        pub exe: Option<String>,
        pub cgroup: Option<String>,
        pub unit: Option<String>,
        pub cmdline: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Service {
        pub name: String,
        #[serde(rename = "match")]
        pub matcher: Match,
        #[serde(default)]
        pub ports: Vec<u16>,
        pub scope: Option<Scope>,
        pub mode: Option<Mode>,
        pub grace: Option<String>,
        pub hook: Option<PathBuf>,
        pub hook_timeout: Option<String>,
        pub heartbeat: Option<Heartbeat>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Heartbeat {
        pub idle: Option<String>,
        pub interval: Option<String>,
        pub count: Option<u32>,
        pub user_timeout: Option<String>,
    }

    type Invalid<'a> = &'a dyn Fn(&str, String) -> ConfigError;

    fn duration(
        v: &Option<String>,
        key: &str,
        default: Duration,
        invalid: Invalid,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s.trim()).map_err(|e| {
                invalid(
                    key,
                    format!("{s:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2m\""),
                )
            }),
        }
    }

    fn fraction(
        v: Option<f64>,
        key: &str,
        default: f64,
        invalid: Invalid,
    ) -> Result<f64, ConfigError> {
        let f = v.unwrap_or(default);
        if f.is_finite() && f > 0.0 && f <= 1.0 {
            Ok(f)
        } else {
            Err(invalid(
                key,
                format!("{f} is not a fraction of device memory in (0, 1]"),
            ))
        }
    }

    impl Config {
        /// Validates the sections in this order, which is the order their errors are found.
        pub fn validate(self, invalid: Invalid) -> Result<super::Config, ConfigError> {
            let d = super::Config::default();
            let policy = self.policy.validate(d.policy, invalid)?;
            let gpu = self.gpu.validate(d.gpu, invalid)?;
            let probe = self.probe.validate(d.probe, invalid)?;
            let metrics_listen = self.metrics.validate(d.metrics_listen, invalid)?;
            let telemetry = self.telemetry.validate(invalid)?;
            let api = self.api.validate(d.api, invalid)?;
            let services = validate_services(self.service, invalid)?;
            Ok(super::Config {
                policy,
                gpu,
                ledger_path: self.ledger.path.unwrap_or(d.ledger_path),
                api,
                metrics_listen,
                telemetry,
                probe,
                containers_dir: self.kubernetes.containers_dir(d.containers_dir),
                services,
            })
        }
    }

    impl Policy {
        fn validate(
            self,
            d: super::Policy,
            invalid: Invalid,
        ) -> Result<super::Policy, ConfigError> {
            let soft = fraction(self.soft, "policy.soft", d.soft, invalid)?;
            let hard = fraction(self.hard, "policy.hard", d.hard, invalid)?;
            if soft > hard {
                return Err(invalid(
                    "policy.soft",
                    format!("soft ({soft}) must not exceed hard ({hard})"),
                ));
            }
            let max = self
                .max_reclaims_per_minute
                .unwrap_or(d.max_reclaims_per_minute);
            if max == 0 {
                return Err(invalid(
                    "policy.max_reclaims_per_minute",
                    "must be at least 1 (use mode = \"report\" to act on nothing)".to_owned(),
                ));
            }
            let sweep = duration(&self.sweep, "policy.sweep", d.sweep, invalid)?;
            if sweep < Duration::from_millis(100) {
                return Err(invalid("policy.sweep", "must be at least 100ms".to_owned()));
            }
            let resync = duration(&self.resync, "policy.resync", d.resync.max(sweep), invalid)?;
            if resync < sweep {
                return Err(invalid(
                    "policy.resync",
                    format!(
                        "must be at least policy.sweep ({})",
                        humantime::format_duration(sweep)
                    ),
                ));
            }
            let queue = self.queue.unwrap_or(d.queue);
            if queue == 0 {
                return Err(invalid("policy.queue", "must be at least 1".to_owned()));
            }
            let parallel = self.parallel.unwrap_or(d.parallel);
            if !(1..=super::MAX_PARALLEL).contains(&parallel) {
                return Err(invalid(
                    "policy.parallel",
                    format!("must be from 1 to {}", super::MAX_PARALLEL),
                ));
            }
            check_protect(&self.protect, invalid)?;
            Ok(super::Policy {
                mode: self.mode.unwrap_or(d.mode),
                grace: duration(&self.grace, "policy.grace", d.grace, invalid)?,
                term_grace: duration(&self.term_grace, "policy.term_grace", d.term_grace, invalid)?,
                soft,
                hard,
                protect: self.protect,
                max_reclaims_per_minute: max,
                sweep,
                resync,
                queue,
                parallel,
                suspects: self.suspects.unwrap_or(d.suspects),
            })
        }
    }

    /// `policy.protect`: command names, or executable globs (entries containing '/').
    fn check_protect(protect: &[String], invalid: Invalid) -> Result<(), ConfigError> {
        for (i, entry) in protect.iter().enumerate() {
            if entry.trim().is_empty() {
                return Err(invalid(
                    "policy.protect",
                    format!("entry {} is empty", i + 1),
                ));
            }
            if entry.contains('/') && glob::Pattern::new(entry).is_err() {
                return Err(invalid(
                    "policy.protect",
                    format!("{entry:?} is not a valid glob"),
                ));
            }
        }
        Ok(())
    }

    impl Gpu {
        fn validate(
            self,
            d: super::GpuConfig,
            invalid: Invalid,
        ) -> Result<super::GpuConfig, ConfigError> {
            let device_glob = self.device_glob.unwrap_or(d.device_glob);
            if let Err(e) = glob::Pattern::new(&device_glob) {
                return Err(invalid(
                    "gpu.device_glob",
                    format!("{device_glob:?} is not a valid glob: {e}"),
                ));
            }
            Ok(super::GpuConfig {
                nvml_library: self.nvml_library,
                device_glob,
            })
        }
    }

    impl Probe {
        fn validate(
            self,
            d: super::ProbeConfig,
            invalid: Invalid,
        ) -> Result<super::ProbeConfig, ConfigError> {
            let ring_bytes = self.ring_bytes.unwrap_or(d.ring_bytes);
            if !ring_bytes.is_power_of_two() || ring_bytes < 4096 {
                return Err(invalid(
                    "probe.ring_bytes",
                    format!("{ring_bytes} must be a power of two, at least 4096"),
                ));
            }
            let fallback_sweep = duration(
                &self.fallback_sweep,
                "probe.fallback_sweep",
                d.fallback_sweep,
                invalid,
            )?;
            if fallback_sweep < Duration::from_millis(100) {
                return Err(invalid(
                    "probe.fallback_sweep",
                    "must be at least 100ms".to_owned(),
                ));
            }
            Ok(super::ProbeConfig {
                mode: self.mode.unwrap_or(d.mode),
                ring_bytes,
                btf: self.btf.unwrap_or(d.btf),
                fallback_sweep,
            })
        }
    }

    impl Metrics {
        /// The Prometheus endpoint's address; `None` when `listen` is "".
        fn validate(
            self,
            default: Option<std::net::SocketAddr>,
            invalid: Invalid,
        ) -> Result<Option<std::net::SocketAddr>, ConfigError> {
            Ok(match self.listen.as_deref() {
                None => default,
                Some("") => None,
                Some(l) => Some(l.parse::<std::net::SocketAddr>().map_err(|e| {
                    invalid(
                        "metrics.listen",
                        format!("{l:?} is not an address:port (\"\" turns it off): {e}"),
                    )
                })?),
            })
        }
    }

    impl Telemetry {
        fn validate(self, invalid: Invalid) -> Result<super::TelemetryConfig, ConfigError> {
            if let Some(p) = &self.otlp_protocol
                && p != "grpc"
                && p != "http/protobuf"
            {
                return Err(invalid(
                    "telemetry.otlp_protocol",
                    format!("{p:?}: use \"grpc\" or \"http/protobuf\""),
                ));
            }
            Ok(super::TelemetryConfig {
                otlp_endpoint: self.otlp_endpoint,
                otlp_protocol: self.otlp_protocol,
            })
        }
    }

    impl Api {
        fn validate(
            self,
            d: super::ApiConfig,
            invalid: Invalid,
        ) -> Result<super::ApiConfig, ConfigError> {
            let socket = self.socket.unwrap_or(d.socket);
            if !socket.is_absolute() {
                return Err(invalid(
                    "api.socket",
                    format!("{} must be an absolute path", socket.display()),
                ));
            }
            let listen = match self.listen {
                None => None,
                Some(l) => Some(l.parse::<std::net::SocketAddr>().map_err(|e| {
                    invalid("api.listen", format!("{l:?} is not an address:port: {e}"))
                })?),
            };
            if listen.is_some()
                && (self.tls_cert.is_none() || self.tls_key.is_none() || self.client_ca.is_none())
            {
                return Err(invalid(
                    "api.listen",
                    "a TCP listener needs TLS with client certificates: set api.tls_cert, \
                     api.tls_key and api.client_ca (or remove api.listen and use the Unix socket)"
                        .to_owned(),
                ));
            }
            let watch_buffer = self.watch_buffer.unwrap_or(d.watch_buffer);
            if !(1..=1 << 20).contains(&watch_buffer) {
                return Err(invalid(
                    "api.watch_buffer",
                    format!("{watch_buffer} must be between 1 and 1048576"),
                ));
            }
            Ok(super::ApiConfig {
                watch_buffer,
                socket,
                group: self.group.unwrap_or(d.group),
                admin_group: self.admin_group,
                listen,
                tls_cert: self.tls_cert,
                tls_key: self.tls_key,
                client_ca: self.client_ca,
            })
        }
    }

    impl Kubernetes {
        /// `containers_dir`, or `None` when it is "".
        fn containers_dir(self, default: Option<PathBuf>) -> Option<PathBuf> {
            match self.containers_dir {
                None => default,
                Some(p) if p.as_os_str().is_empty() => None,
                Some(p) => Some(p),
            }
        }
    }

    fn validate_services(
        service: Vec<Service>,
        invalid: Invalid,
    ) -> Result<Vec<super::Service>, ConfigError> {
        let mut services = Vec::with_capacity(service.len());
        for (i, s) in service.into_iter().enumerate() {
            let valid = s.validate(i, &services, invalid)?;
            services.push(valid);
        }
        Ok(services)
    }

    impl Service {
        /// Entry `i` of `[[service]]`; `earlier` holds the entries before it.
        fn validate(
            self,
            i: usize,
            earlier: &[super::Service],
            invalid: Invalid,
        ) -> Result<super::Service, ConfigError> {
            let at = |key: &str| format!("service[{i}].{key}");
            if self.name.trim().is_empty() {
                return Err(invalid(&at("name"), "must not be empty".to_owned()));
            }
            if earlier.iter().any(|o| o.name == self.name) {
                return Err(invalid(
                    &at("name"),
                    format!("{:?} is defined twice", self.name),
                ));
            }
            let matcher = self.matcher.validate(at, invalid)?;
            if self.ports.contains(&0) {
                return Err(invalid(&at("ports"), "port 0 is not a port".to_owned()));
            }
            let scope = self.scope.unwrap_or(Scope::Process);
            if scope == Scope::Connection && self.ports.is_empty() {
                return Err(invalid(
                    &at("ports"),
                    "scope = \"connection\" needs the service's listening ports".to_owned(),
                ));
            }
            let grace = match &self.grace {
                None => None,
                g => Some(duration(g, &at("grace"), Duration::ZERO, invalid)?),
            };
            if let Some(h) = &self.hook
                && !h.is_absolute()
            {
                return Err(invalid(
                    &at("hook"),
                    format!("{} must be an absolute path", h.display()),
                ));
            }
            let heartbeat = match self.heartbeat {
                None => None,
                Some(_) if scope != Scope::Connection => {
                    return Err(invalid(
                        &at("heartbeat"),
                        "probes a service's connections: it needs scope = \"connection\""
                            .to_owned(),
                    ));
                }
                Some(h) => Some(h.validate(&at, invalid)?),
            };
            Ok(super::Service {
                heartbeat,
                name: self.name,
                matcher,
                ports: self.ports,
                scope,
                mode: self.mode,
                grace,
                hook: self.hook,
                hook_timeout: duration(
                    &self.hook_timeout,
                    &at("hook_timeout"),
                    Duration::from_secs(10),
                    invalid,
                )?,
            })
        }
    }

    /// TCP keeps keepalive times in whole seconds, at most `MAX_TCP_KEEPIDLE` (32767).
    fn whole_seconds(d: Duration, key: &str, invalid: Invalid) -> Result<Duration, ConfigError> {
        if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > 32767 {
            return Err(invalid(
                key,
                format!("{d:?}: keepalive times are whole seconds from 1s to 32767s"),
            ));
        }
        Ok(d)
    }

    impl Heartbeat {
        fn validate(
            self,
            at: &impl Fn(&str) -> String,
            invalid: Invalid,
        ) -> Result<super::Heartbeat, ConfigError> {
            let key = |k: &str| at(&format!("heartbeat.{k}"));
            let seconds = |v: &Option<String>, k: &str, default: u64| {
                let d = duration(v, &key(k), Duration::from_secs(default), invalid)?;
                whole_seconds(d, &key(k), invalid)
            };
            let idle = seconds(&self.idle, "idle", 30)?;
            let interval = seconds(&self.interval, "interval", 10)?;
            let count = self.count.unwrap_or(3);
            if !(1..=127).contains(&count) {
                return Err(invalid(
                    &key("count"),
                    format!("{count}: the kernel takes 1 to 127 probes"),
                ));
            }
            let user_timeout = duration(
                &self.user_timeout,
                &key("user_timeout"),
                idle + interval * count,
                invalid,
            )?;
            if user_timeout < Duration::from_millis(1)
                || user_timeout.as_millis() > i32::MAX as u128
            {
                return Err(invalid(
                    &key("user_timeout"),
                    format!("{user_timeout:?}: from 1ms to about 24 days"),
                ));
            }
            Ok(super::Heartbeat {
                idle,
                interval,
                count,
                user_timeout,
            })
        }
    }

    /// The regex crate's reason, without its multi-line drawing of the pattern.
    fn regex_why(err: &regex::Error) -> String {
        let text = err.to_string();
        let last = text.lines().last().unwrap_or(&text);
        last.trim().trim_start_matches("error: ").to_owned()
    }

    impl Match {
        /// A service's `match`; `at` names its keys.
        fn validate(
            self,
            at: impl Fn(&str) -> String,
            invalid: Invalid,
        ) -> Result<super::Matcher, ConfigError> {
            if self.comm.is_empty()
                && self.exe.is_none()
                && self.cgroup.is_none()
                && self.unit.is_none()
                && self.cmdline.is_none()
            {
                return Err(invalid(
                    &at("match"),
                    "give at least one of comm, exe, cgroup, unit, cmdline".to_owned(),
                ));
            }
            if let Some(bad) = self.comm.iter().find(|c| c.is_empty() || c.len() > 15) {
                return Err(invalid(
                    &at("match.comm"),
                    format!(
                        "{bad:?}: a command name has 1 to 15 characters (the kernel truncates to 15)"
                    ),
                ));
            }
            let exe = match self.exe {
                None => None,
                Some(e) => Some(glob::Pattern::new(&e).map_err(|err| {
                    invalid(
                        &at("match.exe"),
                        format!("{e:?} is not a valid glob: {err}"),
                    )
                })?),
            };
            if let Some(c) = &self.cgroup
                && !c.starts_with('/')
            {
                return Err(invalid(
                    &at("match.cgroup"),
                    format!("{c:?} must start with '/'"),
                ));
            }
            let cmdline = match self.cmdline {
                None => None,
                Some(re) => Some(super::Cmdline(regex::Regex::new(&re).map_err(|err| {
                    invalid(
                        &at("match.cmdline"),
                        format!(
                            "{re:?} is not a valid regular expression: {}",
                            regex_why(&err)
                        ),
                    )
                })?)),
            };
            Ok(super::Matcher {
                comm: self.comm,
                exe,
                cgroup: self.cgroup,
                unit: self.unit,
                cmdline,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[policy]
mode = "enforce"
grace = "500ms"
term_grace = "2s"
soft = 0.7
hard = 0.95
protect = ["sshd", "/usr/bin/nvidia-*"]
max_reclaims_per_minute = 10
sweep = "1s"
resync = "30s"

[gpu]
nvml_library = "/opt/fake/libnvidia-ml.so.1"
device_glob = "/tmp/gpu/nvidia*"

[ledger]
path = "/tmp/ledger.db"

[[service]]
name = "llm"
match = { comm = ["server"], unit = "llm.service" }
ports = [8000, 8001]
scope = "connection"
grace = "0s"

[[service]]
name = "notebooks"
match = { exe = "/opt/jupyter/*" }
mode = "report"
hook = "/usr/local/bin/drain"
"#;

    #[test]
    fn defaults_are_safe() {
        let c = Config::parse("", "test").unwrap();
        assert_eq!(c.policy.mode, Mode::Report);
        assert_eq!(c.policy.grace, Duration::from_secs(10));
        assert_eq!(c.policy.term_grace, Duration::from_secs(5));
        assert_eq!(c.policy.soft, 0.75);
        assert_eq!(c.policy.hard, 0.90);
        assert_eq!(c.policy.max_reclaims_per_minute, 30);
        assert_eq!(c.policy.sweep, Duration::from_secs(5));
        assert_eq!(c.policy.resync, Duration::from_secs(60));
        assert_eq!(c.ledger_path, PathBuf::from("/var/lib/reclaimd/ledger.db"));
        assert_eq!(c.gpu.device_glob, "/dev/nvidia*");
        assert!(c.services.is_empty());
    }

    #[test]
    fn a_sweep_slower_than_the_default_resync_resyncs_every_sweep() {
        let c = Config::parse("[policy]\nsweep = \"2m\"\n", "test").unwrap();
        assert_eq!(c.policy.resync, Duration::from_secs(120));
    }

    #[test]
    fn full_file() {
        let c = Config::parse(FULL, "test").unwrap();
        assert_eq!(c.policy.mode, Mode::Enforce);
        assert_eq!(c.policy.grace, Duration::from_millis(500));
        assert_eq!(c.policy.protect.len(), 2);
        assert_eq!(c.policy.resync, Duration::from_secs(30));
        assert_eq!(c.services.len(), 2);
        let llm = &c.services[0];
        assert_eq!(llm.scope, Scope::Connection);
        assert_eq!(llm.ports, vec![8000, 8001]);
        assert_eq!(llm.matcher.comm, vec!["server"]);
        assert_eq!(llm.matcher.unit.as_deref(), Some("llm.service"));
        assert_eq!(c.grace_of(llm), Duration::ZERO);
        assert_eq!(c.mode_of(llm), Mode::Enforce);
        let nb = &c.services[1];
        assert_eq!(nb.scope, Scope::Process);
        assert_eq!(c.mode_of(nb), Mode::Report);
        assert_eq!(c.grace_of(nb), Duration::from_millis(500));
        assert!(
            nb.matcher
                .exe
                .as_ref()
                .unwrap()
                .matches("/opt/jupyter/python")
        );
        assert_eq!(c.watched_ports(), vec![8000, 8001]);
    }

    fn err(text: &str) -> String {
        Config::parse(text, "reclaimd.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = err("[policy]\nmode = \"enforce\"\ngrace = \"ten seconds\"\n");
        assert!(e.contains("policy.grace"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("reclaimd.toml"), "{e}");

        let e = err("[policy]\nsoft = 0.95\nhard = 0.9\n");
        assert!(e.contains("policy.soft") && e.contains("line 2"), "{e}");

        let e = err(
            "[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\n\n[[service]]\nname = \"b\"\nmatch = { comm = [\"y\"] }\nscope = \"connection\"\n",
        );
        assert!(e.contains("service[1].ports"), "{e}");
        assert!(e.contains("line 5"), "{e}");

        let e = err("[[service]]\nname = \"a\"\nmatch = { }\n");
        assert!(
            e.contains("service[0].match") && e.contains("line 3"),
            "{e}"
        );

        let e = err("[[service]]\nname = \"a\"\nmatch = { exe = \"/opt/[x\" }\n");
        assert!(e.contains("service[0].match.exe"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_cmdline_pattern_that_does_not_compile_names_the_key_and_line() {
        let text = "[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\n\n\
                    [[service]]\nname = \"vllm\"\nmatch = { cmdline = \"-m (vllm\" }\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert_eq!(
            e,
            "config t.toml, line 7: service[1].match.cmdline: \"-m (vllm\" is not a valid \
             regular expression: unclosed group"
        );
        let ok = "[[service]]\nname = \"vllm\"\nmatch = { cmdline = '-m vllm\\.entrypoints' }\n";
        let cfg = Config::parse(ok, "t.toml").unwrap();
        let re = cfg.services[0].matcher.cmdline.as_ref().unwrap();
        assert!(re.0.is_match("python3 -m vllm.entrypoints.openai.api_server"));
    }

    #[test]
    fn syntax_unknown_keys_and_types_are_refused() {
        let e = err("[policy]\nmode = \"enforce\"\ngarce = \"1s\"\n");
        assert!(e.contains("garce") && e.contains("line 3"), "{e}");
        let e = err("[policy]\nmode = \"sometimes\"\n");
        assert!(e.contains("sometimes") && e.contains("line 2"), "{e}");
        let e = err("[policy\n");
        assert!(e.contains("line 1"), "{e}");
        let e = err("[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\nports = [70000]\n");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn other_invalid_values() {
        for (text, key) in [
            (
                "[policy]\nmax_reclaims_per_minute = 0\n",
                "policy.max_reclaims_per_minute",
            ),
            ("[policy]\nhard = 1.5\n", "policy.hard"),
            ("[policy]\nsweep = \"1ms\"\n", "policy.sweep"),
            (
                "[policy]\nsweep = \"10s\"\nresync = \"5s\"\n",
                "policy.resync",
            ),
            ("[policy]\nparallel = 0\n", "policy.parallel"),
            ("[policy]\nparallel = 100000\n", "policy.parallel"),
            ("[policy]\nprotect = [\"\"]\n", "policy.protect"),
            ("[gpu]\ndevice_glob = \"/dev/[\"\n", "gpu.device_glob"),
            ("[probe]\nring_bytes = 5000\n", "probe.ring_bytes"),
            (
                "[probe]\nmode = \"kprobe\"\n",
                "expected one of `auto`, `ebpf`, `fallback`",
            ),
            (
                "[probe]\nfallback_sweep = \"10ms\"\n",
                "probe.fallback_sweep",
            ),
            (
                "[[service]]\nname = \"a\"\nmatch = { comm = [\"averyveryverylongname\"] }\n",
                "service[0].match.comm",
            ),
            (
                "[[service]]\nname = \"a\"\nmatch = { cgroup = \"system.slice\" }\n",
                "service[0].match.cgroup",
            ),
            (
                "[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\nhook = \"drain.sh\"\n",
                "service[0].hook",
            ),
            (
                "[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\n[[service]]\nname = \"a\"\nmatch = { comm = [\"y\"] }\n",
                "service[1].name",
            ),
            (
                "[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\n[service.heartbeat]\n",
                "service[0].heartbeat: probes a service's connections",
            ),
            (
                "[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\nports = [1]\nscope = \"connection\"\n[service.heartbeat]\nidle = \"1500ms\"\n",
                "service[0].heartbeat.idle",
            ),
            (
                "[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\nports = [1]\nscope = \"connection\"\n[service.heartbeat]\ncount = 0\n",
                "service[0].heartbeat.count",
            ),
            (
                "[[service]]\nname = \"a\"\nmatch = { comm = [\"x\"] }\nports = [1]\nscope = \"connection\"\n[service.heartbeat]\nuser_timeout = \"0s\"\n",
                "service[0].heartbeat.user_timeout",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(key), "{text:?} -> {e}");
        }
    }

    #[test]
    fn a_heartbeat_without_values_takes_the_defaults() {
        let text = "[[service]]\nname = \"api\"\nmatch = { comm = [\"x\"] }\nports = [8000]\n\
                    scope = \"connection\"\n[service.heartbeat]\ninterval = \"5s\"\n";
        let cfg = Config::parse(text, "t.toml").unwrap();
        assert_eq!(
            cfg.services[0].heartbeat,
            Some(Heartbeat {
                idle: Duration::from_secs(30),
                interval: Duration::from_secs(5),
                count: 3,
                user_timeout: Duration::from_secs(45),
            }),
            "user_timeout defaults to idle + count × interval"
        );
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = Config::load(Path::new("/nonexistent/reclaimd.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read config /nonexistent/reclaimd.toml"),
            "{e}"
        );
    }
}

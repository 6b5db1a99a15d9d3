//! `reclaimctl`: ask a running reclaimd what it sees and what it did, over its gRPC socket.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use reclaimd::{
    api::{client, pb, pb::reclaimd_client::ReclaimdClient},
    clock::unix_ms,
    config::DEFAULT_API_SOCKET,
    human,
};
use tonic::{Code, transport::Channel};

/// Query reclaimd: its status, sessions, GPU holders and the reclaim ledger; watch it live;
/// ask it to reclaim a holder.
///
/// Exit codes: 0 ok; 1 error; 2 bad usage; 3 reclaimd not reachable; 4 permission denied;
/// 5 not found; 6 a reclaim was refused or did not free the memory.
#[derive(Debug, Parser)]
#[command(name = "reclaimctl", version)]
struct Cli {
    /// The daemon's socket ([api] socket in its config).
    #[arg(long, global = true, env = "RECLAIMD_SOCKET", default_value = DEFAULT_API_SOCKET)]
    socket: PathBuf,
    /// Print JSON (one object; `watch`: one per line) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The daemon, its GPUs and its policy.
    Status,
    /// Sessions: service process trees and connections on service ports.
    Sessions {
        #[arg(long)]
        service: Option<String>,
        /// Include dead sessions still kept (they bind orphans).
        #[arg(long)]
        all: bool,
    },
    /// Processes holding GPU memory or device files, with their verdicts.
    Holders {
        #[arg(long)]
        service: Option<String>,
        /// live, pending, orphan, unmanaged, untrusted or exiting.
        #[arg(long)]
        verdict: Option<String>,
    },
    /// The ledger: decisions and outcomes, newest first.
    Reclaims {
        /// Only the last DURATION, e.g. 1h, 30m, 2d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        #[arg(long)]
        service: Option<String>,
        /// pending, reclaimed, failed, skipped, released or interrupted.
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long)]
        pid: Option<u32>,
        /// At most this many records (fetched a page at a time).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Stream session deaths, verdict changes and reclaim outcomes until interrupted.
    Watch,
    /// Reclaim a holder now (root or [api] admin_group only), through the daemon's safety
    /// rules and ledger.
    Reclaim {
        /// The holder's pid.
        #[arg(long, required_unless_present = "session", conflicts_with = "session")]
        pid: Option<u32>,
        /// Every holder bound to this session key (see `reclaimctl sessions`).
        #[arg(long)]
        session: Option<String>,
        /// Record what would happen; signal nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why, for the ledger.
        #[arg(long)]
        reason: String,
    },
}

/// An error a person can act on, with the exit code scripts can test.
struct Failure {
    code: u8,
    message: String,
}

fn from_status(s: tonic::Status, socket: &Path) -> Failure {
    let (code, message) = match s.code() {
        Code::PermissionDenied => (4, format!("permission denied: {}", s.message())),
        Code::NotFound => (5, s.message().to_owned()),
        Code::InvalidArgument => (2, format!("invalid argument: {}", s.message())),
        Code::Unavailable => (
            3,
            format!(
                "reclaimd at {} is not answering: {}",
                socket.display(),
                s.message()
            ),
        ),
        _ => (1, format!("{:?}: {}", s.code(), s.message())),
    };
    Failure { code, message }
}

fn connect_failure(e: &tonic::transport::Error, socket: &Path) -> Failure {
    // The io::Error is a few sources down (tonic → hyper → io).
    let mut io = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(x) = err.downcast_ref::<std::io::Error>() {
            io = Some(x.kind());
            break;
        }
        cur = err.source();
    }
    let why = match io {
        Some(std::io::ErrorKind::NotFound) | Some(std::io::ErrorKind::ConnectionRefused) => {
            "reclaimd is not running (or listens elsewhere: --socket, [api] socket)".to_owned()
        }
        Some(std::io::ErrorKind::PermissionDenied) => {
            "permission denied: run as root or as a member of the socket's group ([api] group)"
                .to_owned()
        }
        _ => e.to_string(),
    };
    Failure {
        code: if io == Some(std::io::ErrorKind::PermissionDenied) {
            4
        } else {
            3
        },
        message: format!("cannot reach {}: {why}", socket.display()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reclaimctl: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): done.
        Err(f) if f.code == 0 => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("reclaimctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let s = serde_json::to_string(v).map_err(|e| Failure {
        code: 1,
        message: e.to_string(),
    })?;
    out(&s)
}

/// Writes a line; a closed pipe (`| head`) ends quietly.
fn out(line: &str) -> Result<(), Failure> {
    let mut o = std::io::stdout().lock();
    match writeln!(o, "{line}").and_then(|_| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure {
            code: 0,
            message: String::new(),
        }),
        Err(e) => Err(Failure {
            code: 1,
            message: e.to_string(),
        }),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let socket = cli.socket.clone();
    let client = client::connect(&socket)
        .await
        .map_err(|e| connect_failure(&e, &socket))?;
    let mut ctl = Ctl {
        client,
        socket,
        json: cli.json,
    };
    match cli.command {
        Command::Status => ctl.status().await,
        Command::Sessions { service, all } => ctl.sessions(service, all).await,
        Command::Holders { service, verdict } => ctl.holders(service, verdict).await,
        Command::Reclaims {
            since,
            service,
            outcome,
            pid,
            limit,
        } => ctl.reclaims(since, service, outcome, pid, limit).await,
        Command::Watch => ctl.watch().await,
        Command::Reclaim {
            pid,
            session,
            dry_run,
            reason,
        } => ctl.reclaim(pid, session, dry_run, reason).await,
    }
}

/// A connected daemon, and how its answers are printed: one method per subcommand.
struct Ctl {
    client: ReclaimdClient<Channel>,
    socket: PathBuf,
    json: bool,
}

impl Ctl {
    fn failure(&self, s: tonic::Status) -> Failure {
        from_status(s, &self.socket)
    }

    /// `response` as JSON, or as a table: `header`, then `rows`.
    fn table<T: serde::Serialize>(
        &self,
        response: &T,
        header: &str,
        rows: impl Iterator<Item = String>,
    ) -> Result<(), Failure> {
        if self.json {
            return json(response);
        }
        out(header)?;
        for row in rows {
            out(&row)?;
        }
        Ok(())
    }

    async fn status(&mut self) -> Result<(), Failure> {
        let s = self
            .client
            .get_status(pb::GetStatusRequest {})
            .await
            .map_err(|s| self.failure(s))?
            .into_inner();
        if self.json {
            return json(&s);
        }
        print_status(&s)
    }

    async fn sessions(&mut self, service: Option<String>, all: bool) -> Result<(), Failure> {
        let r = self
            .client
            .list_sessions(pb::ListSessionsRequest {
                service: service.unwrap_or_default(),
                include_dead: all,
            })
            .await
            .map_err(|s| self.failure(s))?
            .into_inner();
        let header = format!(
            "{:<11} {:<12} {:>8}  {:<16} SESSION",
            "KIND", "SERVICE", "PID", "STATE"
        );
        self.table(&r, &header, r.sessions.iter().map(session_row))
    }

    async fn holders(
        &mut self,
        service: Option<String>,
        verdict: Option<String>,
    ) -> Result<(), Failure> {
        let r = self
            .client
            .list_holders(pb::ListHoldersRequest {
                service: service.unwrap_or_default(),
                verdict: verdict.unwrap_or_default(),
            })
            .await
            .map_err(|s| self.failure(s))?
            .into_inner();
        let header = format!(
            "{:>8} {:<16} {:<12} {:<18} {:<10} {:>12}  {:<10} {:<24} SESSIONS",
            "PID", "COMM", "SERVICE", "MATCHED BY", "VERDICT", "GPU MEMORY", "GRACE LEFT", "POD"
        );
        self.table(&r, &header, r.holders.iter().map(holder_row))
    }

    async fn reclaims(
        &mut self,
        since: Option<std::time::Duration>,
        service: Option<String>,
        outcome: Option<String>,
        pid: Option<u32>,
        limit: usize,
    ) -> Result<(), Failure> {
        let mut records = Vec::new();
        let mut token = String::new();
        while records.len() < limit {
            let page = self
                .client
                .list_reclaims(pb::ListReclaimsRequest {
                    since_ms: since.map(|d| unix_ms() - d.as_millis() as i64).unwrap_or(0),
                    service: service.clone().unwrap_or_default(),
                    outcome: outcome.clone().unwrap_or_default(),
                    pid: pid.unwrap_or(0),
                    page_size: (limit - records.len()).min(1000) as u32,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .map_err(|s| self.failure(s))?
                .into_inner();
            records.extend(page.reclaims);
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        if self.json {
            return json(&records);
        }
        print_records(&records)
    }

    async fn watch(&mut self) -> Result<(), Failure> {
        let mut stream = self
            .client
            .watch_events(pb::WatchEventsRequest {})
            .await
            .map_err(|s| self.failure(s))?
            .into_inner();
        while let Some(ev) = stream.message().await.map_err(|s| self.failure(s))? {
            if self.json {
                json(&ev)?;
            } else {
                out(&describe(&ev))?;
            }
        }
        Ok(())
    }

    async fn reclaim(
        &mut self,
        pid: Option<u32>,
        session: Option<String>,
        dry_run: bool,
        reason: String,
    ) -> Result<(), Failure> {
        let r = self
            .client
            .reclaim(pb::ReclaimRequest {
                pid: pid.unwrap_or(0),
                session_key: session.unwrap_or_default(),
                dry_run,
                reason,
            })
            .await
            .map_err(|s| self.failure(s))?
            .into_inner();
        if self.json {
            json(&r.records)?;
        } else {
            print_records(&r.records)?;
        }
        let wanted = if dry_run { "skipped" } else { "reclaimed" };
        if r.records.iter().all(|x| x.outcome == wanted) {
            Ok(())
        } else {
            Err(Failure {
                code: 6,
                message: "not every holder was reclaimed; see the outcomes above".into(),
            })
        }
    }
}

/// A line of `sessions`.
fn session_row(s: &pb::Session) -> String {
    let state = if s.dead {
        format!(
            "dead {}",
            s.death_time_ms
                .map(|t| human::ago(t, unix_ms()))
                .unwrap_or_default()
        )
    } else {
        "live".to_owned()
    };
    format!(
        "{:<11} {:<12} {:>8}  {:<16} {}{}",
        s.kind,
        s.service,
        s.pid,
        state,
        s.key,
        if s.dead {
            format!(" ({})", s.death_cause)
        } else {
            String::new()
        }
    )
}

/// A line of `holders`.
fn holder_row(h: &pb::Holder) -> String {
    let known = h
        .memory
        .iter()
        .filter_map(|m| m.bytes)
        .fold(0, u64::saturating_add);
    let unknown = h.memory.iter().any(|m| m.bytes.is_none());
    let mem = match (h.memory.is_empty(), unknown) {
        (true, _) => "-".to_owned(),
        (false, true) => format!("{}+?", human::bytes(known)),
        (false, false) => human::bytes(known),
    };
    let grace = if h.verdict == "pending" {
        human::millis(h.grace_left_ms as i64)
    } else {
        "-".to_owned()
    };
    let pod = if h.k8s_pod.is_empty() {
        "-".to_owned()
    } else {
        format!("{}/{}/{}", h.k8s_namespace, h.k8s_pod, h.k8s_container)
    };
    // Which matcher made it the service's, and on which process: itself, or an ancestor.
    let matched = match (h.matched_by.as_str(), h.matched_pid) {
        ("", _) => "-".to_owned(),
        (by, pid) if pid == h.pid => format!("{by} (self)"),
        (by, pid) => format!("{by} (pid {pid})"),
    };
    format!(
        "{:>8} {:<16} {:<12} {:<18} {:<10} {:>12}  {:<10} {:<24} {}",
        h.pid,
        h.comm,
        if h.service.is_empty() {
            "-"
        } else {
            &h.service
        },
        matched,
        h.verdict,
        mem,
        grace,
        pod,
        h.session_keys.join(",")
    )
}

fn print_status(s: &pb::GetStatusResponse) -> Result<(), Failure> {
    out(&format!(
        "reclaimd {}, up {}s, probe {}, mode {}{}",
        s.version,
        s.uptime_seconds,
        s.probe_mode,
        s.policy_mode,
        if s.breaker_tripped {
            ", BREAKER TRIPPED: not acting"
        } else {
            ""
        }
    ))?;
    if !s.ledger_error.is_empty() {
        out(&format!(
            "LEDGER UNWRITABLE: {} (nothing is signalled until it can record)",
            s.ledger_error
        ))?;
    }
    if !s.probe_degraded_reason.is_empty() {
        out(&format!(
            "DEGRADED: {} (deaths are seen later)",
            s.probe_degraded_reason
        ))?;
    }
    if !s.capabilities.is_empty() {
        out("kernel capabilities (where each kind of event comes from):")?;
    }
    for c in &s.capabilities {
        let how = if c.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.detail)
        };
        out(&format!("  {:<13} {}{how}", c.name, c.source))?;
    }
    out(&format!(
        "kernel events: {} seen, {} lost; reclaim queue {}/{}",
        s.events_seen, s.events_dropped, s.queue_depth, s.queue_capacity
    ))?;
    if s.nvml_available {
        out(&format!("NVML: available, driver {}", s.driver_version))?;
    } else {
        out(&format!("NVML: unavailable: {}", s.nvml_reason))?;
    }
    out(&format!(
        "\n{:<4} {:<42} {:<22} {:>20} {:>12} {:>12} {:>12}",
        "IDX", "UUID", "NAME", "USED / TOTAL", "ATTRIBUTED", "UNATTRIB.", "ORPHANED"
    ))?;
    for d in &s.devices {
        // A MIG instance shows as GPU:instance.
        let index = match s.devices.iter().find(|p| p.uuid == d.parent_uuid) {
            Some(parent) => format!("{}:{}", parent.index, d.index),
            None => d.index.to_string(),
        };
        out(&format!(
            "{:<4} {:<42} {:<22} {:>20} {:>12} {:>12} {:>12}",
            index,
            d.uuid,
            d.name,
            human::used_of(d.used_bytes, d.total_bytes),
            human::bytes(d.attributed_bytes),
            human::bytes(d.unattributed_bytes),
            human::bytes(d.orphaned_bytes)
        ))?;
    }
    Ok(())
}

fn print_records(records: &[pb::ReclaimRecord]) -> Result<(), Failure> {
    let now = unix_ms();
    out(&format!(
        "{:>6} {:<9} {:<12} {:>8} {:<16} {:<11} {:>10} {:>9}  REASON / DETAIL",
        "ID", "WHEN", "SERVICE", "PID", "COMM", "OUTCOME", "FREED", "TIME"
    ))?;
    for r in records {
        let detail = if r.detail.is_empty() {
            r.reason.clone()
        } else {
            format!("{} / {}", r.reason, r.detail)
        };
        out(&format!(
            "{:>6} {:<9} {:<12} {:>8} {:<16} {:<11} {:>10} {:>9}  {}",
            r.id,
            human::ago(r.time_ms, now),
            r.service,
            r.pid,
            r.comm,
            r.outcome,
            r.bytes_freed
                .map(human::bytes)
                .unwrap_or_else(|| "-".into()),
            r.time_to_reclaim_ms
                .map(human::millis)
                .unwrap_or_else(|| "-".into()),
            detail
        ))?;
    }
    Ok(())
}

fn describe(ev: &pb::Event) -> String {
    use pb::event::Kind;
    let at = ev.time_ms;
    match &ev.kind {
        Some(Kind::SessionDied(d)) => {
            let s = d.session.clone().unwrap_or_default();
            format!(
                "{at} session-died {} {} {} ({})",
                s.service, s.kind, s.key, s.death_cause
            )
        }
        Some(Kind::Verdict(v)) => format!(
            "{at} verdict pid {} {} -> {}{}",
            v.pid,
            v.service,
            v.verdict,
            v.bytes
                .map(|b| format!(" holding {}", human::bytes(b)))
                .unwrap_or_default()
        ),
        Some(Kind::Reclaim(r)) => {
            let r = r.record.clone().unwrap_or_default();
            format!(
                "{at} ledger #{} pid {} {} {}: {}{}",
                r.id,
                r.pid,
                r.comm,
                r.outcome,
                r.reason,
                r.bytes_freed
                    .map(|b| format!(", freed {}", human::bytes(b)))
                    .unwrap_or_default()
            )
        }
        None => format!("{at} (unknown event)"),
    }
}

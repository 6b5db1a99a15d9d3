//! What the ledger holds: decisions about holders, their outcomes, and holders' lineage.
//! Plain data, so the engine can say what to record without knowing how it is stored.
use crate::{clock::Now, model::Matched, reconcile::Assessment};

/// What was decided about a holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Reclaim,
    Skip,
    /// Nothing to do: the holder let go of the GPU by itself after its session died.
    None,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Reclaim => "reclaim",
            Action::Skip => "skip",
            Action::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "reclaim" => Some(Action::Reclaim),
            "skip" => Some(Action::Skip),
            "none" => Some(Action::None),
            _ => None,
        }
    }
}

/// How it ended. "pending" until an outcome is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pending,
    Reclaimed,
    Released,
    Failed,
    Skipped,
    /// The daemon died between decision and outcome; see `Ledger::recover_interrupted`.
    Interrupted,
}

pub const ALL_OUTCOMES: [Outcome; 6] = [
    Outcome::Pending,
    Outcome::Reclaimed,
    Outcome::Released,
    Outcome::Failed,
    Outcome::Skipped,
    Outcome::Interrupted,
];

impl Outcome {
    /// The text stored in the ledger (and shown to users); the same as the serde name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Reclaimed => "reclaimed",
            Outcome::Released => "released",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        ALL_OUTCOMES.into_iter().find(|o| o.as_str() == s)
    }
}

/// A decision, written before any action.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    /// Unix ms, when decided.
    pub time_ms: i64,
    pub service: String,
    /// "process" | "connection" | "manual".
    pub session_kind: String,
    /// E.g. "pid:1234@5678" or "sock:0xffff...:10.0.0.1:8000->10.0.0.2:5555".
    pub session_key: String,
    /// E.g. "exit code 0", "signal 9", "peer closed (CLOSE_WAIT)".
    pub death_cause: String,
    /// Unix ms of the session's death, if known.
    pub death_time_ms: Option<i64>,
    pub pid: u32,
    /// Process start time in clock ticks since boot: together with `pid`, names one process
    /// even after the pid is reused.
    pub start_time: u64,
    pub comm: String,
    pub cgroup: String,
    /// "" if none; several joined by ",".
    pub gpu_uuid: String,
    /// GPU memory held when decided; None = unknown.
    pub bytes: Option<u64>,
    pub action: Action,
    /// Why: "orphaned past grace 10s", "report mode", "protected", "rate limited", ...
    pub reason: String,
}

/// The result of an action, written after it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Resolution {
    pub outcome: Outcome,
    pub bytes_freed: Option<u64>,
    /// Death -> verified, when known.
    pub time_to_reclaim_ms: Option<i64>,
    /// E.g. "SIGTERM; exited after 120 ms; NVML no longer lists it".
    pub detail: String,
    /// Unix ms, when resolved.
    pub time_ms: i64,
}

/// One row as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Record {
    pub id: i64,
    pub decision: Decision,
    pub outcome: Outcome,
    /// None while pending.
    pub resolution: Option<Resolution>,
}

/// A holder's binding to its session root, remembered so a restarted daemon still knows who
/// spawned a holder after its parent died (the kernel reparents it, /proc forgets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub pid: u32,
    pub start_time: u64,
    pub service: String,
    pub root_pid: u32,
    pub root_start_time: u64,
    /// What made it the service's (`None` in rows written before reclaimd recorded it).
    pub matched: Option<Matched>,
}

/// The ledger row for a decision about `a`, made at `now`.
pub fn decision(
    a: &Assessment,
    cgroup: &str,
    action: Action,
    reason: String,
    now: &Now,
) -> Decision {
    let kinds: Vec<&str> = a.sessions.iter().map(|s| s.kind.as_str()).collect();
    let keys: Vec<String> = a.sessions.iter().map(|s| s.key.to_string()).collect();
    let mut uuids: Vec<&str> = a
        .holder
        .memory
        .iter()
        .map(|m| m.device_uuid.as_str())
        .collect();
    uuids.dedup();
    Decision {
        time_ms: now.wall_ms,
        service: a.service.clone().unwrap_or_default(),
        session_kind: kinds.first().copied().unwrap_or("process").to_owned(),
        session_key: keys.join(","),
        death_cause: a
            .death
            .as_ref()
            .map(|d| d.cause.clone())
            .unwrap_or_default(),
        death_time_ms: a.death.as_ref().map(|d| now.wall_ms_of(d.at)),
        pid: a.id.pid,
        start_time: a.id.start_time,
        comm: a.holder.comm.clone().unwrap_or_default(),
        cgroup: cgroup.to_owned(),
        gpu_uuid: uuids.join(","),
        bytes: (!a.holder.memory.is_empty() && !a.holder.bytes_unknown())
            .then(|| a.holder.known_bytes()),
        action,
        reason,
    }
}

/// The row of an operator's reclaim request refused for want of rights: nothing is known of
/// a holder, only who asked for what.
pub fn refused(pid: u32, session_key: &str, uid: Option<u32>, reason: &str, now: &Now) -> Decision {
    Decision {
        time_ms: now.wall_ms,
        service: String::new(),
        session_kind: "manual".to_owned(),
        session_key: session_key.to_owned(),
        death_cause: String::new(),
        death_time_ms: None,
        pid,
        start_time: 0,
        comm: String::new(),
        cgroup: String::new(),
        gpu_uuid: String::new(),
        bytes: None,
        action: Action::Skip,
        reason: format!(
            "request refused: uid {} is not root or in the admin group ({reason})",
            uid.map_or_else(|| "unknown".to_owned(), |u| u.to_string()),
        ),
    }
}

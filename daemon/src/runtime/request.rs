//! What the API asks of the runtime, and the answers: domain types only. The API turns
//! protobuf messages into these and the answers back, at its edge.
use tokio::sync::oneshot;

use crate::{
    engine::{Judged, ManualError, ManualRequest},
    gpu::{Device, Holder, NvmlStatus},
    kube::PodRef,
    model::SessionInfo,
    probe::CapabilityStatus,
    reconcile::{Assessment, VerdictKind, orphaned_bytes},
};

pub enum CoreRequest {
    Status(oneshot::Sender<StatusView>),
    Sessions(SessionFilter, oneshot::Sender<Vec<SessionInfo>>),
    Holders(HolderFilter, oneshot::Sender<HoldersView>),
    Reclaim(
        ManualRequest,
        oneshot::Sender<Result<Vec<i64>, ManualError>>,
    ),
}

#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Empty: every service.
    pub service: String,
    pub include_dead: bool,
}

#[derive(Debug, Clone, Default)]
pub struct HolderFilter {
    /// Empty: every service.
    pub service: String,
    pub verdict: Option<VerdictKind>,
}

/// The daemon's state, as GetStatus shows it.
#[derive(Debug, Clone)]
pub struct StatusView {
    pub uptime_seconds: u64,
    pub probe_mode: &'static str,
    pub probe_degraded: Option<String>,
    pub capabilities: Vec<CapabilityStatus>,
    pub ledger_error: Option<String>,
    pub events_seen: u64,
    pub events_dropped: u64,
    pub enforce: bool,
    pub breaker_tripped: bool,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    /// The last inventory, when one was taken.
    pub inventory: Option<InventoryView>,
}

/// The GPUs of the last inventory, and how much of each is held by dead sessions' holders.
#[derive(Debug, Clone)]
pub struct InventoryView {
    pub nvml: NvmlStatus,
    /// Each device with its orphaned bytes.
    pub devices: Vec<(Device, u64)>,
    pub time_ms: i64,
}

impl InventoryView {
    pub fn of(j: &Judged) -> Self {
        Self {
            nvml: j.inventory.nvml.clone(),
            devices: j
                .inventory
                .devices
                .iter()
                .map(|d| (d.clone(), orphaned_bytes(&j.assessments, &d.uuid)))
                .collect(),
            time_ms: j.at.wall_ms,
        }
    }
}

/// A holder of the last inventory with its assessment and pod.
#[derive(Debug, Clone)]
pub struct HolderView {
    pub holder: Holder,
    pub assessment: Option<Assessment>,
    pub pod: Option<PodRef>,
}

#[derive(Debug, Clone, Default)]
pub struct HoldersView {
    pub holders: Vec<HolderView>,
    /// Unix ms of the inventory; 0 before the first.
    pub time_ms: i64,
}

impl HolderView {
    /// The verdict as the API filters on it: a holder without an assessment is untrusted.
    pub fn verdict(&self) -> VerdictKind {
        self.assessment
            .as_ref()
            .map_or(VerdictKind::Untrusted, |a| a.verdict.kind())
    }

    pub fn service(&self) -> &str {
        self.assessment
            .as_ref()
            .and_then(|a| a.service.as_deref())
            .unwrap_or("")
    }
}

//! What the engine asks the runtime to do, and what it is told back. Plain data: no channel,
//! span, database or protobuf type appears here.
use std::time::Duration;

use crate::{
    clock::Now,
    gpu::Inventory,
    kube::PodRef,
    model::{Death, Ns, ProcId, SessionKey},
    reconcile::{Assessment, VerdictKind},
    record::{Decision, Lineage, Outcome, Record},
};

/// An orphan (or an operator's target) for the executor.
#[derive(Debug, Clone)]
pub struct Order {
    pub assessment: Assessment,
    pub manual: Option<Manual>,
}

/// An operator's reclaim request: the safety screen still applies, report mode does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manual {
    pub reason: String,
    pub dry_run: bool,
    /// Who asked (peer credentials of the API client).
    pub uid: u32,
}

/// What became of an order.
#[derive(Debug, Clone)]
pub struct Done {
    pub id: ProcId,
    pub service: String,
    pub outcome: Outcome,
    pub ledger_id: Option<i64>,
    pub bytes_freed: Option<u64>,
    pub time_to_reclaim: Option<Duration>,
    pub pod: Option<PodRef>,
    /// The ledger could not record the decision, so nothing was done: decide again later.
    pub ledger_error: Option<String>,
}

/// A manual reclaim waiting for the executor, named so its reply can find its asker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// Why a manual reclaim was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManualError {
    #[error("{0} (as of the last inventory)")]
    NotFound(String),
    #[error("pid {0} is being reclaimed already")]
    Busy(u32),
    #[error("the reclaim queue is full; try again")]
    QueueFull,
    #[error("the ledger cannot record the decision, so nothing was done: {0}")]
    Unrecorded(String),
}

/// What an operator asks to reclaim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pid(u32),
    Session(SessionKey),
}

/// A checked manual reclaim request.
#[derive(Debug, Clone)]
pub struct ManualRequest {
    pub target: Target,
    pub manual: Manual,
}

/// What API watchers are told, as it happens.
#[derive(Debug, Clone)]
pub enum DomainEvent {
    SessionDied {
        key: SessionKey,
        service: String,
        death: Death,
        death_time_ms: i64,
    },
    VerdictChanged {
        pid: u32,
        service: String,
        verdict: VerdictKind,
        bytes: Option<u64>,
    },
    Reclaim(Box<Record>),
}

/// A domain event and when it happened (Unix ms).
#[derive(Debug, Clone)]
pub struct Published {
    pub time_ms: i64,
    pub event: DomainEvent,
}

/// What the runtime carries out for the engine, in order.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Hand to the executor (the queue has room: the engine was told how much).
    Dispatch(Order),
    /// Write a decision the engine made itself, then tell watchers about the record.
    Record(Decision),
    /// Tell watchers about a record the executor wrote.
    PublishRecord(i64),
    RememberLineage(Vec<Lineage>),
    /// Forget the lineage of every holder but these.
    KeepLineage(Vec<ProcId>),
    Publish(Published),
    /// A session died: its trace span starts (back to when it was first seen).
    SessionDied {
        key: SessionKey,
        service: String,
        death: Death,
        seen: Option<Ns>,
    },
    /// Nothing binds to the session any more: its span ends.
    SessionSettled(SessionKey),
    /// An outcome, for the outcome counters and histograms.
    Settled {
        service: String,
        outcome: Outcome,
        bytes_freed: Option<u64>,
        time_to_reclaim: Option<Duration>,
        pod: Option<PodRef>,
    },
    LedgerFailed,
    /// Arm a connection's heartbeat (kernel keepalive on its socket).
    Heartbeat(super::Arm),
    /// Answer a manual reclaim.
    Reply {
        ticket: Ticket,
        result: Result<Vec<i64>, ManualError>,
    },
}

/// The last snapshot as the engine judged it.
#[derive(Debug, Clone)]
pub struct Judged {
    pub inventory: Inventory,
    pub assessments: Vec<Assessment>,
    /// When the snapshot was applied.
    pub at: Now,
}

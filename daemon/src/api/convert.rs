//! Domain types → API messages: the one place that knows both.
use super::pb;
use crate::{
    clock,
    engine::{DomainEvent, Published},
    gpu::{Device, NvmlStatus, ProcessKind},
    ledger::Record,
    model::SessionInfo,
    probe::CapabilityStatus,
    reconcile::Verdict,
    runtime::request::{HolderView, StatusView},
};

pub fn record(r: &Record) -> pb::ReclaimRecord {
    let d = &r.decision;
    let res = r.resolution.as_ref();
    pb::ReclaimRecord {
        id: r.id,
        time_ms: d.time_ms,
        service: d.service.clone(),
        session_kind: d.session_kind.clone(),
        session_key: d.session_key.clone(),
        death_cause: d.death_cause.clone(),
        death_time_ms: d.death_time_ms,
        pid: d.pid,
        start_time: d.start_time,
        comm: d.comm.clone(),
        cgroup: d.cgroup.clone(),
        gpu_uuid: d.gpu_uuid.clone(),
        bytes: d.bytes,
        action: d.action.as_str().to_owned(),
        reason: d.reason.clone(),
        outcome: r.outcome.as_str().to_owned(),
        bytes_freed: res.and_then(|x| x.bytes_freed),
        time_to_reclaim_ms: res.and_then(|x| x.time_to_reclaim_ms),
        detail: res.map(|x| x.detail.clone()).unwrap_or_default(),
        resolved_time_ms: res.map(|x| x.time_ms),
    }
}

pub fn capability(c: &CapabilityStatus) -> pb::Capability {
    pb::Capability {
        name: c.capability.name().to_owned(),
        source: c.source.name().to_owned(),
        detail: c.detail.clone(),
    }
}

pub fn device(d: &Device, orphaned_bytes: u64) -> pb::Device {
    pb::Device {
        index: d.index,
        uuid: d.uuid.clone(),
        name: d.name.clone(),
        total_bytes: d.total_bytes,
        used_bytes: d.used_bytes,
        attributed_bytes: d.attributed_bytes,
        unattributed_bytes: d.unattributed_bytes,
        orphaned_bytes,
        parent_uuid: d.parent_uuid.clone().unwrap_or_default(),
    }
}

fn kind(k: ProcessKind) -> &'static str {
    match k {
        ProcessKind::Compute => "compute",
        ProcessKind::Graphics => "graphics",
        ProcessKind::Mps => "mps",
    }
}

pub fn holder(v: &HolderView) -> pb::Holder {
    let (h, a) = (&v.holder, v.assessment.as_ref());
    let pod = v.pod.clone().unwrap_or_default();
    let matched = a.and_then(|a| a.matched);
    pb::Holder {
        pid: h.pid,
        comm: h.comm.clone().unwrap_or_default(),
        start_time: h.start_time.unwrap_or(0),
        status: h.status.as_str().to_owned(),
        service: v.service().to_owned(),
        verdict: v.verdict().as_str().to_owned(),
        grace_left_ms: match a.map(|a| &a.verdict) {
            Some(Verdict::Pending { remaining }) => remaining.as_millis() as u64,
            _ => 0,
        },
        session_keys: a
            .map(|a| a.sessions.iter().map(|s| s.key.to_string()).collect())
            .unwrap_or_default(),
        memory: h
            .memory
            .iter()
            .map(|m| pb::HolderMemory {
                gpu_uuid: m.device_uuid.clone(),
                bytes: m.bytes,
                kind: kind(m.kind).to_owned(),
            })
            .collect(),
        device_files: h.fds.iter().map(|f| f.path.display().to_string()).collect(),
        k8s_namespace: pod.namespace,
        k8s_pod: pod.pod,
        k8s_container: pod.container,
        matched_by: matched.map(|m| m.by.as_str()).unwrap_or("").to_owned(),
        matched_pid: matched.map_or(0, |m| m.pid),
    }
}

pub fn status(v: &StatusView) -> pb::GetStatusResponse {
    let (nvml_available, nvml_reason, driver_version) = match v.inventory.as_ref().map(|i| &i.nvml)
    {
        Some(NvmlStatus::Available { driver_version }) => {
            (true, String::new(), driver_version.clone())
        }
        Some(NvmlStatus::Unavailable { reason }) => (false, reason.clone(), String::new()),
        None => (false, "no inventory taken yet".to_owned(), String::new()),
    };
    pb::GetStatusResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: v.uptime_seconds,
        probe_mode: v.probe_mode.to_owned(),
        probe_degraded_reason: v.probe_degraded.clone().unwrap_or_default(),
        capabilities: v.capabilities.iter().map(capability).collect(),
        ledger_error: v.ledger_error.clone().unwrap_or_default(),
        events_seen: v.events_seen,
        events_dropped: v.events_dropped,
        policy_mode: if v.enforce { "enforce" } else { "report" }.to_owned(),
        breaker_tripped: v.breaker_tripped,
        queue_depth: v.queue_depth as u32,
        queue_capacity: v.queue_capacity as u32,
        nvml_available,
        nvml_reason,
        driver_version,
        devices: v
            .inventory
            .iter()
            .flat_map(|i| i.devices.iter())
            .map(|(d, orphaned)| device(d, *orphaned))
            .collect(),
        inventory_time_ms: v.inventory.as_ref().map_or(0, |i| i.time_ms),
    }
}

pub fn session(s: &SessionInfo) -> pb::Session {
    pb::Session {
        kind: s.kind.as_str().to_owned(),
        key: s.key.to_string(),
        service: s.service.clone(),
        dead: s.death.is_some(),
        death_cause: s
            .death
            .as_ref()
            .map(|d| d.cause.clone())
            .unwrap_or_default(),
        death_time_ms: s.death.as_ref().map(|d| clock::wall_ms(d.at)),
        pid: s.pid,
    }
}

pub fn event(p: &Published) -> pb::Event {
    use pb::event::Kind;
    let kind = match &p.event {
        DomainEvent::SessionDied {
            key,
            service,
            death,
            death_time_ms,
        } => Kind::SessionDied(pb::SessionDied {
            session: Some(pb::Session {
                kind: key.kind().as_str().to_owned(),
                key: key.to_string(),
                service: service.clone(),
                dead: true,
                death_cause: death.cause.clone(),
                death_time_ms: Some(*death_time_ms),
                pid: 0,
            }),
        }),
        DomainEvent::VerdictChanged {
            pid,
            service,
            verdict,
            bytes,
        } => Kind::Verdict(pb::VerdictChanged {
            pid: *pid,
            service: service.clone(),
            verdict: verdict.as_str().to_owned(),
            bytes: *bytes,
        }),
        DomainEvent::Reclaim(r) => Kind::Reclaim(pb::ReclaimDone {
            record: Some(record(r)),
        }),
    };
    pb::Event {
        time_ms: p.time_ms,
        kind: Some(kind),
    }
}

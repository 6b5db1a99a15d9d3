//! Daemon types → API messages.
use super::pb;
use crate::{
    gpu::{Device, Holder, ProcessKind},
    ledger::Record,
    probe::CapabilityStatus,
    reconcile::{Assessment, Verdict},
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

pub fn holder(h: &Holder, a: Option<&Assessment>, pod: Option<crate::kube::PodRef>) -> pb::Holder {
    let pod = pod.unwrap_or_default();
    pb::Holder {
        pid: h.pid,
        comm: h.comm.clone().unwrap_or_default(),
        start_time: h.start_time.unwrap_or(0),
        status: h.status.as_str().to_owned(),
        service: a.and_then(|a| a.service.clone()).unwrap_or_default(),
        verdict: a
            .map(|a| a.verdict.as_str())
            .unwrap_or("untrusted")
            .to_owned(),
        grace_left_ms: match a.map(|a| &a.verdict) {
            Some(Verdict::Pending { remaining }) => remaining.as_millis() as u64,
            _ => 0,
        },
        session_keys: a
            .map(|a| a.sessions.iter().map(|s| s.key.clone()).collect())
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
    }
}

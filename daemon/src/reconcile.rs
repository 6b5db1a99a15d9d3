//! Joins the session model with a GPU inventory: a verdict per holder. Pure: what it needs
//! from /proc (a holder's connections) is passed in.
use std::{collections::HashMap, time::Duration};

use serde::Serialize;
use strum::{EnumIter, EnumString, IntoStaticStr, VariantNames};

use crate::{
    config::Config,
    gpu::{Holder, Inventory},
    model::{BoundSession, ConnKey, Death, Matched, Model, Ns, ProcId},
};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Some session it is bound to lives.
    Live,
    /// Every bound session is dead, for less than the grace period.
    Pending { remaining: Duration },
    /// Every bound session has been dead for longer than the grace period.
    Orphan,
    /// Outside every service: observed and reported, never acted on.
    Unmanaged,
    /// NVML lists it but /proc does not show it holding a device file: never acted on.
    Untrusted,
    /// It is exiting by itself (exit seen, files not closed yet): never signalled.
    Exiting,
    /// Outside every service, holding GPU memory, its original parent dead and itself
    /// reparented (to PID 1 or a subreaper): what every GPU stack's orphan looks like.
    /// Reported; reclaimed only with `[policy] suspects = "enforce"`, after the grace.
    Suspect,
}

#[derive(Debug, Clone, Serialize)]
pub struct Assessment {
    pub id: ProcId,
    pub holder: Holder,
    pub service: Option<String>,
    /// What made the holder its service's (none outside every service, or for a binding
    /// restored from an older ledger).
    pub matched: Option<Matched>,
    pub sessions: Vec<BoundSession>,
    /// When every bound session is dead: the latest death, which starts the grace period.
    pub death: Option<Death>,
    /// Grace after memory pressure is applied.
    pub grace: Duration,
    /// Highest used/total over the devices the holder uses.
    pub pressure: f64,
    pub verdict: Verdict,
}

/// A verdict without its data: what the API filters on and metrics label with. The one
/// place verdicts are named.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, EnumIter, EnumString, VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum VerdictKind {
    Live,
    Pending,
    Orphan,
    Unmanaged,
    Untrusted,
    Exiting,
    Suspect,
}

impl VerdictKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Every verdict's name, as the API and metrics spell them.
    pub const NAMES: &'static [&'static str] = <Self as strum::VariantNames>::VARIANTS;
}

impl Verdict {
    /// Every verdict's name (those of [`VerdictKind`]).
    pub const NAMES: &'static [&'static str] = VerdictKind::NAMES;

    pub fn kind(&self) -> VerdictKind {
        match self {
            Verdict::Live => VerdictKind::Live,
            Verdict::Pending { .. } => VerdictKind::Pending,
            Verdict::Orphan => VerdictKind::Orphan,
            Verdict::Unmanaged => VerdictKind::Unmanaged,
            Verdict::Untrusted => VerdictKind::Untrusted,
            Verdict::Exiting => VerdictKind::Exiting,
            Verdict::Suspect => VerdictKind::Suspect,
        }
    }

    pub fn as_str(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// Known bytes on device `uuid` held by holders whose sessions are all dead (pending or
/// orphaned): what the API and the metrics call orphaned.
pub fn orphaned_bytes(assessments: &[Assessment], uuid: &str) -> u64 {
    assessments
        .iter()
        .filter(|a| matches!(a.verdict, Verdict::Orphan | Verdict::Pending { .. }))
        .flat_map(|a| a.holder.memory.iter())
        .filter(|m| m.device_uuid == uuid)
        .filter_map(|m| m.bytes)
        .fold(0, u64::saturating_add)
}

/// Grace under memory pressure: halved above `soft`, none above `hard`.
pub fn effective_grace(grace: Duration, pressure: f64, soft: f64, hard: f64) -> Duration {
    if pressure >= hard {
        Duration::ZERO
    } else if pressure >= soft {
        grace / 2
    } else {
        grace
    }
}

fn pressure_of(holder: &Holder, inv: &Inventory) -> f64 {
    inv.devices
        .iter()
        .filter(|d| {
            holder.memory.iter().any(|m| m.device_uuid == d.uuid)
                || holder
                    .fds
                    .iter()
                    .any(|f| f.minor.is_some() && f.minor == d.minor)
        })
        .filter(|d| d.total_bytes > 0)
        .map(|d| d.used_bytes as f64 / d.total_bytes as f64)
        .fold(0.0, f64::max)
}

/// Verdicts for every holder of `inv`. `conns` gives the TCP connections each pid holds.
pub fn assess(
    model: &mut Model,
    cfg: &Config,
    inv: &Inventory,
    conns: &HashMap<u32, Vec<ConnKey>>,
    now: Ns,
) -> Vec<Assessment> {
    let no_conns = Vec::new();
    inv.holders
        .values()
        .map(|holder| {
            let held = conns.get(&holder.pid).unwrap_or(&no_conns);
            assess_one(model, cfg, holder, pressure_of(holder, inv), held, now)
        })
        .collect()
}

fn assess_one(
    model: &mut Model,
    cfg: &Config,
    holder: &Holder,
    pressure: f64,
    conns: &[ConnKey],
    now: Ns,
) -> Assessment {
    // A holder with no service or no trustworthy identity gets a verdict and nothing else.
    let bare = |id, verdict| Assessment {
        id,
        holder: holder.clone(),
        service: None,
        matched: None,
        sessions: Vec::new(),
        death: None,
        grace: Duration::ZERO,
        pressure,
        verdict,
    };
    let (Some(start_time), true) = (holder.start_time, holder.status.actionable()) else {
        let id = ProcId {
            pid: holder.pid,
            start_time: holder.start_time.unwrap_or(0),
        };
        return bare(id, Verdict::Untrusted);
    };
    let id = ProcId {
        pid: holder.pid,
        start_time,
    };
    if model.has_exited(id) {
        return bare(id, Verdict::Exiting);
    }
    let Some(binding) = model.bind(id) else {
        return match suspect_since(model, holder, id, now) {
            Some(death) => Assessment {
                grace: effective_grace(
                    cfg.policy.grace,
                    pressure,
                    cfg.policy.soft,
                    cfg.policy.hard,
                ),
                death: Some(death),
                ..bare(id, Verdict::Suspect)
            },
            None => bare(id, Verdict::Unmanaged),
        };
    };
    let sessions = model.bound_sessions(&binding, conns, now);
    let base = cfg
        .service(&binding.service)
        .map(|s| cfg.grace_of(s))
        .unwrap_or(cfg.policy.grace);
    let grace = effective_grace(base, pressure, cfg.policy.soft, cfg.policy.hard);
    let all_dead = !sessions.is_empty() && sessions.iter().all(|s| s.death.is_some());
    let death = if all_dead {
        sessions
            .iter()
            .filter_map(|s| s.death.clone())
            .max_by_key(|d| d.at)
    } else {
        None
    };
    Assessment {
        id,
        holder: holder.clone(),
        service: Some(binding.service),
        matched: binding.matched,
        sessions,
        verdict: verdict_of(death.as_ref(), grace, now),
        death,
        grace,
        pressure,
    }
}

/// When a holder outside every service became a suspect: it holds GPU memory, and its
/// original parent (as the model saw it at fork or first sight) is no longer its parent,
/// which the kernel changes only when that parent dies.
fn suspect_since(model: &mut Model, holder: &Holder, id: ProcId, now: Ns) -> Option<Death> {
    if holder.memory.is_empty() {
        return None;
    }
    model.parent_death(id, holder.ppid?, now)
}

/// How much of its grace a holder whose sessions (or original parent) died has left; `None`
/// once it is spent (or when nothing died).
pub fn grace_left(a: &Assessment, now: Ns) -> Option<Duration> {
    left_of(a.death.as_ref()?, a.grace, now)
}

/// What is left of `grace` after `death`; `None` once it is spent.
fn left_of(death: &Death, grace: Duration, now: Ns) -> Option<Duration> {
    let dead_for = Duration::from_nanos(now.saturating_sub(death.at));
    grace.checked_sub(dead_for).filter(|left| !left.is_zero())
}

/// Live while some session lives; then pending for the grace, orphan after it.
fn verdict_of(death: Option<&Death>, grace: Duration, now: Ns) -> Verdict {
    match death.map(|d| left_of(d, grace, now)) {
        None => Verdict::Live,
        Some(Some(remaining)) => Verdict::Pending { remaining },
        Some(None) => Verdict::Orphan,
    }
}

/// Orphans in the order they may be reclaimed: leaves first, so that reclaiming never makes
/// a new orphan (invariant 8). Depth in the parent chain among the orphans decides (pids can
/// wrap, start times can tie); among unrelated ones, later start times first.
pub fn leaves_first(orphans: &mut [Assessment]) {
    let parent: HashMap<u32, u32> = orphans
        .iter()
        .filter_map(|a| a.holder.ppid.map(|pp| (a.id.pid, pp)))
        .collect();
    let depth = |pid: u32| {
        let mut d = 0usize;
        let mut at = pid;
        // Bounded by the set's size: a cycle (pid reuse mid-scan) cannot loop for ever.
        while let Some(&pp) = parent.get(&at) {
            if d > parent.len() {
                break;
            }
            d += 1;
            at = pp;
        }
        d
    };
    orphans.sort_by_cached_key(|a| {
        (
            std::cmp::Reverse(depth(a.id.pid)),
            std::cmp::Reverse(a.id.start_time),
            std::cmp::Reverse(a.id.pid),
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_shrinks_under_pressure() {
        let g = Duration::from_secs(10);
        assert_eq!(effective_grace(g, 0.5, 0.75, 0.9), g);
        assert_eq!(effective_grace(g, 0.75, 0.75, 0.9), Duration::from_secs(5));
        assert_eq!(effective_grace(g, 0.95, 0.75, 0.9), Duration::ZERO);
    }

    fn orphan(pid: u32, ppid: u32, start_time: u64) -> Assessment {
        let mut holder = crate::gpu::Holder::unseen(pid);
        holder.ppid = Some(ppid);
        Assessment {
            id: ProcId { pid, start_time },
            holder,
            service: None,
            matched: None,
            sessions: Vec::new(),
            death: None,
            grace: Duration::ZERO,
            pressure: 0.0,
            verdict: Verdict::Orphan,
        }
    }

    #[test]
    fn children_go_before_their_parents() {
        // 300 → 20 (pid wrapped) → 7, all started in the same tick, plus an unrelated 50.
        let mut v = vec![
            orphan(300, 1, 100),
            orphan(50, 1, 90),
            orphan(7, 20, 100),
            orphan(20, 300, 100),
        ];
        leaves_first(&mut v);
        let order: Vec<u32> = v.iter().map(|a| a.id.pid).collect();
        let pos = |p| order.iter().position(|&x| x == p).unwrap();
        assert!(pos(7) < pos(20) && pos(20) < pos(300), "{order:?}");
        assert_eq!(order.len(), 4);
    }
}

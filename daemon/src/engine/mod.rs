//! The daemon's core, pure: the session model plus the bookkeeping of what was decided, as a
//! state machine. Inputs are kernel events, snapshots (with the /proc facts they need already
//! read), the executor's results, operators' requests and the time; the output is a list of
//! [`Effect`]s for the runtime to carry out. It opens no file, socket or database, and reads
//! no clock: so every path through it can be tested without a kernel, SQLite or tonic.
mod effect;
mod heartbeat;
mod manual;
mod snapshot;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

pub use self::{
    effect::{
        DomainEvent, Done, Effect, Judged, Manual, ManualError, ManualRequest, Order, Published,
        Target, Ticket,
    },
    heartbeat::Arm,
    snapshot::{HeldFd, Reconciled, Snapshot},
};
use crate::{
    config::Config,
    event::KernelEvent,
    model::{Binding, Model, Ns, ProcFacts, ProcId, SessionInfo, SessionKey, SessionKind},
    reconcile::Assessment,
    record::Lineage,
};

/// Where the engine learns a process's /proc facts while it applies an event: the runtime
/// reads /proc, tests answer from a table.
pub trait ProcSource {
    fn facts(&mut self, pid: u32) -> Option<ProcFacts>;
}

/// How soon a death needs a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Urgency {
    None,
    /// Within [`SOON`]: the death may matter to a holder the last snapshot did not know.
    Soon,
    /// At once: it matters to a known holder.
    Now,
}

/// Deaths of sessions no known holder is bound to wait this long for a snapshot, together.
pub const SOON: Duration = Duration::from_millis(100);

/// What the last snapshot's holders are bound to: their pids, the pids of their sessions'
/// roots, and their sessions' keys.
#[derive(Debug, Default)]
struct Bound {
    pids: HashSet<u32>,
    keys: HashSet<SessionKey>,
}

impl Bound {
    /// The kernel sockets (where events named them) of the live connections in `keys`.
    fn sockets(&self, model: &Model) -> HashSet<u64> {
        self.keys
            .iter()
            .filter_map(|k| match k {
                SessionKey::Connection(c) => model.conn(c),
                SessionKey::Process(_) => None,
            })
            .filter(|c| c.death.is_none() && c.sock != 0)
            .map(|c| c.sock)
            .collect()
    }

    fn of(assessments: &[Assessment]) -> Self {
        let mut b = Self::default();
        for a in assessments {
            b.pids.insert(a.id.pid);
            for s in &a.sessions {
                b.pids.extend(s.key.root_pid());
                b.keys.insert(s.key.clone());
            }
        }
        b
    }
}

/// Holders between a verdict and its settlement.
#[derive(Debug, Default)]
struct Holders {
    /// Handed to the executor and not back yet.
    in_flight: HashSet<ProcId>,
    /// Already decided (skipped, reclaimed, released): never decided twice.
    decided: HashSet<ProcId>,
    /// Every session dead, last assessment: to see them let go by themselves.
    dying: HashMap<ProcId, Assessment>,
}

impl Holders {
    fn undecided(&self, id: &ProcId) -> bool {
        !self.in_flight.contains(id) && !self.decided.contains(id)
    }
}

/// What watchers were last told: the verdict per holder, and the dead sessions announced.
#[derive(Debug, Default)]
struct Told {
    verdicts: HashMap<ProcId, crate::reconcile::VerdictKind>,
    announced: HashSet<SessionKey>,
}

pub struct Engine {
    cfg: Arc<Config>,
    model: Model,
    /// Bindings remembered before a restart (the ledger's lineage), loaded once at start-up
    /// and restored when their holder shows up.
    remembered: HashMap<ProcId, Binding>,
    holders: Holders,
    told: Told,
    bound: Bound,
    last: Option<Judged>,
    manual: manual::Waits,
    queue_full: u64,
    /// The last ledger write error, until a write succeeds again.
    ledger_error: Option<String>,
    armed: heartbeat::Armed,
}

impl Engine {
    pub fn new(cfg: Arc<Config>, lineage: Vec<Lineage>) -> Self {
        let remembered = lineage
            .into_iter()
            .map(|l| {
                let id = ProcId {
                    pid: l.pid,
                    start_time: l.start_time,
                };
                let root = ProcId {
                    pid: l.root_pid,
                    start_time: l.root_start_time,
                };
                (
                    id,
                    Binding {
                        service: l.service,
                        root,
                        matched: l.matched,
                    },
                )
            })
            .collect();
        Self {
            model: Model::new(cfg.services.clone()),
            cfg,
            remembered,
            holders: Holders::default(),
            told: Told::default(),
            bound: Bound::default(),
            last: None,
            manual: manual::Waits::default(),
            queue_full: 0,
            ledger_error: None,
            armed: Default::default(),
        }
    }

    /// Feeds one kernel event; says how soon a snapshot should follow.
    pub fn on_event(&mut self, ev: &KernelEvent, procs: &mut impl ProcSource, now: Ns) -> Urgency {
        if let KernelEvent::Fork { ppid, .. } = ev
            && self.model.needs_facts(*ppid)
            && let Some(f) = procs.facts(*ppid)
        {
            // A parent forking for the first time since we knew it: its name may have changed
            // since its own fork (exec, prctl). Read once per process, so floods stay cheap.
            self.model.observe_proc(&f, now);
        }
        let death = self.model.apply(ev);
        if let KernelEvent::Fork { pid, ppid, .. } = ev
            && self.model.service_root(*ppid).is_some()
            && let Some(f) = procs.facts(*pid)
        {
            self.model.observe_proc(&f, now);
        }
        if death {
            self.urgency_of_death(ev)
        } else {
            Urgency::None
        }
    }

    fn urgency_of_death(&self, ev: &KernelEvent) -> Urgency {
        match ev {
            // A holder, or the root of a session a holder is bound to, or a service's root
            // (its workers may not be bound yet): decide now.
            KernelEvent::Exit { tgid, .. }
                if self.bound.pids.contains(tgid)
                    || self
                        .model
                        .service_root(*tgid)
                        .is_some_and(|m| m.root.pid == *tgid) =>
            {
                Urgency::Now
            }
            // Another member of a service: no session ends with it.
            KernelEvent::Exit { .. } => Urgency::None,
            KernelEvent::Tcp { socket, .. }
                if self
                    .bound
                    .keys
                    .contains(&SessionKey::Connection(socket.conn_key())) =>
            {
                Urgency::Now
            }
            // No holder was bound to it at the last snapshot; one started since may be.
            // Deaths like this coalesce, so connection churn costs a few snapshots a second,
            // not one per close.
            _ => Urgency::Soon,
        }
    }

    /// Takes back what the executor did with an order.
    pub fn on_done(&mut self, d: &Done) -> Vec<Effect> {
        let mut out = Vec::new();
        self.holders.in_flight.remove(&d.id);
        if let Some(e) = &d.ledger_error {
            // Nothing was done (invariant 3): left undecided, so the next sweep tries again.
            out.push(Effect::LedgerFailed);
            self.ledger_error = Some(e.clone());
        } else {
            if d.ledger_id.is_some() {
                self.ledger_error = None;
            }
            out.push(Effect::Settled {
                service: d.service.clone(),
                outcome: d.outcome,
                bytes_freed: d.bytes_freed,
                time_to_reclaim: d.time_to_reclaim,
                pod: d.pod.clone(),
            });
            self.holders.decided.insert(d.id);
            self.holders.dying.remove(&d.id);
        }
        out.extend(d.ledger_id.map(Effect::PublishRecord));
        out.extend(self.manual.settle(d));
        out
    }

    /// Every session the model knows, of `service` (all when empty), the dead ones too when
    /// asked.
    pub fn sessions(&self, service: &str, include_dead: bool) -> Vec<SessionInfo> {
        self.model
            .sessions()
            .into_iter()
            .filter(|s| service.is_empty() || s.service == service)
            .filter(|s| include_dead || s.death.is_none())
            .collect()
    }

    /// The kernel sockets of the live connections the last snapshot's holders are bound
    /// to: their deaths wake the daemon at once; other events are read in batches.
    pub fn bound_sockets(&self) -> HashSet<u64> {
        self.bound.sockets(&self.model)
    }

    /// Sessions by (kind, service, state), every configured combination included (zeros
    /// too), so a gauge never keeps a stale value.
    pub fn session_counts(&self) -> Vec<((&'static str, String, &'static str), u64)> {
        use strum::IntoEnumIterator as _;
        let mut counts: HashMap<(&'static str, String, &'static str), u64> = HashMap::new();
        for s in &self.cfg.services {
            for kind in SessionKind::iter() {
                for state in ["live", "dead"] {
                    counts.insert((kind.as_str(), s.name.clone(), state), 0);
                }
            }
        }
        for ((kind, service, dead), n) in self.model.session_tally() {
            let state = if dead { "dead" } else { "live" };
            *counts
                .entry((kind.as_str(), service.to_owned(), state))
                .or_default() += n;
        }
        counts.into_iter().collect()
    }

    /// The last snapshot, judged: holders and their verdicts.
    pub fn judged(&self) -> Option<&Judged> {
        self.last.as_ref()
    }

    pub fn ledger_error(&self) -> Option<&str> {
        self.ledger_error.as_deref()
    }

    /// Decisions deferred because the executor's queue was full.
    pub fn queue_full(&self) -> u64 {
        self.queue_full
    }
}

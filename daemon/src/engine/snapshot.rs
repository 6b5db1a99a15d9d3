//! Applying a snapshot, in its steps: observe what /proc and the socket tables showed,
//! restore remembered bindings, assess every holder, tell watchers what changed, settle the
//! holders that let go by themselves, dispatch the orphans, and prune.
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use reclaimd_common::TcpState;

use super::{Bound, Effect, Engine, Judged, Order, Published, effect::DomainEvent};
use crate::{
    clock::Now,
    gpu::Inventory,
    model::{Binding, ConnKey, ProcFacts, ProcId, TcpSocket},
    reconcile::{self, Assessment, Verdict},
    record::{self, Action, Lineage, Outcome},
};

/// One snapshot, with the /proc facts it needs already read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When the snapshot started (CLOCK_MONOTONIC ns): a /proc scan vouches for nothing
    /// newer.
    pub started: u64,
    /// Every process, on a full scan.
    pub procs: Option<Vec<ProcFacts>>,
    /// Every TCP socket, on a full scan.
    pub tcp: Option<Vec<TcpSocket>>,
    pub inventory: Inventory,
    /// The connections each live holder's socket fds name.
    pub conns: HashMap<u32, Vec<ConnKey>>,
    /// For each of those connections, one holder's fd to it (where a heartbeat is armed).
    pub held: HashMap<ConnKey, HeldFd>,
    /// Fresh facts of live holders and their living ancestors (names change on exec).
    pub holder_facts: Vec<ProcFacts>,
}

/// An fd of a live process, as /proc listed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldFd {
    pub pid: u32,
    pub fd: u32,
    /// The socket's state, as the socket table listed it.
    pub state: TcpState,
}

/// What applying a snapshot asks for, and when to reconcile next.
#[derive(Debug)]
pub struct Reconciled {
    pub effects: Vec<Effect>,
    /// When the first pending holder's grace ends.
    pub next: Option<Duration>,
}

impl Engine {
    /// Applies a snapshot. `room` is how many orders the executor's queue takes now.
    pub fn on_snapshot(&mut self, s: &Snapshot, now: Now, room: usize) -> Reconciled {
        let mut effects = Vec::new();
        self.observe(s, now);
        self.restore(&s.inventory);
        let conns = self.carried_conns(s);
        let assessments =
            reconcile::assess(&mut self.model, &self.cfg, &s.inventory, &conns, now.mono);
        let pins = self.model.take_new_pins();
        if !pins.is_empty() {
            effects.push(Effect::RememberLineage(
                pins.iter().map(|(id, b)| lineage(*id, b)).collect(),
            ));
        }
        self.arm_heartbeats(&assessments, &s.held, &mut effects);
        self.announce(&assessments, now, &mut effects);
        self.bound = Bound::of(&assessments);
        self.last = Some(Judged {
            inventory: s.inventory.clone(),
            assessments: assessments.clone(),
            at: now,
        });
        let live: HashSet<ProcId> = assessments
            .iter()
            // An exiting holder counts as gone: if it was dying, it let go by itself.
            .filter(|a| !matches!(a.verdict, Verdict::Untrusted | Verdict::Exiting))
            .map(|a| a.id)
            .collect();
        self.settle_released(&live, now, &mut effects);
        let next = self.dispatch(assessments, room, now, &mut effects);
        self.prune(live, s.inventory.holders.len(), now, &mut effects);
        Reconciled { effects, next }
    }

    /// The snapshot's connections per holder, plus the dead ones each holder was bound to
    /// last time: a socket the kernel closed (RST, heartbeat timeout) leaves the socket
    /// tables at once while its holder may keep the fd, so /proc no longer names it.
    fn carried_conns(&self, s: &Snapshot) -> HashMap<u32, Vec<ConnKey>> {
        let mut conns = s.conns.clone();
        let Some(last) = &self.last else {
            return conns;
        };
        for a in &last.assessments {
            let still = s
                .inventory
                .holders
                .get(&a.id.pid)
                .is_some_and(|h| h.start_time == Some(a.id.start_time));
            if !still {
                continue;
            }
            let held = conns.entry(a.id.pid).or_default();
            for b in &a.sessions {
                if let crate::model::SessionKey::Connection(k) = &b.key
                    && !held.contains(k)
                    && self.model.conn(k).is_some_and(|c| c.death.is_some())
                {
                    held.push(k.clone());
                }
            }
        }
        conns
    }

    fn observe(&mut self, s: &Snapshot, now: Now) {
        if let Some(procs) = &s.procs {
            self.model.observe_procs(procs, s.started);
        }
        for f in &s.holder_facts {
            self.model.observe_proc(f, s.started);
        }
        if let Some(table) = &s.tcp {
            for sock in table.iter().filter(|s| s.state != TcpState::Listen) {
                self.model
                    .observe_conn(sock.key.clone(), sock.state, now.mono);
            }
            let present: HashSet<&ConnKey> = table.iter().map(|sock| &sock.key).collect();
            self.model.observe_conns_gone(&present, s.started);
        }
        // A holder's open connection the events have not named yet (a listener's child is
        // reported with its owner, at its first accept or I/O; or its record is still in
        // the ring): known from the socket table, so that the holder is bound to it, live,
        // and not to its dead neighbours alone. Only open ones: a listener is no session,
        // and a death is the events' or the full scan's to tell.
        for (key, h) in &s.held {
            if h.state.is_open() && self.model.conn(key).is_none() {
                self.model.observe_conn(key.clone(), h.state, now.mono);
            }
        }
    }

    /// Bindings remembered before a restart come back before anything is decided.
    fn restore(&mut self, inv: &Inventory) {
        for h in inv.holders.values() {
            let Some(start_time) = h.start_time else {
                continue;
            };
            let id = ProcId {
                pid: h.pid,
                start_time,
            };
            if !self.model.is_pinned(id)
                && let Some(b) = self.remembered.get(&id)
            {
                self.model.restore_pin(id, b.clone());
            }
        }
    }

    /// Session deaths and verdict changes, for watchers, spans and metrics.
    fn announce(&mut self, assessments: &[Assessment], now: Now, out: &mut Vec<Effect>) {
        let mut keys = HashSet::new();
        for a in assessments {
            let service = a.service.clone().unwrap_or_default();
            for sess in &a.sessions {
                keys.insert(sess.key.clone());
                if let Some(d) = &sess.death
                    && self.told.announced.insert(sess.key.clone())
                {
                    out.push(Effect::SessionDied {
                        key: sess.key.clone(),
                        service: service.clone(),
                        death: d.clone(),
                        seen: sess.seen,
                    });
                    out.push(publish(
                        now,
                        DomainEvent::SessionDied {
                            key: sess.key.clone(),
                            service: service.clone(),
                            death: d.clone(),
                            death_time_ms: now.wall_ms_of(d.at),
                        },
                    ));
                }
            }
            let v = a.verdict.kind();
            if self.told.verdicts.insert(a.id, v) != Some(v) {
                out.push(publish(
                    now,
                    DomainEvent::VerdictChanged {
                        pid: a.id.pid,
                        service,
                        verdict: v,
                        bytes: (!a.holder.bytes_unknown()).then(|| a.holder.known_bytes()),
                    },
                ));
            }
        }
        let ids: HashSet<ProcId> = assessments.iter().map(|a| a.id).collect();
        self.told.verdicts.retain(|id, _| ids.contains(id));
        // A dead session nothing binds to any more is settled: its span ends.
        let (kept, settled): (HashSet<_>, HashSet<_>) = std::mem::take(&mut self.told.announced)
            .into_iter()
            .partition(|k| keys.contains(k));
        self.told.announced = kept;
        out.extend(settled.into_iter().map(Effect::SessionSettled));
    }

    /// Dying holders that are gone without any action: they let go by themselves.
    fn settle_released(&mut self, live: &HashSet<ProcId>, now: Now, out: &mut Vec<Effect>) {
        let gone: Vec<ProcId> = self
            .holders
            .dying
            .keys()
            .filter(|id| !live.contains(id) && self.holders.undecided(id))
            .copied()
            .collect();
        for id in gone {
            let Some(a) = self.holders.dying.remove(&id) else {
                continue;
            };
            tracing::info!(
                pid = a.id.pid,
                service = a.service.as_deref().unwrap_or(""),
                "holder let go of the GPU by itself after its session died"
            );
            out.push(Effect::Record(record::decision(
                &a,
                "",
                Action::None,
                "exited or released the GPU by itself after its session died".to_owned(),
                &now,
            )));
            out.push(Effect::Settled {
                service: a.service.clone().unwrap_or_default(),
                outcome: Outcome::Released,
                bytes_freed: None,
                time_to_reclaim: None,
                pod: None,
            });
            self.holders.decided.insert(id);
        }
    }

    /// Keeps the dying, orders the orphans (leaves first) while the queue has room.
    /// Returns when the first pending grace ends.
    fn dispatch(
        &mut self,
        assessments: Vec<Assessment>,
        mut room: usize,
        now: Now,
        out: &mut Vec<Effect>,
    ) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut orphans = Vec::new();
        let suspects = self.cfg.policy.suspects == crate::config::Mode::Enforce;
        for a in assessments {
            match &a.verdict {
                // Opted into: a suspect past the grace is ordered as an orphan is.
                Verdict::Suspect if suspects => match reconcile::grace_left(&a, now.mono) {
                    Some(left) => next = Some(next.map_or(left, |n| n.min(left))),
                    None if self.holders.undecided(&a.id) => orphans.push(a),
                    None => {}
                },
                Verdict::Pending { remaining } => {
                    next = Some(next.map_or(*remaining, |n| n.min(*remaining)));
                    self.holders.dying.insert(a.id, a);
                }
                Verdict::Orphan => {
                    if self.holders.undecided(&a.id) {
                        orphans.push(a.clone());
                    }
                    self.holders.dying.insert(a.id, a);
                }
                _ => {}
            }
        }
        reconcile::leaves_first(&mut orphans);
        for a in orphans {
            let id = a.id;
            tracing::info!(
                pid = id.pid,
                service = a.service.as_deref().unwrap_or(""),
                cause = a.death.as_ref().map(|d| d.cause.as_str()).unwrap_or(""),
                bytes = a.holder.known_bytes(),
                "orphan found"
            );
            if room == 0 {
                self.queue_full += 1;
                tracing::warn!(
                    pid = id.pid,
                    total = self.queue_full,
                    "reclaim queue full: decision deferred to the next sweep"
                );
                continue;
            }
            room -= 1;
            self.holders.in_flight.insert(id);
            out.push(Effect::Dispatch(Order {
                assessment: a,
                manual: None,
            }));
        }
        next
    }

    /// Drops what no live or in-flight holder needs any more, lineage included.
    fn prune(&mut self, live: HashSet<ProcId>, holders: usize, now: Now, out: &mut Vec<Effect>) {
        let mut keep = live;
        keep.extend(self.holders.in_flight.iter().copied());
        self.model.prune(&keep, now.mono);
        let (procs, conns, pins) = self.model.sizes();
        tracing::debug!(
            procs,
            conns,
            pins,
            holders,
            dying = self.holders.dying.len(),
            "reconciled"
        );
        self.holders.decided.retain(|id| keep.contains(id));
        self.holders.dying.retain(|id, _| keep.contains(id));
        self.remembered.retain(|id, _| keep.contains(id));
        out.push(Effect::KeepLineage(keep.into_iter().collect()));
    }
}

fn publish(now: Now, event: DomainEvent) -> Effect {
    Effect::Publish(Published {
        time_ms: now.wall_ms,
        event,
    })
}

fn lineage(id: ProcId, b: &Binding) -> Lineage {
    Lineage {
        pid: id.pid,
        start_time: id.start_time,
        service: b.service.clone(),
        root_pid: b.root.pid,
        root_start_time: b.root.start_time,
        matched: b.matched,
    }
}

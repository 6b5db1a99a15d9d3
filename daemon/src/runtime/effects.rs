//! Carrying out the engine's effects: orders to the executor (with the facts the executor
//! needs, read now), ledger writes through the ledger's one owner, watchers, spans and
//! metrics, and the answers to manual reclaims.
use std::{collections::HashMap, path::PathBuf, sync::Arc};

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    clock,
    engine::{DomainEvent, Effect, ManualError, Order, Published, Ticket},
    kube,
    ledger_writer::LedgerWriter,
    model::ProcFacts,
    reclaim::Job,
    record::Decision,
    scan,
    telemetry::{Metrics, session_spans::SessionSpans},
};

/// The executor's queue went away, or refused an order it had room for.
#[derive(Debug, thiserror::Error)]
#[error("the reclaim executor stopped taking orders")]
pub struct ExecutorGone;

pub type Reply = oneshot::Sender<Result<Vec<i64>, ManualError>>;

/// What the runtime acts with.
pub struct Hands {
    pub proc_root: PathBuf,
    pub jobs: mpsc::Sender<Job>,
    pub ledger: LedgerWriter,
    pub events: broadcast::Sender<Published>,
    pub metrics: Arc<Metrics>,
    pub spans: SessionSpans,
    /// Holders' Kubernetes pods, from their cgroups.
    pub pods: kube::Resolver,
    /// Manual reclaims waiting for their answer.
    pub replies: HashMap<Ticket, Reply>,
}

/// The /proc the engine reads facts from while it applies an event.
pub struct Procfs<'a>(pub &'a std::path::Path);

impl crate::engine::ProcSource for Procfs<'_> {
    fn facts(&mut self, pid: u32) -> Option<ProcFacts> {
        scan::facts(self.0, pid)
    }
}

impl Hands {
    /// How many more orders the executor's queue takes now. Only this task sends, so the
    /// room can only grow before the orders are sent.
    pub fn room(&self) -> usize {
        self.jobs.capacity()
    }

    pub fn carry(&mut self, effects: Vec<Effect>) -> Result<(), ExecutorGone> {
        for e in effects {
            self.carry_one(e)?;
        }
        Ok(())
    }

    fn carry_one(&mut self, e: Effect) -> Result<(), ExecutorGone> {
        match e {
            Effect::Dispatch(order) => {
                let job = self.job(order);
                self.jobs.try_send(job).map_err(|_| ExecutorGone)?;
            }
            Effect::Record(d) => self.record(d),
            Effect::PublishRecord(id) => self.publish_record(id),
            Effect::RememberLineage(lineage) => {
                let r = self
                    .ledger
                    .call(move |l| lineage.iter().try_for_each(|x| l.remember_lineage(x)));
                if let Err(error) = r {
                    tracing::warn!(%error, "could not remember lineage");
                }
            }
            Effect::KeepLineage(keep) => {
                let alive: Vec<(u32, u64)> =
                    keep.iter().map(|id| (id.pid, id.start_time)).collect();
                if let Err(error) = self.ledger.call(move |l| l.prune_lineage(&alive)) {
                    tracing::debug!(%error, "could not prune lineage");
                }
            }
            Effect::Publish(p) => {
                let _ = self.events.send(p);
            }
            Effect::SessionDied {
                key,
                service,
                death,
                seen,
            } => {
                self.metrics.session_death(&service, &death.cause);
                self.spans.start(&key, &service, &death, seen);
            }
            Effect::SessionSettled(key) => self.spans.end(&key),
            Effect::Settled {
                service,
                outcome,
                bytes_freed,
                time_to_reclaim,
                pod,
            } => self.metrics.settled(
                &service,
                outcome,
                bytes_freed,
                time_to_reclaim,
                pod.as_ref(),
            ),
            Effect::LedgerFailed => self.metrics.ledger_error(),
            Effect::Heartbeat(arm) => crate::heartbeat::arm(&arm),
            Effect::Reply { ticket, result } => {
                if let Some(reply) = self.replies.remove(&ticket) {
                    let _ = reply.send(result);
                }
            }
        }
        Ok(())
    }

    /// A job for the executor, with the facts read now: exe, cgroup, pod, trace parent.
    fn job(&mut self, order: Order) -> Job {
        let pid = order.assessment.id.pid;
        let facts = scan::facts(&self.proc_root, pid);
        Job {
            parent: self.spans.context_of(&order.assessment.sessions),
            exe: facts.as_ref().and_then(|f| f.exe.clone()),
            cgroup: facts.and_then(|f| f.cgroup).unwrap_or_default(),
            pod: self.pods.pod_of(&self.proc_root, pid),
            assessment: order.assessment,
            manual: order.manual,
        }
    }

    /// Writes a decision the engine made (a holder that let go by itself) and tells
    /// watchers.
    fn record(&mut self, d: Decision) {
        let pid = d.pid;
        match self.ledger.call(move |l| l.record_decision(&d)) {
            Ok(id) => self.publish_record(id),
            Err(error) => tracing::error!(%error, pid, "ledger write failed"),
        }
    }

    /// Sends the ledger record `id` to API watchers.
    fn publish_record(&mut self, id: i64) {
        if self.events.receiver_count() == 0 {
            return;
        }
        match self.ledger.call(move |l| l.get(id)) {
            Ok(Some(r)) => {
                let _ = self.events.send(Published {
                    time_ms: clock::unix_ms(),
                    event: DomainEvent::Reclaim(Box::new(r)),
                });
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, id, "could not read a record back for watchers"),
        }
    }
}

//! Operators' reclaims: the targets among the last snapshot's holders, their orders, and the
//! answer once the executor is done with every one of them.
use std::collections::HashSet;

use super::{Done, Effect, Engine, ManualError, ManualRequest, Order, Target, Ticket};
use crate::{model::ProcId, reconcile::Assessment};

/// A manual reclaim waiting for the executor.
#[derive(Debug)]
struct Wait {
    ticket: Ticket,
    waiting: HashSet<ProcId>,
    ids: Vec<i64>,
    /// Why a holder's decision could not be recorded (so nothing was done to it).
    unrecorded: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct Waits {
    waits: Vec<Wait>,
    next: u64,
}

impl Waits {
    fn add(&mut self, waiting: HashSet<ProcId>) -> Ticket {
        self.next += 1;
        let ticket = Ticket(self.next);
        self.waits.push(Wait {
            ticket,
            waiting,
            ids: Vec::new(),
            unrecorded: None,
        });
        ticket
    }

    /// Takes `d` into the waits that wanted it; answers the ones it completes.
    pub(super) fn settle(&mut self, d: &Done) -> Vec<Effect> {
        for w in &mut self.waits {
            if w.waiting.remove(&d.id) {
                w.ids.extend(d.ledger_id);
                if let Some(e) = &d.ledger_error {
                    w.unrecorded = Some(e.clone());
                }
            }
        }
        let (finished, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waits)
            .into_iter()
            .partition(|w| w.waiting.is_empty());
        self.waits = waiting;
        finished
            .into_iter()
            .map(|w| Effect::Reply {
                ticket: w.ticket,
                result: match (w.ids.is_empty(), w.unrecorded) {
                    (true, Some(e)) => Err(ManualError::Unrecorded(e)),
                    _ => Ok(w.ids),
                },
            })
            .collect()
    }
}

impl Engine {
    /// Orders the reclaim of `req`'s targets, as of the last snapshot. `room` is how many
    /// orders the executor's queue takes now. The answer comes as an [`Effect::Reply`] with
    /// the ticket, once the executor is done with all of them.
    pub fn manual_reclaim(
        &mut self,
        req: ManualRequest,
        mut room: usize,
    ) -> Result<(Ticket, Vec<Effect>), ManualError> {
        let targets = self.targets(&req.target)?;
        if let Some(busy) = targets
            .iter()
            .find(|a| self.holders.in_flight.contains(&a.id))
        {
            return Err(ManualError::Busy(busy.id.pid));
        }
        let mut waiting = HashSet::new();
        let mut effects = Vec::new();
        for a in targets {
            if room == 0 {
                self.queue_full += 1;
                break;
            }
            room -= 1;
            self.holders.in_flight.insert(a.id);
            waiting.insert(a.id);
            effects.push(Effect::Dispatch(Order {
                assessment: a,
                manual: Some(req.manual.clone()),
            }));
        }
        if waiting.is_empty() {
            return Err(ManualError::QueueFull);
        }
        let m = &req.manual;
        tracing::info!(target = ?req.target, dry_run = m.dry_run, uid = m.uid,
            reason = %m.reason, holders = waiting.len(), "manual reclaim requested");
        Ok((self.manual.add(waiting), effects))
    }

    fn targets(&self, target: &Target) -> Result<Vec<Assessment>, ManualError> {
        let targets: Vec<Assessment> = self
            .last
            .iter()
            .flat_map(|l| l.assessments.iter())
            .filter(|a| match target {
                Target::Pid(pid) => a.id.pid == *pid,
                Target::Session(key) => a.sessions.iter().any(|s| s.key == *key),
            })
            .cloned()
            .collect();
        if targets.is_empty() {
            return Err(ManualError::NotFound(match target {
                Target::Pid(pid) => format!("pid {pid} holds no GPU memory or device file"),
                Target::Session(key) => {
                    format!("no holder is bound to session {:?}", key.to_string())
                }
            }));
        }
        Ok(targets)
    }
}

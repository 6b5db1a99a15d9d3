//! Answering the API's requests from the engine's state and the runtime's own.
use super::{
    Runtime,
    effects::ExecutorGone,
    request::{CoreRequest, HolderFilter, HolderView, HoldersView, InventoryView, StatusView},
};

impl Runtime {
    pub(super) fn on_api(&mut self, req: CoreRequest) -> Result<(), ExecutorGone> {
        match req {
            CoreRequest::Status(reply) => {
                let _ = reply.send(self.status());
            }
            CoreRequest::Sessions(q, reply) => {
                let _ = reply.send(self.engine.sessions(&q.service, q.include_dead));
            }
            CoreRequest::Holders(q, reply) => {
                let _ = reply.send(self.holders(&q));
            }
            CoreRequest::Reclaim(m, reply) => {
                match self.engine.manual_reclaim(m, self.hands.room()) {
                    Ok((ticket, effects)) => {
                        self.hands.replies.insert(ticket, reply);
                        self.hands.carry(effects)?;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
        Ok(())
    }

    fn status(&self) -> StatusView {
        let jobs = &self.hands.jobs;
        StatusView {
            uptime_seconds: self.started.elapsed().as_secs(),
            probe_mode: self.probe_mode,
            probe_degraded: self.probe_degraded.clone(),
            capabilities: self.capabilities.clone(),
            ledger_error: self.engine.ledger_error().map(str::to_owned),
            events_seen: self.events_seen,
            events_dropped: self.events_dropped,
            enforce: self.cfg.policy.mode == crate::config::Mode::Enforce,
            breaker_tripped: self.breaker.load(std::sync::atomic::Ordering::Relaxed),
            queue_depth: jobs.max_capacity() - jobs.capacity(),
            queue_capacity: jobs.max_capacity(),
            inventory: self.engine.judged().map(InventoryView::of),
        }
    }

    fn holders(&mut self, q: &HolderFilter) -> HoldersView {
        let Some(judged) = self.engine.judged() else {
            return HoldersView::default();
        };
        let by_pid: std::collections::HashMap<u32, &crate::reconcile::Assessment> =
            judged.assessments.iter().map(|a| (a.id.pid, a)).collect();
        let root = &self.hands.proc_root;
        let holders = judged
            .inventory
            .holders
            .values()
            .map(|h| HolderView {
                holder: h.clone(),
                assessment: by_pid.get(&h.pid).map(|a| (*a).clone()),
                pod: None,
            })
            .filter(|h| q.service.is_empty() || h.service() == q.service)
            .filter(|h| q.verdict.is_none_or(|v| h.verdict() == v))
            // The pod is read from /proc only for the holders the answer lists.
            .map(|mut h| {
                h.pod = self.hands.pods.pod_of(root, h.holder.pid);
                h
            })
            .collect();
        HoldersView {
            holders,
            time_ms: judged.at.wall_ms,
        }
    }
}

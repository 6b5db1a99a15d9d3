//! The executor's jobs on a bounded pool: independent holders' reclaims overlap (their
//! signals, their waits for exit, their verification), so a burst of orphans takes about as
//! long as its slowest member, not the sum of all. Each job's own order (ledger → hook →
//! SIGTERM → SIGKILL → verify) is the executor's and unchanged; the breaker is shared, so it
//! counts every action the pool takes.
//!
//! Invariant 8 holds across the pool: a job does not start while a job for one of its
//! descendants runs or waits before it (descent by the holders' parent pids, among the
//! jobs, as `reconcile::leaves_first` orders them). A job stuck on a process in
//! uninterruptible sleep holds one worker until its timeouts end, never the others.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    panic::AssertUnwindSafe,
};

use tokio::{sync::mpsc, task::JoinSet};

use super::executor::{Done, Executor, Job};
use crate::ledger::Outcome;

/// A job in the pool: its holder and that holder's parent, for the ordering.
#[derive(Debug, Clone, Copy)]
struct Family {
    pid: u32,
    ppid: Option<u32>,
}

impl Family {
    fn of(job: &Job) -> Self {
        Self {
            pid: job.assessment.id.pid,
            ppid: job.assessment.holder.ppid,
        }
    }
}

/// Jobs waiting and running, and the executors free to take one.
struct Pool {
    idle: Vec<Executor>,
    running: HashMap<u32, Family>,
    waiting: VecDeque<Job>,
    /// Jobs taken from the queue but not started: beyond this the queue keeps them, so
    /// its room (what the engine may order) still means something.
    lookahead: usize,
}

impl Pool {
    /// The first waiting job that may start now, if an executor is free.
    fn next_ready(&mut self) -> Option<(Job, Executor)> {
        if self.idle.is_empty() {
            return None;
        }
        let i = self.first_unblocked()?;
        let job = self.waiting.remove(i)?;
        let exec = self.idle.pop()?;
        let f = Family::of(&job);
        self.running.insert(f.pid, f);
        Some((job, exec))
    }

    /// The first waiting job that is no ancestor of a running job or of a job waiting
    /// before it. The first waiting job is blocked only by running ones, which end: the
    /// pool always makes progress, even through a parent cycle (pid reuse mid-scan).
    fn first_unblocked(&self) -> Option<usize> {
        let parents: HashMap<u32, Option<u32>> = self
            .running
            .values()
            .copied()
            .chain(self.waiting.iter().map(Family::of))
            .map(|f| (f.pid, f.ppid))
            .collect();
        let mut busy_ancestors = HashSet::new();
        for f in self.running.values() {
            ancestors(f.pid, &parents, &mut busy_ancestors);
        }
        for (i, job) in self.waiting.iter().enumerate() {
            let pid = job.assessment.id.pid;
            if !busy_ancestors.contains(&pid) {
                return Some(i);
            }
            ancestors(pid, &parents, &mut busy_ancestors);
        }
        None
    }

    fn finish(&mut self, exec: Executor, pid: u32) {
        self.running.remove(&pid);
        self.idle.push(exec);
    }
}

/// Adds the ancestors of `pid` among the jobs (`parents`) to `out`; bounded by the jobs'
/// number, so a cycle cannot loop for ever.
fn ancestors(pid: u32, parents: &HashMap<u32, Option<u32>>, out: &mut HashSet<u32>) {
    let mut at = pid;
    for _ in 0..parents.len() {
        match parents.get(&at).copied().flatten() {
            Some(pp) if parents.contains_key(&pp) => {
                out.insert(pp);
                at = pp;
            }
            _ => return,
        }
    }
}

/// Runs `job` on a blocking thread; the executor comes back whatever happens to the job.
fn start(set: &mut JoinSet<(Executor, u32, Done)>, job: Job, mut exec: Executor) {
    set.spawn_blocking(move || {
        let pid = job.assessment.id.pid;
        let id = job.assessment.id;
        let service = job.assessment.service.clone().unwrap_or_default();
        let pod = job.pod.clone();
        let done =
            std::panic::catch_unwind(AssertUnwindSafe(|| exec.handle(job))).unwrap_or_else(|_| {
                tracing::error!(
                    pid,
                    "the reclaim of this holder panicked; counted as failed"
                );
                Done {
                    id,
                    service,
                    outcome: Outcome::Failed,
                    ledger_id: None,
                    bytes_freed: None,
                    time_to_reclaim: None,
                    pod,
                    ledger_error: None,
                }
            });
        (exec, pid, done)
    });
}

/// Takes jobs from `jobs` and runs them on `executors` (one job each at a time) until the
/// queue closes and every job taken is done; each outcome goes to `done`.
pub async fn run(
    executors: Vec<Executor>,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Done>,
) {
    let lookahead = jobs.max_capacity();
    let mut pool = Pool {
        idle: executors,
        running: HashMap::new(),
        waiting: VecDeque::new(),
        lookahead,
    };
    let mut set = JoinSet::new();
    let mut open = true;
    loop {
        while let Some((job, exec)) = pool.next_ready() {
            start(&mut set, job, exec);
        }
        if !open && set.is_empty() {
            // Closed with jobs still waiting: none can be blocked with nothing running.
            debug_assert!(pool.waiting.is_empty());
            return;
        }
        tokio::select! {
            job = jobs.recv(), if open && pool.waiting.len() < pool.lookahead => match job {
                Some(job) => pool.waiting.push_back(job),
                None => open = false,
            },
            Some(joined) = set.join_next() => match joined {
                Ok((exec, pid, d)) => {
                    pool.finish(exec, pid);
                    // The runtime is gone (stopping): the jobs still waiting run anyway,
                    // each recorded in the ledger.
                    let _ = done.send(d);
                }
                // Only a cancelled task gets here (panics are caught in the task): the
                // runtime is shutting down.
                Err(error) => {
                    tracing::error!(%error, "a reclaim task ended without its outcome");
                    return;
                }
            },
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parents(pairs: &[(u32, u32)]) -> HashMap<u32, Option<u32>> {
        pairs.iter().map(|&(p, pp)| (p, Some(pp))).collect()
    }

    #[test]
    fn ancestors_follow_the_jobs_only_and_stop_on_a_cycle() {
        // 7 → 20 → 300 → 1 (1 is no job); 5 ↔ 6 a cycle (pid reuse).
        let p = parents(&[(7, 20), (20, 300), (300, 1), (5, 6), (6, 5)]);
        let mut out = HashSet::new();
        ancestors(7, &p, &mut out);
        assert_eq!(out, HashSet::from([20, 300]));
        let mut out = HashSet::new();
        ancestors(5, &p, &mut out);
        assert_eq!(out, HashSet::from([5, 6]));
    }
}

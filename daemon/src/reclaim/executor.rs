//! Carries out decisions: ledger first, then hook, pin, SIGTERM → wait → SIGKILL through the
//! pin, and verification that the memory came back. Blocking; runs on a thread of its own.
use std::{
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::{Duration, Instant},
};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal},
};

use super::{
    breaker::Breaker,
    hook,
    policy::{self, Untouchable},
};
pub use crate::engine::{Done, Manual};
use crate::{
    clock::{self, Now},
    config::Config,
    gpu::{DeviceFiles, GpuInventory, Inventory, LiveProc, NvmlStatus, SharedViews},
    ledger::{Action, Decision, Outcome, Resolution},
    ledger_writer::LedgerWriter,
    model::ProcId,
    reconcile::{Assessment, Verdict},
};

/// How long a process gets to die after SIGKILL before the reclaim counts as failed.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long NVML gets to stop listing a dead holder and give the memory back.
const VERIFY_WAIT: Duration = Duration::from_secs(5);

/// An orphan to reclaim, with the facts the ledger and the policy need.
#[derive(Debug, Clone)]
pub struct Job {
    pub assessment: Assessment,
    pub exe: Option<PathBuf>,
    pub cgroup: String,
    /// The Kubernetes pod and container it runs in, when it does.
    pub pod: Option<crate::kube::PodRef>,
    /// Asked for through the API rather than decided by the daemon.
    pub manual: Option<Manual>,
    /// The session's trace context: the reclaim's span is its child.
    pub parent: Option<opentelemetry::Context>,
}

/// How often verification first re-reads NVML after the holder exited, and at most: the
/// interval doubles, so a burst of parallel verifications does not hammer the driver.
const VERIFY_POLL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(160));

/// One reclaim at a time; a pool runs several (`super::pool`), sharing one breaker and one
/// NVML handle.
pub struct Executor {
    cfg: Arc<Config>,
    ledger: LedgerWriter,
    files: DeviceFiles,
    views: Arc<SharedViews>,
    breaker: Arc<Mutex<Breaker>>,
    /// The breaker's state, for the API (the executor runs on a thread of its own).
    tripped: Arc<AtomicBool>,
    never: Untouchable,
    /// The span of the job in hand (a no-op when tracing is off).
    span: Option<opentelemetry::global::BoxedSpan>,
    /// Why the last ledger write of the job in hand failed.
    write_error: Option<String>,
}

/// The ledger row for a decision about `a`, made now.
pub fn decision(a: &Assessment, cgroup: &str, action: Action, reason: String) -> Decision {
    crate::record::decision(a, cgroup, action, reason, &Now::read())
}

/// Why a pin could not be made.
enum PinError {
    /// The process is gone (or its pid now belongs to another process).
    Gone,
    Other(std::io::Error),
}

/// Opens a pidfd for `id` and checks that it is that process and not a reused pid: after
/// the open, the pidfd refers to one process for good, so a matching start time read after
/// the open proves the right one was pinned (invariant 2).
fn pin(id: ProcId) -> Result<OwnedFd, PinError> {
    let pid = Pid::from_raw(id.pid as i32).ok_or(PinError::Gone)?;
    let fd = pidfd_open(pid, PidfdFlags::empty()).map_err(|e| match e {
        rustix::io::Errno::SRCH => PinError::Gone,
        e => PinError::Other(e.into()),
    })?;
    // A leader that exited before its threads is a live process (invariant 9): the signal
    // through the pidfd reaches the threads that run.
    match LiveProc::find(std::path::Path::new("/proc"), id.pid) {
        Some(p) if p.stat.start_time == id.start_time => Ok(fd),
        _ => Err(PinError::Gone),
    }
}

/// Waits until the pinned process exits, at most `limit`.
fn wait_exit(fd: &OwnedFd, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(rustix::io::Errno::INTR) if !left.is_zero() => continue,
            Err(_) => return false,
        }
    }
}

/// The devices whose memory should drop when the holder goes: those NVML lists it on, else
/// those its `/dev/nvidia<N>` fds name, else (only control or test device files) all of them.
fn devices_of(a: &Assessment, inv: &Inventory) -> Vec<String> {
    let listed: Vec<String> = a
        .holder
        .memory
        .iter()
        .map(|m| m.device_uuid.clone())
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    let by_fd: Vec<String> = inv
        .devices
        .iter()
        .filter(|d| {
            d.minor
                .is_some_and(|m| a.holder.fds.iter().any(|f| f.minor == Some(m)))
        })
        .map(|d| d.uuid.clone())
        .collect();
    if !by_fd.is_empty() {
        return by_fd;
    }
    inv.devices.iter().map(|d| d.uuid.clone()).collect()
}

/// Device used bytes for the devices a holder used, by UUID.
/// Memory used on `uuids` that NVML does not attribute to a process other than `pid`: what
/// `pid` holds, plus what nobody is listed for. Other processes allocating meanwhile (a busy
/// GPU) do not hide the drop that `pid`'s exit makes in it.
fn used_of(inv: &Inventory, uuids: &[String], pid: u32) -> Option<u64> {
    if !matches!(inv.nvml, NvmlStatus::Available { .. }) {
        return None;
    }
    let used = inv
        .devices
        .iter()
        .filter(|d| uuids.contains(&d.uuid))
        .map(|d| d.used_bytes)
        .fold(0, u64::saturating_add);
    let others = inv
        .holders
        .values()
        .filter(|h| h.pid != pid)
        .flat_map(|h| &h.memory)
        .filter(|m| uuids.contains(&m.device_uuid))
        .filter_map(|m| m.bytes)
        .fold(0, u64::saturating_add);
    Some(used.saturating_sub(others))
}

impl Executor {
    pub fn new(
        cfg: Arc<Config>,
        ledger: LedgerWriter,
        gpu: GpuInventory,
        never: Untouchable,
    ) -> Self {
        let breaker = Breaker::new(cfg.policy.max_reclaims_per_minute);
        Self {
            cfg,
            ledger,
            files: gpu.device_files().clone(),
            views: Arc::new(SharedViews::new(gpu)),
            breaker: Arc::new(Mutex::new(breaker)),
            tripped: Arc::default(),
            never,
            span: None,
            write_error: None,
        }
    }

    /// Another executor for the same pool: the same breaker, NVML handle, ledger and
    /// untouchables.
    pub fn sibling(&self) -> Self {
        Self {
            cfg: self.cfg.clone(),
            ledger: self.ledger.clone(),
            files: self.files.clone(),
            views: self.views.clone(),
            breaker: self.breaker.clone(),
            tripped: self.tripped.clone(),
            never: self.never.clone(),
            span: None,
            write_error: None,
        }
    }

    pub fn breaker_flag(&self) -> Arc<AtomicBool> {
        self.tripped.clone()
    }

    /// The shared breaker; a panic elsewhere while it was held does not unlock action: the
    /// breaker's own state is still consistent (each method is one short update).
    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&mut self, d: &Decision) -> Option<i64> {
        self.event("decision", format!("{}: {}", d.action.as_str(), d.reason));
        let row = d.clone();
        match self.ledger.call(move |l| l.record_decision(&row)) {
            Ok(id) => Some(id),
            Err(error) => {
                tracing::error!(%error, pid = d.pid, ledger = %self.cfg.ledger_path.display(),
                    "ledger write failed: not acting until the ledger can record the decision \
                     (retried every sweep)");
                self.write_error = Some(error.to_string());
                None
            }
        }
    }

    fn resolve(&self, ledger_id: i64, r: &Resolution) {
        let r = r.clone();
        if let Err(error) = self.ledger.call(move |l| l.resolve(ledger_id, &r)) {
            tracing::error!(%error, ledger_id, "ledger resolve failed");
        }
    }

    /// Handles `job` inside a `reclaim` span (child of the session's), with an event per
    /// step and the outcome as its status.
    pub fn handle(&mut self, job: Job) -> Done {
        use opentelemetry::{
            KeyValue,
            trace::{Span as _, Status, Tracer as _},
        };
        let a = &job.assessment;
        let tracer = crate::telemetry::traces::tracer();
        let mut attributes = vec![
            KeyValue::new("process.pid", i64::from(a.id.pid)),
            KeyValue::new(
                "process.executable.name",
                a.holder.comm.clone().unwrap_or_default(),
            ),
            KeyValue::new("reclaimd.service", a.service.clone().unwrap_or_default()),
            KeyValue::new(
                "reclaimd.session.key",
                a.sessions
                    .first()
                    .map(|s| s.key.to_string())
                    .unwrap_or_default(),
            ),
            KeyValue::new(
                "reclaimd.gpu.uuid",
                a.holder
                    .memory
                    .first()
                    .map(|m| m.device_uuid.clone())
                    .unwrap_or_default(),
            ),
            KeyValue::new("reclaimd.bytes", a.holder.known_bytes() as i64),
            KeyValue::new("reclaimd.manual", job.manual.is_some()),
        ];
        if let Some(p) = &job.pod {
            // OpenTelemetry's Kubernetes resource conventions.
            attributes.extend([
                KeyValue::new("k8s.namespace.name", p.namespace.clone()),
                KeyValue::new("k8s.pod.name", p.pod.clone()),
                KeyValue::new("k8s.container.name", p.container.clone()),
            ]);
        }
        let builder = tracer.span_builder("reclaim").with_attributes(attributes);
        self.span = Some(match &job.parent {
            Some(cx) => builder.start_with_context(&tracer, cx),
            None => builder.start(&tracer),
        });
        let mut done = self.handle_inner(job);
        done.ledger_error = self.write_error.take();
        if let Some(mut span) = self.span.take() {
            span.set_attribute(KeyValue::new("reclaimd.outcome", done.outcome.as_str()));
            if let Some(b) = done.bytes_freed {
                span.set_attribute(KeyValue::new("reclaimd.bytes_freed", b as i64));
            }
            span.set_status(match done.outcome {
                Outcome::Failed => Status::error("the memory is still held"),
                _ => Status::Ok,
            });
            span.end();
        }
        done
    }

    /// An event on the current job's span.
    fn event(&mut self, name: &'static str, detail: String) {
        use opentelemetry::trace::Span as _;
        if let Some(span) = &mut self.span {
            span.add_event(name, vec![opentelemetry::KeyValue::new("detail", detail)]);
        }
    }

    fn handle_inner(&mut self, job: Job) -> Done {
        let a = &job.assessment;
        let span = tracing::info_span!(
            "reclaim",
            pid = a.id.pid,
            service = a.service.as_deref().unwrap_or("")
        );
        let _enter = span.enter();
        let mut done = Done {
            id: a.id,
            service: a.service.clone().unwrap_or_default(),
            outcome: Outcome::Skipped,
            ledger_id: None,
            bytes_freed: None,
            time_to_reclaim: None,
            pod: job.pod.clone(),
            ledger_error: None,
        };
        let reason = match self.gate(&job) {
            Ok(reason) => reason,
            Err(skip) => {
                done.ledger_id = self.record(&decision(a, &job.cgroup, Action::Skip, skip));
                return done;
            }
        };
        // Invariant 3: nothing happens that the ledger does not hold first.
        let Some(ledger_id) = self.record(&decision(a, &job.cgroup, Action::Reclaim, reason))
        else {
            self.breaker().refund();
            done.outcome = Outcome::Failed;
            return done;
        };
        done.ledger_id = Some(ledger_id);
        let resolution = self.act(&job);
        done.outcome = resolution.outcome;
        done.bytes_freed = resolution.bytes_freed;
        done.time_to_reclaim = resolution
            .time_to_reclaim_ms
            .map(|ms| Duration::from_millis(ms.max(0) as u64));
        tracing::info!(outcome = resolution.outcome.as_str(), detail = %resolution.detail,
            bytes_freed = ?resolution.bytes_freed, time_to_reclaim_ms = ?resolution.time_to_reclaim_ms,
            "reclaim finished");
        self.resolve(ledger_id, &resolution);
        done
    }

    /// Whether `job` may be acted on: the reason to reclaim, or the reason it is skipped
    /// (the safety screen, a dry run, the breaker).
    fn gate(&mut self, job: &Job) -> Result<String, String> {
        let a = &job.assessment;
        let suspect = a.verdict == Verdict::Suspect;
        let refusal = policy::screen(
            &a.holder,
            job.exe.as_deref(),
            a.service.as_deref(),
            suspect,
            &self.cfg,
            &self.never,
        );
        // An operator's explicit request overrides report mode, never the safety screen.
        let refusal = match (refusal, &job.manual) {
            (Err(policy::Refusal::Report), Some(_)) => Ok(()),
            (r, _) => r,
        };
        if let Err(r) = refusal {
            tracing::info!(reason = %r.reason(), "orphan not reclaimed");
            return Err(match &job.manual {
                Some(m) => format!("manual request refused: {} ({})", r.reason(), m.reason),
                None => r.reason(),
            });
        }
        if let Some(m) = job.manual.as_ref().filter(|m| m.dry_run) {
            return Err(format!(
                "dry run by uid {}: would reclaim ({})",
                m.uid, m.reason
            ));
        }
        let (allowed, tripped) = {
            let mut b = self.breaker();
            (b.allow(Instant::now()), b.is_tripped())
        };
        self.tripped
            .store(tripped, std::sync::atomic::Ordering::Relaxed);
        if !allowed {
            return Err("breaker tripped".to_owned());
        }
        let cause = a.death.as_ref().map(|d| d.cause.as_str()).unwrap_or("");
        Ok(match &job.manual {
            Some(m) => format!("manual request by uid {}: {}", m.uid, m.reason),
            None if suspect => format!(
                "suspect: outside every service, {cause} >= {:?} ago ([policy] suspects = \"enforce\")",
                a.grace
            ),
            None => format!(
                "orphaned: every session dead for >= {:?} ({})",
                a.grace,
                a.death.as_ref().map(|d| d.cause.as_str()).unwrap_or("")
            ),
        })
    }

    /// The hook, the pin, the signals, the verification; each step says what it saw in
    /// `detail`.
    fn act(&mut self, job: &Job) -> Resolution {
        let started = Instant::now();
        let a = &job.assessment;
        let mut detail: Vec<String> = Vec::new();
        if let Some(said) = self.run_hook(a) {
            detail.push(said);
        }
        let fd = match pin(a.id) {
            Ok(fd) => fd,
            Err(PinError::Gone) => {
                detail.push("exited before any signal".to_owned());
                return resolution(Outcome::Released, &detail);
            }
            Err(PinError::Other(e)) => {
                detail.push(format!("pidfd_open failed: {e}"));
                return resolution(Outcome::Failed, &detail);
            }
        };
        // Invariant 7: only while it holds a device file.
        if self.files.of_pid(a.id.pid).is_empty() {
            detail.push("holds no GPU device file any more".to_owned());
            return resolution(Outcome::Released, &detail);
        }
        let before_inv = self.views.since(started);
        let uuids = devices_of(a, &before_inv);
        let before = used_of(&before_inv, &uuids, a.id.pid);
        if let Err(outcome) = self.terminate(&fd, &mut detail) {
            return resolution(outcome, &detail);
        }
        self.verify(a, &uuids, before, Instant::now(), detail)
    }

    /// The service's hook, if it has one: what it said.
    fn run_hook(&mut self, a: &Assessment) -> Option<String> {
        let (hook, timeout) = a
            .service
            .as_deref()
            .and_then(|s| self.cfg.service(s))
            .and_then(|s| s.hook.clone().map(|h| (h, s.hook_timeout)))?;
        let env = [
            ("RECLAIMD_SERVICE", a.service.clone().unwrap_or_default()),
            ("RECLAIMD_PID", a.id.pid.to_string()),
            ("RECLAIMD_COMM", a.holder.comm.clone().unwrap_or_default()),
            (
                "RECLAIMD_SESSION",
                a.sessions
                    .iter()
                    .map(|s| format!("{}:{}", s.kind, s.key))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "RECLAIMD_DEATH_CAUSE",
                a.death
                    .as_ref()
                    .map(|d| d.cause.clone())
                    .unwrap_or_default(),
            ),
            ("RECLAIMD_BYTES", a.holder.known_bytes().to_string()),
        ];
        let said = hook::run(&hook, &env, timeout);
        self.event("hook", said.clone());
        Some(said)
    }

    /// SIGTERM through the pin, SIGKILL after the grace; `Err` with the outcome when the
    /// process did not exit (or was gone before the signal).
    fn terminate(&mut self, fd: &OwnedFd, detail: &mut Vec<String>) -> Result<(), Outcome> {
        let t0 = Instant::now();
        if let Err(e) = pidfd_send_signal(fd, Signal::TERM) {
            detail.push(format!("SIGTERM failed: {e}"));
            return Err(if e == rustix::io::Errno::SRCH {
                Outcome::Released
            } else {
                Outcome::Failed
            });
        }
        detail.push("SIGTERM".to_owned());
        self.event("SIGTERM", String::new());
        let grace = self.cfg.policy.term_grace;
        if !wait_exit(fd, grace) {
            let _ = pidfd_send_signal(fd, Signal::KILL);
            self.event("SIGKILL", format!("still alive after {grace:?}"));
            detail.push(format!("SIGKILL after {} ms", grace.as_millis()));
            if !wait_exit(fd, KILL_WAIT) {
                detail.push("still alive after SIGKILL (uninterruptible sleep?)".to_owned());
                return Err(Outcome::Failed);
            }
        }
        detail.push(format!("exited after {} ms", t0.elapsed().as_millis()));
        Ok(())
    }

    /// Verification: NVML stops listing it and the device memory drops.
    /// NVML views are those begun after `exited`, the moment the holder was seen gone.
    fn verify(
        &mut self,
        a: &Assessment,
        uuids: &[String],
        before: Option<u64>,
        exited: Instant,
        mut detail: Vec<String>,
    ) -> Resolution {
        let deadline = Instant::now() + VERIFY_WAIT;
        let mut pause = VERIFY_POLL.0;
        let (still_listed, after) = loop {
            let inv = self.views.since(exited);
            let listed = inv
                .holders
                .get(&a.id.pid)
                .is_some_and(|h| !h.memory.is_empty());
            let after = used_of(&inv, uuids, a.id.pid);
            let dropped = match (before, after) {
                (Some(b), Some(x)) => x < b || uuids.is_empty(),
                _ => true,
            };
            if (!listed && dropped) || Instant::now() >= deadline {
                break (listed, after);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(VERIFY_POLL.1);
        };
        let mut r = resolution(Outcome::Reclaimed, &detail);
        r.time_to_reclaim_ms = a
            .death
            .as_ref()
            .map(|d| (clock::monotonic_ns().saturating_sub(d.at) / 1_000_000) as i64);
        match (before, after) {
            (Some(b), Some(x)) => r.bytes_freed = Some(b.saturating_sub(x)),
            _ => detail.push("NVML unavailable: memory not verified".to_owned()),
        }
        if still_listed {
            detail.push("NVML still lists it after exit".to_owned());
            r.outcome = Outcome::Failed;
        } else if r.bytes_freed == Some(0) && !a.holder.memory.is_empty() {
            detail.push("device memory did not drop".to_owned());
            r.outcome = Outcome::Failed;
        } else if r.bytes_freed == Some(0) {
            // NVML never attributed memory to it: gone, but nothing measurable came back.
            detail.push("gone; no memory was attributed to it and none came back".to_owned());
        } else {
            detail.push("verified: NVML no longer lists it".to_owned());
        }
        r.detail = detail.join("; ");
        self.event("verification", r.detail.clone());
        r
    }
}

/// A resolution without bytes or times, with the steps so far.
fn resolution(outcome: Outcome, detail: &[String]) -> Resolution {
    Resolution {
        outcome,
        bytes_freed: None,
        time_to_reclaim_ms: None,
        detail: detail.join("; "),
        time_ms: clock::unix_ms(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::gpu::{Device, GpuMemory, Holder, ProcessKind};

    const GIB: u64 = 1 << 30;

    fn inventory(used: u64, holders: &[(u32, u64)]) -> Inventory {
        let mut map = BTreeMap::new();
        for (pid, bytes) in holders {
            let mut h = Holder::unseen(*pid);
            h.memory.push(GpuMemory {
                device_uuid: "GPU-a".to_owned(),
                bytes: Some(*bytes),
                kind: ProcessKind::Compute,
            });
            map.insert(*pid, h);
        }
        Inventory {
            nvml: NvmlStatus::Available {
                driver_version: "x".to_owned(),
            },
            devices: vec![Device {
                index: 0,
                uuid: "GPU-a".to_owned(),
                name: "A".to_owned(),
                minor: Some(0),
                total_bytes: 80 * GIB,
                used_bytes: used,
                attributed_bytes: 0,
                unattributed_bytes: 0,
                parent_uuid: None,
            }],
            holders: map,
            warnings: Vec::new(),
            nvml_duration: Duration::ZERO,
        }
    }

    #[test]
    fn a_drop_is_seen_even_when_another_process_allocates_as_much_meanwhile() {
        let uuids = vec!["GPU-a".to_owned()];
        // Worker 10 holds 1 GiB beside process 20's 2 GiB; then 10 exits as 30 takes 1 GiB:
        // the device's used memory stays at 3 GiB.
        let before = used_of(&inventory(3 * GIB, &[(10, GIB), (20, 2 * GIB)]), &uuids, 10);
        let after = used_of(&inventory(3 * GIB, &[(20, 2 * GIB), (30, GIB)]), &uuids, 10);
        assert_eq!(before, Some(GIB));
        assert_eq!(after, Some(0));
        // Memory nobody is listed for (a child holding inherited handles) counts as ours.
        let held = used_of(&inventory(3 * GIB, &[(20, 2 * GIB)]), &uuids, 10);
        assert_eq!(held, Some(GIB));
    }
}

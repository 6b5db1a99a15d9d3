//! `reclaimd run`: the daemon. One task owns the model and drives it from kernel events,
//! a periodic sweep, and GPU inventory snapshots taken on a blocking thread; decisions go
//! through a bounded queue to the executor's own thread, so intake never blocks on action.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{broadcast, mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    api::{self, CoreRequest, ManualReclaim, pb},
    clock,
    config::Config,
    event::KernelEvent,
    gpu::{GpuError, GpuInventory, GpuOptions, HolderStatus, Inventory, in_host_pid_namespace},
    ledger::{Action, Ledger, LedgerError, Lineage},
    model::{Binding, ConnKey, Model, Ns, ProcId},
    probe::{EventSource, ProbeError, ProbeOptions, Received},
    reclaim::{Done, Executor, Job, Manual, Untouchable, executor},
    reconcile::{self, Assessment, Verdict},
    scan,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::metrics::MetricsError),
    #[error(transparent)]
    Traces(#[from] crate::telemetry::traces::TracesError),
    #[error(transparent)]
    MetricsEndpoint(#[from] crate::telemetry::prometheus_endpoint::EndpointError),
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Starts the span of a dead session (from when it was first seen), with OTel's
/// attribute names where they exist and ours under `reclaimd.*`.
fn session_span(
    sess: &crate::model::BoundSession,
    service: &str,
    death: &crate::model::Death,
) -> opentelemetry::Context {
    use opentelemetry::{
        KeyValue,
        trace::{Span as _, TraceContextExt as _, Tracer as _},
    };
    let mut attrs = vec![
        KeyValue::new("reclaimd.session.kind", sess.kind),
        KeyValue::new("reclaimd.session.key", sess.key.clone()),
        KeyValue::new("reclaimd.service", service.to_owned()),
        KeyValue::new("reclaimd.death_cause", death.cause.clone()),
    ];
    if let Some(pid) = sess
        .key
        .strip_prefix("pid:")
        .and_then(|k| k.split('@').next())
        .and_then(|p| p.parse::<i64>().ok())
    {
        attrs.push(KeyValue::new("process.pid", pid));
    }
    if let Some((local, remote)) = sess.key.split_once("->")
        && let (Ok(l), Ok(r)) = (
            local.parse::<std::net::SocketAddr>(),
            remote.parse::<std::net::SocketAddr>(),
        )
    {
        attrs.push(KeyValue::new("server.port", i64::from(l.port())));
        attrs.push(KeyValue::new("network.peer.address", r.ip().to_string()));
        attrs.push(KeyValue::new("network.peer.port", i64::from(r.port())));
    }
    let tracer = crate::telemetry::traces::tracer();
    let mut span = tracer
        .span_builder("session")
        .with_start_time(clock::wall_time(sess.seen.unwrap_or(death.at)))
        .with_attributes(attrs)
        .start(&tracer);
    span.add_event_with_timestamp(
        "died",
        clock::wall_time(death.at),
        vec![KeyValue::new("cause", death.cause.clone())],
    );
    opentelemetry::Context::new().with_span(span)
}

/// How long API clients get to finish when the daemon stops.
const API_DRAIN: Duration = Duration::from_secs(1);

/// What one snapshot brings back from the blocking thread.
struct Snapshot {
    gpu: GpuInventory,
    started: Ns,
    procs: Option<Vec<crate::model::ProcFacts>>,
    tcp: Option<HashMap<u64, scan::TcpSocket>>,
    inventory: Inventory,
    conns: HashMap<u32, Vec<ConnKey>>,
    /// Fresh facts of live holders and their living ancestors (names change on exec).
    holder_facts: Vec<crate::model::ProcFacts>,
    /// How long the GPU inventory took.
    took: Duration,
}

fn take_snapshot(mut gpu: GpuInventory, full: bool, proc_root: PathBuf) -> Snapshot {
    let started = clock::monotonic_ns();
    let procs = full.then(|| scan::all_facts(&proc_root));
    let t0 = std::time::Instant::now();
    let inventory = gpu.snapshot();
    let took = t0.elapsed();
    let sockets: Vec<(u32, Vec<u64>)> = inventory
        .holders
        .values()
        .filter(|h| h.status == HolderStatus::Live)
        .map(|h| (h.pid, scan::socket_inodes(&proc_root, h.pid)))
        .collect();
    // The socket tables cost the kernel a walk of every socket (TIME_WAIT included: tens of
    // thousands under churn): read them only for a full scan or a holder with sockets.
    let table = if full || sockets.iter().any(|(_, s)| !s.is_empty()) {
        scan::tcp_sockets_seen_by(&proc_root, sockets.iter().map(|(pid, _)| *pid))
    } else {
        HashMap::new()
    };
    let conns = sockets
        .iter()
        .map(|(pid, inodes)| (*pid, scan::connections_among(inodes, &table)))
        .collect();
    let mut holder_facts = Vec::new();
    for h in inventory
        .holders
        .values()
        .filter(|h| h.status == HolderStatus::Live)
    {
        let mut pid = h.pid;
        for _ in 0..16 {
            let Some(f) = scan::facts(&proc_root, pid) else {
                break;
            };
            let ppid = f.ppid;
            holder_facts.push(f);
            if ppid <= 1 {
                break;
            }
            pid = ppid;
        }
    }
    Snapshot {
        gpu,
        started,
        procs,
        tcp: full.then_some(table),
        inventory,
        conns,
        holder_facts,
        took,
    }
}

struct Core {
    cfg: Arc<Config>,
    ledger: Arc<Mutex<Ledger>>,
    model: Model,
    proc_root: PathBuf,
    /// Holders handed to the executor and not back yet.
    in_flight: HashSet<ProcId>,
    /// Holders already decided (skipped, reclaimed, released): never decided twice.
    decided: HashSet<ProcId>,
    /// Holders whose sessions are all dead, last assessment: to see them let go by themselves.
    dying: HashMap<ProcId, Assessment>,
    queue_full: u64,
    /// The last snapshot's inventory and verdicts, for the API.
    last: Option<Last>,
    started: std::time::Instant,
    events_seen: u64,
    events_dropped: u64,
    breaker: Arc<std::sync::atomic::AtomicBool>,
    /// API watchers: session deaths, verdict changes, reclaim outcomes.
    events: broadcast::Sender<pb::Event>,
    /// Last verdict sent per holder, and dead session keys already announced.
    verdicts: HashMap<ProcId, &'static str>,
    announced: HashSet<String>,
    /// Manual reclaims waiting for the executor.
    manual: Vec<ManualWait>,
    metrics: Arc<crate::telemetry::Metrics>,
    /// The event source's name, and why it is not eBPF when it is not.
    probe_mode: &'static str,
    probe_degraded: Option<String>,
    /// What the kernel side sees, and from where.
    capabilities: Vec<crate::probe::CapabilityStatus>,
    /// What the last snapshot's holders are bound to, to tell urgent deaths.
    bound: Bound,
    /// The last ledger write error, until a write succeeds again.
    ledger_error: Option<String>,
    /// Holders' Kubernetes pods, from their cgroups.
    pods: std::cell::RefCell<crate::kube::Resolver>,
    /// Open `session` spans of dead sessions, ended when nothing binds to them any more.
    session_spans: HashMap<String, opentelemetry::Context>,
}

/// How soon a death needs a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Urgency {
    None,
    /// Within [`SOON`]: the death may matter to a holder the last snapshot did not know.
    Soon,
    /// At once: it matters to a known holder.
    Now,
}

/// Deaths of sessions no known holder is bound to wait this long for a snapshot, together.
const SOON: Duration = Duration::from_millis(100);

/// What the last snapshot's holders are bound to: their pids, the pids of their sessions'
/// roots, and their sessions' keys.
#[derive(Default)]
struct Bound {
    pids: HashSet<u32>,
    keys: HashSet<String>,
}

impl Bound {
    fn of(assessments: &[Assessment]) -> Self {
        let mut b = Self::default();
        for a in assessments {
            b.pids.insert(a.id.pid);
            for s in &a.sessions {
                if let Some(pid) = s
                    .key
                    .strip_prefix("pid:")
                    .and_then(|k| k.split('@').next())
                    .and_then(|p| p.parse().ok())
                {
                    b.pids.insert(pid);
                }
                b.keys.insert(s.key.clone());
            }
        }
        b
    }
}

struct Last {
    inventory: Inventory,
    assessments: Vec<Assessment>,
    time_ms: i64,
}

struct ManualWait {
    waiting: HashSet<ProcId>,
    ids: Vec<i64>,
    /// Why a holder's decision could not be recorded (so nothing was done to it).
    unrecorded: Option<String>,
    reply: oneshot::Sender<Result<Vec<i64>, tonic::Status>>,
}

impl Core {
    fn on_event(&mut self, ev: &KernelEvent) -> Urgency {
        if let KernelEvent::Fork { ppid, .. } = ev
            && self.model.needs_facts(*ppid)
            && let Some(f) = scan::facts(&self.proc_root, *ppid)
        {
            // A parent forking for the first time since we knew it: its name may have changed
            // since its own fork (exec, prctl). Read once per process, so floods stay cheap.
            self.model.observe_proc(&f, clock::monotonic_ns());
        }
        let death = self.model.apply(ev);
        if let KernelEvent::Fork { pid, ppid, .. } = ev
            && self.model.service_root(*ppid).is_some()
            && let Some(f) = scan::facts(&self.proc_root, *pid)
        {
            self.model.observe_proc(&f, clock::monotonic_ns());
        }
        if !death {
            return Urgency::None;
        }
        match ev {
            // A holder, or the root of a session a holder is bound to, or a service's root
            // (its workers may not be bound yet): decide now.
            KernelEvent::Exit { tgid, .. }
                if self.bound.pids.contains(tgid)
                    || self
                        .model
                        .service_root(*tgid)
                        .is_some_and(|(_, root)| root.pid == *tgid) =>
            {
                Urgency::Now
            }
            // Another member of a service: no session ends with it.
            KernelEvent::Exit { .. } => Urgency::None,
            KernelEvent::Tcp { socket, .. } => {
                let key = ConnKey {
                    local: std::net::SocketAddr::new(socket.local.addr, socket.local.port),
                    remote: std::net::SocketAddr::new(socket.remote.addr, socket.remote.port),
                };
                if self.bound.keys.contains(&key.to_string()) {
                    Urgency::Now
                } else {
                    // No holder was bound to it at the last snapshot; one started since may
                    // be. Deaths like this coalesce, so connection churn costs a few
                    // snapshots a second, not one per close.
                    Urgency::Soon
                }
            }
            _ => Urgency::Soon,
        }
    }

    fn lineage(&self, id: ProcId, b: &Binding) -> Lineage {
        Lineage {
            pid: id.pid,
            start_time: id.start_time,
            service: b.service.clone(),
            root_pid: b.root.pid,
            root_start_time: b.root.start_time,
        }
    }

    /// Applies a snapshot: verdicts, released holders, jobs. Returns when to reconcile next.
    fn on_snapshot(&mut self, s: &Snapshot, jobs: &mpsc::Sender<Job>) -> Option<Duration> {
        let now = clock::monotonic_ns();
        if let Some(procs) = &s.procs {
            self.model.observe_procs(procs, s.started);
        }
        for f in &s.holder_facts {
            self.model.observe_proc(f, s.started);
        }
        if let Some(table) = &s.tcp {
            for sock in table.values() {
                if sock.state != reclaimd_common::tcp_state::LISTEN {
                    self.model.observe_conn(sock.key.clone(), sock.state, now);
                }
            }
            let present: HashSet<&ConnKey> = table.values().map(|sock| &sock.key).collect();
            self.model.observe_conns_gone(&present, s.started);
        }
        // Bindings remembered before a restart come back before anything is decided.
        if let Ok(ledger) = self.ledger.lock() {
            for h in s.inventory.holders.values() {
                let Some(start_time) = h.start_time else {
                    continue;
                };
                let id = ProcId {
                    pid: h.pid,
                    start_time,
                };
                if !self.model.is_pinned(id)
                    && let Ok(Some(l)) = ledger.lineage(id.pid, id.start_time)
                {
                    self.model.restore_pin(
                        id,
                        Binding {
                            service: l.service,
                            root: ProcId {
                                pid: l.root_pid,
                                start_time: l.root_start_time,
                            },
                        },
                    );
                }
            }
        }
        let mut assessments =
            reconcile::assess(&mut self.model, &self.cfg, &s.inventory, &s.conns, now);
        let new_pins = self.model.take_new_pins();
        if !new_pins.is_empty()
            && let Ok(ledger) = self.ledger.lock()
        {
            for (id, b) in &new_pins {
                if let Err(error) = ledger.remember_lineage(&self.lineage(*id, b)) {
                    tracing::warn!(%error, pid = id.pid, "could not remember lineage");
                }
            }
        }
        self.announce(&assessments);
        self.metrics.snapshot(&s.inventory, &assessments, s.took);
        self.metrics.sessions(&self.session_counts());
        self.bound = Bound::of(&assessments);
        self.last = Some(Last {
            inventory: s.inventory.clone(),
            assessments: assessments.clone(),
            time_ms: executor::unix_ms(),
        });
        let live: HashSet<ProcId> = assessments
            .iter()
            // An exiting holder counts as gone: if it was dying, it let go by itself.
            .filter(|a| !matches!(a.verdict, Verdict::Untrusted | Verdict::Exiting))
            .map(|a| a.id)
            .collect();

        // Dying holders that are gone without any action: they let go by themselves.
        let gone: Vec<ProcId> = self
            .dying
            .keys()
            .filter(|id| {
                !live.contains(id) && !self.in_flight.contains(id) && !self.decided.contains(id)
            })
            .copied()
            .collect();
        for id in gone {
            if let Some(a) = self.dying.remove(&id) {
                self.record_released(&a);
                self.decided.insert(id);
            }
        }

        let mut next: Option<Duration> = None;
        let mut orphans = Vec::new();
        for a in assessments.drain(..) {
            match &a.verdict {
                Verdict::Pending { remaining } => {
                    next = Some(next.map_or(*remaining, |n| n.min(*remaining)));
                    self.dying.insert(a.id, a);
                }
                Verdict::Orphan => {
                    if !self.in_flight.contains(&a.id) && !self.decided.contains(&a.id) {
                        orphans.push(a.clone());
                    }
                    self.dying.insert(a.id, a);
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
            match jobs.try_send(self.job(a, None)) {
                Ok(()) => {
                    self.in_flight.insert(id);
                }
                Err(_) => {
                    self.queue_full += 1;
                    tracing::warn!(
                        pid = id.pid,
                        total = self.queue_full,
                        "reclaim queue full: decision deferred to the next sweep"
                    );
                }
            }
        }

        let mut keep = live.clone();
        keep.extend(self.in_flight.iter().copied());
        self.model.prune(&keep, now);
        let (procs, conns, pins) = self.model.sizes();
        tracing::debug!(
            procs,
            conns,
            pins,
            holders = s.inventory.holders.len(),
            dying = self.dying.len(),
            "reconciled"
        );
        self.decided.retain(|id| keep.contains(id));
        self.dying.retain(|id, _| keep.contains(id));
        if let Ok(ledger) = self.ledger.lock() {
            let alive: Vec<(u32, u64)> = keep.iter().map(|id| (id.pid, id.start_time)).collect();
            let _ = ledger.prune_lineage(&alive);
        }
        next
    }

    fn record_released(&self, a: &Assessment) {
        tracing::info!(
            pid = a.id.pid,
            service = a.service.as_deref().unwrap_or(""),
            "holder let go of the GPU by itself after its session died"
        );
        let cgroup = String::new();
        let d = executor::decision(
            a,
            &cgroup,
            Action::None,
            "exited or released the GPU by itself after its session died".to_owned(),
        );
        let id = match self.ledger.lock().map(|l| l.record_decision(&d)) {
            Ok(Ok(id)) => Some(id),
            Ok(Err(error)) => {
                tracing::error!(%error, pid = a.id.pid, "ledger write failed");
                None
            }
            Err(_) => None,
        };
        if let Some(id) = id {
            self.publish_record(id);
        }
        self.metrics.settled(
            a.service.as_deref().unwrap_or(""),
            crate::ledger::Outcome::Released,
            None,
            None,
            None,
        );
    }

    /// Sessions by (kind, service, state), every configured combination included (zeros
    /// too), so a gauge never keeps a stale value.
    fn session_counts(&self) -> Vec<((&'static str, String, &'static str), u64)> {
        let mut counts: HashMap<(&'static str, String, &'static str), u64> = HashMap::new();
        for s in &self.cfg.services {
            for kind in ["process", "connection"] {
                for state in ["live", "dead"] {
                    counts.insert((kind, s.name.clone(), state), 0);
                }
            }
        }
        for s in self.model.sessions() {
            let state = if s.death.is_some() { "dead" } else { "live" };
            *counts.entry((s.kind, s.service, state)).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    /// Sends the ledger record `id` to API watchers.
    fn publish_record(&self, id: i64) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let record = self
            .ledger
            .lock()
            .ok()
            .and_then(|l| l.get(id).ok().flatten());
        if let Some(r) = record {
            let _ = self.events.send(pb::Event {
                time_ms: executor::unix_ms(),
                kind: Some(pb::event::Kind::Reclaim(pb::ReclaimDone {
                    record: Some(api::convert::record(&r)),
                })),
            });
        }
    }

    /// Session deaths and verdict changes, to API watchers.
    fn announce(&mut self, assessments: &[Assessment]) {
        let now = executor::unix_ms();
        let mut keys = HashSet::new();
        for a in assessments {
            for sess in &a.sessions {
                keys.insert(sess.key.clone());
                if let Some(d) = &sess.death
                    && self.announced.insert(sess.key.clone())
                {
                    self.metrics
                        .session_death(a.service.as_deref().unwrap_or(""), &d.cause);
                    let cx = session_span(sess, a.service.as_deref().unwrap_or(""), d);
                    self.session_spans.insert(sess.key.clone(), cx);
                    let _ = self.events.send(pb::Event {
                        time_ms: now,
                        kind: Some(pb::event::Kind::SessionDied(pb::SessionDied {
                            session: Some(pb::Session {
                                kind: sess.kind.to_owned(),
                                key: sess.key.clone(),
                                service: a.service.clone().unwrap_or_default(),
                                dead: true,
                                death_cause: d.cause.clone(),
                                death_time_ms: Some(clock::wall_ms(d.at)),
                                pid: 0,
                            }),
                        })),
                    });
                }
            }
            let v = a.verdict.as_str();
            if self.verdicts.insert(a.id, v) != Some(v) {
                let _ = self.events.send(pb::Event {
                    time_ms: now,
                    kind: Some(pb::event::Kind::Verdict(pb::VerdictChanged {
                        pid: a.id.pid,
                        service: a.service.clone().unwrap_or_default(),
                        verdict: v.to_owned(),
                        bytes: (!a.holder.bytes_unknown()).then(|| a.holder.known_bytes()),
                    })),
                });
            }
        }
        let ids: HashSet<ProcId> = assessments.iter().map(|a| a.id).collect();
        self.verdicts.retain(|id, _| ids.contains(id));
        self.announced.retain(|k| keys.contains(k));
        // A session nothing binds to any more is settled: its span ends.
        self.session_spans.retain(|k, cx| {
            let keep = keys.contains(k);
            if !keep {
                use opentelemetry::trace::TraceContextExt as _;
                cx.span().end();
            }
            keep
        });
    }

    /// A job for the executor, with the facts read now: exe, cgroup, trace parent.
    fn job(&self, a: Assessment, manual: Option<Manual>) -> Job {
        let pid = a.id.pid;
        let facts = scan::facts(&self.proc_root, pid);
        Job {
            parent: self.session_context(&a),
            exe: facts.as_ref().and_then(|f| f.exe.clone()),
            cgroup: facts.and_then(|f| f.cgroup).unwrap_or_default(),
            pod: self.pods.borrow_mut().pod_of(&self.proc_root, pid),
            assessment: a,
            manual,
        }
    }

    /// The trace context of the (first dead) session a holder is bound to.
    fn session_context(&self, a: &Assessment) -> Option<opentelemetry::Context> {
        a.sessions
            .iter()
            .find_map(|s| self.session_spans.get(&s.key))
            .cloned()
    }

    fn on_done(&mut self, d: &Done) {
        self.in_flight.remove(&d.id);
        if let Some(e) = &d.ledger_error {
            // Nothing was done (invariant 3): left undecided, so the next sweep tries again.
            self.metrics.ledger_error();
            self.ledger_error = Some(e.clone());
        } else {
            if d.ledger_id.is_some() {
                self.ledger_error = None;
            }
            self.metrics.settled(
                &d.service,
                d.outcome,
                d.bytes_freed,
                d.time_to_reclaim,
                d.pod.as_ref(),
            );
            self.decided.insert(d.id);
            self.dying.remove(&d.id);
        }
        if let Some(id) = d.ledger_id {
            self.publish_record(id);
        }
        for w in &mut self.manual {
            if w.waiting.remove(&d.id) {
                w.ids.extend(d.ledger_id);
                if let Some(e) = &d.ledger_error {
                    w.unrecorded = Some(e.clone());
                }
            }
        }
        let (finished, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.manual)
            .into_iter()
            .partition(|w| w.waiting.is_empty());
        self.manual = waiting;
        for w in finished {
            let _ = w.reply.send(match (w.ids.is_empty(), w.unrecorded) {
                (true, Some(e)) => Err(tonic::Status::unavailable(format!(
                    "the ledger cannot record the decision, so nothing was done: {e}"
                ))),
                _ => Ok(w.ids),
            });
        }
    }

    fn on_api(&mut self, req: CoreRequest, jobs: &mpsc::Sender<Job>) {
        match req {
            CoreRequest::Status(reply) => {
                let _ = reply.send(self.status(jobs));
            }
            CoreRequest::Sessions(q, reply) => {
                let _ = reply.send(self.sessions(&q));
            }
            CoreRequest::Holders(q, reply) => {
                let _ = reply.send(self.holders(&q));
            }
            CoreRequest::Reclaim(m, reply) => self.manual_reclaim(m, reply, jobs),
        }
    }

    fn status(&self, jobs: &mpsc::Sender<Job>) -> pb::GetStatusResponse {
        let (nvml_available, nvml_reason, driver_version) =
            match self.last.as_ref().map(|l| &l.inventory.nvml) {
                Some(crate::gpu::NvmlStatus::Available { driver_version }) => {
                    (true, String::new(), driver_version.clone())
                }
                Some(crate::gpu::NvmlStatus::Unavailable { reason }) => {
                    (false, reason.clone(), String::new())
                }
                None => (false, "no inventory taken yet".to_owned(), String::new()),
            };
        let devices = self
            .last
            .as_ref()
            .map(|l| {
                l.inventory
                    .devices
                    .iter()
                    .map(|d| {
                        let orphaned = reconcile::orphaned_bytes(&l.assessments, &d.uuid);
                        api::convert::device(d, orphaned)
                    })
                    .collect()
            })
            .unwrap_or_default();
        pb::GetStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            probe_mode: self.probe_mode.to_owned(),
            probe_degraded_reason: self.probe_degraded.clone().unwrap_or_default(),
            capabilities: self
                .capabilities
                .iter()
                .map(api::convert::capability)
                .collect(),
            ledger_error: self.ledger_error.clone().unwrap_or_default(),
            events_seen: self.events_seen,
            events_dropped: self.events_dropped,
            policy_mode: match self.cfg.policy.mode {
                crate::config::Mode::Report => "report",
                crate::config::Mode::Enforce => "enforce",
            }
            .to_owned(),
            breaker_tripped: self.breaker.load(std::sync::atomic::Ordering::Relaxed),
            queue_depth: (jobs.max_capacity() - jobs.capacity()) as u32,
            queue_capacity: jobs.max_capacity() as u32,
            nvml_available,
            nvml_reason,
            driver_version,
            devices,
            inventory_time_ms: self.last.as_ref().map(|l| l.time_ms).unwrap_or(0),
        }
    }

    fn sessions(&self, q: &pb::ListSessionsRequest) -> pb::ListSessionsResponse {
        let sessions = self
            .model
            .sessions()
            .into_iter()
            .filter(|s| q.service.is_empty() || s.service == q.service)
            .filter(|s| q.include_dead || s.death.is_none())
            .map(|s| pb::Session {
                kind: s.kind.to_owned(),
                key: s.key,
                service: s.service,
                dead: s.death.is_some(),
                death_cause: s
                    .death
                    .as_ref()
                    .map(|d| d.cause.clone())
                    .unwrap_or_default(),
                death_time_ms: s.death.as_ref().map(|d| clock::wall_ms(d.at)),
                pid: s.pid,
            })
            .collect();
        pb::ListSessionsResponse { sessions }
    }

    fn holders(&self, q: &pb::ListHoldersRequest) -> pb::ListHoldersResponse {
        let Some(last) = &self.last else {
            return pb::ListHoldersResponse::default();
        };
        let by_pid: HashMap<u32, &Assessment> =
            last.assessments.iter().map(|a| (a.id.pid, a)).collect();
        let holders = last
            .inventory
            .holders
            .values()
            .map(|h| {
                let pod = self.pods.borrow_mut().pod_of(&self.proc_root, h.pid);
                api::convert::holder(h, by_pid.get(&h.pid).copied(), pod)
            })
            .filter(|h| q.service.is_empty() || h.service == q.service)
            .filter(|h| q.verdict.is_empty() || h.verdict == q.verdict)
            .collect();
        pb::ListHoldersResponse {
            holders,
            inventory_time_ms: last.time_ms,
        }
    }

    fn manual_reclaim(
        &mut self,
        m: ManualReclaim,
        reply: oneshot::Sender<Result<Vec<i64>, tonic::Status>>,
        jobs: &mpsc::Sender<Job>,
    ) {
        let targets: Vec<Assessment> = self
            .last
            .iter()
            .flat_map(|l| l.assessments.iter())
            .filter(|a| {
                if m.pid != 0 {
                    a.id.pid == m.pid
                } else {
                    a.sessions.iter().any(|s| s.key == m.session_key)
                }
            })
            .cloned()
            .collect();
        if targets.is_empty() {
            let what = if m.pid != 0 {
                format!("pid {} holds no GPU memory or device file", m.pid)
            } else {
                format!("no holder is bound to session {:?}", m.session_key)
            };
            let _ = reply.send(Err(tonic::Status::not_found(format!(
                "{what} (as of the last inventory)"
            ))));
            return;
        }
        if let Some(busy) = targets.iter().find(|a| self.in_flight.contains(&a.id)) {
            let _ = reply.send(Err(tonic::Status::failed_precondition(format!(
                "pid {} is being reclaimed already",
                busy.id.pid
            ))));
            return;
        }
        let mut waiting = HashSet::new();
        for a in targets {
            let id = a.id;
            let job = self.job(
                a,
                Some(Manual {
                    reason: m.reason.clone(),
                    dry_run: m.dry_run,
                    uid: m.uid,
                }),
            );
            if jobs.try_send(job).is_err() {
                self.queue_full += 1;
                break;
            }
            self.in_flight.insert(id);
            waiting.insert(id);
        }
        if waiting.is_empty() {
            let _ = reply.send(Err(tonic::Status::resource_exhausted(
                "the reclaim queue is full; try again",
            )));
            return;
        }
        tracing::info!(pid = m.pid, session = %m.session_key, dry_run = m.dry_run, uid = m.uid,
            reason = %m.reason, holders = waiting.len(), "manual reclaim requested");
        self.manual.push(ManualWait {
            waiting,
            ids: Vec::new(),
            unrecorded: None,
            reply,
        });
    }
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let cfg = Arc::new(cfg);
    let proc_root = PathBuf::from("/proc");
    if in_host_pid_namespace() == Some(false) {
        tracing::warn!(
            "not in the host pid namespace: NVML pids may not match /proc; run with hostPID"
        );
    }
    let ledger = Ledger::open(&cfg.ledger_path)?;
    let interrupted = ledger.recover_interrupted(
        executor::unix_ms(),
        "reclaimd stopped before this action's outcome was written",
    )?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "actions of a previous run had no outcome; marked interrupted"
        );
    }
    let ledger = Arc::new(Mutex::new(ledger));
    let gpu_opts = GpuOptions {
        nvml_library: cfg.gpu.nvml_library.clone(),
        device_glob: cfg.gpu.device_glob.clone(),
    };
    let opened = EventSource::open(
        cfg.probe.mode,
        &ProbeOptions {
            watched_ports: cfg.watched_ports(),
            ring_bytes: cfg.probe.ring_bytes,
            btf_path: cfg.probe.btf.clone(),
            exit_filter: crate::probe::ExitFilter::Auto,
        },
    )?;
    let mut probe = opened.source;
    if let Some(why) = &opened.degraded {
        tracing::warn!(mode = probe.mode(), reason = %why, sweep = ?cfg.probe.fallback_sweep,
            "DEGRADED: running without eBPF; deaths are found by the fallback, later");
    }
    for c in probe.capabilities() {
        tracing::info!(capability = c.capability.name(), source = c.source.name(),
            detail = %c.detail, "kernel capability");
    }
    let sweep_every = if probe.needs_fast_sweep() {
        cfg.policy.sweep.min(cfg.probe.fallback_sweep)
    } else {
        cfg.policy.sweep
    };
    let mut gpu = Some(GpuInventory::new(&gpu_opts)?);
    // The API's socket is bound before anything else can fail late: a daemon that cannot
    // answer its operators does not start.
    let api_listener = api::bind(&cfg.api).await?;
    let admin_gid = api::admin_gid(&cfg.api)?;
    let tcp = match (cfg.api.listen, api::tls(&cfg.api)?) {
        (Some(addr), Some(tls)) => Some((api::bind_tcp(addr).await?, tls)),
        _ => None,
    };
    let mut exec = Executor::new(
        cfg.clone(),
        ledger.clone(),
        GpuInventory::new(&gpu_opts)?,
        Untouchable {
            pids: scan::self_and_ancestors(&proc_root).into_iter().collect(),
        },
    );
    let breaker = exec.breaker_flag();
    let metrics = Arc::new(crate::telemetry::Metrics::new(&cfg.telemetry)?);
    let traces = crate::telemetry::traces::init(&cfg.telemetry, metrics.clone())?;
    let metrics_task = match cfg.metrics_listen {
        Some(addr) => {
            let listener = crate::telemetry::prometheus_endpoint::bind(addr).await?;
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            Some(tokio::spawn(crate::telemetry::prometheus_endpoint::serve(
                listener,
                metrics.clone(),
            )))
        }
        None => None,
    };
    let (job_tx, mut job_rx) = mpsc::channel::<Job>(cfg.policy.queue);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let executor_thread = std::thread::Builder::new()
        .name("reclaim-executor".into())
        .spawn(move || {
            while let Some(job) = job_rx.blocking_recv() {
                if done_tx.send(exec.handle(job)).is_err() {
                    break;
                }
            }
        })
        .map_err(DaemonError::Signal)?;

    let mut core = Core {
        cfg: cfg.clone(),
        ledger,
        model: Model::new(cfg.services.clone()),
        proc_root: proc_root.clone(),
        in_flight: HashSet::new(),
        decided: HashSet::new(),
        dying: HashMap::new(),
        queue_full: 0,
        last: None,
        started: std::time::Instant::now(),
        events_seen: 0,
        events_dropped: 0,
        breaker,
        events: broadcast::channel(cfg.api.watch_buffer).0,
        verdicts: HashMap::new(),
        announced: HashSet::new(),
        manual: Vec::new(),
        metrics: metrics.clone(),
        probe_mode: probe.mode(),
        probe_degraded: opened.degraded,
        capabilities: probe.capabilities().to_vec(),
        ledger_error: None,
        bound: Bound::default(),
        pods: std::cell::RefCell::new(crate::kube::Resolver::new(cfg.containers_dir.clone())),
        session_spans: HashMap::new(),
    };
    metrics.probe_mode(probe.mode());
    metrics.capabilities(probe.capabilities());
    let (api_tx, mut api_rx) = mpsc::channel::<CoreRequest>(64);
    let (api_stop_tx, api_stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let svc = api::ReclaimdService {
        core: api_tx,
        events: core.events.clone(),
        ledger: core.ledger.clone(),
        access: api::access::Access { admin_gid },
    };
    let mut api_tasks = Vec::new();
    if let Some((listener, tls)) = tcp {
        let (svc, stop) = (svc.clone(), stopped(api_stop_rx.clone()));
        api_tasks.push(tokio::spawn(async move {
            if let Err(error) = api::serve_tcp(listener, tls, svc, stop).await {
                tracing::error!(%error, "API TCP listener failed");
            }
        }));
    }
    api_tasks.push(tokio::spawn({
        let socket = cfg.api.socket.clone();
        let stop = stopped(api_stop_rx);
        async move {
            if let Err(error) = api::serve(api_listener, &socket, svc, stop).await {
                tracing::error!(%error, "API server failed");
            }
        }
    }));
    tracing::info!(services = cfg.services.len(), mode = ?cfg.policy.mode,
        ledger = %cfg.ledger_path.display(), ports = ?cfg.watched_ports(),
        api = %cfg.api.socket.display(), "reclaimd running");

    let mut batch: Vec<Received> = Vec::with_capacity(1024);
    let mut sweep = tokio::time::interval(sweep_every);
    let mut snapshot: Option<JoinHandle<Snapshot>> = None;
    // The first snapshot is a full one: /proc, sockets and GPUs.
    let mut full_due = true;
    let mut due: Option<Instant> = Some(Instant::now());
    let mut last_drops = 0u64;
    loop {
        let can_start = snapshot.is_none() && gpu.is_some();
        let wake = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            read = probe.read_batch(&mut batch) => {
                read?;
                let mut urgency = Urgency::None;
                core.events_seen += batch.len() as u64;
                for r in batch.drain(..) {
                    metrics.event(r.event.kind(), r.recv_ns.saturating_sub(r.event.ts_ns()));
                    urgency = urgency.max(core.on_event(&r.event));
                }
                let now = Instant::now();
                match urgency {
                    Urgency::Now => due = Some(now),
                    Urgency::Soon => due = Some(due.map_or(now + SOON, |d| d.min(now + SOON))),
                    Urgency::None => {}
                }
            }
            _ = sweep.tick() => {
                full_due = true;
                due = Some(Instant::now());
                let drops = probe.drops()?;
                if drops > last_drops {
                    metrics.dropped(drops - last_drops);
                    tracing::warn!(lost = drops - last_drops, source = probe.mode(),
                        "kernel events lost: resynchronising from /proc");
                    last_drops = drops;
                }
                core.events_dropped = drops;
                metrics.queue(
                    job_tx.max_capacity() - job_tx.capacity(),
                    core.breaker.load(std::sync::atomic::Ordering::Relaxed),
                );
            }
            Some(req) = api_rx.recv() => core.on_api(req, &job_tx),
            Some(done) = done_rx.recv() => core.on_done(&done),
            _ = tokio::time::sleep_until(wake), if can_start && due.is_some() => {
                due = None;
                let (Some(g), root) = (gpu.take(), proc_root.clone()) else { continue };
                let full = std::mem::take(&mut full_due);
                snapshot = Some(tokio::task::spawn_blocking(move || take_snapshot(g, full, root)));
            }
            joined = async { snapshot.as_mut().expect("guarded").await }, if snapshot.is_some() => {
                snapshot = None;
                match joined {
                    Ok(s) => {
                        if let Some(next) = core.on_snapshot(&s, &job_tx) {
                            let at = Instant::now() + next + Duration::from_millis(1);
                            due = Some(due.map_or(at, |d| d.min(at)));
                        }
                        gpu = Some(s.gpu);
                    }
                    Err(error) => {
                        tracing::error!(%error, "inventory snapshot failed; retrying");
                        gpu = Some(GpuInventory::new(&gpu_opts)?);
                    }
                }
            }
        }
    }
    tracing::info!("stopping: waiting for the action in progress");
    // Clients get a moment to finish; open watch streams never would, so then they are cut.
    let _ = api_stop_tx.send(true);
    let aborts: Vec<_> = api_tasks.iter().map(|t| t.abort_handle()).collect();
    if tokio::time::timeout(API_DRAIN, futures_join(api_tasks))
        .await
        .is_err()
    {
        aborts.iter().for_each(|a| a.abort());
        let _ = std::fs::remove_file(&cfg.api.socket);
    }
    drop(job_tx);
    let _ = tokio::task::spawn_blocking(move || executor_thread.join()).await;
    drop(probe);
    if let Some(t) = metrics_task {
        t.abort();
    }
    for (_, cx) in core.session_spans.drain() {
        use opentelemetry::trace::TraceContextExt as _;
        cx.span().end();
    }
    if let Some(t) = traces {
        t.shutdown();
    }
    metrics.shutdown();
    tracing::info!("stopped");
    Ok(())
}

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
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

use crate::{
    clock,
    config::Config,
    event::KernelEvent,
    gpu::{GpuError, GpuInventory, GpuOptions, HolderStatus, Inventory, in_host_pid_namespace},
    ledger::{Action, Ledger, LedgerError, Lineage},
    model::{Binding, ConnKey, Model, Ns, ProcId},
    probe::{Probe, ProbeError, ProbeOptions, Received},
    reclaim::{Done, Executor, Job, Untouchable, executor},
    reconcile::{self, Assessment, Verdict},
    scan,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

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
}

fn take_snapshot(mut gpu: GpuInventory, full: bool, proc_root: PathBuf) -> Snapshot {
    let started = clock::monotonic_ns();
    let procs = full.then(|| scan::all_facts(&proc_root));
    let inventory = gpu.snapshot();
    let table = scan::tcp_sockets(&proc_root);
    let conns = inventory
        .holders
        .values()
        .filter(|h| h.status == HolderStatus::Live)
        .map(|h| (h.pid, scan::connections_of(&proc_root, h.pid, &table)))
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
}

impl Core {
    fn on_event(&mut self, ev: &KernelEvent) -> bool {
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
        death
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
            let exe =
                std::fs::read_link(self.proc_root.join(a.id.pid.to_string()).join("exe")).ok();
            let cgroup = scan::cgroup_of(&self.proc_root, a.id.pid).unwrap_or_default();
            let id = a.id;
            tracing::info!(
                pid = id.pid,
                service = a.service.as_deref().unwrap_or(""),
                cause = a.death.as_ref().map(|d| d.cause.as_str()).unwrap_or(""),
                bytes = a.holder.known_bytes(),
                "orphan found"
            );
            match jobs.try_send(Job {
                assessment: a,
                exe,
                cgroup,
            }) {
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
        if let Ok(ledger) = self.ledger.lock()
            && let Err(error) = ledger.record_decision(&d)
        {
            tracing::error!(%error, pid = a.id.pid, "ledger write failed");
        }
    }

    fn on_done(&mut self, d: &Done) {
        self.in_flight.remove(&d.id);
        self.decided.insert(d.id);
        self.dying.remove(&d.id);
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
    let mut probe = Probe::load(&ProbeOptions {
        watched_ports: cfg.watched_ports(),
        ring_bytes: cfg.probe.ring_bytes,
        btf_path: cfg.probe.btf.clone(),
    })?;
    let mut gpu = Some(GpuInventory::new(&gpu_opts)?);
    let mut exec = Executor::new(
        cfg.clone(),
        ledger.clone(),
        GpuInventory::new(&gpu_opts)?,
        Untouchable {
            pids: scan::self_and_ancestors(&proc_root).into_iter().collect(),
        },
    );
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
    };
    tracing::info!(services = cfg.services.len(), mode = ?cfg.policy.mode,
        ledger = %cfg.ledger_path.display(), ports = ?cfg.watched_ports(), "reclaimd running");

    let mut batch: Vec<Received> = Vec::with_capacity(1024);
    let mut sweep = tokio::time::interval(cfg.policy.sweep);
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
                let mut death = false;
                for r in batch.drain(..) {
                    death |= core.on_event(&r.event);
                }
                if death {
                    due = Some(Instant::now());
                }
            }
            _ = sweep.tick() => {
                full_due = true;
                due = Some(Instant::now());
                let drops = probe.drops()?;
                if drops > last_drops {
                    tracing::warn!(lost = drops - last_drops, "kernel events lost: resynchronising from /proc");
                    last_drops = drops;
                }
            }
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
    drop(job_tx);
    let _ = tokio::task::spawn_blocking(move || executor_thread.join()).await;
    drop(probe);
    tracing::info!("stopped");
    Ok(())
}

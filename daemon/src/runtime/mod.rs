//! `reclaimd run`: the thin runtime around the [`Engine`]. One task reads the inputs (kernel
//! events, the sweep's ticks, snapshots taken on a blocking thread, the executor's results,
//! the API's requests), feeds the engine, and carries out the effects it returns. Orders go
//! through a bounded queue to the executor's own thread, so intake never blocks on action;
//! the ledger has one owner, its own thread.
mod effects;
pub mod request;
mod snapshot;
mod status;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{broadcast, mpsc},
    task::JoinHandle,
    time::Instant,
};

use self::{
    effects::{ExecutorGone, Hands, Procfs},
    request::CoreRequest,
    snapshot::Taken,
};
use crate::{
    api::{self},
    clock::{self, Now},
    config::Config,
    engine::{Done, Engine, SOON, Urgency},
    gpu::{GpuError, GpuInventory, GpuOptions, in_host_pid_namespace},
    ledger::{Ledger, LedgerError},
    ledger_writer::{LedgerWriter, WriterError},
    probe::{EventSource, ProbeError, ProbeOptions, Received},
    reclaim::{Executor, Job, Untouchable},
    scan,
    telemetry::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("ledger: {0}")]
    LedgerWriter(#[from] WriterError),
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
    #[error(transparent)]
    Executor(#[from] ExecutorGone),
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error("starting a thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// How long API clients get to finish when the daemon stops.
const API_DRAIN: Duration = Duration::from_secs(1);

/// The runtime's state: the engine, what it acts with, and what only the runtime knows.
struct Runtime {
    cfg: Arc<Config>,
    engine: Engine,
    hands: Hands,
    gpu_opts: GpuOptions,
    /// The NVML handle, away while a snapshot is being taken.
    gpu: Option<GpuInventory>,
    started: std::time::Instant,
    events_seen: u64,
    events_dropped: u64,
    breaker: Arc<std::sync::atomic::AtomicBool>,
    probe_mode: &'static str,
    probe_degraded: Option<String>,
    capabilities: Vec<crate::probe::CapabilityStatus>,
}

/// When the next snapshot is due, and whether it is a full one.
struct Schedule {
    due: Option<Instant>,
    /// The next snapshot reads all of /proc (processes and their open files) and the socket
    /// tables: a resync.
    full: bool,
    /// Sweeps since the last resync, and how many make one (`[policy] resync`).
    since_resync: u32,
    resync_every: u32,
    running: Option<JoinHandle<Taken>>,
    last_drops: u64,
}

impl Schedule {
    fn new(sweep: Duration, resync: Duration) -> Self {
        let every = resync.as_nanos().div_ceil(sweep.as_nanos().max(1));
        Self {
            // The first snapshot is a full one: /proc, sockets and GPUs.
            due: Some(Instant::now()),
            full: true,
            since_resync: 0,
            resync_every: u32::try_from(every).unwrap_or(u32::MAX).max(1),
            running: None,
            last_drops: 0,
        }
    }

    /// A sweep's tick: a snapshot now, a resync every `resync_every` ticks, or at once when
    /// `resync` (events were lost, or come from sources that only a resync completes).
    fn sweep(&mut self, resync: bool) {
        self.since_resync += 1;
        if resync || self.since_resync >= self.resync_every {
            self.full = true;
            self.since_resync = 0;
        }
        self.due = Some(Instant::now());
    }

    fn at_most(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }

    fn urge(&mut self, urgency: Urgency) {
        let now = Instant::now();
        match urgency {
            Urgency::Now => self.due = Some(now),
            Urgency::Soon => self.at_most(now + SOON),
            Urgency::None => {}
        }
    }
}

/// The channels the loop reads besides the probe.
struct Inputs {
    probe: EventSource,
    sigint: Signal,
    sigterm: Signal,
    api: mpsc::Receiver<CoreRequest>,
    done: mpsc::UnboundedReceiver<Done>,
}

/// What runs beside the loop and is stopped after it.
struct Beside {
    api_tasks: Vec<JoinHandle<()>>,
    api_stop: tokio::sync::watch::Sender<bool>,
    executor: JoinHandle<()>,
    ledger: std::thread::JoinHandle<()>,
    metrics_task: Option<JoinHandle<()>>,
    traces: Option<crate::telemetry::traces::Traces>,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let cfg = Arc::new(cfg);
    warn_outside_host_pids();
    let (ledger, ledger_thread, lineage) = open_ledger(&cfg)?;
    let (probe, probe_degraded) = open_probe(&cfg)?;
    let gpu_opts = GpuOptions {
        nvml_library: cfg.gpu.nvml_library.clone(),
        device_glob: cfg.gpu.device_glob.clone(),
    };
    let gpu = GpuInventory::new(&gpu_opts)?;
    // The API's socket is bound before anything else can fail late: a daemon that cannot
    // answer its operators does not start.
    let bound = bind_api(&cfg).await?;
    let crew = new_executors(&cfg, &ledger, &gpu_opts)?;
    let breaker = crew[0].breaker_flag();
    let (metrics, traces, metrics_task) = start_telemetry(&cfg).await?;
    let (job_tx, job_rx) = mpsc::channel::<Job>(cfg.policy.queue);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let executor = tokio::spawn(crate::reclaim::pool::run(crew, job_rx, done_tx));
    let (events, _) = broadcast::channel(cfg.api.watch_buffer);
    let (api_tx, api_rx) = mpsc::channel::<CoreRequest>(64);
    let (api_stop, api_stop_rx) = tokio::sync::watch::channel(false);
    let svc = api::ReclaimdService {
        core: api_tx,
        events: events.clone(),
        ledger: ledger.clone(),
        access: api::access::Access {
            admin_gid: bound.admin_gid,
        },
    };
    let api_tasks = serve_api(&cfg, bound, svc, api_stop_rx);
    metrics.probe_mode(probe.mode());
    metrics.capabilities(probe.capabilities());
    let hands = Hands {
        proc_root: PathBuf::from("/proc"),
        jobs: job_tx,
        ledger,
        events,
        metrics,
        spans: Default::default(),
        pods: crate::kube::Resolver::new(cfg.containers_dir.clone()),
        replies: Default::default(),
    };
    let mut rt = Runtime {
        engine: Engine::new(cfg.clone(), lineage),
        hands,
        gpu_opts,
        gpu: Some(gpu),
        started: std::time::Instant::now(),
        events_seen: 0,
        events_dropped: 0,
        breaker,
        probe_mode: probe.mode(),
        probe_degraded,
        capabilities: probe.capabilities().to_vec(),
        cfg: cfg.clone(),
    };
    log_running(&cfg);
    let mut inputs = Inputs {
        probe,
        sigint,
        sigterm,
        api: api_rx,
        done: done_rx,
    };
    let result = rt.run_loop(&mut inputs).await;
    let beside = Beside {
        api_tasks,
        api_stop,
        executor,
        ledger: ledger_thread,
        metrics_task,
        traces,
    };
    rt.stop(inputs, beside).await;
    result
}

fn warn_outside_host_pids() {
    if in_host_pid_namespace() == Some(false) {
        tracing::warn!(
            "not in the host pid namespace: NVML pids may not match /proc; run with hostPID"
        );
    }
}

/// Metrics, traces, and the metrics endpoint's task when one is configured.
async fn start_telemetry(
    cfg: &Config,
) -> Result<
    (
        Arc<Metrics>,
        Option<crate::telemetry::traces::Traces>,
        Option<JoinHandle<()>>,
    ),
    DaemonError,
> {
    let metrics = Arc::new(Metrics::new(&cfg.telemetry)?);
    let traces = crate::telemetry::traces::init(&cfg.telemetry, metrics.clone())?;
    let task = serve_metrics(cfg, &metrics).await?;
    Ok((metrics, traces, task))
}

fn log_running(cfg: &Config) {
    tracing::info!(services = cfg.services.len(), mode = ?cfg.policy.mode,
        ledger = %cfg.ledger_path.display(), ports = ?cfg.watched_ports(),
        api = %cfg.api.socket.display(), "reclaimd running");
}

/// The executors of the reclaim pool (`[policy] parallel`, at least one), sharing one NVML
/// handle and one breaker, never to touch reclaimd or its ancestors.
fn new_executors(
    cfg: &Arc<Config>,
    ledger: &LedgerWriter,
    gpu_opts: &GpuOptions,
) -> Result<Vec<Executor>, DaemonError> {
    let first = Executor::new(
        cfg.clone(),
        ledger.clone(),
        GpuInventory::new(gpu_opts)?,
        Untouchable {
            pids: scan::self_and_ancestors(&PathBuf::from("/proc"))
                .into_iter()
                .collect(),
        },
    );
    let mut crew = Vec::with_capacity(cfg.policy.parallel);
    for _ in 1..cfg.policy.parallel {
        crew.push(first.sibling());
    }
    crew.push(first);
    Ok(crew)
}

/// Opens the ledger, marks the actions a previous run left without an outcome, and reads
/// the lineage it remembers (once: the engine keeps it from then on).
type OpenLedger = (
    LedgerWriter,
    std::thread::JoinHandle<()>,
    Vec<crate::record::Lineage>,
);

fn open_ledger(cfg: &Config) -> Result<OpenLedger, DaemonError> {
    let ledger = Ledger::open(&cfg.ledger_path)?;
    let interrupted = ledger.recover_interrupted(
        clock::unix_ms(),
        "reclaimd stopped before this action's outcome was written",
    )?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "actions of a previous run had no outcome; marked interrupted"
        );
    }
    let lineage = ledger.lineages()?;
    let (writer, thread) = LedgerWriter::spawn(ledger).map_err(DaemonError::Thread)?;
    Ok((writer, thread, lineage))
}

fn open_probe(cfg: &Config) -> Result<(EventSource, Option<String>), DaemonError> {
    let opened = EventSource::open(
        cfg.probe.mode,
        &ProbeOptions {
            watched_ports: cfg.watched_ports(),
            ring_bytes: cfg.probe.ring_bytes,
            btf_path: cfg.probe.btf.clone(),
            exit_filter: crate::probe::ExitFilter::Auto,
            every_change: false,
        },
    )?;
    let probe = opened.source;
    if let Some(why) = &opened.degraded {
        tracing::warn!(mode = probe.mode(), reason = %why, sweep = ?cfg.probe.fallback_sweep,
            "DEGRADED: running without eBPF; deaths are found by the fallback, later");
    }
    for c in probe.capabilities() {
        tracing::info!(capability = c.capability.name(), source = c.source.name(),
            detail = %c.detail, "kernel capability");
    }
    Ok((probe, opened.degraded))
}

async fn serve_metrics(
    cfg: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<JoinHandle<()>>, DaemonError> {
    let Some(addr) = cfg.metrics_listen else {
        return Ok(None);
    };
    let listener = crate::telemetry::prometheus_endpoint::bind(addr).await?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(Some(tokio::spawn(
        crate::telemetry::prometheus_endpoint::serve(listener, metrics.clone()),
    )))
}

/// The API's listeners, bound, and the admin group, checked.
struct ApiBound {
    listener: tokio::net::UnixListener,
    admin_gid: Option<u32>,
    tcp: Option<(tokio::net::TcpListener, tonic::transport::ServerTlsConfig)>,
}

async fn bind_api(cfg: &Config) -> Result<ApiBound, DaemonError> {
    let listener = api::bind(&cfg.api).await?;
    let admin_gid = api::admin_gid(&cfg.api)?;
    let tcp = match (cfg.api.listen, api::tls(&cfg.api)?) {
        (Some(addr), Some(tls)) => Some((api::bind_tcp(addr).await?, tls)),
        _ => None,
    };
    Ok(ApiBound {
        listener,
        admin_gid,
        tcp,
    })
}

fn serve_api(
    cfg: &Config,
    bound: ApiBound,
    svc: api::ReclaimdService,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut tasks = Vec::new();
    if let Some((listener, tls)) = bound.tcp {
        let (svc, stop) = (svc.clone(), stopped(stop_rx.clone()));
        tasks.push(tokio::spawn(async move {
            if let Err(error) = api::serve_tcp(listener, tls, svc, stop).await {
                tracing::error!(%error, "API TCP listener failed");
            }
        }));
    }
    let socket = cfg.api.socket.clone();
    let stop = stopped(stop_rx);
    tasks.push(tokio::spawn(async move {
        if let Err(error) = api::serve(bound.listener, &socket, svc, stop).await {
            tracing::error!(%error, "API server failed");
        }
    }));
    tasks
}

impl Runtime {
    async fn run_loop(&mut self, inputs: &mut Inputs) -> Result<(), DaemonError> {
        let sweep_every = if inputs.probe.needs_fast_sweep() {
            self.cfg.policy.sweep.min(self.cfg.probe.fallback_sweep)
        } else {
            self.cfg.policy.sweep
        };
        let mut batch: Vec<Received> = Vec::with_capacity(1024);
        let mut sweep = tokio::time::interval(sweep_every);
        let mut sched = Schedule::new(sweep_every, self.cfg.policy.resync);
        loop {
            let can_start = sched.running.is_none() && self.gpu.is_some();
            let wake = sched
                .due
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = inputs.sigint.recv() => return Ok(()),
                _ = inputs.sigterm.recv() => return Ok(()),
                read = inputs.probe.read_batch(&mut batch) => {
                    read?;
                    let urgency = self.on_events(&mut batch);
                    sched.urge(urgency);
                }
                _ = sweep.tick() => self.on_tick(&mut sched, &inputs.probe)?,
                Some(req) = inputs.api.recv() => self.on_api(req)?,
                Some(done) = inputs.done.recv() => {
                    let effects = self.engine.on_done(&done);
                    self.hands.carry(effects)?;
                }
                _ = tokio::time::sleep_until(wake), if can_start && sched.due.is_some() => {
                    self.start_snapshot(&mut sched);
                }
                joined = async { sched.running.as_mut().expect("guarded").await },
                    if sched.running.is_some() => {
                    sched.running = None;
                    self.on_taken(joined, &mut sched)?;
                    inputs.probe.set_bound(&self.engine.bound_sockets())?;
                }
            }
        }
    }

    fn on_events(&mut self, batch: &mut Vec<Received>) -> Urgency {
        let mut urgency = Urgency::None;
        self.events_seen += batch.len() as u64;
        self.hands.metrics.events(
            batch
                .iter()
                .map(|r| (r.event.kind(), r.recv_ns.saturating_sub(r.event.ts_ns()))),
        );
        let mut procs = Procfs(&self.hands.proc_root);
        for r in batch.drain(..) {
            let now = clock::monotonic_ns();
            urgency = urgency.max(self.engine.on_event(&r.event, &mut procs, now));
        }
        urgency
    }

    fn on_tick(&mut self, sched: &mut Schedule, probe: &EventSource) -> Result<(), DaemonError> {
        let drops = probe.drops()?;
        let lost = drops > sched.last_drops;
        if lost {
            self.hands.metrics.dropped(drops - sched.last_drops);
            tracing::warn!(
                lost = drops - sched.last_drops,
                source = probe.mode(),
                "kernel events lost: resynchronising from /proc"
            );
            sched.last_drops = drops;
        }
        sched.sweep(lost || probe.needs_fast_sweep());
        self.events_dropped = drops;
        let jobs = &self.hands.jobs;
        self.hands.metrics.queue(
            jobs.max_capacity() - jobs.capacity(),
            self.breaker.load(std::sync::atomic::Ordering::Relaxed),
        );
        Ok(())
    }

    fn start_snapshot(&mut self, sched: &mut Schedule) {
        sched.due = None;
        let Some(g) = self.gpu.take() else { return };
        let root = self.hands.proc_root.clone();
        let full = std::mem::take(&mut sched.full);
        let ports = self.cfg.watched_ports();
        sched.running = Some(tokio::task::spawn_blocking(move || {
            snapshot::take(g, full, root, &ports)
        }));
    }

    fn on_taken(
        &mut self,
        joined: Result<Taken, tokio::task::JoinError>,
        sched: &mut Schedule,
    ) -> Result<(), DaemonError> {
        let t = match joined {
            Ok(t) => t,
            Err(error) => {
                tracing::error!(%error, "inventory snapshot failed; retrying");
                self.gpu = Some(GpuInventory::new(&self.gpu_opts)?);
                return Ok(());
            }
        };
        let r = self
            .engine
            .on_snapshot(&t.snapshot, Now::read(), self.hands.room());
        if let Some(j) = self.engine.judged() {
            self.hands
                .metrics
                .snapshot(&j.inventory, &j.assessments, t.took);
        }
        self.hands.metrics.sessions(&self.engine.session_counts());
        self.hands.carry(r.effects)?;
        if let Some(next) = r.next {
            sched.at_most(Instant::now() + next + Duration::from_millis(1));
        }
        self.gpu = Some(t.gpu);
        Ok(())
    }

    async fn stop(self, inputs: Inputs, beside: Beside) {
        tracing::info!("stopping: waiting for the action in progress");
        // Clients get a moment to finish; open watch streams never would, so then they are cut.
        let _ = beside.api_stop.send(true);
        let aborts: Vec<_> = beside.api_tasks.iter().map(|t| t.abort_handle()).collect();
        if tokio::time::timeout(API_DRAIN, join_all(beside.api_tasks))
            .await
            .is_err()
        {
            aborts.iter().for_each(|a| a.abort());
            let _ = std::fs::remove_file(&self.cfg.api.socket);
        }
        let Hands {
            jobs,
            ledger,
            mut spans,
            metrics,
            ..
        } = self.hands;
        drop(jobs);
        let _ = beside.executor.await;
        drop(inputs);
        if let Some(t) = beside.metrics_task {
            t.abort();
        }
        spans.end_all();
        if let Some(t) = beside.traces {
            t.shutdown();
        }
        metrics.shutdown();
        // The last handle goes: the ledger's thread finishes what it was asked and closes
        // the database.
        drop(ledger);
        let thread = beside.ledger;
        let closed = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout(API_DRAIN, closed).await.is_err() {
            tracing::warn!("the ledger's thread did not finish in time");
        }
        tracing::info!("stopped");
    }
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fulls(s: &mut Schedule, ticks: &[bool]) -> Vec<bool> {
        ticks
            .iter()
            .map(|&lost| {
                s.sweep(lost);
                std::mem::take(&mut s.full)
            })
            .collect()
    }

    #[test]
    fn a_resync_comes_every_resync_period_and_at_once_after_lost_events() {
        let mut s = Schedule::new(Duration::from_secs(5), Duration::from_secs(12));
        assert!(
            std::mem::take(&mut s.full),
            "the first snapshot is a full one"
        );
        assert_eq!(s.resync_every, 3, "12 s in 5 s sweeps: every third");
        let f = fulls(
            &mut s,
            &[false, false, false, false, true, false, false, false],
        );
        assert_eq!(f, [false, false, true, false, true, false, false, true]);
        let mut every = Schedule::new(Duration::from_secs(5), Duration::from_secs(5));
        assert_eq!(fulls(&mut every, &[false, false]), [true, true]);
    }
}

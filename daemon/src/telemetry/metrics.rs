//! The daemon's metrics. Every name starts with `reclaimd_`; labels are bounded (service
//! names from the config, device UUIDs, fixed vocabularies): never a pid.
use std::time::Duration;

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram, Meter, MeterProvider as _},
};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::{gpu::Inventory, ledger::Outcome, reconcile::Assessment};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("Prometheus exporter: {0}")]
    Exporter(#[from] opentelemetry_sdk::error::OTelSdkError),
    #[error("OTLP metric exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("[telemetry] otlp_protocol {0:?}: use \"grpc\" or \"http/protobuf\"")]
    Protocol(String),
}

/// The OTLP metric exporter's reader, when OTLP export is configured: every 60 s (or
/// OTEL_METRIC_EXPORT_INTERVAL ms), and once more at shutdown.
fn otlp_reader(
    cfg: &crate::config::TelemetryConfig,
) -> Result<
    Option<opentelemetry_sdk::metrics::PeriodicReader<opentelemetry_otlp::MetricExporter>>,
    MetricsError,
> {
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    let Some(target) = super::otlp_target(cfg, "METRICS") else {
        return Ok(None);
    };
    let exporter = match target.protocol.as_str() {
        "grpc" => {
            let mut b = opentelemetry_otlp::MetricExporter::builder().with_tonic();
            if let Some(e) = &target.endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.with_timeout(Duration::from_secs(5)).build()?
        }
        "http/protobuf" => {
            let mut b = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(e) = &target.endpoint {
                b = b.with_endpoint(super::signal_url(e, "metrics"));
            }
            b.with_timeout(Duration::from_secs(5)).build()?
        }
        other => return Err(MetricsError::Protocol(other.to_owned())),
    };
    Ok(Some(
        opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build(),
    ))
}

/// Verdict names, all reported every time (zeros too), so a series never goes stale.
const VERDICTS: &[&str] = crate::reconcile::VerdictKind::NAMES;

pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    kernel: KernelMetrics,
    sessions: Gauge<u64>,
    session_deaths: Counter<u64>,
    inventory: InventoryMetrics,
    reclaim: ReclaimMetrics,
    spans_exported: Counter<u64>,
    spans_dropped: Counter<u64>,
}

/// Kernel events, and where each kind comes from.
struct KernelMetrics {
    events: Counter<u64>,
    dropped: Counter<u64>,
    event_latency: Histogram<f64>,
    probe_mode: Gauge<u64>,
    probe_capability: Gauge<u64>,
}

/// What each GPU inventory snapshot saw, and what it cost.
struct InventoryMetrics {
    gpu_memory: Gauge<u64>,
    holders: Gauge<u64>,
    nvml_up: Gauge<u64>,
    nvml_errors: Counter<u64>,
    inventory_duration: Histogram<f64>,
    nvml_duration: Histogram<f64>,
}

/// Decisions, their outcomes, and what holds the executor back.
struct ReclaimMetrics {
    reclaims: Counter<u64>,
    reclaimed_bytes: Counter<u64>,
    time_to_reclaim: Histogram<f64>,
    queue_depth: Gauge<u64>,
    breaker: Gauge<u64>,
    ledger_errors: Counter<u64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(meter: &Meter, name: &'static str, help: &'static str) -> Counter<u64> {
    meter.u64_counter(name).with_description(help).build()
}

fn gauge(meter: &Meter, name: &'static str, help: &'static str) -> Gauge<u64> {
    meter.u64_gauge(name).with_description(help).build()
}

fn seconds(
    meter: &Meter,
    name: &'static str,
    help: &'static str,
    bounds: Vec<f64>,
) -> Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_unit("s")
        .with_description(help)
        .with_boundaries(bounds)
        .build()
}

/// The meter provider: read by the Prometheus exporter (into the returned registry), and by
/// the OTLP exporter too when `telemetry` says where.
fn provider(
    telemetry: &crate::config::TelemetryConfig,
) -> Result<(SdkMeterProvider, prometheus::Registry), MetricsError> {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .scope_info_enabled(false)
        .build()?;
    let mut builder = SdkMeterProvider::builder()
        .with_reader(exporter)
        .with_resource(super::resource());
    if let Some(reader) = otlp_reader(telemetry)? {
        builder = builder.with_reader(reader);
    }
    Ok((builder.build(), registry))
}

impl KernelMetrics {
    fn new(m: &Meter) -> Self {
        Self {
            events: counter(
                m,
                "reclaimd_kernel_events",
                "Kernel events received, by kind",
            ),
            dropped: counter(
                m,
                "reclaimd_kernel_events_dropped",
                "Kernel events lost because the ring buffer was full",
            ),
            event_latency: seconds(
                m,
                "reclaimd_kernel_event_latency",
                "Per read of kernel events and kind, the longest wait from kernel timestamp to \
                 receipt by the daemon",
                vec![
                    1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 1.0,
                ],
            ),
            probe_mode: gauge(
                m,
                "reclaimd_probe_mode",
                "1 for the event source in use: ebpf, or degraded proc-connector / proc-sweep",
            ),
            probe_capability: gauge(
                m,
                "reclaimd_probe_capability",
                "1 for where each kernel capability's events come from: ebpf, or \
                 proc-connector / proc-sweep / snapshot where this kernel lacks its programs",
            ),
        }
    }
}

impl InventoryMetrics {
    fn new(m: &Meter) -> Self {
        Self {
            gpu_memory: m
                .u64_gauge("reclaimd_gpu_memory")
                .with_unit("By")
                .with_description(
                    "GPU memory per device: total, used, attributed, unattributed, orphaned",
                )
                .build(),
            holders: gauge(m, "reclaimd_holders", "GPU holders, by verdict"),
            nvml_up: gauge(m, "reclaimd_nvml_up", "1 while NVML answers"),
            nvml_errors: counter(
                m,
                "reclaimd_nvml_errors",
                "Inventory snapshots in which NVML could not be used",
            ),
            inventory_duration: seconds(
                m,
                "reclaimd_inventory_duration",
                "One GPU inventory: NVML calls and the /proc device-file scan",
                vec![1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 5.0],
            ),
            nvml_duration: seconds(
                m,
                "reclaimd_nvml_query_duration",
                "NVML calls of one inventory (devices, memory, process lists)",
                vec![1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0],
            ),
        }
    }
}

impl ReclaimMetrics {
    fn new(m: &Meter) -> Self {
        Self {
            reclaims: counter(
                m,
                "reclaimd_reclaims",
                "Decisions settled, by service and outcome",
            ),
            reclaimed_bytes: m
                .u64_counter("reclaimd_reclaimed")
                .with_unit("By")
                .with_description("GPU memory got back by reclaims, by service")
                .build(),
            time_to_reclaim: seconds(
                m,
                "reclaimd_time_to_reclaim",
                "Session death to verified reclaim",
                vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ],
            ),
            queue_depth: gauge(
                m,
                "reclaimd_queue_depth",
                "Decisions waiting for the executor",
            ),
            breaker: gauge(
                m,
                "reclaimd_breaker_tripped",
                "1 while the breaker stops all action",
            ),
            ledger_errors: counter(
                m,
                "reclaimd_ledger_errors",
                "Decisions the ledger could not record (nothing was done; retried)",
            ),
        }
    }
}

impl Metrics {
    /// Metrics for the Prometheus endpoint, and over OTLP too when `telemetry` says where.
    pub fn new(telemetry: &crate::config::TelemetryConfig) -> Result<Self, MetricsError> {
        let (provider, registry) = provider(telemetry)?;
        let m = provider.meter("reclaimd");
        let me = Self {
            kernel: KernelMetrics::new(&m),
            sessions: gauge(
                &m,
                "reclaimd_sessions",
                "Sessions in the table, by kind, service and state",
            ),
            session_deaths: counter(
                &m,
                "reclaimd_session_deaths",
                "Deaths of sessions bound to GPU holders, by service and cause",
            ),
            inventory: InventoryMetrics::new(&m),
            reclaim: ReclaimMetrics::new(&m),
            spans_exported: counter(
                &m,
                "reclaimd_spans_exported",
                "Trace spans the OTLP collector accepted",
            ),
            spans_dropped: counter(
                &m,
                "reclaimd_spans_dropped",
                "Trace spans lost: the collector failed or was unreachable",
            ),
            provider,
            registry,
        };
        // Counters that may stay at zero for a long time are exported from the start, so
        // rates over them show 0 instead of no data.
        me.kernel.dropped.add(0, &[]);
        me.inventory.nvml_errors.add(0, &[]);
        me.reclaim.ledger_errors.add(0, &[]);
        Ok(me)
    }

    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// Exports what is pending (OTLP) and stops the readers.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "flushing metrics at shutdown");
        }
    }

    /// One read of kernel events, as (kind, wait in ns from the kernel's timestamp to
    /// receipt): each kind's count, and per kind the longest wait, its oldest event's.
    /// Recorded once per read and kind, not per event: under connection churn the per-event
    /// attribute lookups were a sixth of the daemon's time.
    pub fn events(&self, read: impl IntoIterator<Item = (&'static str, u64)>) {
        // (kind, count, longest wait): a handful of kinds, so a short list.
        let mut kinds: Vec<(&'static str, u64, u64)> = Vec::new();
        for (kind, wait) in read {
            match kinds.iter_mut().find(|(name, ..)| *name == kind) {
                Some((_, n, longest)) => {
                    *n += 1;
                    *longest = (*longest).max(wait);
                }
                None => kinds.push((kind, 1, wait)),
            }
        }
        for (kind, n, longest) in kinds {
            self.record_events(kind, n, longest);
        }
    }

    fn record_events(&self, kind: &'static str, n: u64, longest_ns: u64) {
        let k = [KeyValue::new("kind", kind)];
        self.kernel.events.add(n, &k);
        self.kernel
            .event_latency
            .record(longest_ns as f64 / 1e9, &k);
    }

    /// Every mode is reported (0 for the others), so a switch shows in one series.
    pub fn probe_mode(&self, mode: &'static str) {
        for m in ["ebpf", "proc-connector", "proc-sweep"] {
            self.kernel
                .probe_mode
                .record(u64::from(m == mode), &[KeyValue::new("mode", m)]);
        }
    }

    /// Each capability with every source (1 for the one in use, 0 for the others).
    pub fn capabilities(&self, caps: &[crate::probe::CapabilityStatus]) {
        for c in caps {
            for source in crate::probe::Source::ALL {
                self.kernel.probe_capability.record(
                    u64::from(source == c.source),
                    &[
                        KeyValue::new("capability", c.capability.name()),
                        KeyValue::new("source", source.name()),
                    ],
                );
            }
        }
    }

    pub fn ledger_error(&self) {
        self.reclaim.ledger_errors.add(1, &[]);
    }

    pub fn dropped(&self, n: u64) {
        self.kernel.dropped.add(n, &[]);
    }

    pub fn session_death(&self, service: &str, cause: &str) {
        self.session_deaths.add(
            1,
            &[
                KeyValue::new("service", service.to_owned()),
                KeyValue::new("cause", cause_class(cause)),
            ],
        );
    }

    /// Per-snapshot state: GPU memory, holders by verdict, NVML health and cost.
    pub fn snapshot(&self, inv: &Inventory, assessments: &[Assessment], took: Duration) {
        self.inventory
            .inventory_duration
            .record(took.as_secs_f64(), &[]);
        let up = matches!(inv.nvml, crate::gpu::NvmlStatus::Available { .. });
        self.inventory.nvml_up.record(u64::from(up), &[]);
        if up {
            self.inventory
                .nvml_duration
                .record(inv.nvml_duration.as_secs_f64(), &[]);
        } else {
            self.inventory.nvml_errors.add(1, &[]);
        }
        for d in &inv.devices {
            let orphaned = crate::reconcile::orphaned_bytes(assessments, &d.uuid);
            for (state, v) in [
                ("total", d.total_bytes),
                ("used", d.used_bytes),
                ("attributed", d.attributed_bytes),
                ("unattributed", d.unattributed_bytes),
                ("orphaned", orphaned),
            ] {
                self.inventory.gpu_memory.record(
                    v,
                    &[
                        KeyValue::new("device", d.uuid.clone()),
                        KeyValue::new("state", state),
                    ],
                );
            }
        }
        for &v in VERDICTS {
            let n = assessments
                .iter()
                .filter(|a| a.verdict.as_str() == v)
                .count();
            self.inventory
                .holders
                .record(n as u64, &[KeyValue::new("verdict", v)]);
        }
    }

    /// Sessions by (kind, service, state); `known` lists every combination to report, so
    /// that ones with none left drop to 0 instead of keeping their last value.
    pub fn sessions(&self, counts: &[((&'static str, String, &'static str), u64)]) {
        for ((kind, service, state), n) in counts {
            self.sessions.record(
                *n,
                &[
                    KeyValue::new("kind", *kind),
                    KeyValue::new("service", service.clone()),
                    KeyValue::new("state", *state),
                ],
            );
        }
    }

    /// A settled job. Kubernetes holders add their namespace and container name (bounded by
    /// what is deployed); pod names churn, so they go to traces only.
    pub fn settled(
        &self,
        service: &str,
        outcome: Outcome,
        freed: Option<u64>,
        ttr: Option<Duration>,
        pod: Option<&crate::kube::PodRef>,
    ) {
        let s = KeyValue::new("service", service.to_owned());
        let mut labels = vec![s.clone()];
        if let Some(p) = pod {
            labels.push(KeyValue::new("k8s_namespace", p.namespace.clone()));
            labels.push(KeyValue::new("k8s_container", p.container.clone()));
        }
        let mut with_outcome = labels.clone();
        with_outcome.push(KeyValue::new("outcome", outcome.as_str()));
        self.reclaim.reclaims.add(1, &with_outcome);
        if outcome == Outcome::Reclaimed {
            self.reclaim
                .reclaimed_bytes
                .add(freed.unwrap_or(0), &labels);
            if let Some(t) = ttr {
                self.reclaim.time_to_reclaim.record(t.as_secs_f64(), &[s]);
            }
        }
    }

    pub fn spans_exported(&self, n: u64) {
        self.spans_exported.add(n, &[]);
    }

    pub fn spans_dropped(&self, n: u64, reason: &'static str) {
        self.spans_dropped
            .add(n, &[KeyValue::new("reason", reason)]);
    }

    pub fn queue(&self, depth: usize, breaker_tripped: bool) {
        self.reclaim.queue_depth.record(depth as u64, &[]);
        self.reclaim.breaker.record(u64::from(breaker_tripped), &[]);
    }

    /// The Prometheus text exposition of everything above.
    pub fn render(&self) -> String {
        let _ = self.provider.force_flush();
        let families = self.registry.gather();
        let mut out = String::new();
        if let Err(error) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }
}

/// Exposition lines that break the naming rules (a `reclaimd_` prefix, no pid labels);
/// empty when all is well.
pub fn convention_breaches(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter(|l| {
            !(l.starts_with("reclaimd_") || l.starts_with("target_info")) || l.contains("pid=")
        })
        .map(str::to_owned)
        .collect()
}

/// A death cause as a bounded label value.
pub fn cause_class(cause: &str) -> &'static str {
    if cause.starts_with("exited") {
        "exit"
    } else if cause.starts_with("killed by signal") {
        "signal"
    } else if cause.starts_with("heartbeat") {
        "heartbeat"
    } else if cause.starts_with("peer timed out") {
        "timeout"
    } else if cause.starts_with("peer closed") {
        "peer_closed"
    } else if cause.starts_with("connection gone") || cause.starts_with("gone") {
        "lost_events"
    } else if cause.contains("RESET") || cause.contains("reset") {
        "reset"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_counts_every_event_and_records_each_kinds_longest_wait() {
        let m = Metrics::new(&Default::default()).unwrap();
        m.events([
            ("tcp", 10_000),
            ("owner", 20_000),
            ("tcp", 2_000_000),
            ("tcp", 40_000),
        ]);
        let text = m.render();
        for needle in [
            "reclaimd_kernel_events_total{kind=\"tcp\"} 3",
            "reclaimd_kernel_events_total{kind=\"owner\"} 1",
            // One wait per read and kind: tcp's is its longest, 2 ms.
            "reclaimd_kernel_event_latency_seconds_count{kind=\"tcp\"} 1",
            "reclaimd_kernel_event_latency_seconds_bucket{kind=\"tcp\",le=\"0.001\"} 0",
            "reclaimd_kernel_event_latency_seconds_bucket{kind=\"tcp\",le=\"0.005\"} 1",
            "reclaimd_kernel_event_latency_seconds_bucket{kind=\"owner\",le=\"0.00005\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn names_units_and_labels_follow_the_conventions() {
        let m = Metrics::new(&Default::default()).unwrap();
        m.events([("exit", 120_000)]);
        m.settled(
            "llm",
            Outcome::Reclaimed,
            Some(2 << 30),
            Some(Duration::from_millis(30)),
            None,
        );
        let pod = crate::kube::PodRef {
            namespace: "team-a".into(),
            pod: "vllm-7d9f".into(),
            container: "server".into(),
        };
        m.settled("llm", Outcome::Failed, None, None, Some(&pod));
        m.session_death("llm", "killed by signal 9");
        m.queue(3, false);
        let text = m.render();
        for needle in [
            "reclaimd_kernel_events_total{kind=\"exit\"} 1",
            "reclaimd_reclaims_total{outcome=\"reclaimed\",service=\"llm\"} 1",
            "reclaimd_reclaims_total{k8s_container=\"server\",k8s_namespace=\"team-a\",outcome=\"failed\",service=\"llm\"} 1",
            "reclaimd_reclaimed_bytes_total{service=\"llm\"} 2147483648",
            "reclaimd_time_to_reclaim_seconds_count{service=\"llm\"} 1",
            "reclaimd_kernel_event_latency_seconds_bucket{kind=\"exit\",le=\"0.00025\"} 1",
            "reclaimd_session_deaths_total{cause=\"signal\",service=\"llm\"} 1",
            "reclaimd_queue_depth 3",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert_eq!(convention_breaches(&text), Vec::<String>::new());
    }

    #[test]
    fn causes_are_a_closed_set() {
        assert_eq!(cause_class("exited with code 0"), "exit");
        assert_eq!(cause_class("killed by signal 9"), "signal");
        assert_eq!(cause_class("peer closed (CLOSE_WAIT)"), "peer_closed");
        assert_eq!(
            cause_class("heartbeat: the peer stopped answering"),
            "heartbeat"
        );
        assert_eq!(cause_class("reset by peer (CLOSE)"), "reset");
        assert_eq!(cause_class("gone (missing from /proc)"), "lost_events");
        assert_eq!(cause_class("anything else 1234"), "other");
    }
}

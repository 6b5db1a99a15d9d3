//! Traces over OTLP: a span per session (seen → settled) and a child span per reclaim. Off
//! unless an endpoint is configured (`[telemetry] otlp_endpoint`) or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variables are set;
//! then spans go through a bounded queue drained by a thread of its own (`span_queue`), so
//! a slow or absent collector never blocks the daemon, and every span lost is counted.
use std::{sync::Arc, time::Duration};

use opentelemetry::global;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::config::TelemetryConfig;

#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("[telemetry] otlp_protocol {0:?}: use \"grpc\" or \"http/protobuf\"")]
    Protocol(String),
}

/// The installed provider; dropping it (or `shutdown`) flushes what is queued.
pub struct Traces {
    provider: SdkTracerProvider,
}

/// Installs the global tracer provider when tracing is configured; `None` when it is off
/// (spans then cost nothing: the global tracer is a no-op).
pub fn init(
    cfg: &TelemetryConfig,
    metrics: Arc<super::Metrics>,
) -> Result<Option<Traces>, TracesError> {
    let Some(target) = super::otlp_target(cfg, "TRACES") else {
        return Ok(None);
    };
    let exporter = match target.protocol.as_str() {
        "grpc" => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(e) = &target.endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.with_timeout(Duration::from_secs(5)).build()?
        }
        "http/protobuf" => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(e) = &target.endpoint {
                b = b.with_endpoint(super::signal_url(e, "traces"));
            }
            b.with_timeout(Duration::from_secs(5)).build()?
        }
        other => return Err(TracesError::Protocol(other.to_owned())),
    };
    let resource = super::resource();
    let mut exporter = exporter;
    opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(super::span_queue::SpanQueue::new(exporter, metrics))
        .with_resource(resource)
        .build();
    global::set_tracer_provider(provider.clone());
    tracing::info!(protocol = %target.protocol, endpoint = target.endpoint.as_deref().unwrap_or("(from OTEL_EXPORTER_OTLP_*)"),
        "exporting traces over OTLP");
    Ok(Some(Traces { provider }))
}

impl Traces {
    /// Flushes queued spans, waiting at most a few seconds for the collector.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown_with_timeout(Duration::from_secs(3)) {
            tracing::warn!(%error, "flushing traces at shutdown");
        }
    }
}

/// The daemon's tracer (a no-op one when tracing is off).
pub fn tracer() -> global::BoxedTracer {
    global::tracer("reclaimd")
}

//! Traces over OTLP: a span per session (seen → settled) and a child span per reclaim. Off
//! unless an endpoint is configured (`[telemetry] otlp_endpoint`) or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variables are set;
//! then spans go through the SDK's batch processor (its own thread, a bounded queue that
//! drops when full), so a slow or absent collector never blocks the daemon.
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
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Counted {
            inner: exporter,
            metrics,
        })
        .with_resource(super::resource())
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

/// The exporter, counting what the collector took and what it did not (the batch processor
/// retries nothing: a failed export's spans are lost, and now counted).
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    metrics: Arc<super::Metrics>,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Counted<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => self.metrics.spans_exported(n),
            Err(_) => self.metrics.spans_dropped(n, "export_failed"),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

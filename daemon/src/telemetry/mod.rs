//! What the daemon shows of itself: metrics, instrumented once with the OpenTelemetry API and
//! served on a Prometheus scrape endpoint.
pub mod metrics;
pub mod prometheus_endpoint;
pub mod session_spans;
pub mod span_queue;
pub mod traces;

pub use self::metrics::Metrics;

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

use crate::config::TelemetryConfig;

/// Where and how to export one OTLP signal.
pub struct OtlpTarget {
    pub protocol: String,
    /// `None`: the exporter reads the OTEL_EXPORTER_OTLP_* variables itself.
    pub endpoint: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The OTLP target for `signal` ("TRACES", "METRICS"): the config's endpoint, else the
/// standard variables; `None` (export off) when neither says where.
pub fn otlp_target(cfg: &TelemetryConfig, signal: &str) -> Option<OtlpTarget> {
    let from_env = env(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
        .or(env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if cfg.otlp_endpoint.is_none() && from_env.is_none() {
        return None;
    }
    let protocol = cfg
        .otlp_protocol
        .clone()
        .or(env(&format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")))
        .or(env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "grpc".to_owned());
    Some(OtlpTarget {
        protocol,
        endpoint: cfg.otlp_endpoint.clone(),
    })
}

/// A base URL as in OTEL_EXPORTER_OTLP_ENDPOINT, with the signal's HTTP path added.
pub fn signal_url(base: &str, signal: &str) -> String {
    let base = base.trim_end_matches('/');
    let path = format!("/v1/{signal}");
    if base.ends_with(&path) {
        base.to_owned()
    } else {
        format!("{base}{path}")
    }
}

/// Who is speaking: OTEL_SERVICE_NAME (default "reclaimd") and the version.
pub fn resource() -> Resource {
    Resource::builder()
        .with_service_name(env("OTEL_SERVICE_NAME").unwrap_or_else(|| "reclaimd".to_owned()))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

//! What the daemon shows of itself: metrics, instrumented once with the OpenTelemetry API and
//! served on a Prometheus scrape endpoint.
pub mod metrics;
pub mod prometheus_endpoint;
pub mod traces;

pub use self::metrics::Metrics;

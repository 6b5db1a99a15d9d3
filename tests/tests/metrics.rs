//! Metrics: the daemon's Prometheus endpoint after a real end-to-end reclaim, read directly
//! and through a real Prometheus (Debian's package, installed by `cargo xtask setup`).
use std::time::Duration;

use reclaimd_tests::{Daemon, FakeGpu, prometheus};
use serde_json::Value;

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const DEVICE: &str = "device 0 GPU-metrics 16384 Fake H100";

/// A daemon (enforce, grace 0) that has reclaimed one 1 GiB worker.
fn after_a_reclaim(gpu: &FakeGpu) -> Daemon {
    reclaimd_tests::daemon_after_a_reclaim(gpu, &workload(), DEVICE)
}

fn get(url: &str) -> String {
    ureq::get(url)
        .timeout(Duration::from_secs(5))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .into_string()
        .unwrap()
}

#[test]
fn the_endpoint_exports_every_family_by_convention() {
    let gpu = FakeGpu::new(DEVICE);
    let d = after_a_reclaim(&gpu);
    let url = format!("http://127.0.0.1:{}/metrics", Daemon::metrics_port(&gpu));
    // Gauges are recorded per snapshot: wait for one after the reclaim.
    std::thread::sleep(Duration::from_millis(500));
    let text = get(&url);
    for family in [
        "reclaimd_kernel_events_total{kind=\"exit\"}",
        "reclaimd_kernel_event_latency_seconds_bucket",
        "reclaimd_sessions{",
        "reclaimd_session_deaths_total{cause=\"signal\",service=\"llm\"} 1",
        "reclaimd_gpu_memory_bytes{device=\"GPU-metrics\",state=\"total\"} 17179869184",
        "reclaimd_gpu_memory_bytes{device=\"GPU-metrics\",state=\"orphaned\"} 0",
        "reclaimd_holders{verdict=\"orphan\"}",
        "reclaimd_reclaims_total{outcome=\"reclaimed\",service=\"llm\"} 1",
        "reclaimd_reclaimed_bytes_total{service=\"llm\"} 1073741824",
        "reclaimd_time_to_reclaim_seconds_count{service=\"llm\"} 1",
        "reclaimd_queue_depth",
        "reclaimd_breaker_tripped 0",
        "reclaimd_nvml_up 1",
        "reclaimd_inventory_duration_seconds_count",
        "reclaimd_nvml_query_duration_seconds_bucket",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    assert_eq!(
        reclaimd::telemetry::metrics::convention_breaches(&text),
        Vec::<String>::new()
    );
    let other = ureq::get(&url.replace("/metrics", "/nope")).call();
    assert!(matches!(other, Err(ureq::Error::Status(404, _))));
    d.stop();
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

#[test]
fn a_real_prometheus_scrapes_the_daemon() {
    let gpu = FakeGpu::new(DEVICE);
    let d = after_a_reclaim(&gpu);
    let p = prometheus(&format!("127.0.0.1:{}", Daemon::metrics_port(&gpu)));
    p.query_until("up{job=\"reclaimd\"}", |r| {
        r.len() == 1 && value(&r[0]) == 1.0
    });
    let r = p.query_until("sum by (service, outcome) (reclaimd_reclaims_total)", |r| {
        !r.is_empty()
    });
    assert_eq!(r[0]["metric"]["outcome"], "reclaimed", "{r:?}");
    assert_eq!(value(&r[0]), 1.0);
    let total = p.query_until("reclaimd_gpu_memory_bytes{state=\"total\"}", |r| {
        !r.is_empty()
    });
    assert_eq!(value(&total[0]), (16384u64 << 20) as f64);
    assert_eq!(total[0]["metric"]["device"], "GPU-metrics");
    p.query_until("sum(reclaimd_reclaimed_bytes_total)", |r| {
        r.len() == 1 && value(&r[0]) == (1u64 << 30) as f64
    });
    p.query_until(
        "histogram_quantile(0.5, sum by (le) (reclaimd_time_to_reclaim_seconds_bucket))",
        |r| r.len() == 1 && value(&r[0]) > 0.0,
    );
    p.query_until("sum by (kind) (reclaimd_kernel_events_total)", |r| {
        r.iter()
            .any(|s| s["metric"]["kind"] == "exit" && value(s) > 0.0)
    });
    d.stop();
}

//! OTLP: a real receiver (grpcio + opentelemetry-proto, over gRPC and over HTTP/protobuf)
//! gets the session span and its child reclaim span of an end-to-end reclaim, and the
//! metrics (flushed when the daemon stops).
use std::time::{Duration, Instant};

use reclaimd_tests::{
    Daemon, FakeGpu, daemon_after_a_reclaim_with, free_port, llm_service, start_receiver,
};
use serde_json::Value;

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const DEVICE: &str = "device 0 GPU-trace 16384 Fake H100";

/// Waits (the batch goes out every 5 s) until the daemon's /metrics has `series` above 0.
fn wait_for_metric(gpu: &FakeGpu, series: &str) {
    let url = format!("http://127.0.0.1:{}/metrics", Daemon::metrics_port(gpu));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = ureq::get(&url).call().unwrap().into_string().unwrap();
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if value.is_some_and(|v| v > 0.0) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} never counted:\n{text}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn spans_of_a_reclaim(protocol: &str) {
    let (port, mut receiver, rx) = start_receiver(if protocol == "grpc" { "grpc" } else { "http" });

    let gpu = FakeGpu::new(DEVICE);
    let daemon = Daemon::builder(&gpu)
        .service(llm_service())
        .set(
            "telemetry",
            "otlp_endpoint",
            format!("http://127.0.0.1:{port}"),
        )
        .set("telemetry", "otlp_protocol", protocol);
    let (d, server, worker) = daemon_after_a_reclaim_with(&gpu, &workload(), DEVICE, daemon);
    wait_for_metric(&gpu, "reclaimd_spans_exported_total");
    // Stopping flushes the batch; the session span ends then if not before.
    d.stop();
    let mut spans: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let find = |spans: &[Value], name: &str| spans.iter().find(|s| s["name"] == name).cloned();
    let metric = |spans: &[Value], name: &str| spans.iter().find(|s| s["metric"] == name).cloned();
    while find(&spans, "session").is_none()
        || find(&spans, "reclaim").is_none()
        || metric(&spans, "reclaimd_reclaims").is_none()
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => spans.push(serde_json::from_str(&line).unwrap()),
            Err(_) => panic!("spans so far: {spans:#?}"),
        }
    }
    let _ = receiver.kill();
    let _ = receiver.wait();

    let session = find(&spans, "session").unwrap();
    let reclaim = spans
        .iter()
        .find(|s| s["name"] == "reclaim" && s["attributes"]["process.pid"] == worker)
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(session["resource"]["service.name"], "reclaimd");
    let sa = &session["attributes"];
    assert_eq!(sa["reclaimd.service"], "llm");
    assert_eq!(sa["reclaimd.session.kind"], "process");
    assert_eq!(sa["process.pid"], server, "{session:#}");
    assert_eq!(sa["reclaimd.death_cause"], "killed by signal 9");
    assert!(
        session["events"]
            .as_array()
            .unwrap()
            .contains(&"died".into())
    );
    assert!(session["start_ns"].as_u64() < session["end_ns"].as_u64());

    assert_eq!(reclaim["trace_id"], session["trace_id"], "one trace");
    assert_eq!(
        reclaim["parent_span_id"], session["span_id"],
        "a child of the session"
    );
    let ra = &reclaim["attributes"];
    assert_eq!(ra["reclaimd.outcome"], "reclaimed");
    assert_eq!(ra["reclaimd.bytes_freed"], 1u64 << 30);
    assert_eq!(ra["reclaimd.gpu.uuid"], "GPU-trace");
    assert_eq!(ra["process.executable.name"], "gpu-worker");
    let events: Vec<&str> = reclaim["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["decision", "SIGTERM", "verification"],
        "{reclaim:#}"
    );
    assert_eq!(reclaim["status"], 1, "STATUS_CODE_OK");

    let reclaims = metric(&spans, "reclaimd_reclaims").unwrap();
    assert_eq!(reclaims["kind"], "sum");
    assert!(
        reclaims["points"].as_array().unwrap().iter().any(|p| {
            p["attributes"]["outcome"] == "reclaimed"
                && p["attributes"]["service"] == "llm"
                && p["value"] == 1
        }),
        "{reclaims:#}"
    );
    let memory = metric(&spans, "reclaimd_gpu_memory").unwrap();
    assert!(
        memory["points"].as_array().unwrap().iter().any(|p| {
            p["attributes"]["device"] == "GPU-trace"
                && p["attributes"]["state"] == "total"
                && p["value"] == 16384u64 << 20
        }),
        "{memory:#}"
    );
}

#[test]
fn otlp_grpc_receives_the_spans_and_metrics() {
    spans_of_a_reclaim("grpc");
}

#[test]
fn otlp_http_receives_the_spans_and_metrics() {
    spans_of_a_reclaim("http/protobuf");
}

#[test]
fn an_unreachable_collector_blocks_nothing() {
    let nobody_listens = free_port();
    let gpu = FakeGpu::new(DEVICE);
    // The reclaim itself is asserted inside: it happens as without tracing.
    let daemon = Daemon::builder(&gpu).service(llm_service()).set(
        "telemetry",
        "otlp_endpoint",
        format!("http://127.0.0.1:{nobody_listens}"),
    );
    let (d, _, _) = daemon_after_a_reclaim_with(&gpu, &workload(), DEVICE, daemon);
    // What the collector did not take is counted (on the daemon's own metrics).
    wait_for_metric(
        &gpu,
        "reclaimd_spans_dropped_total{reason=\"export_failed\"}",
    );
    let t = Instant::now();
    d.stop();
    // Shutdown gives the exporter a bounded moment (3 s), never the collector's mercy.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[test]
fn the_standard_otel_variables_alone_turn_export_on() {
    let (port, mut receiver, lines) = start_receiver("grpc");
    let next = || {
        lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the receiver spoke")
    };
    let gpu = FakeGpu::new(DEVICE);
    let endpoint = format!("http://127.0.0.1:{port}");
    let d = Daemon::builder(&gpu)
        .service(llm_service())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_SERVICE_NAME", "reclaimd-from-env")
        .start();
    // Shutdown flushes the metrics: proof enough that the variables alone switched it on.
    d.stop();
    let first: Value = serde_json::from_str(&next()).unwrap();
    assert!(
        first["metric"]
            .as_str()
            .is_some_and(|m| m.starts_with("reclaimd_")),
        "{first}"
    );
    let _ = receiver.kill();
    let _ = receiver.wait();
}

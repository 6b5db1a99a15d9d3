//! The degraded mode: where eBPF cannot load, or is turned off, the daemon runs on the
//! kernel's proc connector and a /proc sweep, says so (status, metrics, log), and still
//! reclaims. Real kernel, real processes, the fake NVML.
use std::{process::Command, time::Duration};

use reclaimd::ledger::Outcome;
use reclaimd_tests::{
    Daemon, DaemonBuilder, FakeGpu, TwoConnections, alive, connection_service, free_port, kill,
    llm_service, reclaimctl_bin, reclaimctl_json, spawn_server, wait_for_record, wait_until_bound,
};
use serde_json::Value;

const DEVICE: &str = "device 0 GPU-fallback 16384 Fake H100";
const WAIT: Duration = Duration::from_secs(20);

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

/// Enforce, grace 0, the sweep at 5 s: deaths found in well under a sweep came from events.
fn daemon(gpu: &FakeGpu) -> DaemonBuilder {
    Daemon::builder(gpu)
        .policy("sweep", "5s")
        .policy("mode", "enforce")
        .policy("grace", "0s")
}

fn status(gpu: &FakeGpu) -> Value {
    reclaimctl_json(gpu, &["status"])
}

fn probe_mode_metric(gpu: &FakeGpu, mode: &str) -> Option<f64> {
    let url = format!("http://127.0.0.1:{}/metrics", Daemon::metrics_port(gpu));
    let text = ureq::get(&url).call().ok()?.into_string().ok()?;
    let prefix = format!("reclaimd_probe_mode{{mode=\"{mode}\"");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn capability_metric(gpu: &FakeGpu, capability: &str, source: &str) -> Option<f64> {
    let url = format!("http://127.0.0.1:{}/metrics", Daemon::metrics_port(gpu));
    let text = ureq::get(&url).call().ok()?.into_string().ok()?;
    let labels = [
        format!("capability=\"{capability}\""),
        format!("source=\"{source}\""),
    ];
    text.lines()
        .filter(|l| l.starts_with("reclaimd_probe_capability{"))
        .find(|l| labels.iter().all(|want| l.contains(want.as_str())))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Kills a service server whose worker holds 512 MiB and returns the worker's record.
fn reclaim_one(gpu: &FakeGpu, ledger: &std::path::Path) -> reclaimd::ledger::Record {
    let device = gpu.device_file(0);
    let (server, worker) = spawn_server(&workload(), "llm-server", device.to_str().unwrap(), &[]);
    gpu.set_state(&format!("{DEVICE}\nproc 0 {worker} 512 compute\n"));
    wait_until_bound(gpu, &[worker]);
    kill(server.pid());
    let r = wait_for_record(ledger, worker, WAIT);
    let _ = server.finish();
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(!alive(worker));
    r
}

#[test]
fn no_ebpf_flag_runs_on_the_proc_connector_says_so_and_reclaims() {
    let gpu = FakeGpu::new(DEVICE);
    let mut d = daemon(&gpu).service(llm_service()).arg("--no-ebpf").start();
    d.wait_log("DEGRADED", WAIT);
    let s = status(&gpu);
    assert_eq!(s["probe_mode"], "proc-connector", "{s}");
    assert!(
        s["probe_degraded_reason"]
            .as_str()
            .unwrap()
            .contains("turned off"),
        "{s}"
    );
    assert_eq!(probe_mode_metric(&gpu, "proc-connector"), Some(1.0));
    assert_eq!(probe_mode_metric(&gpu, "ebpf"), Some(0.0));
    // Each capability says where its events come from instead.
    let sources: Vec<(String, String)> = s["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["source"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = [
        ("exit", "proc-connector"),
        ("fork", "proc-connector"),
        ("tcp", "proc-sweep"),
        ("owner:accept", "snapshot"),
        ("owner:io", "snapshot"),
    ];
    assert_eq!(
        sources,
        want.map(|(n, s)| (n.to_owned(), s.to_owned())),
        "{s}"
    );
    assert_eq!(capability_metric(&gpu, "tcp", "proc-sweep"), Some(1.0));
    assert_eq!(capability_metric(&gpu, "tcp", "ebpf"), Some(0.0));

    let r = reclaim_one(&gpu, &d.ledger);
    // The exit came from the connector, not from the 5 s sweep: well under a sweep.
    let ms = r.resolution.unwrap().time_to_reclaim_ms.unwrap();
    assert!(ms < 5000, "death → verified took {ms} ms");
    assert!(status(&gpu)["events_seen"].as_u64().unwrap() > 0);
    d.stop();
}

#[test]
fn where_ebpf_cannot_load_auto_mode_falls_back_and_says_why() {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(&gpu)
        .set("probe", "btf", "/nonexistent/vmlinux")
        .service(llm_service())
        .start();
    let s = status(&gpu);
    assert_eq!(s["probe_mode"], "proc-connector", "{s}");
    let why = s["probe_degraded_reason"].as_str().unwrap();
    assert!(
        why.contains("eBPF unavailable") && why.contains("/nonexistent/vmlinux"),
        "{why}"
    );
    let text = Command::new(reclaimctl_bin())
        .arg("--socket")
        .arg(Daemon::api_socket(&gpu))
        .arg("status")
        .output()
        .expect("reclaimctl status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("DEGRADED"), "{text}");
    // Each capability on a line of its own, with its source and why it is not eBPF.
    let tcp = text
        .lines()
        .find(|l| l.trim_start().starts_with("tcp "))
        .unwrap_or_else(|| panic!("no tcp line in {text}"));
    assert!(
        tcp.contains("proc-sweep") && tcp.contains("/nonexistent/vmlinux"),
        "{tcp}"
    );
    reclaim_one(&gpu, &d.ledger);
    d.stop();
}

#[test]
fn ebpf_mode_refuses_to_start_without_ebpf() {
    let gpu = FakeGpu::new(DEVICE);
    let (config, _) = daemon(&gpu)
        .set("probe", "mode", "ebpf")
        .set("probe", "btf", "/nonexistent/vmlinux")
        .service(llm_service())
        .write();
    let out = Command::new(reclaimd_tests::reclaimd_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run reclaimd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BTF was not found at /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn without_the_connector_the_sweep_alone_still_reclaims() {
    let gpu = FakeGpu::new(DEVICE);
    // The proc connector only answers in the host's network namespace. (The metrics
    // endpoint is then out of reach; the API's Unix socket is not.)
    let d = daemon(&gpu)
        .set("probe", "fallback_sweep", "300ms")
        .service(llm_service())
        .wrapper(&["unshare", "--net"])
        .arg("--no-ebpf")
        .start();
    let s = status(&gpu);
    assert_eq!(s["probe_mode"], "proc-sweep", "{s}");
    assert!(
        s["probe_degraded_reason"]
            .as_str()
            .unwrap()
            .contains("proc connector unavailable"),
        "{s}"
    );
    let r = reclaim_one(&gpu, &d.ledger);
    assert_eq!(r.decision.session_kind, "process");
    d.stop();
}

#[test]
fn in_fallback_a_closed_connection_is_found_by_the_socket_sweep() {
    let gpu = FakeGpu::new(DEVICE);
    let port = free_port();
    let d = daemon(&gpu)
        .set("probe", "fallback_sweep", "300ms")
        .service(connection_service("api", "api-server", &[port]))
        .arg("--no-ebpf")
        .start();
    let addr = format!("127.0.0.1:{port}");
    let TwoConnections {
        server,
        stay,
        w_stay,
        leave,
        w_leave,
    } = TwoConnections::open(&gpu, DEVICE, &workload(), "api-server", &addr);
    // Two sweeps: both connections are in the table before one closes.
    std::thread::sleep(Duration::from_millis(800));
    drop(leave);
    let r = wait_for_record(&d.ledger, w_leave, WAIT);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert_eq!(r.decision.session_kind, "connection");
    // Seen by the sweep ("found CLOSE_WAIT"), not by a socket event.
    assert!(r.decision.death_cause.starts_with("found"), "{r:#?}");
    std::thread::sleep(Duration::from_millis(700));
    assert!(alive(w_stay), "the worker of a live connection is kept");
    drop(stay);
    let log = d.stop();
    assert!(
        !log.iter().any(|l| l.contains("sock_diag lookup failed")),
        "the sweep asked sock_diag: {log:#?}"
    );
    kill(w_stay);
    kill(server.pid());
    let _ = server.finish();
}

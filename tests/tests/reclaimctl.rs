//! `reclaimctl` against a running daemon (real kernel, real processes, the fake NVML).
use std::{
    process::{Command, Output},
    time::Duration,
};

use reclaimd_tests::{
    Daemon, FakeGpu, kill, llm_service, reclaimctl_bin, reclaimctl_json, spawn_server,
    wait_for_record, wait_until_bound,
};
use serde_json::Value;

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const DEVICE: &str = "device 0 GPU-ctl 16384 Fake H100";

fn ctl(gpu: &FakeGpu, args: &[&str]) -> Output {
    Command::new(reclaimctl_bin())
        .arg("--socket")
        .arg(Daemon::api_socket(gpu))
        .args(args)
        .output()
        .expect("run reclaimctl")
}

#[test]
fn reclaims_show_an_end_to_end_reclaim_before_and_after_a_restart() {
    let gpu = FakeGpu::new(DEVICE);
    let daemon = Daemon::builder(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .service(llm_service());
    let d = daemon.clone().start();
    let device = gpu.device_file(0);
    let (server, worker) = spawn_server(&workload(), "llm-server", device.to_str().unwrap(), &[]);
    gpu.set_state(&format!("{DEVICE}\nproc 0 {worker} 512 compute\n"));
    wait_until_bound(&gpu, &[worker]);
    kill(server.pid());
    wait_for_record(&d.ledger, worker, Duration::from_secs(20));

    let shows = |v: &Value| {
        v.as_array().unwrap().iter().any(|r| {
            r["pid"] == worker
                && r["outcome"] == "reclaimed"
                && r["bytes_freed"] == 512u64 << 20
                && r["service"] == "llm"
        })
    };
    let recs = reclaimctl_json(&gpu, &["reclaims", "--since", "1h"]);
    assert!(shows(&recs), "{recs:#}");
    let filtered = reclaimctl_json(&gpu, &["reclaims", "--outcome", "failed"]);
    assert_eq!(filtered.as_array().unwrap().len(), 0);
    let table = ctl(&gpu, &["reclaims"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("reclaimed")
            && text.contains(&worker.to_string())
            && text.contains("512 MiB"),
        "{text}"
    );
    assert!(text.contains("ago"), "ages as people read them: {text}");
    let status = reclaimctl_json(&gpu, &["status"]);
    assert_eq!(status["policy_mode"], "enforce");
    assert_eq!(status["devices"][0]["uuid"], "GPU-ctl");
    let status_table = String::from_utf8_lossy(&ctl(&gpu, &["status"]).stdout).into_owned();
    assert!(
        status_table.contains("mode enforce") && status_table.contains("16.0 GiB"),
        "{status_table}"
    );

    // Exit codes scripts can use.
    assert_eq!(
        ctl(&gpu, &["reclaim", "--pid", "4000000", "--reason", "test"])
            .status
            .code(),
        Some(5),
        "not found"
    );

    // The daemon dies hard and comes back: the record is still there.
    d.kill9();
    let down = ctl(&gpu, &["status"]);
    assert_eq!(down.status.code(), Some(3), "daemon down");
    assert!(String::from_utf8_lossy(&down.stderr).contains("not running"));
    let d = daemon.start();
    let recs = reclaimctl_json(&gpu, &["reclaims"]);
    assert!(shows(&recs), "after a restart: {recs:#}");
    d.stop();
    let _ = server.finish();
}

//! Faults: the daemon killed -9 in the middle of a burst of reclaims, the ledger's disk full,
//! NVML failing in the middle of a run. Real kernel, real processes, the fake NVML; the
//! tiny-ring overflow and the unreachable collector are in reclaim_e2e and otlp.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use reclaimd::ledger::Outcome;
use reclaimd_tests::{
    Daemon, DaemonBuilder, FakeGpu, Workload, alive, kill, ledger_records, llm_service,
    reclaimctl_json, spawn_server, wait_for_record, wait_until_bound,
};

const DEVICE: &str = "device 0 GPU-faults 81920 Fake H100";
const WAIT: Duration = Duration::from_secs(30);

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

/// A daemon for `gpu` with the `llm` service, in enforce mode with grace 0.
fn enforce(gpu: &FakeGpu) -> DaemonBuilder {
    Daemon::builder(gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .service(llm_service())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill9_in_a_burst_of_reclaims_loses_no_action_and_forgets_no_orphan() {
    const N: usize = 6;
    let gpu = FakeGpu::new(DEVICE);
    // Workers ignore SIGTERM: each reclaim takes term_grace, two at a time, so the burst
    // is still going (waves two and three) when the daemon dies.
    let daemon = enforce(&gpu)
        .policy("term_grace", "700ms")
        .policy("parallel", 2);
    let d = daemon.clone().start();
    let device = gpu.device_file(0);
    let device = device.to_str().unwrap();
    let services: Vec<(Workload, u32)> = (0..N)
        .map(|_| spawn_server(&workload(), "llm-server", device, &["ignore-term"]))
        .collect();
    // A holder outside every service: never touched, before or after the crash.
    let (bystander, by_worker) = spawn_server(&workload(), "trainer", device, &[]);
    let mut state = format!("{DEVICE}\nproc 0 {by_worker} 512 compute\n");
    for (_, w) in &services {
        state.push_str(&format!("proc 0 {w} 256 compute\n"));
    }
    gpu.set_state(&state);
    // Seen, bound and remembered (lineage in the ledger) before anything dies.
    let workers: Vec<u32> = services.iter().map(|(_, w)| *w).collect();
    wait_until_bound(&gpu, &workers);
    for (s, _) in &services {
        kill(s.pid());
    }
    // Into the burst: at least one reclaim done, more pending.
    wait_until("a first reclaim", || {
        ledger_records(&d.ledger)
            .iter()
            .any(|r| r.outcome == Outcome::Reclaimed)
    });
    let ledger = d.ledger.clone();
    d.kill9();
    let dead_at_crash: Vec<u32> = workers.iter().copied().filter(|w| !alive(*w)).collect();
    let before = ledger_records(&ledger);
    assert!(
        dead_at_crash.len() < N,
        "the crash came after the burst: {before:#?}"
    );
    // Every worker already signalled has its decision in the ledger (written first).
    for w in &dead_at_crash {
        assert!(
            before.iter().any(|r| r.decision.pid == *w),
            "worker {w} was killed with no ledger record: {before:#?}"
        );
    }

    let d = daemon.start();
    wait_until("every worker reclaimed after the restart", || {
        let recs = ledger_records(&ledger);
        workers.iter().all(|w| {
            !alive(*w)
                && recs
                    .iter()
                    .any(|r| r.decision.pid == *w && r.outcome == Outcome::Reclaimed)
        })
    });
    let after = ledger_records(&ledger);
    assert!(
        after.iter().all(|r| r.outcome != Outcome::Pending),
        "a decision left pending by the crash is marked interrupted: {after:#?}"
    );
    for r in &before {
        assert!(
            after.iter().any(|a| a.id == r.id),
            "record {} survived the crash",
            r.id
        );
    }
    assert!(alive(by_worker), "the bystander is never signalled");
    assert!(after.iter().all(|r| r.decision.pid != by_worker));
    d.stop();
    kill(by_worker);
    let _ = bystander.finish();
    for (s, _) in services {
        let _ = s.finish();
    }
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount a tmpfs at {}", dir.display());
        Self { dir }
    }

    /// Writes zeros until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn status_of(gpu: &FakeGpu) -> serde_json::Value {
    reclaimctl_json(gpu, &["status"])
}

#[test]
fn a_full_ledger_disk_stops_action_says_so_and_resumes_when_space_is_back() {
    let gpu = FakeGpu::new(DEVICE);
    let disk = SmallDisk::mount(gpu.dir.path().join("ledgerfs"), "1m");
    let ledger = disk.dir.join("ledger.db");
    let mut d = enforce(&gpu)
        .policy("sweep", "300ms")
        .ledger(&ledger)
        .start();
    let device = gpu.device_file(0);
    let (server, worker) = spawn_server(&workload(), "llm-server", device.to_str().unwrap(), &[]);
    gpu.set_state(&format!("{DEVICE}\nproc 0 {worker} 1024 compute\n"));
    std::thread::sleep(Duration::from_millis(600));
    let filler = disk.fill();

    kill(server.pid());
    d.wait_log("ledger write failed", WAIT);
    // The executor logs the failure before the engine takes its result back: status says
    // so a moment later.
    let mut s = serde_json::Value::Null;
    wait_until("status names the ledger error", || {
        s = status_of(&gpu);
        s["ledger_error"].as_str().is_some_and(|e| !e.is_empty())
    });
    let why = s["ledger_error"].as_str().unwrap_or_default();
    assert!(why.contains("full"), "{s}");
    // Invariant 3: not recorded, so not done; a few sweeps later, still not done.
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(worker), "no action the ledger could not record");
    assert!(alive(d.pid()), "the daemon keeps running");
    let url = format!("http://127.0.0.1:{}/metrics", Daemon::metrics_port(&gpu));
    let metrics = ureq::get(&url).call().unwrap().into_string().unwrap();
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("reclaimd_ledger_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("reclaimd_ledger_errors_total");
    assert!(errors >= 2.0, "retried each sweep: {errors}");
    // An operator's request is refused the same way, and says why (asked again if it
    // meets the automatic retry in flight).
    let mut said = String::new();
    for _ in 0..20 {
        let asked = Command::new(reclaimd_tests::reclaimctl_bin())
            .arg("--socket")
            .arg(Daemon::api_socket(&gpu))
            .args([
                "reclaim",
                "--pid",
                &worker.to_string(),
                "--reason",
                "disk full test",
            ])
            .output()
            .expect("reclaimctl reclaim");
        assert!(!asked.status.success());
        said = String::from_utf8_lossy(&asked.stderr).into_owned();
        if !said.contains("being reclaimed already") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(said.contains("ledger cannot record"), "{said}");
    assert!(alive(worker));

    std::fs::remove_file(filler).unwrap();
    let r = wait_for_record(&ledger, worker, WAIT);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(!alive(worker));
    // The record is written before the engine hears of it: the error clears a moment later.
    wait_until("status clears the ledger error", || {
        status_of(&gpu)["ledger_error"] == ""
    });
    d.stop();
    let _ = server.finish();
    drop(disk);
}

#[test]
fn nvml_failing_mid_run_then_back_loses_no_orphan() {
    let gpu = FakeGpu::new(DEVICE);
    let mut d = enforce(&gpu).start();
    let device = gpu.device_file(0);
    let (server, worker) = spawn_server(&workload(), "llm-server", device.to_str().unwrap(), &[]);
    let listed = format!("{DEVICE}\nproc 0 {worker} 1024 compute\n");
    gpu.set_state(&listed);
    std::thread::sleep(Duration::from_millis(600));
    // The GPU falls off the bus (NVML_ERROR_GPU_IS_LOST), then its server dies.
    gpu.set_state(&format!("{listed}fail nvmlDeviceGetMemoryInfo_v2 15\n"));
    d.wait_log("NVML unavailable", WAIT);
    kill(server.pid());
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(d.pid()));
    assert_eq!(status_of(&gpu)["nvml_available"], false);
    gpu.set_state(&listed);
    d.wait_log("NVML available again", WAIT);
    let r = wait_for_record(&d.ledger, worker, WAIT);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(!alive(worker));
    d.stop();
    let _ = server.finish();
}

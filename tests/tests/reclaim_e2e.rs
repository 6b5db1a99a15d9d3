//! `reclaimd run` end to end: real eBPF programs in this kernel, real processes holding
//! (fake) GPU device files, the fake NVML library, and the ledger. Root only.
use std::{process::Command, time::Duration};

use reclaimd::ledger::{Action, Outcome};
use reclaimd_tests::{
    Daemon, FakeGpu, TwoConnections, Workload, alive, connection_service, free_port, holder_listed,
    kill, ledger_records, llm_service, reclaimctl_json, reclaimd_bin, spawn_server,
    wait_for_record, wait_until_bound,
};

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const WAIT: Duration = Duration::from_secs(20);
const DEVICE: &str = "device 0 GPU-e2e 16384 Fake H100";

/// A service server with one GPU worker listed in NVML with `mib`.
struct Service {
    server: Workload,
    worker: u32,
}

fn start_service(gpu: &FakeGpu, name: &str, mib: u64, extra: &[&str]) -> Service {
    let device = gpu.device_file(0);
    let (server, worker) = spawn_server(&workload(), name, device.to_str().unwrap(), extra);
    let listed = if extra.contains(&"inherit") {
        server.pid() // the driver lists the creator, not the child that inherited the fd
    } else {
        worker
    };
    gpu.set_state(&format!("{DEVICE}\nproc 0 {listed} {mib} compute\n"));
    Service { server, worker }
}

/// Kills the server of `s` once the daemon has bound its worker; the worker's settled record.
fn kill_server_and_wait(gpu: &FakeGpu, d: &Daemon, s: &Service) -> reclaimd::ledger::Record {
    wait_until_bound(gpu, &[s.worker]);
    kill(s.server.pid());
    wait_for_record(&d.ledger, s.worker, WAIT)
}

/// Waits for `pid` to be gone, at most `limit`.
fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A daemon for `gpu` with the `llm` service, in enforce mode with grace 0 unless changed.
fn enforce(gpu: &FakeGpu) -> reclaimd_tests::DaemonBuilder {
    Daemon::builder(gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .service(llm_service())
}

#[test]
fn enforce_reclaims_the_worker_of_a_killed_server() {
    let gpu = FakeGpu::new(DEVICE);
    let d = enforce(&gpu).start();
    // With eBPF on every kernel of the matrix, not the fallback: process deaths and TCP
    // closes come from the programs.
    let status = reclaimctl_json(&gpu, &["status"]);
    assert_eq!(status["probe_mode"], "ebpf", "{status}");
    let source = |name: &str| {
        status["capabilities"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .map(|c| c["source"].clone())
    };
    for cap in ["exit", "fork", "tcp"] {
        assert_eq!(source(cap), Some("ebpf".into()), "{cap}: {status}");
    }
    // One owner program: at the first send or receive where the kernel has it (6.3), at
    // accept before; owner:accept is then left out, to the snapshot.
    let owner = if source("owner:io") == Some("ebpf".into()) {
        assert_eq!(source("owner:accept"), Some("snapshot".into()), "{status}");
        "owner:io"
    } else {
        "owner:accept"
    };
    assert_eq!(source(owner), Some("ebpf".into()), "{owner}: {status}");
    let s = start_service(&gpu, "llm-server", 2048, &[]);
    let r = kill_server_and_wait(&gpu, &d, &s);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(!alive(s.worker));
    let res = r.resolution.as_ref().unwrap();
    assert_eq!(res.bytes_freed, Some(2048 << 20));
    assert!(res.time_to_reclaim_ms.is_some_and(|ms| ms >= 0), "{res:?}");
    assert!(res.detail.contains("SIGTERM"), "{res:?}");
    assert!(res.detail.contains("verified"), "{res:?}");
    assert_eq!(r.decision.service, "llm");
    assert_eq!(r.decision.session_kind, "process");
    assert_eq!(r.decision.comm, "gpu-worker");
    assert_eq!(r.decision.gpu_uuid, "GPU-e2e");
    assert_eq!(r.decision.bytes, Some(2048 << 20));
    assert_eq!(r.decision.death_cause, "killed by signal 9");
    assert!(
        r.decision.cgroup.starts_with('/'),
        "{:?}",
        r.decision.cgroup
    );
    let _ = s.server.finish();
    d.stop();
}

#[test]
fn report_mode_records_and_signals_nothing() {
    let gpu = FakeGpu::new(DEVICE);
    // Report is the default: no mode line at all.
    let d = Daemon::builder(&gpu)
        .policy("grace", "0s")
        .service(llm_service())
        .start();
    let s = start_service(&gpu, "llm-server", 512, &[]);
    let r = kill_server_and_wait(&gpu, &d, &s);
    assert_eq!(r.outcome, Outcome::Skipped);
    assert_eq!(r.decision.action, Action::Skip);
    assert_eq!(r.decision.reason, "report mode");
    std::thread::sleep(Duration::from_millis(600)); // several sweeps
    assert!(alive(s.worker), "report mode signalled the worker");
    assert_eq!(
        ledger_records(&d.ledger).len(),
        1,
        "decided once, not once per sweep"
    );
    d.stop();
    let _ = s.server.finish();
}

#[test]
fn a_child_holding_an_inherited_handle_is_reclaimed_not_its_dead_creator() {
    let gpu = FakeGpu::new(DEVICE);
    let d = enforce(&gpu).start();
    let s = start_service(&gpu, "llm-server", 1024, &["inherit"]);
    let server_pid = s.server.pid();
    wait_until_bound(&gpu, &[s.worker]);
    // From here the driver lists no one (the creator is dying; the child is not mapped),
    // and the memory stays held through the worker's inherited fd until it exits.
    gpu.set_state(&format!(
        "{DEVICE}\nunattributed 0 1024 while {}\n",
        s.worker
    ));
    kill(server_pid);
    let r = wait_for_record(&d.ledger, s.worker, WAIT);
    assert!(!alive(s.worker));
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert_eq!(
        r.resolution.as_ref().unwrap().bytes_freed,
        Some(1024 << 20),
        "{r:#?}"
    );
    assert!(
        ledger_records(&d.ledger)
            .iter()
            .all(|r| r.decision.pid != server_pid),
        "nothing may be decided about the dead creator's pid: {:#?}",
        ledger_records(&d.ledger)
    );
    d.stop();
    let _ = s.server.finish();
}

#[test]
fn a_worker_ignoring_sigterm_gets_sigkill() {
    let gpu = FakeGpu::new(DEVICE);
    let d = enforce(&gpu).policy("term_grace", "300ms").start();
    let s = start_service(&gpu, "llm-server", 256, &["ignore-term"]);
    let r = kill_server_and_wait(&gpu, &d, &s);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    let detail = &r.resolution.unwrap().detail;
    assert!(detail.contains("SIGKILL"), "{detail}");
    assert!(!alive(s.worker));
    d.stop();
    let _ = s.server.finish();
}

#[test]
fn a_worker_that_lets_go_by_itself_is_released_not_reclaimed() {
    let gpu = FakeGpu::new(DEVICE);
    // The grace only has to outlast the wait for "pending" below: the worker lets go as soon
    // as that is seen, so a long one costs nothing, and a short one (3 s) was missed in
    // software-emulated VMs, where each reclaimctl call alone takes a good part of a second.
    let d = enforce(&gpu).policy("grace", "15s").start();
    let s = start_service(&gpu, "llm-server", 256, &[]);
    wait_until_bound(&gpu, &[s.worker]);
    kill(s.server.pid());
    let worker = s.worker;
    // Only a holder the daemon saw orphaned-in-waiting can be recorded as letting go: on a
    // loaded machine the first snapshot after the death may come late.
    wait_for_verdict(&gpu, worker, "pending");
    let _ = s.server.finish(); // closes stdin: the worker exits within the grace period
    assert!(gone_within(worker, WAIT));
    let r = wait_for_record(&d.ledger, worker, WAIT);
    assert_eq!(r.outcome, Outcome::Released, "{r:#?}");
    assert_eq!(r.decision.action, Action::None);
    d.stop();
}

#[test]
fn outsiders_and_protected_holders_are_never_signalled() {
    let gpu = FakeGpu::new(DEVICE);
    let d = enforce(&gpu).policy("protect", vec!["gpu-worker"]).start();
    // Protected: a real orphan of the service, on the protect list.
    let s = start_service(&gpu, "llm-server", 256, &[]);
    // Outsider: holds a device file and NVML memory, belongs to no service.
    let outsider = Workload::spawn(&workload(), &["hold", gpu.device_file(0).to_str().unwrap()]);
    outsider.line("holding");
    gpu.set_state(&format!(
        "{DEVICE}\nproc 0 {} 256 compute\nproc 0 {} 128 compute\n",
        s.worker,
        outsider.pid()
    ));
    let r = kill_server_and_wait(&gpu, &d, &s);
    assert_eq!(r.outcome, Outcome::Skipped);
    assert_eq!(r.decision.reason, "protected (gpu-worker)");
    std::thread::sleep(Duration::from_millis(800));
    assert!(alive(s.worker));
    assert!(alive(outsider.pid()));
    assert!(
        ledger_records(&d.ledger)
            .iter()
            .all(|r| r.decision.pid != outsider.pid()),
        "an outsider is observed, never decided about"
    );
    d.stop();
    let _ = s.server.finish();
    let _ = outsider.finish();
}

#[test]
fn the_breaker_trips_on_a_flood() {
    let gpu = FakeGpu::new(DEVICE);
    let d = enforce(&gpu).policy("max_reclaims_per_minute", 2).start();
    let services: Vec<Service> = (0..4)
        .map(|_| start_service(&gpu, "llm-server", 64, &[]))
        .collect();
    let state: String = services
        .iter()
        .map(|s| format!("proc 0 {} 64 compute\n", s.worker))
        .collect();
    gpu.set_state(&format!("{DEVICE}\n{state}"));
    wait_until_bound(&gpu, &services.iter().map(|s| s.worker).collect::<Vec<_>>());
    for s in &services {
        kill(s.server.pid());
    }
    let records: Vec<_> = services
        .iter()
        .map(|s| wait_for_record(&d.ledger, s.worker, WAIT))
        .collect();
    let reclaimed = records
        .iter()
        .filter(|r| r.outcome == Outcome::Reclaimed)
        .count();
    let tripped: Vec<_> = records
        .iter()
        .filter(|r| r.decision.reason == "breaker tripped")
        .collect();
    assert_eq!(reclaimed, 2, "{records:#?}");
    assert_eq!(tripped.len(), 2, "{records:#?}");
    for r in tripped {
        assert!(alive(r.decision.pid), "a tripped breaker signals nothing");
    }
    let mut d = d;
    d.wait_log("breaker tripped", WAIT);
    d.stop();
    for s in services {
        let _ = s.server.finish();
    }
}

#[test]
fn a_death_whose_event_was_lost_is_found_by_the_sweep() {
    let gpu = FakeGpu::new(DEVICE);
    let mut d = enforce(&gpu).set("probe", "ring_bytes", 4096).start();
    let s = start_service(&gpu, "llm-server", 256, &[]);
    wait_until_bound(&gpu, &[s.worker]);
    // With the daemon stopped, a flood fills the 4 KiB ring; the server's exit comes after
    // it, so the kernel must drop that event: only the resync can see this death.
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(d.pid() as i32, libc::SIGSTOP) };
    let flood = Workload::spawn(&workload(), &["flood", "2000"]);
    let _ = flood.finish();
    kill(s.server.pid());
    // A signal is acted on when its target next runs: wait until the server has really
    // exited (a zombie: past the exit tracepoint) before the daemon may read again.
    assert!(gone_within(s.server.pid(), WAIT), "the server did not die");
    // SAFETY: as above.
    unsafe { libc::kill(d.pid() as i32, libc::SIGCONT) };
    let r = wait_for_record(&d.ledger, s.worker, WAIT);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(
        r.decision.death_cause.starts_with("gone"),
        "the death must come from the scan, not an event: {r:#?}"
    );
    assert!(!alive(s.worker));
    d.wait_log("kernel events lost", WAIT);
    d.stop();
    let _ = s.server.finish();
}

#[test]
fn without_nvml_the_daemon_runs_says_so_once_and_recovers() {
    // Driver not loaded: every NVML init fails with NVML_ERROR_DRIVER_NOT_LOADED.
    let gpu = FakeGpu::new(&format!("{DEVICE}\nfail nvmlInit_v2 9\n"));
    let mut d = Daemon::builder(&gpu).service(llm_service()).start();
    d.wait_log("NVML unavailable", WAIT);
    std::thread::sleep(Duration::from_millis(2500)); // a dozen sweeps, two retries
    d.drain_log();
    let said = d
        .log
        .iter()
        .filter(|l| l.contains("NVML unavailable"))
        .count();
    assert_eq!(said, 1, "said once, not per retry:\n{}", d.log.join("\n"));
    assert!(
        d.log.iter().any(|l| l.contains("driver is not loaded")),
        "{}",
        d.log.join("\n")
    );
    gpu.set_state(DEVICE);
    d.wait_log("NVML available again", WAIT);
    d.stop();
}

#[test]
fn connection_scope_reclaims_the_worker_of_a_closed_connection_only() {
    let gpu = FakeGpu::new(DEVICE);
    let port = free_port();
    let d = Daemon::builder(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .service(connection_service("api", "api-server", &[port]))
        .start();
    let addr = format!("127.0.0.1:{port}");
    let TwoConnections {
        server,
        stay,
        w_stay,
        leave,
        w_leave,
    } = TwoConnections::open(&gpu, DEVICE, &workload(), "api-server", &addr);
    wait_until_bound(&gpu, &[w_stay, w_leave]);
    drop(leave);
    let r = wait_for_record(&d.ledger, w_leave, WAIT);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert_eq!(r.decision.session_kind, "connection");
    assert!(r.decision.death_cause.contains("CLOSE_WAIT"), "{r:#?}");
    assert_eq!(r.resolution.unwrap().bytes_freed, Some(200 << 20));
    std::thread::sleep(Duration::from_millis(600));
    assert!(alive(w_stay), "the worker of a live connection is kept");
    assert!(alive(server.pid()), "the server is never an orphan");
    assert!(
        ledger_records(&d.ledger)
            .iter()
            .all(|r| r.decision.pid != w_stay)
    );
    drop(stay);
    let log = d.stop();
    // The connections were looked up through sock_diag (loaded on demand where it is a
    // module), not the /proc/net/tcp fallback.
    assert!(
        !log.iter().any(|l| l.contains("sock_diag lookup failed")),
        "{log:#?}"
    );
    // The workers share the server's stdout: end them first, or finish() waits for EOF.
    kill(w_stay);
    kill(server.pid());
    let _ = server.finish();
}

#[test]
fn after_a_restart_orphans_are_found_again_and_the_ledger_is_kept() {
    let gpu = FakeGpu::new(DEVICE);
    let daemon = enforce(&gpu);
    let d = daemon.clone().start();
    // A first reclaim, so the ledger has a record before the crash.
    let first = start_service(&gpu, "llm-server", 64, &[]);
    let r = kill_server_and_wait(&gpu, &d, &first);
    assert_eq!(r.outcome, Outcome::Reclaimed);
    let _ = first.server.finish();

    // A second service is seen (and its lineage remembered), then the daemon dies.
    let s = start_service(&gpu, "llm-server", 128, &[]);
    wait_until_bound(&gpu, &[s.worker]);
    d.kill9();
    // While reclaimd is down, the server dies: its worker is reparented.
    kill(s.server.pid());
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(s.worker));

    let d = daemon.start();
    let r = wait_for_record(&d.ledger, s.worker, WAIT);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(!alive(s.worker));
    let all = ledger_records(&d.ledger);
    assert!(
        all.iter()
            .any(|r| r.decision.pid == first.worker && r.outcome == Outcome::Reclaimed)
    );
    d.stop();
    let _ = s.server.finish();
}

#[test]
fn an_invalid_config_is_refused_with_key_and_line() {
    let dir = reclaimd_tests::TempDir::new("bad-config");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[policy]\nmode = \"enforce\"\ngrace = \"soon\"\n").unwrap();
    let out = Command::new(reclaimd_bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.grace") && err.contains("line 3"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `[[service]]` named by its command line alone, as `python3 -m vllm…` is: its comm and
/// exe are the interpreter's.
#[test]
fn a_service_matched_by_its_command_line_alone_is_reclaimed_when_its_root_dies() {
    let gpu = FakeGpu::new(DEVICE);
    let mut vllm = toml::Table::new();
    let mut matcher = toml::Table::new();
    matcher.insert("cmdline".into(), r"--model=e2e-cmdline-\w+".into());
    vllm.insert("name".into(), "vllm".into());
    vllm.insert("match".into(), matcher.into());
    let d = Daemon::builder(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .service(vllm)
        .start();
    let bystander = start_service(&gpu, "python3", 0, &["--model=other"]);
    let s = start_service(&gpu, "python3", 1024, &["--model=e2e-cmdline-llama"]);
    wait_until_bound(&gpu, &[s.worker]);
    // A forked worker keeps its server's command line: it matches by itself.
    assert_matched(&gpu, s.worker, "cmdline", s.worker);
    let r = kill_server_and_wait(&gpu, &d, &s);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert_eq!(r.decision.service, "vllm");
    assert!(!alive(s.worker));
    assert!(
        alive(bystander.worker),
        "a python3 of another command line is left alone"
    );
    let _ = bystander.server.finish();
    let _ = s.server.finish();
    d.stop();
}

/// A server that names itself after exec (setproctitle, prctl(PR_SET_NAME)) once its worker
/// runs: the service matches the new title.
#[test]
fn a_service_matched_by_a_title_set_after_exec_is_reclaimed_when_its_root_dies() {
    let gpu = FakeGpu::new(DEVICE);
    let d = Daemon::builder(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .service(reclaimd_tests::service("sglang", "sglang::sched"))
        .start();
    let s = start_service(&gpu, "python3", 1024, &["rename=sglang::sched"]);
    assert_eq!(s.server.line("renamed"), "");
    wait_until_bound(&gpu, &[s.worker]);
    assert_matched(&gpu, s.worker, "comm", s.server.pid());
    let r = kill_server_and_wait(&gpu, &d, &s);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert_eq!(r.decision.service, "sglang");
    assert!(!alive(s.worker));
    let _ = s.server.finish();
    d.stop();
}

/// The verdict reclaimctl lists for `pid`, if it is a holder.
fn verdict_of(gpu: &FakeGpu, pid: u32) -> Option<String> {
    let h = holder_listed(gpu, pid)?;
    Some(h["verdict"].as_str().unwrap_or("").to_owned())
}

/// Asserts that reclaimctl says `by` on process `on` made `pid` its service's.
fn assert_matched(gpu: &FakeGpu, pid: u32, by: &str, on: u32) {
    let h = holder_listed(gpu, pid).expect("listed");
    assert_eq!(
        (h["matched_by"].as_str(), h["matched_pid"].as_u64()),
        (Some(by), Some(u64::from(on))),
        "{h}"
    );
}

/// Waits until reclaimctl lists `pid` with `verdict`; how long that took.
fn wait_for_verdict(gpu: &FakeGpu, pid: u32, verdict: &str) -> Duration {
    let since = std::time::Instant::now();
    while verdict_of(gpu, pid).as_deref() != Some(verdict) {
        let now = verdict_of(gpu, pid);
        assert!(since.elapsed() < WAIT, "never {verdict}: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    since.elapsed()
}

/// With no `[[service]]` at all, the worker of a SIGKILLed server (reparented, still
/// holding GPU memory) is listed as a suspect within a few sweeps and never signalled.
#[test]
fn with_no_service_a_reparented_holder_is_a_suspect_and_is_left_alone() {
    let gpu = FakeGpu::new(DEVICE);
    let d = Daemon::builder(&gpu).policy("grace", "0s").start();
    let s = start_service(&gpu, "llm-server", 512, &[]);
    wait_for_verdict(&gpu, s.worker, "unmanaged");
    kill(s.server.pid());
    let took = wait_for_verdict(&gpu, s.worker, "suspect");
    println!("suspect {} ms after the SIGKILL", took.as_millis());
    std::thread::sleep(Duration::from_secs(2)); // ten sweeps
    assert!(
        alive(s.worker),
        "a suspect is reported, never signalled by default"
    );
    assert_eq!(verdict_of(&gpu, s.worker).as_deref(), Some("suspect"));
    assert!(
        ledger_records(&d.ledger).is_empty(),
        "nothing decided about it"
    );
    kill(s.worker);
    let _ = s.server.finish();
    d.stop();
}

/// `[policy] suspects = "enforce"`: the suspect is reclaimed through the ledger, as an
/// orphan would be.
#[test]
fn suspects_enforced_are_reclaimed() {
    let gpu = FakeGpu::new(DEVICE);
    let d = Daemon::builder(&gpu)
        .policy("grace", "0s")
        .policy("suspects", "enforce")
        .start();
    let s = start_service(&gpu, "llm-server", 512, &[]);
    wait_for_verdict(&gpu, s.worker, "unmanaged");
    kill(s.server.pid());
    let r = wait_for_record(&d.ledger, s.worker, WAIT);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert_eq!(r.decision.action, Action::Reclaim);
    assert!(
        r.decision.reason.starts_with("suspect: "),
        "{}",
        r.decision.reason
    );
    assert!(
        r.decision
            .death_cause
            .contains("killed by signal 9; reparented to"),
        "{}",
        r.decision.death_cause
    );
    assert!(!alive(s.worker));
    let _ = s.server.finish();
    d.stop();
}

/// A server with 60 GPU holders dies: 40 workers, 20 of them with a leaf of their own that
/// ignores SIGTERM (so it takes the term grace to die). The pool reclaims them all, in
/// parallel, and no worker is signalled before its leaf is gone:
/// each worker with a leaf says on SIGTERM whether it had already reaped it, and the
/// ledger's times say the same (invariant 8).
#[test]
fn a_burst_of_orphans_is_reclaimed_in_parallel_leaves_first() {
    let gpu = FakeGpu::new(DEVICE);
    let d = enforce(&gpu)
        .policy("max_reclaims_per_minute", 1000)
        .policy("term_grace", "1s")
        // More than the leaves: workers could start beside them, and must not if theirs.
        .policy("parallel", 32)
        .start();
    let burst = reclaimd_tests::Burst::start(&gpu, DEVICE, &workload(), 40, &["slow-leaves"]);
    let holders = burst.holders();
    assert_eq!((burst.workers.len(), burst.leaves.len()), (40, 20));
    wait_until_bound(&gpu, &holders);
    kill(burst.server.pid());
    let records: std::collections::HashMap<u32, reclaimd::ledger::Record> = holders
        .iter()
        .map(|&p| (p, wait_for_record(&d.ledger, p, Duration::from_secs(60))))
        .collect();
    for (pid, r) in &records {
        assert_eq!(r.outcome, Outcome::Reclaimed, "pid {pid}: {r:#?}");
        assert!(!alive(*pid), "pid {pid} reclaimed but alive");
    }
    for (leaf, worker) in &burst.leaves {
        let leaf_done = records[leaf].resolution.as_ref().expect("resolved").time_ms;
        let worker_decided = records[worker].decision.time_ms;
        assert!(
            leaf_done <= worker_decided,
            "worker {worker} decided at {worker_decided} before its leaf {leaf} was done at {leaf_done}"
        );
    }
    // Every worker with a leaf said, on its SIGTERM, that the leaf was gone already.
    let mut said = Vec::new();
    while said.len() < burst.leaves.len() {
        said.push(burst.server.any_line());
    }
    let mut expected: Vec<String> = burst
        .leaves
        .iter()
        .map(|(_, w)| format!("term {w} leaf-gone"))
        .collect();
    said.sort();
    expected.sort();
    assert_eq!(said, expected);
    d.stop();
    let _ = burst.server.finish();
}

/// The server is killed before the daemon reads the fork of its worker (the daemon is
/// stopped meanwhile, so /proc no longer has the server when the event is read): the worker
/// is bound through the fork record, which names the server as it forked (it renamed itself
/// after exec, as a Python server sets its title) and says when it started. An orphan of
/// its service, not a suspect.
#[test]
fn a_worker_whose_server_dies_before_its_fork_is_read_is_reclaimed() {
    let gpu = FakeGpu::new(DEVICE);
    let d = enforce(&gpu).start();
    for _ in 0..3 {
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(d.pid() as i32, libc::SIGSTOP) };
        let s = start_service(&gpu, "llm-server", 128, &[]);
        kill(s.server.pid());
        assert!(gone_within(s.server.pid(), WAIT), "the server did not die");
        // SAFETY: as above.
        unsafe { libc::kill(d.pid() as i32, libc::SIGCONT) };
        let r = wait_for_record(&d.ledger, s.worker, WAIT);
        assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
        assert_eq!(r.decision.service, "llm", "{r:#?}");
        assert_eq!(r.decision.death_cause, "killed by signal 9", "{r:#?}");
        let _ = s.server.finish();
    }
    d.stop();
}
